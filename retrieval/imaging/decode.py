"""Stage 2: read one file, hash it, decode it, preprocess it. Runs in worker processes.

Pure function of (work item, preprocessing config, pixel limit): no database, no model, so the
stage can run anywhere the files are readable.
"""

from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.errors import ImageDecodeError, ReadFailure
from retrieval.imaging.inflight import InflightMarkers
from retrieval.imaging.preprocess import PreprocessConfig, decode_image, preprocess


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


@dataclass
class DecodeResult:
    item: WorkItem
    pixels: np.ndarray | None = None  # uint8 (3, H, W) model input; None for failures and unchanged
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


def _read(root: Any, item: WorkItem) -> bytes:
    if not isinstance(root, str):  # a retrieval.sources reader: bounded, retried, ReadFailure on error
        return root.read(item.path, item.size)
    path = os.path.join(root, item.path)
    # O_NOFOLLOW is not used: the scanner already checked that symlinks stay inside the corpus.
    with open(path, "rb") as f:
        return f.read()


def perceptual_hash(image) -> int:  # noqa: ANN001 - a PIL image
    """64-bit DCT perceptual hash (imagehash.phash) as an unsigned integer."""
    import imagehash

    bits = imagehash.phash(image, hash_size=8).hash.reshape(-1)
    return int("".join("1" if b else "0" for b in bits), 2)


def decode_one(root: Any, item: WorkItem, config: PreprocessConfig, max_pixels: int) -> DecodeResult:
    """Read, hash, decode and preprocess one file; every failure becomes a DecodeResult with a reason.

    `root` is the corpus folder, or a retrieval.sources reader for any other source.
    """
    result = _decode_one(root, item, config, max_pixels)
    if result.failure_reason is None:
        extra = root.meta(item.path) if not isinstance(root, str) else None
        result.meta = {**(item.meta or {}), **extra} if extra else item.meta
    return result


def _decode_one(root: Any, item: WorkItem, config: PreprocessConfig, max_pixels: int) -> DecodeResult:
    if item.size < 0:
        known = item.meta or {}
        if "read_error" in known:  # the source could not even list it (e.g. a broken shard)
            return _failure(item, known.get("kind") or "io_error", known["read_error"])
        return _failure(item, "unreadable", "cannot stat the file (permission denied or it vanished)")
    try:
        data = _read(root, item)
    except ReadFailure as exc:
        return _failure(item, exc.kind, exc.reason)
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
        decoded = decode_image(data, config, max_pixels)
        pixels = preprocess(decoded, config)
        phash = perceptual_hash(decoded.image)
    except ImageDecodeError as exc:
        return _failure(item, exc.kind, str(exc))
    except MemoryError:
        return _failure(item, "too_large", "out of memory while decoding this image")
    except Exception as exc:  # noqa: BLE001 - a decoder bug on one hostile file must not stop the run
        return _failure(item, "corrupt", f"corrupt image data: {type(exc).__name__}: {exc}")
    return DecodeResult(
        item=item,
        pixels=pixels,
        sha256=sha,
        width=decoded.width,
        height=decoded.height,
        format=decoded.format,
        phash=phash,
    )


class DecodeDataset:
    """Map-style dataset: index -> DecodeResult. Picklable, so DataLoader workers can run it.

    With `markers`, each file is marked as in flight while it decodes (see retrieval.imaging.inflight).
    """

    def __init__(self, root: str, items: list[WorkItem], config: PreprocessConfig, max_pixels: int,
                 markers: InflightMarkers | None = None):
        self.root, self.items, self.config, self.max_pixels = root, items, config, max_pixels
        self.markers = markers

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> DecodeResult:
        item = self.items[i]
        if self.markers is None:
            return decode_one(self.root, item, self.config, self.max_pixels)
        with self.markers.decoding(item.path):
            return decode_one(self.root, item, self.config, self.max_pixels)


def collate_results(results: list[DecodeResult]) -> tuple[list[DecodeResult], Any]:
    """Stack pixels into one uint8 tensor (pinned by the DataLoader on GPU); results keep metadata."""
    import torch

    pixels = [r.pixels for r in results if r.embeddable]
    batch = torch.from_numpy(np.stack(pixels)) if pixels else None
    for r in results:
        r.pixels = None  # the data travels once, in `batch`
    return results, batch
