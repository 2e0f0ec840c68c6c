"""The indexer's side of `retrieval.Index.update`: registered in pyproject.toml under the entry-point
group `retrieval.updaters` as "local", so the core reaches it by name without importing the indexer."""

from __future__ import annotations

from pathlib import Path

from retrieval.indexer.pipeline import IndexOptions, IndexSummary, run_index
from retrieval.settings import Settings


def update(corpus: Path | str, settings: Settings, *, rebuild: bool = False, retry_failed: bool = False,
           index_factory: str | None = None, progress: bool = True) -> IndexSummary:
    """Index (or update the index of) `corpus` in this process: DataLoader workers, writer thread."""
    return run_index(IndexOptions(corpus=corpus, settings=settings, rebuild=rebuild,
                                  retry_failed=retry_failed, index_factory=index_factory, progress=progress))
