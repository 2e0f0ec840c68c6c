"""The command-line adapter: the only part of the package that imports the indexer and the API.

Each command parses its options, calls one library function and prints the result.
"""

from retrieval.cli.app import app, run

__all__ = ["app", "run"]
