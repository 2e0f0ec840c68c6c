"""Hamming range search over binary codes (pHash, PDQ): all pairs within a radius.

A plain blocked brute force with the interface the dedup stages use; a faster multi-index
hashing implementation with the same signatures may replace it.
"""

from __future__ import annotations

import numpy as np

BLOCK = 1024


def _popcount_xor(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between every row of a (m, nbytes) and of b (k, nbytes) -> (m, k) int32."""
    x = np.bitwise_xor(a[:, None, :], b[None, :, :])
    return np.bitwise_count(x).sum(axis=2, dtype=np.int32)


def _check(codes: np.ndarray, name: str = "codes") -> np.ndarray:
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise ValueError(f"{name} must be uint8 (n, nbytes), got {codes.dtype} {codes.shape}")
    return np.ascontiguousarray(codes)


def range_pairs(codes: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs i < j with popcount(codes[i] ^ codes[j]) <= radius; codes uint8 (n, nbytes).
    Returns (i, j, distance) int64/int64/int32 arrays."""
    codes = _check(codes)
    n = len(codes)
    out_i, out_j, out_d = [], [], []
    for start in range(0, n, BLOCK):
        block = codes[start : start + BLOCK]
        for other in range(start, n, BLOCK):
            _collect(_popcount_xor(block, codes[other : other + BLOCK]), start, other, radius, out_i, out_j, out_d)
    return _joined(out_i, out_j, out_d)


def range_pairs_dihedral(codes: np.ndarray, variants: np.ndarray,
                         radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """variants uint8 (n, 8, nbytes), the 8 dihedral hashes of each image (variants[:, 0] == codes):
    pairs i < j with min over v of popcount(variants[i, v] ^ codes[j]) <= radius (or the same with
    i and j swapped); distance is that minimum."""
    codes = _check(codes)
    variants = np.asarray(variants)
    if variants.dtype != np.uint8 or variants.ndim != 3 or variants.shape[0] != len(codes) \
            or variants.shape[2] != codes.shape[1]:
        raise ValueError(f"variants must be uint8 (n, v, nbytes) matching codes, got {variants.dtype} {variants.shape}")
    n, v = len(codes), variants.shape[1]
    out_i, out_j, out_d = [], [], []
    for start in range(0, n, BLOCK):
        block = variants[start : start + BLOCK]
        for other in range(start, n, BLOCK):
            target = codes[other : other + BLOCK]
            # min over the variants of i against j's identity hash, and of j's variants against i's
            forward = np.min([_popcount_xor(block[:, k], target) for k in range(v)], axis=0)
            backward = np.min([_popcount_xor(codes[start : start + BLOCK], variants[other : other + BLOCK, k])
                               for k in range(v)], axis=0)
            _collect(np.minimum(forward, backward), start, other, radius, out_i, out_j, out_d)
    return _joined(out_i, out_j, out_d)


def _collect(d: np.ndarray, start: int, other: int, radius: int, out_i: list[np.ndarray], out_j: list[np.ndarray],
             out_d: list[np.ndarray]) -> None:
    """Append the pairs i < j of a block of distances (rows from `start`, columns from `other`) within radius."""
    rows, cols = np.nonzero(d <= radius)
    i, j = rows + start, cols + other
    keep = i < j
    out_i.append(i[keep])
    out_j.append(j[keep])
    out_d.append(d[rows[keep], cols[keep]])


def _joined(i: list[np.ndarray], j: list[np.ndarray], d: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not i:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int32)
    return (np.concatenate(i).astype(np.int64), np.concatenate(j).astype(np.int64),
            np.concatenate(d).astype(np.int32))
