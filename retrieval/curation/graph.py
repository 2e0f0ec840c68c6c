"""The k-NN similarity graph, built in bounded-memory batches through the FAISS index.

For each batch of image ids: the ANN index proposes candidates, their exact cosine is computed
from the memory-mapped fp16 vectors, the top k (self excluded) are kept and only edges at or above
the threshold leave the batch. Candidates come from
* a flat index (small N): no index search at all, but a blocked matrix product of each query batch
  with the stored vectors (`scan_edges`), keeping what reaches the threshold: exact, and several
  times cheaper in CPU than FAISS's flat top-k search with its heap of k + 1 per query;
* IVF-Flat: its top k + 1, whose scores are already exact;
* an approximate one (IVF-PQ, at the index's tuned nprobe): a range search for every vector whose
  ANN score is within the measured margin of the threshold (`prefilter_margin`). At a high
  threshold that is a handful per query instead of a fixed re-rank depth of 10k, and no depth
  limit can cut off a true neighbour.
Memory is O(batch * candidates * dim) plus the surviving edges, whatever the corpus size; past
SPILL_EDGES edges the batches' edges go to disk (`EdgeSink`) and come back as memory-mapped arrays.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from retrieval import ann
from retrieval.vectors import clip_cosine

logger = logging.getLogger(__name__)

BATCH = 2048
CALIBRATION_QUERIES = 512  # queries whose every ANN candidate is re-ranked to measure the pre-filter margin
GATHER_CHUNK = 64  # queries whose candidate vectors are gathered at once (64 * 640 * 384 * 4 B = 63 MB)
GATHER_PAIRS = 1 << 15  # (query, candidate) pairs whose vectors are gathered at once in the range path
SPILL_EDGES = 1 << 23  # edges held in memory by the graph before they are written to disk
SPILL_PARTS = 16  # key ranges the spilled edges are sorted in (one at a time: bounded memory)
SCAN_BLOCK = 16_384  # stored vectors multiplied with a query batch at once in the exact scan
SCAN_CACHE_BYTES = 1 << 28  # the exact scan keeps the float32 vectors in memory up to this size


@dataclass
class Edges:
    """Undirected edges (src < dst) with their exact cosine."""

    src: np.ndarray
    dst: np.ndarray
    sim: np.ndarray

    @classmethod
    def empty(cls) -> "Edges":
        return cls(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))

    def __len__(self) -> int:
        return len(self.src)

    @classmethod
    def concat(cls, parts: list["Edges"]) -> "Edges":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        return cls(np.concatenate([p.src for p in parts]), np.concatenate([p.dst for p in parts]),
                   np.concatenate([p.sim for p in parts]))

    def canonical(self) -> "Edges":
        """src < dst, each pair once (the highest similarity kept), sorted by (src, dst)."""
        if not len(self):
            return self
        a, b = np.minimum(self.src, self.dst), np.maximum(self.src, self.dst)
        keep = a != b
        a, b, s = a[keep], b[keep], self.sim[keep]
        order = np.lexsort((-s, b, a))
        a, b, s = a[order], b[order], s[order]
        first = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])]
        return Edges(a[first], b[first], s[first].astype(np.float32))


def exact_rows(queries: np.ndarray, cand: np.ndarray, read: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Exact cosine of queries[i] with every candidate id cand[i, j] (-1 -> -inf).

    Only valid candidates are read and multiplied, so a sparse candidate matrix (most entries
    filtered out) costs in proportion to what is left.
    """
    out = np.full(cand.shape, -np.inf, dtype=np.float32)
    for start in range(0, len(cand), GATHER_CHUNK):
        c = cand[start : start + GATHER_CHUNK]
        rows, cols = np.nonzero(c >= 0)
        if not len(rows):
            continue
        uniq, inv = np.unique(c[rows, cols], return_inverse=True)
        vecs = read(uniq)
        q = queries[start : start + GATHER_CHUNK]
        out[start + rows, cols] = np.einsum("nd,nd->n", q[rows], vecs[inv])
    return out


def exact_pairs(queries: np.ndarray, rows: np.ndarray, cand: np.ndarray,
                read: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Exact cosine of queries[rows[i]] with the stored vector of id cand[i], GATHER_PAIRS at a time."""
    out = np.empty(len(rows), np.float32)
    for start in range(0, len(rows), GATHER_PAIRS):
        c = cand[start : start + GATHER_PAIRS]
        uniq, inv = np.unique(c, return_inverse=True)
        vecs = read(uniq)
        out[start : start + len(c)] = np.einsum("nd,nd->n", queries[rows[start : start + GATHER_PAIRS]], vecs[inv])
    return out


def supports_range_search(index: Any) -> bool:
    """CPU FAISS indexes answer range searches; their GPU clones do not."""
    return "Gpu" not in type(_unwrapped(index)).__name__


def range_edges(index: Any, queries: np.ndarray, query_ids: np.ndarray, k: int,
                read: Callable[[np.ndarray], np.ndarray], min_approx: float, threshold: float) -> Edges:
    """Edges of `query_ids` from every candidate whose ANN score is >= min_approx, re-ranked exactly.

    Each query keeps its k best candidates by exact cosine (ties by id), then those at or above the
    threshold: the k-NN graph's edges, as long as the ANN score of a true neighbour is not below
    min_approx (the measured margin) and its list is probed (the tuned nprobe).
    """
    lims, _, cand = index.range_search(np.ascontiguousarray(queries, dtype=np.float32), float(min_approx))
    rows = np.repeat(np.arange(len(queries)), np.diff(lims.astype(np.int64)))
    cand = cand.astype(np.int64)
    keep = (cand >= 0) & (cand != query_ids[rows])
    rows, cand = rows[keep], cand[keep]
    if not len(rows):
        return Edges.empty()
    sims = exact_pairs(queries, rows, cand, read)
    order = np.lexsort((cand, -sims, rows))
    rows, cand, sims = rows[order], cand[order], sims[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)  # position within its query's run
    sel = (rank < k) & (sims >= threshold)
    return Edges(query_ids[rows[sel]], cand[sel], clip_cosine(sims[sel]).astype(np.float32))


def search_exact_topk(index: Any, queries: np.ndarray, query_ids: np.ndarray | None, k: int,
                      read: Callable[[np.ndarray], np.ndarray], exact_index: bool,
                      min_approx: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by exact cosine among the ANN candidates, `query_ids[i]` excluded from row i.

    `min_approx`: candidates whose approximate (ANN) score is below it are dropped before the
    exact re-rank (see `prefilter_margin`).
    """
    extra = 1 if query_ids is not None else 0
    depth = k + extra if exact_index else ann.rerank_depth(k) + extra
    depth = min(depth, max(1, index.ntotal))
    approx, cand = index.search(queries, depth)
    if query_ids is not None:
        cand = np.where(cand == query_ids[:, None], -1, cand)
    if min_approx is not None:
        cand = np.where(approx >= min_approx, cand, -1)
    sims = exact_rows(queries, cand, read)
    kk = min(k, cand.shape[1])
    top = np.argsort(-sims, axis=1, kind="stable")[:, :kk]
    return clip_cosine(np.take_along_axis(sims, top, axis=1)), np.take_along_axis(cand, top, axis=1)


def prefilter_margin(index: Any, queries: np.ndarray, query_ids: np.ndarray, k: int,
                     read: Callable[[np.ndarray], np.ndarray], exact_scores: bool = False) -> float:
    """How far below its exact cosine a near neighbour's ANN score can fall, measured on `queries`.

    The graph only keeps edges at or above a high threshold, while most of the 640 re-rank
    candidates per query (k = 64) sit far below it; re-ranking them all is what made the graph
    slow (124 s of a 144 s dedup at 100k vectors, 20 s since). Candidates whose approximate score is below
    `threshold - margin` cannot reach the threshold if the quantisation error is below `margin`,
    so the margin is measured here: every candidate of these queries is re-ranked exactly, and
    the largest underestimate among each query's true top-k (the region the threshold lives in)
    is taken, with 50% + 0.02 headroom. On an index whose scores are exact (flat, IVF-Flat) the
    margin comes out at the headroom, and the re-rank only confirms the scores from the vector file.
    """
    depth = min((k if exact_scores else ann.rerank_depth(k)) + 1, max(1, index.ntotal))
    approx, cand = index.search(queries, depth)
    cand = np.where(cand == query_ids[:, None], -1, cand)
    exact = exact_rows(queries, cand, read)
    top = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    e = np.take_along_axis(exact, top, axis=1)
    a = np.take_along_axis(approx, top, axis=1)
    valid = np.isfinite(e)
    if not valid.any():
        return 1.0
    under = float(np.max(e[valid] - a[valid]))
    return max(0.0, under) * 1.5 + 0.02


def is_exact_index(index: Any) -> bool:
    """Exhaustive: a flat index (every vector is compared with every query)."""
    import faiss

    return isinstance(_unwrapped(index), faiss.IndexFlat)


def _unwrapped(index: Any) -> Any:
    """The index inside an IDMap, as its own type (SWIG hands `.index` back as a bare faiss.Index,
    which no isinstance check matches: the graph took the approximate path on flat indexes)."""
    import faiss

    if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return faiss.downcast_index(index.index)
    return index


def scores_are_exact(index: Any) -> bool:
    """Flat or IVF-Flat: the scores it returns are exact, so candidates past the top k+1 add nothing."""
    import faiss

    return isinstance(_unwrapped(index), (faiss.IndexFlat, faiss.IndexIVFFlat))


def maybe_gpu(index: Any, use_gpu: bool) -> Any:
    """The index cloned to all GPUs when asked and possible; the CPU index otherwise."""
    if not use_gpu or not ann.gpu_count():
        return index
    import faiss

    try:
        return faiss.index_cpu_to_all_gpus(index)
    except Exception as exc:  # noqa: BLE001 - not every index type has a GPU version
        logger.warning("searching on CPU: this index cannot be moved to the GPU (%s)", exc)
        return index


def knn_edges(index: Any, ids: np.ndarray, read: Callable[[np.ndarray], np.ndarray], k: int, threshold: float,
              batch: int = BATCH, progress: bool = False, extra: Any = None,
              stats: dict[str, Any] | None = None, ray: "RayGraph | None" = None) -> Edges:
    """Edges (i, j, exact cosine) with j among the k nearest of i and cosine >= threshold.

    `extra`, when given, is an (index, offset) pair searched as well (a reference set): its
    ids are shifted by `offset` so they never collide with image ids. `stats`, when given,
    receives the measured pre-filter margin. `ray`, when given, runs the batches as Ray tasks
    over shards of query ids (the margin is still measured here, once): the same edges.
    """
    from tqdm import tqdm

    exact = scores_are_exact(index)
    if ray is None and is_exact_index(index):
        if stats is not None:
            stats["candidates"] = "exact scan"
        return scan_edges(np.asarray(ids, np.int64), read, k, threshold, batch, progress, extra, stats)
    min_approx = None
    if len(ids) > 1:
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(ids, size=min(CALIBRATION_QUERIES, len(ids)), replace=False))
        margin = prefilter_margin(index, read(sample), sample, k, read, exact_scores=exact)
        min_approx = threshold - margin
        logger.info("k-NN graph: ANN scores under-estimate near neighbours by up to %.3f; candidates "
                    "scoring below %.3f are not re-ranked", margin, min_approx)
        if stats is not None:
            stats["prefilter_margin"] = round(margin, 4)
    if ray is not None:
        job = ShardJob(ray.faiss_path, ray.nprobe, ray.vectors, k, threshold, exact, min_approx, batch,
                       _serialized(extra))
        return _edges_on_ray(ray.address, ids, job, progress)
    if stats is not None:
        stats["candidates"] = ("range search" if min_approx is not None and not exact and supports_range_search(index)
                               else "top k + 1" if exact else "top re-rank depth")
        stats["nprobe"] = _nprobe(index)
    sink = EdgeSink(int(np.max(ids)) + 1 if len(ids) else 1)
    for start in tqdm(range(0, len(ids), batch), desc="k-NN graph", unit="batch", disable=not progress):
        chunk = np.asarray(ids[start : start + batch], dtype=np.int64)
        sink.add(batch_edges(index, chunk, read, k, threshold, exact, min_approx, extra))
    out = sink.result()
    if stats is not None and sink.spilled:
        stats["edges_spilled_to_disk"] = sink.spilled
    return out


def _topk_per_row(rows: np.ndarray, cand: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """The k best (rows, cand, sims) entries of each row by similarity (ties: the smaller id)."""
    order = np.lexsort((cand, -sims, rows))
    rows, cand, sims = rows[order], cand[order], sims[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)
    keep = rank < k
    return rows[keep], cand[keep], sims[keep]


def scan_edges(ids: np.ndarray, read: Callable[[np.ndarray], np.ndarray], k: int, threshold: float,
               batch: int = BATCH, progress: bool = False, extra: Any = None,
               stats: dict[str, Any] | None = None) -> Edges:
    """The k-NN edges at or above the threshold by brute force over the stored vectors of `ids`.

    Each batch of queries is multiplied with blocks of SCAN_BLOCK stored vectors; only similarities
    at or above the threshold are kept (at most k per query, merged block by block), so memory is
    O(batch * SCAN_BLOCK) whatever the threshold. The vectors are read once when they fit in
    SCAN_CACHE_BYTES as float32 (an index this small is flat), else per batch from the mapped file.
    """
    from tqdm import tqdm

    dim_bytes = 4 * (read(ids[:1]).shape[1] if len(ids) else 0)
    cached = read(ids) if len(ids) * dim_bytes <= SCAN_CACHE_BYTES else None
    sink = EdgeSink(int(ids.max()) + 1 if len(ids) else 1)
    for start in tqdm(range(0, len(ids), batch), desc="k-NN graph", unit="batch", disable=not progress):
        q_ids = ids[start : start + batch]
        queries = cached[start : start + batch] if cached is not None else read(q_ids)
        rows = np.empty(0, np.int64)
        cand = np.empty(0, np.int64)
        sims = np.empty(0, np.float32)
        for b0 in range(0, len(ids), SCAN_BLOCK):
            b_ids = ids[b0 : b0 + SCAN_BLOCK]
            block = cached[b0 : b0 + SCAN_BLOCK] if cached is not None else read(b_ids)
            s = queries @ block.T
            r, c = np.nonzero(s >= threshold)
            keep = b_ids[c] != q_ids[r]
            r, c = r[keep], c[keep]
            rows, cand, sims = np.r_[rows, r], np.r_[cand, b_ids[c]], np.r_[sims, s[r, c]]
            if len(rows) > 4 * k * len(q_ids):
                rows, cand, sims = _topk_per_row(rows, cand, sims, k)
        rows, cand, sims = _topk_per_row(rows, cand, sims, k)
        sink.add(Edges(q_ids[rows], cand, clip_cosine(sims.astype(np.float32))))
        if extra is not None:
            ref_index, offset = extra
            kk = min(k, ref_index.ntotal)
            if kk:
                s2, n2 = ref_index.search(np.ascontiguousarray(queries, np.float32), kk)
                sink.add(_above(q_ids, s2, np.where(n2 >= 0, n2 + offset, -1), threshold))
    out = sink.result()
    if stats is not None and sink.spilled:
        stats["edges_spilled_to_disk"] = sink.spilled
    return out


def _nprobe(index: Any) -> int | None:
    ivf = ann._ivf_or_none(index)
    return int(ivf.nprobe) if ivf is not None else None


class RangeFiles:
    """Arrays written to disk split into `parts` ranges of a key (SPILL_PARTS by default), and read back
    one range at a time: how the graph's sinks and the join's probes keep a peak of one range
    instead of everything at once."""

    def __init__(self, max_key: int, prefix: str, parts: int = SPILL_PARTS):
        self.parts = parts
        self.width = max(1, -(-max_key // parts))
        self.prefix = prefix
        self.folder: Path | None = None
        self.files: list[list[Path]] = [[] for _ in range(parts)]
        self.dtypes: list[np.dtype] = [np.dtype(np.int64), np.dtype(np.int64), np.dtype(np.float32)]

    def write(self, key: np.ndarray, *arrays: np.ndarray) -> None:
        part = np.minimum(key // self.width, self.parts - 1)
        # the ranges present, by counting: np.unique would sort a copy of every key
        for p in np.flatnonzero(np.bincount(part, minlength=self.parts)).tolist():
            sel = part == p
            self._add(p, [a[sel] for a in arrays])

    def write_sorted(self, starts: np.ndarray, *arrays: np.ndarray) -> None:
        """`arrays` already in key order: range p is arrays[starts[p]:starts[p + 1]] (parts + 1 starts),
        written as slices, without a copy of the arrays."""
        n = len(arrays[0]) if arrays else 0
        if len(starts) != self.parts + 1 or starts[0] != 0 or starts[-1] != n or (np.diff(starts) < 0).any():
            raise ValueError(f"starts must rise from 0 to {n} in {self.parts + 1} steps")
        for p in np.flatnonzero(np.diff(starts)).tolist():
            self._add(p, [a[starts[p] : starts[p + 1]] for a in arrays])

    def _add(self, p: int, pieces: list[np.ndarray]) -> None:
        """One more file of range p."""
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix=self.prefix))
        self.dtypes = [a.dtype for a in pieces]
        path = self.folder / f"p{p:04d}-{len(self.files[p]):05d}.npz"
        np.savez(path, *pieces)
        self.files[p].append(path)

    def ranges(self):
        """The arrays of each range in key order (range p: keys from p * width), its files removed once read."""
        for files in self.files:
            pieces = []
            for f in files:
                with np.load(f) as d:
                    pieces.append([d[f"arr_{i}"] for i in range(len(d.files))])
                f.unlink()
            if pieces:
                yield tuple(np.concatenate([piece[i] for piece in pieces]) for i in range(len(pieces[0])))
            else:
                yield tuple(np.empty(0, dt) for dt in self.dtypes)

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


class EdgeSink:
    """The graph's edges, collected batch by batch; past `limit` edges they are written to disk.

    Spilled edges are split by key range (the smaller end, i.e. the canonical src) into SPILL_PARTS
    files, each made canonical on its own; since canonical order sorts by src first, the parts laid
    end to end are canonical as a whole. The result is then a set of memory-mapped arrays (page
    cache, not process memory), and the peak is one part, not the whole edge list with its sort.
    """

    def __init__(self, max_key: int, limit: int | None = None):
        self.limit = SPILL_EDGES if limit is None else limit
        self.parts: list[Edges] = []
        self.held = 0
        self.spilled = 0
        self.disk = RangeFiles(max_key, "retrieval-edges-")

    def add(self, edges: Edges) -> None:
        if not len(edges):
            return
        self.parts.append(edges)
        self.held += len(edges)
        if self.held >= self.limit:
            self._spill()

    def _spill(self) -> None:
        e = Edges.concat(self.parts)
        self.parts, self.held = [], 0
        if not len(e):
            return
        first = self.disk.folder is None
        self.disk.write(np.minimum(e.src, e.dst), e.src, e.dst, e.sim)
        if first:
            logger.info("k-NN graph: more than %d edges, writing them to %s", self.limit, self.disk.folder)
        self.spilled += len(e)

    def result(self) -> Edges:
        """All edges, canonical (src < dst, each pair once, sorted)."""
        if self.disk.folder is None:
            return Edges.concat(self.parts).canonical()
        self._spill()
        try:
            sizes, done = [], []
            for p, (src, dst, sim) in enumerate(self.disk.ranges()):
                part = Edges(src, dst, sim).canonical()
                assert self.disk.folder is not None
                path = self.disk.folder / f"c{p:02d}.npz"
                np.savez(path, src=part.src, dst=part.dst, sim=part.sim)
                sizes.append(len(part))
                done.append(path)
            total = int(sum(sizes))
            out_dir = Path(tempfile.mkdtemp(prefix="retrieval-edges-canonical-"))
            cols = {name: np.lib.format.open_memmap(out_dir / f"{name}.npy", mode="w+", dtype=dt, shape=(total,))
                    for name, dt in (("src", np.int64), ("dst", np.int64), ("sim", np.float32))}
            at = 0
            for path, size in zip(done, sizes):
                with np.load(path) as d:
                    for name, col in cols.items():
                        col[at : at + size] = d[name]
                at += size
            for col in cols.values():
                col.flush()
            # read back read-only; the files stay mapped until the arrays go, then the folder can go
            mapped = {name: np.load(out_dir / f"{name}.npy", mmap_mode="r") for name in cols}
            shutil.rmtree(out_dir, ignore_errors=True)  # unlinked: the mapping keeps the data until released
            return Edges(mapped["src"], mapped["dst"], mapped["sim"])
        finally:
            self.disk.close()


def batch_edges(index: Any, chunk: np.ndarray, read: Callable[[np.ndarray], np.ndarray], k: int, threshold: float,
                exact: bool, min_approx: float | None, extra: Any = None) -> Edges:
    """The edges of one batch of query ids (the unit of work, locally and in a Ray task)."""
    queries = read(chunk)
    if min_approx is not None and not exact and supports_range_search(index):
        parts = [range_edges(index, queries, chunk, k, read, min_approx, threshold)]
    else:
        sims, nbrs = search_exact_topk(index, queries, chunk, k, read, exact, min_approx)
        parts = [_above(chunk, sims, nbrs, threshold)]
    if extra is not None:
        ref_index, offset = extra
        kk = min(k, ref_index.ntotal)
        if kk:
            s, n = ref_index.search(queries, kk)  # a flat index over float32 vectors: exact already
            parts.append(_above(chunk, s, np.where(n >= 0, n + offset, -1), threshold))
    return Edges.concat(parts)


# --- the same graph as Ray tasks ---------------------------------------------------------------
RAY_SHARD_BATCHES = 16  # query batches per Ray task


@dataclass(frozen=True)
class RayGraph:
    """Where the index lives, for tasks on other nodes (the index folder is on shared storage)."""

    address: str
    faiss_path: str
    nprobe: int
    vectors: Any  # a VectorStore: pickles as (path, dim) and maps the file on the worker


@dataclass(frozen=True)
class ShardJob:
    faiss_path: str
    nprobe: int
    vectors: Any
    k: int
    threshold: float
    exact: bool
    min_approx: float | None
    batch: int
    extra: tuple[bytes, int] | None  # the reference set's flat index, serialised, and its id offset


def _serialized(extra: Any) -> tuple[bytes, int] | None:
    if extra is None:
        return None
    import faiss

    ref_index, offset = extra
    return faiss.serialize_index(ref_index).tobytes(), offset


_LOADED: dict[tuple[str, int, int, int], Any] = {}  # one FAISS index per worker process, reused by its tasks


def _index_for(job: ShardJob) -> Any:
    return mapped_index(job.faiss_path, job.nprobe)


def mapped_index(faiss_path: str, nprobe: int) -> Any:
    """The FAISS file memory-mapped with `nprobe` set, loaded once per worker process and reused by
    its tasks until the file changes."""
    stat = Path(faiss_path).stat()
    key = (faiss_path, stat.st_mtime_ns, stat.st_size, nprobe)
    if key not in _LOADED:
        _LOADED.clear()
        index = ann.load_index(Path(faiss_path), mmap=True)
        ann.set_nprobe(index, nprobe)
        _LOADED[key] = index
    return _LOADED[key]


def shard_edges(ids: np.ndarray, job: ShardJob) -> Edges:
    """A Ray task: the edges of a shard of query ids, batch by batch exactly as the local loop does."""
    index = _index_for(job)
    extra = None
    if job.extra is not None:
        import faiss

        extra = (faiss.deserialize_index(np.frombuffer(job.extra[0], dtype=np.uint8)), job.extra[1])
    return Edges.concat([batch_edges(index, ids[start : start + job.batch], job.vectors.read, job.k, job.threshold,
                                     job.exact, job.min_approx, extra)
                         for start in range(0, len(ids), job.batch)])


def _edges_on_ray(address: str, ids: np.ndarray, job: ShardJob, progress: bool) -> Edges:
    from retrieval.distributed import map_shards, shards

    ids = np.asarray(ids, dtype=np.int64)
    pieces = [ids[a:b] for a, b in shards(len(ids), RAY_SHARD_BATCHES * job.batch)]
    return Edges.concat(map_shards(address, shard_edges, pieces, job, progress=progress, desc="k-NN graph")).canonical()


def exact_topk(q_ids: np.ndarray, queries: np.ndarray, ids: np.ndarray, read: Callable[[np.ndarray], np.ndarray],
               k: int, block: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """(cosine, id) of the exact top k of each query over every vector of `ids` (the query's own id
    excluded), best first, by a blocked scan: memory O(len(queries) * block). Padded with -inf / -1."""
    import torch

    q = torch.from_numpy(np.ascontiguousarray(queries, np.float32))
    own = torch.from_numpy(np.asarray(q_ids, np.int64))
    best_s = torch.full((len(q), 0), -np.inf)
    best_i = torch.full((len(q), 0), -1, dtype=torch.int64)
    for start in range(0, len(ids), block):
        b = torch.from_numpy(np.asarray(ids[start : start + block], np.int64))
        s = q @ torch.from_numpy(np.ascontiguousarray(read(ids[start : start + block]), np.float32)).T
        s[own[:, None] == b[None, :]] = -np.inf  # a node is not its own neighbour
        s = torch.cat([best_s, s], dim=1)
        i = torch.cat([best_i, b.expand(len(q), -1)], dim=1)
        top = torch.topk(s, min(k, s.shape[1]), dim=1)
        best_s, best_i = top.values, torch.gather(i, 1, top.indices)
    sims = best_s.numpy()
    return sims, np.where(np.isfinite(sims), best_i.numpy(), -1)


def sampled_edge_recall(edges: Edges, ids: np.ndarray, read: Callable[[np.ndarray], np.ndarray], k: int,
                        threshold: float, sample: int = 256, block: int = 16_384, seed: int = 0) -> dict[str, Any]:
    """Edge recall at the threshold against brute force, on `sample` query nodes.

    For each sampled node the exact top k (by a scan of every stored vector, in blocks of `block`
    rows, so memory stays O(sample * block)) gives the true edges at or above the threshold; the
    recall is the share of them present in `edges` (ids, canonical). This is the graph's loss from
    the approximate index, measured in every run instead of assumed.
    """
    ids = np.asarray(ids, np.int64)
    if len(ids) < 2 or sample <= 0:
        return {"queries": 0, "true_edges": 0, "recall": None}
    rng = np.random.default_rng(seed)
    q_ids = np.sort(rng.choice(ids, size=min(sample, len(ids)), replace=False))
    queries = read(q_ids)
    best_s, best_i = exact_topk(q_ids, queries, ids, read, min(k, len(ids) - 1), block)
    rows, cols = np.nonzero(best_s >= threshold)
    a = np.minimum(q_ids[rows], best_i[rows, cols])
    b = np.maximum(q_ids[rows], best_i[rows, cols])
    base = int(max(ids.max(), edges.dst.max() if len(edges) else 0)) + 1
    truth = np.unique(a * base + b)
    found = np.isin(truth, edges.src.astype(np.int64) * base + edges.dst.astype(np.int64))
    return {"queries": int(len(q_ids)), "true_edges": int(len(truth)),
            "recall": round(float(found.mean()), 5) if len(truth) else None}


def _above(src_ids: np.ndarray, sims: np.ndarray, nbrs: np.ndarray, threshold: float) -> Edges:
    mask = (sims >= threshold) & (nbrs >= 0)
    rows, cols = np.nonzero(mask)
    return Edges(src_ids[rows], nbrs[rows, cols].astype(np.int64), sims[rows, cols].astype(np.float32))


def brute_force_edges(ids: np.ndarray, vectors: np.ndarray, threshold: float, k: int | None = None) -> Edges:
    """The oracle: every pair (k=None) or every k-NN pair at or above the threshold, by full matrix product."""
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    if k is not None:
        kk = min(k, len(ids) - 1)
        top = np.argsort(-sims, axis=1, kind="stable")[:, :kk]
        mask = np.zeros_like(sims, dtype=bool)
        np.put_along_axis(mask, top, True, axis=1)
        sims = np.where(mask, sims, -np.inf)
    rows, cols = np.nonzero(sims >= threshold)
    return Edges(ids[rows], ids[cols], sims[rows, cols].astype(np.float32)).canonical()
