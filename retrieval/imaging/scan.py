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
import stat
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


def text_path(path: str) -> str:
    """`path` as text that can be stored and printed: a name that is not valid UTF-8 (held by Python
    as surrogate escapes) gets its bad bytes written as \\xNN. Equal to `path` for every valid name."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _sniff(path: str) -> bool:
    """Do the first bytes look like an image? Never blocks: a FIFO or device is not read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        return looks_like_image(os.read(fd, 16))
    except OSError:
        return False
    finally:
        os.close(fd)


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
    yield from _walk(real_root, real_root, excluded)


def _list(folder: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as exc:
        logger.warning("cannot list %s: %s", text_path(folder), exc.strerror or exc)
        return []


def _walk(top: str, real_root: str, excluded: set[str]) -> Iterator[ScanEntry]:
    """Depth first, names sorted; iterative, so that no depth of folders can exhaust the stack."""
    stack: list[tuple[Iterator[os.DirEntry[str]], str]] = [(iter(_list(top)), "")]
    while stack:
        entries, rel = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        found = _candidate(entry, rel, real_root, excluded, stack)
        if found is not None:
            yield found


def _candidate(entry: os.DirEntry[str], rel: str, real_root: str, excluded: set[str],
               stack: list[tuple[Iterator[os.DirEntry[str]], str]]) -> ScanEntry | None:
    """The ScanEntry for a candidate image file; a folder to descend into is pushed on `stack`."""
    if entry.name.startswith("."):
        return None
    rel_path = f"{rel}{entry.name}"
    try:
        if entry.is_dir(follow_symlinks=False):
            # Folders are reached from the resolved root without following links: their path is
            # already resolved (no realpath per folder, which costs O(depth) system calls each).
            if entry.path not in excluded:
                stack.append((iter(_list(entry.path)), rel_path + "/"))
            return None
        if entry.is_symlink():
            if not is_within(entry.path, real_root) or not os.path.isfile(entry.path):
                logger.debug("skipping symlink %s: points outside the corpus or not to a file", text_path(rel_path))
                return None
        elif not entry.is_file(follow_symlinks=False):
            return None
    except OSError:
        return None
    ext = os.path.splitext(entry.name)[1].lower()
    if ext in NON_IMAGE_EXTENSIONS:
        return None
    if ext not in IMAGE_EXTENSIONS and not _sniff(entry.path):
        return None
    try:
        st = entry.stat(follow_symlinks=True)
        return ScanEntry(rel_path, st.st_size, st.st_mtime_ns)
    except OSError:
        return ScanEntry(rel_path, -1, 0)
