"""Stage 2: read one file, hash it, decode it, preprocess it. Runs in worker processes.

Pure function of (work item, preprocessing, pixel limit): no database, no model, so the stage can
run anywhere the files are readable. Each file is decoded once; every embedder role's input and
the perceptual hashes are made from that one decode (DecodeSpec).
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import stat
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from retrieval.errors import ImageDecodeError, ReadFailure
from retrieval.imaging.hashes import pdq_dihedral
from retrieval.imaging.inflight import InflightMarkers
from retrieval.imaging.preprocess import PreprocessConfig, decode_image, preprocess
from retrieval.imaging.scan import text_path

TIMEOUT_KIND = "timeout"
# Bytes a file may hold per allowed pixel (--max-pixels) before it is refused unread: an uncompressed
# 16-bit RGBA image needs 8, so no legitimate image within the pixel limit is refused.
FILE_BYTES_PER_PIXEL = 8
FILE_BYTES_SLACK = 16 << 20


def max_file_bytes(max_pixels: int) -> int:
    """The largest file read into memory for decoding: derived from the pixel limit (documented)."""
    return FILE_BYTES_PER_PIXEL * max_pixels + FILE_BYTES_SLACK


def timeout_reason(seconds: float | None) -> str:
    return (f"decoding took longer than {seconds:g} s (--decode-timeout); the decoder was stopped"
            if seconds else "decoding did not finish")


class DecodeTimeout(BaseException):
    """Raised in the decoding process when a file runs past its time limit (not an Exception: no
    `except Exception` in a decoder plugin may swallow it)."""


@contextmanager
def hard_time_limit(seconds: float | None) -> Iterator[None]:
    """In a process of its own: SIGALRM with its default action ends the process after `seconds`,
    even inside a C call that never returns to Python. The parent reads the signal as a timeout."""
    if not seconds:
        yield
        return
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


@contextmanager
def soft_time_limit(seconds: float | None) -> Iterator[None]:
    """In a process that must survive (decoding in the main process, `-j 0`): raise DecodeTimeout
    after `seconds`. Pillow decodes chunk by chunk from Python, so the signal handler gets to run.
    Signal handlers belong to the main thread; elsewhere there is no limit."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(_signum: int, _frame: Any) -> None:
        raise DecodeTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)


@dataclass(frozen=True)
class WorkItem:
    """A file to (re)process; `known_sha256` lets a touched-but-identical file skip embedding."""

    path: str  # relative to the corpus root
    size: int
    mtime_ns: int
    image_id: int | None = None  # set when the file is already indexed (changed file)
    known_sha256: str | None = None
    etag: str | None = None  # object stores: the content tag compared by incremental runs
    meta: dict[str, Any] | None = None  # list columns / shard sidecars, stored with the image


@dataclass(frozen=True)
class DecodeSpec:
    """What one decode produces: the search role's input, the copy role's, PDQ hashes.

    `copy` is the copy embedder's preprocessing (retrieval.embedding.prep): a picklable callable
    from a DecodedImage to that model's input, with a `min_source_edge`. `search` None: only the
    copy role is embedded (adding a copy model to an existing index).
    """

    search: PreprocessConfig | None = PreprocessConfig()
    copy: Any = None
    pdq: bool = True

    @property
    def min_source_edge(self) -> int:
        """JPEG draft decoding keeps enough pixels for the most demanding role."""
        edges = [c.min_source_edge for c in (self.search, self.copy) if c is not None]
        return max(edges, default=PreprocessConfig().min_source_edge)


def as_spec(config: PreprocessConfig | DecodeSpec) -> DecodeSpec:
    return config if isinstance(config, DecodeSpec) else DecodeSpec(search=config)


@dataclass
class DecodeResult:
    item: WorkItem
    pixels: np.ndarray | None = None  # uint8 (3, H, W) model input; None for failures and unchanged
    copy_pixels: np.ndarray | None = None  # the copy role's input (its preprocessing decides the layout)
    pdq: bytes | None = None  # 8 dihedral PDQ hashes, 32 bytes each (retrieval.imaging.hashes)
    pdq_quality: int | None = None
    sha256: str | None = None
    width: int = 0
    height: int = 0
    format: str = ""
    phash: int = 0  # unsigned 64-bit
    unchanged_content: bool = False  # same bytes as already indexed: metadata refresh only
    failure_kind: str | None = None
    failure_reason: str | None = None
    meta: dict[str, Any] | None = None  # what the source keeps with the image (item.meta or shard sidecars)

    @property
    def embeddable(self) -> bool:
        """Decoded new content that needs an embedding (not a failure, not an identical touch)."""
        return self.failure_reason is None and not self.unchanged_content


def _failure(item: WorkItem, kind: str, reason: str) -> DecodeResult:
    return DecodeResult(item=item, failure_kind=kind, failure_reason=reason)


class NotRegularFile(OSError):
    """The path holds a FIFO, a device or a socket (swapped in after the scan): never read it."""


class FileTooLarge(OSError):
    def __init__(self, size: int, limit: int):
        super().__init__(f"the file is {size:,} bytes, over the {limit:,}-byte limit for reading it whole "
                         f"(8 bytes per pixel allowed by --max-pixels)")


def read_regular_file(path: str, limit: int | None = None) -> bytes:
    """The bytes of a regular file, opened without blocking (a FIFO would block an open() forever).

    Raises NotRegularFile for anything else and FileTooLarge when it holds more than `limit` bytes,
    checked before reading (a sparse 64 GB file must not be read into memory).
    """
    # O_NOFOLLOW is not used: the scanner already checked that symlinks stay inside the corpus.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile("not a regular file (a FIFO, device or socket)")
        if limit is not None and st.st_size > limit:
            raise FileTooLarge(st.st_size, limit)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _read(root: Any, item: WorkItem, limit: int | None = None) -> bytes:
    if not isinstance(root, str):  # a retrieval.sources reader: bounded, retried, ReadFailure on error
        return root.read(item.path, item.size)
    return read_regular_file(os.path.join(root, item.path), limit)


def perceptual_hash(image) -> int:  # noqa: ANN001 - a PIL image
    """64-bit DCT perceptual hash (imagehash.phash) as an unsigned integer."""
    import imagehash

    bits = imagehash.phash(image, hash_size=8).hash.reshape(-1)
    return int("".join("1" if b else "0" for b in bits), 2)


def decode_one(root: Any, item: WorkItem, config: PreprocessConfig | DecodeSpec, max_pixels: int) -> DecodeResult:
    """Read, hash, decode and preprocess one file; every failure becomes a DecodeResult with a reason.

    `root` is the corpus folder, or a retrieval.sources reader for any other source.
    """
    result = _decode_one(root, item, config, max_pixels)
    if result.failure_reason is None:
        extra = root.meta(item.path) if not isinstance(root, str) else None
        result.meta = {**(item.meta or {}), **extra} if extra else item.meta
    return result


def _decode_one(root: Any, item: WorkItem, config: PreprocessConfig | DecodeSpec, max_pixels: int) -> DecodeResult:
    spec = as_spec(config)
    if item.size < 0:
        known = item.meta or {}
        if "read_error" in known:  # the source could not even list it (e.g. a broken shard)
            return _failure(item, known.get("kind") or "io_error", known["read_error"])
        return _failure(item, "unreadable", "cannot stat the file (permission denied or it vanished)")
    if text_path(item.path) != item.path:
        return _failure(item, "bad_name", "the file name is not valid UTF-8; rename the file to index it")
    try:
        data = _read(root, item, max_file_bytes(max_pixels))
    except ReadFailure as exc:
        return _failure(item, exc.failure_kind, exc.reason)
    except NotRegularFile as exc:
        return _failure(item, "not_a_file", str(exc))
    except FileTooLarge as exc:
        return _failure(item, "too_large", str(exc))
    except PermissionError:
        return _failure(item, "unreadable", "permission denied: the file cannot be read by this user")
    except FileNotFoundError:
        return _failure(item, "vanished", "the file was deleted while indexing")
    except IsADirectoryError:
        return _failure(item, "unreadable", "is a directory")
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        kind = "unreadable" if exc.errno in (errno.EACCES, errno.EPERM, errno.EIO) else "io_error"
        return _failure(item, kind, f"cannot read the file: {reason}")
    sha = hashlib.sha256(data).hexdigest()
    if item.known_sha256 is not None and sha == item.known_sha256:
        return DecodeResult(item=item, sha256=sha, unchanged_content=True)
    try:
        decoded = decode_image(data, spec, max_pixels)  # type: ignore[arg-type] - needs min_source_edge only
        pixels = preprocess(decoded, spec.search) if spec.search is not None else None
        copy_pixels = spec.copy(decoded) if spec.copy is not None else None
        phash = perceptual_hash(decoded.image)
        pdq, pdq_quality = pdq_dihedral(decoded.image) if spec.pdq else (None, None)
    except ImageDecodeError as exc:
        return _failure(item, exc.failure_kind, str(exc))
    except MemoryError:
        return _failure(item, "too_large", "out of memory while decoding this image")
    except Exception as exc:  # noqa: BLE001 - a decoder bug on one hostile file must not stop the run
        return _failure(item, "corrupt", f"corrupt image data: {type(exc).__name__}: {exc}")
    return DecodeResult(
        item=item,
        pixels=pixels,
        copy_pixels=copy_pixels,
        pdq=pdq,
        pdq_quality=pdq_quality,
        sha256=sha,
        width=decoded.width,
        height=decoded.height,
        format=decoded.format,
        phash=phash,
    )


class DecodeDataset:
    """Map-style dataset: index -> DecodeResult. Picklable, so DataLoader workers can run it.

    With `markers`, each file is marked as in flight while it decodes (see retrieval.imaging.inflight).
    With `timeout_s`, a file that decodes longer is stopped: in a worker process the worker is ended
    (the loader then decodes the marked file in isolation, where it becomes a "timeout" failure); in
    the process that made the dataset (`-j 0`) the file becomes a "timeout" failure at once.
    """

    def __init__(self, root: str, items: list[WorkItem], config: PreprocessConfig | DecodeSpec, max_pixels: int,
                 markers: InflightMarkers | None = None, timeout_s: float | None = None):
        self.root, self.items, self.config, self.max_pixels = root, items, config, max_pixels
        self.markers = markers
        self.timeout_s = timeout_s
        self._owner = os.getpid()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> DecodeResult:
        item = self.items[i]
        if self.markers is None:
            return self._decode(item)
        with self.markers.decoding(item.path):
            return self._decode(item)

    def _decode(self, item: WorkItem) -> DecodeResult:
        if os.getpid() != self._owner:  # a worker: ending it is safe, and works even inside C code
            with hard_time_limit(self.timeout_s):
                return decode_one(self.root, item, self.config, self.max_pixels)
        try:
            with soft_time_limit(self.timeout_s):
                return decode_one(self.root, item, self.config, self.max_pixels)
        except DecodeTimeout:
            return _failure(item, TIMEOUT_KIND, timeout_reason(self.timeout_s))


def collate_results(results: list[DecodeResult]) -> tuple[list[DecodeResult], Any]:
    """Stack pixels into one uint8 tensor (pinned by the DataLoader on GPU); results keep metadata."""
    import torch

    pixels = [r.pixels for r in results if r.embeddable and r.pixels is not None]
    batch = torch.from_numpy(np.stack(pixels)) if pixels else None
    for r in results:
        r.pixels = None  # the data travels once, in `batch`
    return results, batch
