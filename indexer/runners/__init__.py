"""Runners drive the index update's stages (retrieval.indexer.stages): local (this process) and ray (a cluster)."""
