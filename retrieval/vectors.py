"""The fp16 embedding store: one `.npy` file per embedder role, row i holds the vector of image id i.

Why a flat file: it memory-maps (the API and curation read vectors by id without loading the
corpus), it is the source the FAISS index is rebuilt or retrained from without re-embedding, and
exact re-ranking reads a few rows of it. Row = image id means no mapping table to keep in sync;
deleted images leave zero rows behind (2*d bytes each), which is cheap and keeps ids stable.

Why `.npy`: its header names the dtype and the shape, so `numpy.load(path, mmap_mode="r")` opens
it without knowing the model's dimension (a second role, the copy model, has another one). The
header has a fixed length (HEADER_BYTES), so the row count in it is rewritten in place as the
file grows.

Crash safety: the writer writes rows, fsyncs, then (when the file grew) rewrites the row count in
the header and fsyncs again, all before the database transaction that makes those ids visible
commits. Rows beyond what the database references are ignored and overwritten by the next run, so
a SIGKILL never leaves a visible half-written vector. Index folders from before the `.npy` format
hold a headerless `vectors.f16`; `upgrade_legacy` converts one under the writer's lock (copy to a
temporary file, fsync, rename, then delete the old file), and readers fall back to the old file
until that happened.
"""

from __future__ import annotations

import ast
import logging
import os
from pathlib import Path

import numpy as np

from retrieval.layout import fsync_dir

DTYPE = np.float16
HEADER_BYTES = 128  # magic (6) + version (2) + length (2) + the header dict padded with spaces + "\n"
MAGIC = b"\x93NUMPY\x01\x00"
COPY_CHUNK = 64 << 20

logger = logging.getLogger(__name__)


def check_matrix(x: np.ndarray, dim: int | None = None, name: str = "vectors") -> np.ndarray:
    """Input contract for vector batches: 2-D, float32, C-contiguous, expected width."""
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D numpy array, got {getattr(x, 'shape', type(x))}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} have dimension {x.shape[1]}, expected {dim}")
    return np.ascontiguousarray(x, dtype=np.float32)


def npy_header(rows: int, dim: int) -> bytes:
    """A version 1.0 `.npy` header for a C-order fp16 (rows, dim) array, always HEADER_BYTES long."""
    text = "{'descr': '%s', 'fortran_order': False, 'shape': (%d, %d), }" % (np.dtype(DTYPE).str, rows, dim)
    room = HEADER_BYTES - len(MAGIC) - 2
    if len(text) + 1 > room:
        raise ValueError(f"shape ({rows}, {dim}) does not fit a {HEADER_BYTES}-byte header")
    body = text.ljust(room - 1).encode("latin1") + b"\n"
    return MAGIC + len(body).to_bytes(2, "little") + body


def clip_cosine(x: np.ndarray | float) -> np.ndarray | float:
    """Cosines from fp16 unit vectors can land just outside [-1, 1] (1.0002): clip what users see.

    Clip after ranking, never before: clipping ties values that the ranking still tells apart.
    -inf (the "no candidate" padding of search results) stays -inf.
    """
    if isinstance(x, np.ndarray):
        return np.where(np.isneginf(x), x, np.clip(x, -1.0, 1.0)).astype(x.dtype, copy=False)
    return min(1.0, max(-1.0, float(x)))



def read_npy_shape(path: Path) -> tuple[int, int]:
    """(rows, dim) from the header of a vector file this module wrote; ValueError for anything else."""
    with open(path, "rb") as f:
        return parse_npy_header(f.read(HEADER_BYTES), path)


def parse_npy_header(head: bytes, path: Path | str) -> tuple[int, int]:
    """(rows, dim) from the first HEADER_BYTES of a vector file (`path` names it in errors)."""
    if len(head) < HEADER_BYTES or not head.startswith(MAGIC):
        raise ValueError(f"{path} is not a vector file of this format (no .npy header)")
    length = int.from_bytes(head[8:10], "little")
    if 10 + length != HEADER_BYTES:
        raise ValueError(f"{path} has a {10 + length}-byte .npy header, expected {HEADER_BYTES}")
    info = ast.literal_eval(head[10:HEADER_BYTES].decode("latin1"))
    shape = info.get("shape", ())
    if np.dtype(info.get("descr")) != np.dtype(DTYPE) or info.get("fortran_order") or len(shape) != 2:
        raise ValueError(f"{path} does not hold a C-order fp16 matrix: {info}")
    return int(shape[0]), int(shape[1])


def upgrade_legacy(legacy: Path, target: Path, dim: int) -> bool:
    """Convert a headerless fp16 file (`vectors.f16`) into the `.npy` file `target`. Crash-safe, idempotent.

    The copy goes to a temporary file that is fsynced and renamed into place before the old file is
    deleted: a kill at any point leaves either the old file (the next call starts over) or the new
    one (a leftover old file is then deleted). Returns True when a conversion happened.
    """
    legacy, target = Path(legacy), Path(target)
    if target.exists():
        if legacy.exists():
            legacy.unlink()  # the rename happened, the clean-up was cut short
            fsync_dir(legacy.parent)
        return False
    if not legacy.exists():
        return False
    row_bytes = dim * np.dtype(DTYPE).itemsize
    rows = legacy.stat().st_size // row_bytes
    tmp = target.with_name(f".{target.name}.upgrading")
    with open(legacy, "rb") as src, open(tmp, "wb") as dst:
        dst.write(npy_header(rows, dim))
        left = rows * row_bytes
        while left:
            chunk = src.read(min(COPY_CHUNK, left))
            if not chunk:
                raise OSError(f"{legacy} shrank while it was being converted")
            dst.write(chunk)
            left -= len(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)
    legacy.unlink()
    fsync_dir(target.parent)
    logger.info("converted %s (%d rows) to %s", legacy.name, rows, target.name)
    return True


class VectorStore:
    """Append/overwrite rows by id; read rows by id through a memory map.

    `path` ending in `.npy` is the current format (the dimension comes from its header when the
    file exists); any other name is the headerless legacy format (the dimension must be given).
    `legacy`: an old-format file read while `path` does not exist yet, converted on first write.
    """

    def __init__(self, path: Path, dim: int | None = None, legacy: Path | None = None):
        self.path = Path(path)
        self.legacy = Path(legacy) if legacy is not None else None
        self.npy = self.path.suffix == ".npy"
        if self.npy and self.path.exists():
            _, stored = read_npy_shape(self.path)
            if dim is not None and dim != stored:
                raise ValueError(f"{self.path} holds {stored}-d vectors, not {dim}-d")
            dim = stored
        if dim is None or dim <= 0:
            raise ValueError(f"dimension must be positive, got {dim}")
        self.dim = dim
        self.row_bytes = dim * np.dtype(DTYPE).itemsize
        self._map: np.ndarray | None = None
        self._map_rows = 0

    def _reading_legacy(self) -> bool:
        return self.npy and self.legacy is not None and not self.path.exists() and self.legacy.exists()

    def __getstate__(self) -> dict:
        """Pickled (to another process or a Ray worker) without its memory map: the other side maps the file."""
        return {**self.__dict__, "_map": None, "_map_rows": 0}

    @property
    def n_rows(self) -> int:
        """Rows the file can hold (max id + 1 of what was ever written)."""
        try:
            if self._reading_legacy():
                assert self.legacy is not None
                return self.legacy.stat().st_size // self.row_bytes
            if self.npy:
                return read_npy_shape(self.path)[0]
            return self.path.stat().st_size // self.row_bytes
        except FileNotFoundError:
            return 0

    @property
    def data_offset(self) -> int:
        return HEADER_BYTES if self.npy else 0

    def _prepare_write(self) -> int:
        """Open the file for writing (creating or converting it first); returns the fd."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.npy and self.legacy is not None:
            upgrade_legacy(self.legacy, self.path, self.dim)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if self.npy and os.fstat(fd).st_size < HEADER_BYTES:
            os.pwrite(fd, npy_header(0, self.dim), 0)
        return fd

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
        rows_before = self.n_rows if self.npy else 0
        fd = self._prepare_write()
        try:
            order = np.argsort(ids, kind="stable")
            ids, half = ids[order], half[order]
            # Consecutive ids (the common case: a fresh batch) go out in one write.
            breaks = np.flatnonzero(np.diff(ids) != 1) + 1
            for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(ids)]):
                os.pwrite(fd, half[start:stop].tobytes(), self.data_offset + int(ids[start]) * self.row_bytes)
            os.fsync(fd)
            needed = int(ids[-1]) + 1
            if self.npy and needed > rows_before:
                # Only after the rows are durable does the header say they exist.
                os.pwrite(fd, npy_header(needed, self.dim), 0)
                os.fsync(fd)
        finally:
            os.close(fd)

    def truncate(self, n_rows: int) -> None:
        """Drop rows at and beyond `n_rows` (used by --rebuild and after compaction)."""
        if self.npy and self.legacy is not None:
            upgrade_legacy(self.legacy, self.path, self.dim)
        if self.path.exists():
            if self.npy:
                fd = os.open(self.path, os.O_RDWR)
                try:
                    os.pwrite(fd, npy_header(min(n_rows, self.n_rows), self.dim), 0)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.truncate(self.path, self.data_offset + n_rows * self.row_bytes)
        self._map = None

    def pin(self, fd: int) -> None:
        """Map the file open as `fd` once and for all: reads never see a file written after this."""
        offset = 0 if self._reading_legacy() or not self.npy else HEADER_BYTES
        if offset:
            rows = parse_npy_header(os.pread(fd, HEADER_BYTES, 0), self.path)[0]
        else:
            rows = os.fstat(fd).st_size // self.row_bytes
        if rows == 0:
            raise KeyError("the vector store is empty")
        with os.fdopen(os.dup(fd), "rb") as f:
            self._map = np.memmap(f, dtype=DTYPE, mode="r", offset=offset, shape=(rows, self.dim))
        self._map_rows = rows
        self._pinned = True

    def _mapped(self, min_rows: int) -> np.ndarray:
        if getattr(self, "_pinned", False):
            assert self._map is not None
            return self._map
        if self._map is None or self._map_rows < min_rows:
            rows = self.n_rows
            if rows == 0:
                raise KeyError("the vector store is empty")
            if self._reading_legacy():
                assert self.legacy is not None
                self._map = np.memmap(self.legacy, dtype=DTYPE, mode="r", shape=(rows, self.dim))
            elif self.npy:
                self._map = np.lib.format.open_memmap(self.path, mode="r")
            else:
                self._map = np.memmap(self.path, dtype=DTYPE, mode="r", shape=(rows, self.dim))
            self._map_rows = rows
        return self._map

    def release(self) -> None:
        """Unmap the file (the next read maps it again): its pages leave this process's resident set but
        stay in the page cache. Long scans call it now and then so that RSS stays the process's own
        memory; a pinned store keeps its map (it must keep reading one generation of the file)."""
        if not getattr(self, "_pinned", False):
            self._map = None
            self._map_rows = 0

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


FILE_RSS_BUDGET = 1 << 30  # mapped vector pages a long scan may keep resident before it unmaps the file


def _file_rss_bytes() -> int | None:
    """File-backed and shared resident memory of this process (/proc/self/statm), None off Linux."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[2]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class BoundedReader:
    """`store.read` for scans that touch the whole file: the mapped pages it leaves resident are kept
    near `budget` bytes by unmapping the file (`VectorStore.release`) whenever they grow past it.

    A read of scattered rows faults in far more than the rows (the kernel maps whole folios around
    each), so without this a scan of a 10M-vector file ends with all of it counted in the process's
    RSS. Reads go in CHUNK_ROWS pieces with a look at /proc/self/statm after each, so the overshoot is
    one piece's pages. The pages stay in the page cache.
    Example:
        read = BoundedReader(reader.vectors)
        vectors = read(ids)
    """

    CHUNK_ROWS = 512

    def __init__(self, store: "VectorStore", budget: int = FILE_RSS_BUDGET):
        self.store = store
        self.budget = budget
        store.release()
        self._base = _file_rss_bytes()  # libraries and other maps, resident before the scan

    def __call__(self, ids: np.ndarray | list[int]) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if self._base is None or len(ids) <= self.CHUNK_ROWS:
            out = self.store.read(ids)
            self._check()
            return out
        out = np.empty((len(ids), self.store.dim), np.float32)
        for start in range(0, len(ids), self.CHUNK_ROWS):
            out[start : start + self.CHUNK_ROWS] = self.store.read(ids[start : start + self.CHUNK_ROWS])
            self._check()
        return out

    def _check(self) -> None:
        now = _file_rss_bytes()
        if now is not None and self._base is not None and now - self._base > self.budget:
            self.store.release()
            # other maps may have grown meanwhile (a model, an index): the budget counts from here
            self._base = _file_rss_bytes()


def role_vectors(layout, role: str = "search", dim: int | None = None) -> VectorStore:  # noqa: ANN001 - IndexLayout
    """The vector store of an embedder role in an index folder (the search role reads a legacy
    `vectors.f16` until its first write converts it)."""
    legacy = layout.legacy_vectors_path if role == "search" else None
    return VectorStore(layout.vectors_for(role), dim, legacy=legacy)
