"""Where the partitioned join (partition.py) reads its rows: a resident int8 copy of the vectors, or the
stored vectors themselves.

The join reads every vector once for each cell it probes, tens of times over at ten million vectors.
From the memory-mapped float16 file that is scattered page faults and a fresh float32 copy per cell;
a resident int8 copy (a byte a dimension and a scale per row) is gathered from memory instead.

Its products only filter: with x^ = scale * q, |<x, y> - <x^, y^>| <= ||x^|| e_y + e_x ||y^|| + e_x e_y,
where e = ||x - x^||; `bound` is that at the largest e and ||x^|| of the whole copy (measured when it
is made), the join widens its filter by it, and every pair that passes is re-scored from the stored
vectors. Rows come as the integers q with their scales, so a block multiplies exact integers (exact
in bfloat16 and float32 alike) against columns x^, and each row is compared with its own threshold
(threshold - slack) / scale.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Protocol

import numpy as np

logger = logging.getLogger(__name__)

ROWS = "auto"  # "int8", "stored", or "auto": int8 while the copy takes at most RESIDENT_BYTES
RESIDENT_BYTES = 4 << 30  # an int8 copy of 10M vectors of 384 dimensions, or 5.5M of 768
BUILD_ROWS = 8192  # vectors quantised at once (larger temporaries cost more in page faults than they save)


class JoinRows(Protocol):
    """What the join needs of its rows: `rows(positions)` -> values and `scales(positions)`, where a row's
    vector is about values * scale, `columns(positions)` -> float32 values * scale, and `bound`, how far
    products of these are from the stored vectors' at most; `max_norm`, the largest row norm."""

    bound: float
    max_norm: float

    def rows(self, positions: np.ndarray) -> np.ndarray: ...

    def scales(self, positions: np.ndarray) -> np.ndarray: ...

    def columns(self, positions: np.ndarray) -> np.ndarray: ...


class StoredRows:
    """The stored vectors, read as they are: scale 1, nothing to widen (the unit vectors of the store)."""

    bound = 0.0
    max_norm = 1.0

    def __init__(self, ids: np.ndarray, read: Callable[[np.ndarray], np.ndarray]):
        self.ids, self.read = ids, read

    def rows(self, positions: np.ndarray) -> np.ndarray:
        return self.read(self.ids[positions])

    def scales(self, positions: np.ndarray) -> np.ndarray:
        return np.ones(len(positions), np.float32)

    def columns(self, positions: np.ndarray) -> np.ndarray:
        return self.read(self.ids[positions])


class Int8Rows:
    """An int8 copy of the vectors in memory: q = round(x / scale), scale = max |x_i| / 127 per row.

    Example:
        rows = Int8Rows(ids, read)
        q, scale = rows.rows(np.array([0, 5])), rows.scales(np.array([0, 5]))
    """

    def __init__(self, ids: np.ndarray, read: Callable[[np.ndarray], np.ndarray], progress: bool = False):
        from tqdm import tqdm

        n = len(ids)
        dim = read(ids[:1]).shape[1] if n else 0
        self.q = np.empty((n, dim), np.int8)
        self.scale = np.empty(n, np.float32)
        worst_error, worst_norm = 0.0, 0.0
        for start in tqdm(range(0, n, BUILD_ROWS), desc="k-NN graph: int8 copy", unit="block",
                          disable=not progress):
            x = read(ids[start : start + BUILD_ROWS])
            q, scale, error, norm = quantize(x)
            self.q[start : start + len(x)] = q
            self.scale[start : start + len(x)] = scale
            worst_error, worst_norm = max(worst_error, error), max(worst_norm, norm)
        # float32 rounding of the norms and differences themselves: a relative 1e-5 covers it many times
        e, m = worst_error * (1 + 1e-5) + 1e-7, worst_norm * (1 + 1e-5)
        self.max_norm = m
        self.bound = 2 * m * e + e * e
        logger.info("k-NN graph: int8 copy of %d vectors (%.1f MB), products within %.4f of the stored ones",
                    n, self.q.nbytes / 1e6, self.bound)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        return self.q[positions]

    def scales(self, positions: np.ndarray) -> np.ndarray:
        return self.scale[positions]

    def columns(self, positions: np.ndarray) -> np.ndarray:
        out = self.q[positions].astype(np.float32)
        out *= self.scale[positions][:, None]
        return out


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(int8 q, float32 scale, largest ||x - x^||, largest ||x^||) with x^ = q * scale (as columns() makes
    it) and scale = max |x_i| / 127 per row (1 for a zero row)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    top = t.abs().amax(dim=1) if t.numel() else torch.zeros(len(t))
    scale = torch.where(top > 0, top / 127, torch.ones_like(top))
    q = torch.round(t / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    approx = q.to(torch.float32).mul_(scale[:, None])
    norm = float(torch.linalg.vector_norm(approx, dim=1).max()) if len(t) else 0.0
    error = float(torch.linalg.vector_norm(approx.sub_(t), dim=1).max()) if len(t) else 0.0
    return q.numpy(), scale.numpy(), error, norm


def join_rows(ids: np.ndarray, read: Callable[[np.ndarray], np.ndarray], progress: bool = False) -> JoinRows:
    """The int8 copy where ROWS allows it and it fits RESIDENT_BYTES, else the stored vectors."""
    if ROWS not in ("auto", "int8", "stored"):
        raise ValueError(f"ROWS must be auto, int8 or stored, not {ROWS!r}")
    dim = read(ids[:1]).shape[1] if len(ids) else 0
    if ROWS == "stored" or (ROWS == "auto" and len(ids) * dim > RESIDENT_BYTES):
        if ROWS == "auto":
            logger.info("k-NN graph: an int8 copy would take %.1f GB (over %.1f GB): the join reads the stored "
                        "vectors", len(ids) * dim / 1e9, RESIDENT_BYTES / 1e9)
        return StoredRows(ids, read)
    return Int8Rows(ids, read, progress)


def rounded_down(values: np.ndarray, dtype: str) -> Any:
    """values (float64) as a torch tensor of `dtype`, each rounded down onto that dtype's grid (a
    comparison of a block with it then never excludes a product that reached the value)."""
    import torch

    want = torch.from_numpy(np.asarray(values, np.float64))
    out = want.to(getattr(torch, dtype))
    over = out.double() > want
    if bool(over.any()):
        out[over] = torch.nextafter(out[over], torch.full_like(out[over], -math.inf))
    return out
