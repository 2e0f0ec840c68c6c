"""Exact and near-exact duplicates from what the indexer stored: sha256, decoded pixels, pHash.

* exact bytes: equal sha256;
* identical pixels (a PNG and a lossless re-save, different metadata): only images that already
  share pHash and size can have identical pixels, so only those are decoded and hashed;
* near-exact: 64-bit DCT pHash within a Hamming radius, by multi-index hashing
  (retrieval/curation/hamming.py: exact, bounded memory). The paper uses a PCA hash at this stage;
  pHash is what we store.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np

from retrieval.curation.graph import Edges

logger = logging.getLogger(__name__)

# Default pHash radius. imagededup defaults to 10 for its 64-bit pHash; we take 8. Re-encoding and
# resizing move the hash by 0-4 bits, while plain or gradient images that merely share a layout
# start to collide around 10. This stage has no embedding check behind it, so the conservative
# side is right; `retrieval calibrate` prints the measured distances per transform.
DEFAULT_PHASH_DISTANCE = 8


def group_edges(keys: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A star of edges (first id -> each other id) for every run of equal keys."""
    order = np.lexsort((ids, keys))
    k, i = keys[order], ids[order]
    starts = np.r_[True, k[1:] != k[:-1]]
    head = np.maximum.accumulate(np.where(starts, np.arange(len(k)), 0))
    first = i[head]
    mask = ~starts
    return first[mask], i[mask]


KEY_BYTES = 33  # content_keys: a tag byte, then 32 bytes
_UNKNOWN, _DIGEST, _TEXT = 0, 1, 2


def content_keys(digests: Sequence[str | None], start: int = 0) -> np.ndarray:
    """sha256 hex digests as fixed-width keys (dtype S33): equal keys <=> identical bytes.

    A 64-character str object per image would be most of the node table at ten million. A key is a
    tag byte and 32 bytes: 1 + the raw digest for a hex digest; 2 + the sha256 of the text for
    anything else (tests, foreign sources: compared as text); 0 + the node's position (`start` + i)
    for a missing digest (NULL or empty), so that it equals no other key and two images whose bytes
    nobody hashed are never exact duplicates.
    """
    m = len(digests)
    out = np.zeros((m, KEY_BYTES), np.uint8)
    try:  # the common case, a batch of hex digests, without a Python loop per digest
        if all(len(h) == 64 for h in digests):  # type: ignore[arg-type]
            raw = bytes.fromhex("".join(digests))  # type: ignore[arg-type]
            if len(raw) == 32 * m:  # (fromhex skips whitespace: then it is shorter)
                out[:, 0] = _DIGEST
                out[:, 1:] = np.frombuffer(raw, np.uint8).reshape(m, 32)
                return out.view(f"S{KEY_BYTES}").reshape(m)
    except (TypeError, ValueError):
        pass
    for i, h in enumerate(digests):
        raw = b""
        if isinstance(h, str) and len(h) == 64:
            try:
                raw = bytes.fromhex(h)
            except ValueError:
                pass
        if len(raw) == 32:
            out[i, 0], out[i, 1:] = _DIGEST, np.frombuffer(raw, np.uint8)
        elif h is None or h == "" or h == b"":
            out[i, 0], out[i, 1:9] = _UNKNOWN, np.frombuffer((start + i).to_bytes(8, "big"), np.uint8)
        else:
            text = h if isinstance(h, bytes) else str(h).encode("utf-8", "surrogatepass")
            out[i, 0], out[i, 1:] = _TEXT, np.frombuffer(hashlib.sha256(text).digest(), np.uint8)
    return out.view(f"S{KEY_BYTES}").reshape(m)


def sha256_edges(ids: np.ndarray, sha256: np.ndarray) -> Edges:
    """Edges between images with identical bytes.

    `sha256`: content keys (content_keys, as dedup.load_nodes holds them) or hex digests as text,
    which are turned into keys here. Digests compare as their 32 raw bytes, other text as text;
    a missing digest matches nothing.
    """
    if len(ids) == 0:
        return Edges.empty()
    keys = sha256 if sha256.dtype == np.dtype(f"S{KEY_BYTES}") else content_keys(list(sha256))
    _, codes = np.unique(keys, return_inverse=True)
    a, b = group_edges(codes.astype(np.int64).reshape(-1), ids)
    return Edges(a, b, np.ones(len(a), np.float32))


def phash_codes(phash_signed: np.ndarray) -> np.ndarray:
    """Signed int64 pHash values (as stored) -> (n, 8) uint8 big-endian codes (bit 0 = the top bit)."""
    return np.ascontiguousarray(np.asarray(phash_signed, dtype=np.int64).astype(">i8").view(np.uint8).reshape(-1, 8))


def phash_edges(ids: np.ndarray, phash_signed: np.ndarray, max_distance: int, progress: bool = False) -> Edges:
    """Pairs whose pHash Hamming distance is <= max_distance (exact, by multi-index hashing)."""
    from retrieval.curation.hamming import range_pairs

    if len(ids) < 2 or max_distance < 0:
        return Edges.empty()
    i, j, _ = range_pairs(phash_codes(phash_signed), max_distance)
    return Edges(ids[i], ids[j], np.ones(len(i), np.float32)).canonical()


def hamming(a: int, b: int) -> int:
    return bin((a ^ b) & ((1 << 64) - 1)).count("1")


def pixel_digest(path: Any, max_pixels: int) -> str | None:
    """sha256 of the decoded RGB pixels and size, or None when the file cannot be decoded now."""
    from PIL import Image, ImageOps

    from retrieval.imaging.preprocess import to_rgb

    try:
        if not isinstance(path, (str, Path)):  # an image of a remote source (retrieval.sources.base.Located)
            import io

            path = io.BytesIO(path.read_bytes())
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                return None
            rgb = to_rgb(ImageOps.exif_transpose(im))  # the conversion the model input gets
            h = hashlib.sha256(f"{rgb.width}x{rgb.height}".encode())
            h.update(rgb.tobytes())
            return h.hexdigest()
    except Exception:  # noqa: BLE001 - a file changed or broken since indexing is simply not matched
        return None


def pixel_edges(root: Path | Callable[[str], Any], ids: np.ndarray, paths: Sequence[str], sha256: np.ndarray, phash_signed: np.ndarray,
                width: np.ndarray, height: np.ndarray, max_pixels: int) -> Edges:
    """Edges between images with different bytes but identical decoded pixels."""
    key = np.stack([phash_signed, width.astype(np.int64), height.astype(np.int64)], axis=1)
    _, codes, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    codes = codes.reshape(-1)
    candidates = np.flatnonzero(counts[codes] > 1)
    if len(candidates) == 0:
        return Edges.empty()
    # Byte-identical files have identical pixels: decode one file per distinct sha256.
    locate = root if callable(root) else (lambda p: root / p)
    digests: dict[int, str] = {}
    by_sha: dict[str, str | None] = {}
    for pos in candidates:
        sha = str(sha256[pos])
        if sha not in by_sha:
            by_sha[sha] = pixel_digest(locate(paths[pos]), max_pixels)
        if by_sha[sha] is not None:
            digests[int(pos)] = by_sha[sha]
    if not digests:
        return Edges.empty()
    pos = np.array(sorted(digests))
    _, dcodes = np.unique([digests[p] for p in pos], return_inverse=True)
    a, b = group_edges(dcodes.astype(np.int64), ids[pos])
    same_bytes = sha256[np.searchsorted(ids, a)] == sha256[np.searchsorted(ids, b)]
    return Edges(a[~same_bytes], b[~same_bytes], np.ones(int((~same_bytes).sum()), np.float32))
