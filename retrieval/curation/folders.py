"""Embed a folder (or any retrieval.sources source) that is not part of the corpus (reference set,
query set), recording broken files.

Reuses the indexer's scanner and decoder; files are decoded in DataLoader workers and embedded
in batches, exactly as the indexer does, so the vectors are comparable with the stored ones. A
file that crashes a decode worker is a failure like any other (see retrieval.imaging.loader); with
`workers=0` a decoder crash still ends the process, as there is no later run to resume.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.imaging.decode import DecodeSpec, WorkItem
from retrieval.imaging.inflight import InflightMarkers
from retrieval.imaging.loader import decode_batches
from retrieval.imaging.scan import scan_corpus
from retrieval.settings import get_settings
from retrieval.sources.open import open_aux_source

logger = logging.getLogger(__name__)


@dataclass
class FolderEmbedding:
    """Vectors of the usable files of a folder (scan order, unless a decoder crashed), and the failures with reasons."""

    root: Path | str  # a folder's resolved path, or the source's URI
    paths: list[str] = field(default_factory=list)  # relative to a folder root; URIs for other sources
    vectors: np.ndarray = field(default_factory=lambda: np.empty((0, 0), np.float32))
    sha256: list[str] = field(default_factory=list)
    phash: list[int] = field(default_factory=list)  # unsigned 64-bit
    pdq: list[bytes | None] = field(default_factory=list)  # 8 dihedral PDQ hashes (retrieval.imaging.hashes)
    failures: list[dict[str, str]] = field(default_factory=list)

    def full_path(self, path: str) -> str:
        """Where a file of the set is: under the folder, or its URI as it stands."""
        return str(self.root / path) if isinstance(self.root, Path) else path


def embed_folder(folder: Path | str, embedder: Any, max_pixels: int, batch_size: int = 32, workers: int = 0,
                 progress: bool = False, what: str = "folder", copy: Any = None) -> FolderEmbedding:
    """Embed every image under `folder` (any source); unreadable or broken files are recorded, never fatal.

    With `copy` (a retrieval.embedding.copy.CopyEmbedder) the vectors are the copy role's and
    `embedder` is not used.
    """
    import tempfile
    from contextlib import closing

    from tqdm import tqdm

    source = open_aux_source(folder, what)
    entries = list(source.scan())
    out = FolderEmbedding(root=source.local_root.resolve() if source.local_root is not None else source.uri)
    items = [WorkItem(path=e.path, size=e.size, mtime_ns=e.mtime_ns, etag=e.etag, meta=e.meta) for e in entries]
    parts: list[np.ndarray] = []
    spec = embedder.preprocess if copy is None else DecodeSpec(search=None, copy=copy.prepare)
    with tempfile.TemporaryDirectory(prefix="retrieval-decoding-") as tmp, InflightMarkers(tmp) as markers, \
            closing(source.decode_stream(items, lambda reader, part: decode_batches(
                reader, part, spec, max_pixels, batch_size, workers, markers,
                timeout_s=get_settings().decode_timeout_s or None))) as batches, \
            tqdm(total=len(items), unit="img", desc=f"embedding {what}", disable=not progress) as bar:
        for results, pixels in batches:
            good = [r for r in results if r.embeddable]
            for r in results:
                if r.failure_reason is not None:
                    out.failures.append({"path": r.item.path, "kind": r.failure_kind or "corrupt",
                                         "reason": r.failure_reason})
            if copy is not None:
                good = [r for r in good if r.copy_pixels is not None]
            if good:
                parts.append(embedder.embed(pixels) if copy is None else copy.embed_many([r.copy_pixels for r in good]))
                out.pdq += [r.pdq for r in good]
                out.paths += [r.item.path for r in good]
                out.sha256 += [r.sha256 or "" for r in good]
                out.phash += [r.phash for r in good]
            bar.update(len(results))
    out.vectors = np.concatenate(parts) if parts else np.empty((0, (copy or embedder).dim), np.float32)
    for f in out.failures:
        logger.warning("%s file %s skipped: %s", what, f["path"], f["reason"])
    return out


def folder_content(folder: Path | str) -> list[tuple[str, str]]:
    """(relative path, sha256 of the bytes) of every file `embed_folder` would see, in scan order.

    The identity of a query or reference set for reusing a stored run: touching or moving the
    folder keeps it, editing, adding, removing or renaming a file changes it. Unreadable files
    hash as "unreadable" (they are failures either way). Other sources are not read: their listing
    (path, size, ETag or mtime) stands for their content.
    """
    source = open_aux_source(folder, "query")
    if source.local_root is None:
        return [(e.path, f"{e.size}:{e.etag or e.mtime_ns}") for e in source.scan()]
    folder = Path(folder)
    out: list[tuple[str, str]] = []
    for e in scan_corpus(folder):
        try:
            with open(folder / e.path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError:
            digest = "unreadable"
        out.append((e.path, digest))
    return out
