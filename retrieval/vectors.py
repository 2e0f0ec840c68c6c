"""The fp16 embedding store: one flat file, row i holds the vector of image id i.

Why a flat file: it memory-maps (the API and curation read vectors by id without loading the
corpus), it is the source the FAISS index is rebuilt or retrained from without re-embedding, and
exact re-ranking reads a few rows of it. Row = image id means no mapping table to keep in sync;
deleted images leave zero rows behind (2*d bytes each), which is cheap and keeps ids stable.

Crash safety: the writer writes rows, flushes and fsyncs before the database transaction that
makes those ids visible commits. Rows beyond what the database references are ignored and
overwritten by the next run, so a SIGKILL never leaves a visible half-written vector.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DTYPE = np.float16


def check_matrix(x: np.ndarray, dim: int | None = None, name: str = "vectors") -> np.ndarray:
    """Input contract for vector batches: 2-D, float32, C-contiguous, expected width."""
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D numpy array, got {getattr(x, 'shape', type(x))}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} have dimension {x.shape[1]}, expected {dim}")
    return np.ascontiguousarray(x, dtype=np.float32)


def clip_cosine(x: np.ndarray | float) -> np.ndarray | float:
    """Cosines from fp16 unit vectors can land just outside [-1, 1] (1.0002): clip what users see.

    Clip after ranking, never before: clipping ties values that the ranking still tells apart.
    -inf (the "no candidate" padding of search results) stays -inf.
    """
    if isinstance(x, np.ndarray):
        return np.where(np.isneginf(x), x, np.clip(x, -1.0, 1.0)).astype(x.dtype, copy=False)
    return min(1.0, max(-1.0, float(x)))


class VectorStore:
    """Append/overwrite rows by id; read rows by id through a memory map."""

    def __init__(self, path: Path, dim: int):
        if dim <= 0:
            raise ValueError(f"dimension must be positive, got {dim}")
        self.path = Path(path)
        self.dim = dim
        self.row_bytes = dim * np.dtype(DTYPE).itemsize
        self._map: np.memmap | None = None
        self._map_rows = 0

    def __getstate__(self) -> dict:
        """Pickled (to another process or a Ray worker) without its memory map: the other side maps the file."""
        return {**self.__dict__, "_map": None, "_map_rows": 0}

    @property
    def n_rows(self) -> int:
        """Rows the file can hold (max id + 1 of what was ever written)."""
        try:
            return self.path.stat().st_size // self.row_bytes
        except FileNotFoundError:
            return 0

    def write(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Write `vectors[i]` at row `ids[i]`, then fsync. Rows are converted to fp16."""
        ids = np.asarray(ids, dtype=np.int64)
        vectors = check_matrix(vectors, self.dim)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(ids) == 0:
            return
        if ids.min() < 0:
            raise ValueError("ids must be non-negative")
        half = vectors.astype(DTYPE)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            order = np.argsort(ids, kind="stable")
            ids, half = ids[order], half[order]
            # Consecutive ids (the common case: a fresh batch) go out in one write.
            breaks = np.flatnonzero(np.diff(ids) != 1) + 1
            for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(ids)]):
                os.pwrite(fd, half[start:stop].tobytes(), int(ids[start]) * self.row_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)

    def truncate(self, n_rows: int) -> None:
        """Drop rows at and beyond `n_rows` (used by --rebuild and after compaction)."""
        if self.path.exists():
            os.truncate(self.path, n_rows * self.row_bytes)
        self._map = None

    def pin(self, fd: int) -> None:
        """Map the file open as `fd` once and for all: reads never see a file written after this."""
        rows = os.fstat(fd).st_size // self.row_bytes
        if rows == 0:
            raise KeyError("the vector store is empty")
        with os.fdopen(os.dup(fd), "rb") as f:
            self._map = np.memmap(f, dtype=DTYPE, mode="r", shape=(rows, self.dim))
        self._map_rows = rows
        self._pinned = True

    def _mapped(self, min_rows: int) -> np.memmap:
        if getattr(self, "_pinned", False):
            assert self._map is not None
            return self._map
        if self._map is None or self._map_rows < min_rows:
            rows = self.n_rows
            if rows == 0:
                raise KeyError("the vector store is empty")
            self._map = np.memmap(self.path, dtype=DTYPE, mode="r", shape=(rows, self.dim))
            self._map_rows = rows
        return self._map

    def read(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Vectors of `ids` as float32, shape (len(ids), dim)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        mapped = self._mapped(int(ids.max()) + 1)
        if ids.min() < 0 or ids.max() >= self._map_rows:
            raise KeyError(f"ids outside the vector store (rows 0..{self._map_rows - 1})")
        return np.asarray(mapped[ids], dtype=np.float32)

    def iter_batches(self, ids: np.ndarray, batch: int = 65_536):
        """Yield (ids, float32 vectors) in chunks so memory stays bounded for any corpus size."""
        ids = np.asarray(ids, dtype=np.int64)
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            yield chunk, self.read(chunk)
