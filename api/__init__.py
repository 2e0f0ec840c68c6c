"""The HTTP API (FastAPI). Built in the Query API issue; the indexer issue only reserves the package."""
