"""FAISS: choose an index for N vectors and a memory budget, build it, tune nprobe for recall.

Policy (compare autofaiss, which tunes nprobe for latency only and reports no recall):
* below `exact_threshold` vectors: exact inner-product search (IDMap2,Flat); IVF training is
  unreliable with few points per list, and brute force is fast at that size;
* above: IVF-PQ. nlist ~ 4*sqrt(N) rounded to a power of two (at least 39 training points per
  list); the PQ code size is the largest that fits the memory budget, capped at d/4 bytes (more
  buys little because results are re-ranked exactly from the stored fp16 vectors). No OPQ, and
  the PQ codebooks train on 64 points per centroid for 10 iterations (FAISS: 256 and 25): measured
  on 100k clustered vectors (d = 384, one loaded 2-core machine), `IVF1024,PQ96` trained in 686 s
  with FAISS's defaults and in 51 s so, with the same recall@10 after re-ranking (1.000 at
  nprobe 4-64); OPQ's rotation training was slower still, and the exact re-rank recovers what it
  buys. (4-bit fast-scan PQ trains and searches faster still, but in FAISS 1.15 removing ids and
  adding them back corrupts its packed codes: 8 of 20 re-added vectors were not found any more.);
* nprobe is the smallest value whose recall@10 (after exact re-ranking, self excluded) on held-out
  vectors reaches the recall target; the measured curve is stored with the index;
* when PQ misses the target even with every list probed (tightly packed, near-duplicate-heavy
  data), the next more precise index that fits the budget is built instead (IVF-SQ8, IVF-Flat,
  exact), and the automatic choice it replaces is recorded with it.
All vectors are L2-normalised, so inner product = cosine.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from retrieval.errors import RetrievalError
from retrieval.layout import fsync_dir
from retrieval.vectors import check_matrix, clip_cosine

logger = logging.getLogger(__name__)

MIN_POINTS_PER_LIST = 39  # below this FAISS warns that k-means is unreliable
MIN_IVF_VECTORS = 1000  # PQ trains 256 centroids per sub-quantizer: below this, always exact
TRAIN_POINTS_PER_LIST = 64
PQ_TRAIN_POINTS_PER_CENTROID = 64
PQ_TRAIN_ITERATIONS = 10
MAX_TRAIN_POINTS = 500_000
RERANK_MIN = 100  # ANN candidates re-ranked exactly: max(RERANK_MIN, RERANK_FACTOR * k)
RERANK_FACTOR = 10
TUNE_K = 10
TUNE_QUERIES = 1000


@dataclass
class IndexSpec:
    """What to build: a FAISS factory string plus the numbers behind the choice."""

    kind: str  # "flat", "ivfpq" or "custom"
    factory: str
    n: int
    dim: int
    nlist: int | None = None
    pq_m: int | None = None
    estimated_bytes: int = 0
    params: dict[str, Any] = field(default_factory=dict)  # filled after tuning: nprobe, recall curve

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "IndexSpec":
        return cls(**data)


def _pow2_near(x: float) -> int:
    return 1 << max(0, round(math.log2(max(1.0, x))))


def choose_nlist(n: int) -> int:
    nlist = min(_pow2_near(4 * math.sqrt(n)), 65_536)
    while nlist > 16 and n / nlist < MIN_POINTS_PER_LIST:
        nlist //= 2
    return nlist


def choose_index_spec(n: int, dim: int, memory_budget: int, exact_threshold: int, factory: str | None = None) -> IndexSpec:
    """The index for `n` vectors of `dim` that fits `memory_budget` bytes of RAM."""
    if n <= 0:
        raise RetrievalError("there are no embeddings to index")
    if factory:
        return IndexSpec(kind="custom", factory=factory, n=n, dim=dim)
    if n < max(exact_threshold, MIN_IVF_VECTORS):
        return IndexSpec(kind="flat", factory="IDMap2,Flat", n=n, dim=dim, estimated_bytes=n * (4 * dim + 8))
    nlist = choose_nlist(n)
    fixed = nlist * dim * 4 + n * 8  # centroids, stored ids
    per_vector = (memory_budget - fixed) // n
    sizes = [m for m in range(dim // 4, 3, -1) if dim % m == 0]
    if not sizes:
        raise RetrievalError(f"no PQ code size divides the dimension {dim}; pass --index-factory")
    candidates = [m for m in sizes if m <= per_vector]
    if not candidates:
        need = fixed + n * sizes[-1]
        raise RetrievalError(
            f"--memory-budget {memory_budget / 1e9:.2f} GB is too small for {n:,} vectors; "
            f"at least {need / 1e9:.2f} GB is needed (or pass --index-factory)"
        )
    m = candidates[0]
    coarse = f"IVF{nlist}_HNSW32" if nlist >= 8192 else f"IVF{nlist}"
    return IndexSpec(
        kind="ivfpq",
        factory=f"{coarse},PQ{m}",
        n=n,
        dim=dim,
        nlist=nlist,
        pq_m=m,
        estimated_bytes=fixed + n * m,
    )


def precise_fallbacks(spec: IndexSpec, memory_budget: int) -> list[IndexSpec]:
    """More precise indexes to try, in order, when `spec` cannot reach the recall target.

    PQ codes can be too coarse for tightly packed data (near-duplicate-heavy corpora); 8-bit
    scalar quantisation, then full vectors in the same lists, then exact search, each only if it
    fits the memory budget. Exact search always reaches the target.
    """
    if spec.kind != "ivfpq" or not spec.nlist:
        return []
    n, d, nlist = spec.n, spec.dim, spec.nlist
    coarse = f"IVF{nlist}_HNSW32" if nlist >= 8192 else f"IVF{nlist}"
    options = [
        IndexSpec(kind="ivfsq8", factory=f"{coarse},SQ8", n=n, dim=d, nlist=nlist,
                  estimated_bytes=nlist * d * 4 + n * (d + 8)),
        IndexSpec(kind="ivfflat", factory=f"{coarse},Flat", n=n, dim=d, nlist=nlist,
                  estimated_bytes=nlist * d * 4 + n * (4 * d + 8)),
        IndexSpec(kind="flat", factory="IDMap2,Flat", n=n, dim=d, estimated_bytes=n * (4 * d + 8)),
    ]
    return [o for o in options if o.estimated_bytes <= memory_budget]


def gpu_count() -> int:
    import faiss

    try:
        return faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0
    except Exception:  # noqa: BLE001 - a broken CUDA setup means "no GPU" here
        return 0


def new_index(spec: IndexSpec) -> Any:
    import faiss

    try:
        index = faiss.index_factory(spec.dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        text = str(exc).strip().splitlines()[-1] if str(exc).strip() else "rejected by FAISS"
        reason = text.rsplit("failed: ", 1)[-1].rsplit("Error: ", 1)[-1]  # drop FAISS's C++ location prefix
        raise RetrievalError(f"invalid index factory {spec.factory!r} for {spec.dim}-d vectors: {reason}") from None
    if not _has_native_ids(index):
        index = faiss.IndexIDMap2(index)
    ivf = _ivf_or_none(index)
    if ivf is not None:
        ivf = faiss.downcast_index(ivf)
        if hasattr(ivf, "do_polysemous_training"):
            # On by default in index_factory, useless for inner-product search, and slow to train.
            ivf.do_polysemous_training = False
        ivf.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
        ivf.cp.niter = 15
        pq = getattr(ivf, "pq", None)
        if pq is not None and not getattr(ivf, "bbs", 0):  # 8-bit PQ: see the module docstring
            pq.cp.max_points_per_centroid = PQ_TRAIN_POINTS_PER_CENTROID
            pq.cp.niter = PQ_TRAIN_ITERATIONS
        if gpu_count():
            # Train the coarse k-means on the GPU (the FAISS-recommended trick); search stays CPU.
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
    return index


def _ivf_or_none(index: Any) -> Any:
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _has_native_ids(index: Any) -> bool:
    import faiss

    return isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) or _ivf_or_none(index) is not None


def train_sample_size(spec: IndexSpec) -> int:
    if spec.nlist:
        return min(spec.n, max(spec.nlist * TRAIN_POINTS_PER_LIST, 65_536), MAX_TRAIN_POINTS)
    return min(spec.n, MAX_TRAIN_POINTS)


def index_ids(index: Any) -> np.ndarray:
    """Every id stored in `index`, sorted."""
    import faiss
    from faiss.contrib.inspect_tools import get_invlist

    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return np.sort(faiss.vector_to_array(index.id_map).astype(np.int64))
    ivf = _ivf_or_none(index)
    if ivf is None:
        raise RetrievalError(f"cannot list the ids of a {type(index).__name__} index")
    parts = [get_invlist(ivf.invlists, l)[0] for l in range(ivf.nlist) if ivf.invlists.list_size(l)]
    return np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)


def add(index: Any, ids: np.ndarray, vectors: np.ndarray) -> None:
    vectors = check_matrix(vectors, index.d)
    index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))


def remove(index: Any, ids: np.ndarray) -> int:
    import faiss

    if len(ids) == 0:
        return 0
    return int(index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))))


def set_nprobe(index: Any, nprobe: int) -> None:
    """The default nprobe of an index, set once when it is built or loaded (searches pass their own)."""
    ivf = _ivf_or_none(index)
    if ivf is not None:
        ivf.nprobe = int(nprobe)


def search_params(index: Any, nprobe: int | None) -> Any:
    """FAISS SearchParameters with `nprobe` for one search call, or None (no IVF, or no nprobe given).

    Per-call parameters leave the shared index untouched, so threads searching the same index with
    different nprobe values need no lock. Wrappers (pre-transforms, id maps, refinement) get the
    matching parameter object around the IVF one.
    """
    import faiss

    if nprobe is None or _ivf_or_none(index) is None:
        return None
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIVF):
        return faiss.SearchParametersIVF(nprobe=int(nprobe))
    if isinstance(index, faiss.IndexPreTransform):
        return faiss.SearchParametersPreTransform(index_params=search_params(index.index, nprobe))
    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return search_params(index.index, nprobe)
    if isinstance(index, faiss.IndexRefine):
        return faiss.IndexRefineSearchParameters(base_index_params=search_params(index.base_index, nprobe))
    raise RetrievalError(f"cannot set nprobe per search on a {type(index).__name__} index")


def rerank_depth(k: int) -> int:
    return max(RERANK_MIN, RERANK_FACTOR * k)


def search_reranked(
    index: Any, queries: np.ndarray, k: int, read_vectors: Callable[[np.ndarray], np.ndarray],
    nprobe: int | None = None, exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """ANN candidates, then exact cosine from the stored vectors. Returns (scores, ids), -1 padded.

    `nprobe` applies to this call only (the index's own default otherwise).

    `exclude[i]` (an id or -1) is dropped from the results of query i (query-by-id without self).
    """
    queries = check_matrix(queries, index.d, "queries")
    depth = min(rerank_depth(k) + (1 if exclude is not None else 0), max(1, index.ntotal))
    _, cand = index.search(queries, depth, params=search_params(index, nprobe))
    out_ids = np.full((len(queries), k), -1, dtype=np.int64)
    out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for i, row in enumerate(cand):
        row = row[row >= 0]
        if exclude is not None and exclude[i] >= 0:
            row = row[row != exclude[i]]
        if len(row) == 0:
            continue
        exact = read_vectors(row) @ queries[i]
        top = np.argsort(-exact, kind="stable")[:k]
        out_ids[i, : len(top)] = row[top]
        out_scores[i, : len(top)] = clip_cosine(exact[top])
    return out_scores, out_ids


# Similarities computed at once by exact_knn (16 MB of float32): its memory no longer grows with
# queries x batch (1,000 tuning queries x 65,536-row batches took ~0.9 GB of temporaries, most of
# an index build's peak RSS).
KNN_CHUNK_ELEMENTS = 1 << 22


def exact_knn(queries: np.ndarray, batches: Iterator[tuple[np.ndarray, np.ndarray]], k: int,
              exclude: np.ndarray | None = None) -> np.ndarray:
    """Brute-force top-k ids over (ids, vectors) batches, in bounded memory. The oracle.

    Queries are taken in groups sized so that one group's similarities to one batch stay within
    KNN_CHUNK_ELEMENTS; each group keeps its own result heap.
    """
    import faiss

    queries = check_matrix(queries, name="queries")
    depth = k + (1 if exclude is not None else 0)
    groups: list[tuple[int, int, Any]] = []  # (start, stop, heap), fixed by the first batch's size
    for ids, vectors in batches:
        if not groups:
            step = max(1, KNN_CHUNK_ELEMENTS // max(1, len(ids)))
            bounds = [(a, min(a + step, len(queries))) for a in range(0, len(queries), step)]
            groups = [(a, b, faiss.ResultHeap(b - a, depth, keep_max=True)) for a, b in bounds]
        kk = min(depth, len(ids))
        if kk == 0:
            continue
        for start, stop, heap in groups:
            sims = queries[start:stop] @ vectors.T
            if exclude is not None:
                sims[exclude[start:stop, None] == ids[None, :]] = -np.inf
            part = np.argpartition(sims, len(ids) - kk, axis=1)[:, len(ids) - kk :]
            d = np.take_along_axis(sims, part, axis=1)
            heap.add_result(np.ascontiguousarray(d, dtype=np.float32), np.ascontiguousarray(ids[part], dtype=np.int64))
    if not groups:
        return np.full((len(queries), k), -1, dtype=np.int64)
    out = []
    for _, _, heap in groups:
        heap.finalize()
        out.append(heap.I[:, :k])
    return np.vstack(out)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true top-k present in the found top-k (ids; -1 never matches)."""
    hits = sum(len(set(f[f >= 0]) & set(t[t >= 0])) for f, t in zip(found, truth))
    total = sum(int((t >= 0).sum()) for t in truth)
    return hits / total if total else 1.0


def tune_nprobe(index: Any, spec: IndexSpec, query_ids: np.ndarray, truth: np.ndarray,
                read_vectors: Callable[[np.ndarray], np.ndarray], target: float) -> dict[str, Any]:
    """Smallest nprobe whose re-ranked recall@10 reaches `target`; the curve is returned too."""
    queries = read_vectors(query_ids)
    ivf = _ivf_or_none(index)
    if ivf is None:
        _, found = search_reranked(index, queries, TUNE_K, read_vectors, exclude=query_ids)
        r = recall_at_k(found, truth)
        return {"nprobe": None, "recall_at_10": r, "curve": [[None, r]], "target": target, "queries": len(query_ids)}
    curve = []
    chosen = None
    nprobe = 1
    while True:
        _, found = search_reranked(index, queries, TUNE_K, read_vectors, nprobe=nprobe, exclude=query_ids)
        r = recall_at_k(found, truth)
        curve.append([nprobe, round(r, 4)])
        if r >= target:
            chosen = nprobe
            break
        if nprobe >= ivf.nlist:
            break
        nprobe = min(nprobe * 2, ivf.nlist)
    if chosen is None:
        chosen = curve[-1][0]
        logger.warning("recall@10 %.3f at nprobe=%d is below the target %.2f", curve[-1][1], chosen, target)
    set_nprobe(index, chosen)
    return {"nprobe": chosen, "recall_at_10": curve[-1][1], "curve": curve, "target": target,
            "queries": len(query_ids), "rerank_depth": rerank_depth(TUNE_K)}


def save_index(index: Any, path: Path) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers never see a torn index."""
    import faiss

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        faiss.write_index(index, str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except (RuntimeError, OSError) as exc:
        tmp.unlink(missing_ok=True)  # a half-written index must not keep a full disk full
        raise RetrievalError(f"cannot write the FAISS index {path}: {_write_failure(path, exc)}") from None
    fsync_dir(path.parent)


def _write_failure(path: Path, exc: BaseException) -> str:
    """One line for a failed write: FAISS's own message is a multi-line C++ trace."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    try:
        st = os.statvfs(path.parent)
        if st.f_bavail * st.f_frsize < (1 << 20):
            return "no space left on the device"
    except OSError:
        pass
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def load_index(path: Path, mmap: bool = False, read_only: bool = False) -> Any:
    """The FAISS index at `path`. Readers pass `read_only` (or `mmap`, which implies it): on-disk
    inverted lists are then mapped read-only, so an index on read-only media or owned by another
    user opens; writers (sync) leave it False. On-disk lists recorded at a path that no longer
    exists (the index folder was moved or copied) are looked for beside the FAISS file."""
    import faiss

    if not path.exists():
        raise RetrievalError(f"no FAISS index at {path}; run `retrieval index` first")
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else (faiss.IO_FLAG_READ_ONLY if read_only else 0)
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        moved = _with_moved_lists(path, str(exc), flags & faiss.IO_FLAG_READ_ONLY)
        if moved is not None:
            return moved
        if mmap:  # not every index type can be memory-mapped
            return faiss.read_index(str(path))
        raise


def _with_moved_lists(path: Path, error: str, flags: int) -> Any:
    """The index at `path` with its on-disk lists file found beside it, when FAISS could not open the
    absolute path it recorded; None when that is not what failed. The FAISS file of such an index
    holds only the quantizer and list offsets, so it is read into memory and the recorded path
    (a length-prefixed string) is replaced before FAISS parses it."""
    import re
    import struct

    import faiss

    found = re.search(r"could not open (.+) in mode r\+?:", error)
    if found is None:
        return None
    recorded = found.group(1)
    beside = path.parent / Path(recorded).name
    if not recorded.endswith(".ivfdata") or not beside.is_file() or str(beside) == recorded:
        return None
    data = path.read_bytes()
    old, new = recorded.encode(), str(beside.resolve()).encode()
    old_field = struct.pack("<Q", len(old)) + old
    if data.count(old_field) != 1:
        return None
    logger.info("the lists file %s moved: using %s", recorded, beside)
    patched = data.replace(old_field, struct.pack("<Q", len(new)) + new)
    return faiss.deserialize_index(np.frombuffer(patched, dtype=np.uint8), flags)
