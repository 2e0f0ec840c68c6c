"""What an index update is asked to do (IndexOptions) and what it did (IndexSummary), shared by the
pipeline and its runners."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from retrieval.settings import Settings


@dataclass
class IndexOptions:
    corpus: Path | str  # a folder, a URL prefix, a list or shards (retrieval.sources.open_source)
    settings: Settings
    rebuild: bool = False
    retry_failed: bool = False
    index_factory: str | None = None
    progress: bool = True
    ray: str | None = None  # a Ray cluster address: retrieval.indexer.runners.ray decodes and embeds there


@dataclass
class IndexSummary:
    corpus: str
    index_dir: str
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    touched: int = 0
    removed: int = 0
    failed: int = 0
    known_failures: int = 0
    total_images: int = 0
    elapsed_s: float = 0.0
    images_per_s: float = 0.0
    index_type: str | None = None
    index_factory: str | None = None
    nprobe: int | None = None
    recall_at_10: float | None = None
    index_rebuilt: bool = False
    index_changed: bool = False
    model: str = ""
    copy_model: str | None = None
    copy_embedded: int = 0  # images given a copy vector by this run (new, changed and added-later)
    copy_index_type: str | None = None
    device: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    failure_kinds: dict[str, int] = field(default_factory=dict)
