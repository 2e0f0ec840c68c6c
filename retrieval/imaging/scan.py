"""Walk a corpus and list candidate image files, in a deterministic order.

A file is a candidate when its extension is an image extension or, failing that, its first bytes
are an image signature (so `IMG_0001` without extension is found, and `notes.txt` is not opened
beyond 16 bytes). Hidden files and folders (".*") and the index directory are skipped. Symlinked
files are followed only when they resolve inside the corpus; symlinked folders are never followed
(they can loop, and they would index the same files twice).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from retrieval.errors import CorpusError
from retrieval.imaging.signatures import looks_like_image
from retrieval.layout import is_within

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".webp", ".bmp", ".dib", ".tif", ".tiff",
     ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".avif", ".jp2", ".j2k", ".jpx", ".qoi", ".sgi", ".pcx"}
)
# Extensions that are certainly not images; we do not even sniff their first bytes.
NON_IMAGE_EXTENSIONS = frozenset(
    {".txt", ".md", ".json", ".csv", ".xml", ".html", ".py", ".db", ".sqlite", ".zip", ".gz", ".tar", ".pdf",
     ".mp4", ".mov", ".avi", ".mkv", ".mp3", ".wav", ".log", ".yaml", ".yml", ".parquet", ".npy", ".faiss"}
)

@dataclass(frozen=True)
class ScanEntry:
    """One candidate file: its corpus-relative POSIX path (a URI for remote sources) and what stat() says.

    `etag` is the object store's content tag (None for local files); `meta` the columns of a list or
    the sidecars of a shard member, kept with the image.
    """

    path: str
    size: int
    mtime_ns: int
    etag: str | None = None
    meta: dict[str, Any] | None = None


def _sniff(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return looks_like_image(f.read(16))
    except OSError:
        return False


def scan_corpus(root: Path, exclude: tuple[Path, ...] = ()) -> Iterator[ScanEntry]:
    """Yield every candidate image under `root`, depth first with names sorted (deterministic).

    Files that cannot be stat'ed are yielded with size -1 so the pipeline records a failure
    instead of silently dropping them.
    """
    root = Path(root)
    if not root.exists():
        raise CorpusError(f"corpus folder {root} does not exist")
    if not root.is_dir():
        raise CorpusError(f"corpus path {root} is not a folder")
    real_root = os.path.realpath(root)
    excluded = {os.path.realpath(p) for p in exclude}
    yield from _walk(real_root, "", real_root, excluded)


def _walk(folder: str, rel: str, real_root: str, excluded: set[str]) -> Iterator[ScanEntry]:
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        logger.warning("cannot list %s: %s", folder, exc.strerror or exc)
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        rel_path = f"{rel}{entry.name}"
        try:
            if entry.is_dir(follow_symlinks=False):
                if entry.path not in excluded and os.path.realpath(entry.path) not in excluded:
                    yield from _walk(entry.path, rel_path + "/", real_root, excluded)
                continue
            if entry.is_symlink():
                if not is_within(entry.path, real_root) or not os.path.isfile(entry.path):
                    logger.debug("skipping symlink %s: points outside the corpus or not to a file", rel_path)
                    continue
            elif not entry.is_file(follow_symlinks=False):
                continue
        except OSError:
            continue
        ext = os.path.splitext(entry.name)[1].lower()
        if ext in NON_IMAGE_EXTENSIONS:
            continue
        if ext not in IMAGE_EXTENSIONS and not _sniff(entry.path):
            continue
        try:
            st = entry.stat(follow_symlinks=True)
            yield ScanEntry(rel_path, st.st_size, st.st_mtime_ns)
        except OSError:
            yield ScanEntry(rel_path, -1, 0)
