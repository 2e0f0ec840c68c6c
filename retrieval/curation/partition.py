"""The k-NN graph at scale by a partitioned similarity join: cells of a spherical k-means, joined by BLAS.

Why not the ANN index: at a dedup threshold the graph keeps only pairs a short distance apart
(cos >= t means ||x - y|| <= r = sqrt(2 - 2t)), so each vector needs only the cells that can hold
such a neighbour, and the work is dense matrix products instead of per-query list scans and
gathers. It reads only the vectors file, never the FAISS index.

1. Cells: spherical k-means (FAISS) on a sample, in the vectors' top PROJECTED_DIM principal
   directions (a projection never lengthens a difference, so the bound below still holds, and
   assigning N vectors to the cells costs d' (d + cells) each instead of d * cells); every vector
   goes to the cell of its most similar centroid (its home).
2. Probes: y can lie in cell j only if x is near the boundary between its home i and j. The gap
   g_j(x) = <x, c_i> - <x, c_j> and the boundary's spread ||c_i - c_j|| say how near; for a pair
   (x, y) the two gaps sum to <x - y, c_i - c_j> = z ||x - y|| ||c_i - c_j||, where z is the cosine
   between the pair's difference and the centroids' difference. A pair is found from the side with
   the smaller gap, so probing every cell with g_j(x) <= rho * r * ||c_i - c_j|| finds each pair
   whose z <= 2 rho. rho is measured on every run: z of the exact nearest neighbours of sampled
   vectors, at its RHO_QUANTILE quantile, halved, with RHO_HEADROOM (z is scale-free: the
   neighbours need not be above the threshold). rho = 1/2 is exact (the two gaps sum to at most
   r ||c_i - c_j||) but, in hundreds of dimensions, probes nearly every cell.
3. Join: per cell, the rows (its members, then the visitors probing it) are multiplied with its
   members through torch, in bfloat16 where that is faster (Products: blocks padded to a few
   shapes, since oneDNN compiles and keeps a kernel per shape) or float32; the block only filters
   (at the threshold less the dtype's error), and every product that passes is re-scored one pair
   at a time in float32, as brute force scores pairs, so a pair the probes reach falls on the side
   of the threshold brute force puts it, with the same value in either dtype.
   A visitor's hit is recorded both ways, since the member may never probe the visitor's cell.
   Within a block a row keeps at most its k largest products, so a cell of copies costs k per row.
4. Each vector keeps its k best (by cosine, ties by id) over every hit it took part in; the edges
   are made canonical with graph.EdgeSink (both spill to disk when large).

The loss is in step 2 only; `retrieval dedup` measures it on every run (graph.sampled_edge_recall).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from retrieval.curation.graph import (
    SPILL_EDGES,
    Edges,
    EdgeSink,
    RangeFiles,
    _above,
    _topk_per_row,
    exact_topk,
)
from retrieval.curation.joinrows import Int8Rows, JoinRows, StoredRows, join_rows, rounded_down
from retrieval.vectors import clip_cosine

logger = logging.getLogger(__name__)

MIN_VECTORS = 20_000  # below this the exact join of one cell (exact_edges) is cheap enough
EXACT_MAX = 200_000  # the exact join for a flat index up to here (its columns are held whole: ~2 KB a vector)
CELLS_PER_ROOT_N = 3.0  # cells ~ 3 sqrt(N): balances assigning (N * cells) against joining (N^2 * probes / cells)
MAX_CELLS = 16_384
PROJECTED_DIM = 128  # principal directions the cells live in (Cells)
TRAIN_POINTS_PER_CELL = 16  # k-means sample per cell (FAISS wants at least 39 to avoid a warning; it subsamples)
KMEANS_ITERATIONS = 6
CALIBRATION_QUERIES = 256
CALIBRATION_NEIGHBOURS = 10
RHO_QUANTILE = 0.99
RHO_HEADROOM = 1.25
RHO_MIN = 0.05
RHO_EXACT = 0.5  # g_x + g_y <= r ||c_i - c_j||, so one side's gap is at most half: every pair is found
PROBES_HELD = 1 << 26  # probe keys (8 bytes each) held in memory before they go to disk (Probes)
PROBE_PARTS = 64  # ranges of cells the spilled probes are read back in
GATHER_PAIRS = 1 << 15  # pairs re-scored at once
ASSIGN_BLOCK = 4096  # vectors scored against every centroid at once (4096 x cells float32)
ROW_BLOCK = 2048  # rows x columns of one product in the join
COL_BLOCK = 1024
PRODUCTS = "auto"  # "float32", "bfloat16", or "auto": bfloat16 where it is BF16_SPEEDUP times faster (Products)
BF16_SPEEDUP = 1.5
BF16_SLACK = 0.01  # > 2 * 2^-8 + SLACK: how far rounding the inputs can lower a product of unit vectors
PAD_ROWS = 512  # bfloat16 blocks are padded to multiples of these (a few shapes, a few kernels)
PAD_COLS = 256
# float32 products of unit vectors in another summation order differ by at most ~d * 2^-24 (4096 dims: 2.4e-4)
SLACK = 2.5e-4


@dataclass
class Plan:
    """The partition: home cell per position, and the (cell, position) probes beyond the home."""

    centroids: np.ndarray
    home: np.ndarray  # int32, per position
    probes: "Probes"
    rho: float


class Probes:
    """The (cell, position) probes, packed into int64 keys (cell << 32 | position): held in memory up to
    PROBES_HELD keys, beyond that written to disk in PROBE_PARTS ranges of cells (graph.RangeFiles),
    and handed to the join one range of cells at a time, sorted. At ten million vectors the probes
    outnumber the vectors tens of times over; this keeps them out of the memory budget."""

    def __init__(self, n_cells: int, limit: int | None = None):
        self.n_cells = n_cells
        self.limit = PROBES_HELD if limit is None else limit
        self.parts: list[np.ndarray] = []
        self.held = 0
        self.count = 0
        self.disk = RangeFiles(n_cells, "retrieval-probes-", parts=PROBE_PARTS)

    def add(self, keys: np.ndarray) -> None:
        self.parts.append(keys)
        self.held += len(keys)
        self.count += len(keys)
        if self.held >= self.limit:
            self._spill()

    def _spill(self) -> None:
        keys = _concatenate_freeing(self.parts)
        self.held = 0
        if len(keys):
            first = self.disk.folder is None
            # sorted in place, each range is a slice: no per-key temporaries beside the keys (the
            # spill can come while the join's rows are resident)
            keys.sort()
            cuts = np.minimum(np.arange(self.disk.parts + 1, dtype=np.int64) * self.disk.width, self.n_cells)
            self.disk.write_sorted(np.searchsorted(keys, cuts << 32), keys)
            if first:
                logger.info("k-NN graph: more than %d probes, writing them to %s", self.limit, self.disk.folder)

    def settle(self) -> None:
        """Once every probe is added: if some went to disk, the rest follow now (before the join makes
        its rows), so that nothing is written while the join holds them."""
        if self.disk.folder is not None:
            self._spill()

    def ranges(self):
        """(first cell, end cell, positions int32 sorted by (cell, position), bounds: cell j's positions
        are positions[bounds[j - first]:bounds[j - first + 1]]) for consecutive ranges of cells."""
        if self.disk.folder is None:
            keys = _concatenate_freeing(self.parts)
            self.held = 0
            yield self._sorted(keys, 0, self.n_cells)
            return
        self._spill()
        for p, (keys,) in enumerate(self.disk.ranges()):
            lo = min(self.n_cells, p * self.disk.width)
            hi = self.n_cells if p == self.disk.parts - 1 else min(self.n_cells, lo + self.disk.width)
            yield self._sorted(keys, lo, hi)

    @staticmethod
    def _sorted(keys: np.ndarray, lo: int, hi: int) -> tuple[int, int, np.ndarray, np.ndarray]:
        keys.sort()  # by (cell, position), in place
        bounds = np.searchsorted(keys, np.arange(lo, hi + 1, dtype=np.int64) << 32)
        np.bitwise_and(keys, np.int64(0xFFFFFFFF), out=keys)
        return lo, hi, keys.astype(np.int32), bounds

    @property
    def folder(self) -> Path | None:
        return self.disk.folder

    def close(self) -> None:
        """Remove the spill folder (also after a failure)."""
        self.disk.close()


def n_cells(n: int) -> int:
    """Cells for n vectors: ~CELLS_PER_ROOT_N sqrt(n), at most n / 39 so that k-means has points for each
    (a small corpus is one cell: an exact join)."""
    return int(max(1, min(MAX_CELLS, round(CELLS_PER_ROOT_N * math.sqrt(n)), n // 39)))


def partition_edges(ids: np.ndarray, read: Callable[[np.ndarray], np.ndarray], k: int, threshold: float,
                    extra: Any = None, stats: dict[str, Any] | None = None, progress: bool = False,
                    seed: int = 0) -> Edges:
    """Edges (i, j, cosine) with j among the k most similar of i and cosine >= threshold.

    `ids` sorted image ids, `read(ids)` their unit vectors (float32; a vectors.BoundedReader keeps the
    mapped file's pages out of RSS). `extra`: (flat reference index, id offset), searched for every
    vector as in graph.knn_edges.
    Example:
        edges = partition_edges(ids, BoundedReader(store), k=64, threshold=0.95)
    """
    ids = _sorted_ids(ids)
    if len(ids) < 2:
        return Edges.empty()
    reader = _float32(read)
    radius = math.sqrt(max(0.0, 2.0 - 2.0 * threshold))
    cells = n_cells(len(ids))
    clock = _Clock()
    partition = clock("train", train_cells(ids, reader, cells, seed))
    rho = clock("calibrate", calibrate_rho(ids, reader, partition, seed))
    plan = clock("assign", assign(ids, reader, partition, radius, rho, progress))
    probes = 1.0 + plan.probes.count / len(ids)
    out, rows_kind, rows_bound = _joined(ids, reader, plan, k, threshold, extra, clock, progress)
    logger.info("k-NN graph: %d cells, %.2f probes per vector (rho %.3f); seconds per step %s", cells, probes, rho,
                clock.seconds)
    if stats is not None:
        stats["partition_s"] = clock.seconds
        stats["candidates"] = "partitioned join"
        stats["cells"] = cells
        stats["probe_rho"] = round(rho, 4)
        stats["probes_per_vector"] = round(probes, 3)
        stats["block_products"] = Products.choose().dtype
        stats["join_rows"] = rows_kind  # joinrows: the resident int8 copy, or the stored vectors
        stats["join_rows_bound"] = rows_bound
    return out


def exact_edges(ids: np.ndarray, read: Callable[[np.ndarray], np.ndarray], k: int, threshold: float,
                extra: Any = None, stats: dict[str, Any] | None = None, progress: bool = False) -> Edges:
    """Brute force as the join of one cell: every vector against every other, in blocks filtered as in
    partition_edges and every pair that passes decided by its float32 product, so the edges are exact.

    Example:
        edges = exact_edges(ids, BoundedReader(store), k=64, threshold=0.95)
    """
    ids = _sorted_ids(ids)
    if not len(ids):  # one image still meets the reference set (`extra`)
        return Edges.empty()
    reader = _float32(read)
    dim = reader(ids[:1]).shape[1]
    clock = _Clock()
    plan = Plan(np.zeros((1, dim), np.float32), np.zeros(len(ids), np.int32), Probes(1), RHO_EXACT)
    out, rows_kind, rows_bound = _joined(ids, reader, plan, k, threshold, extra, clock, progress)
    if stats is not None:
        stats.update(candidates="exact join", partition_s=clock.seconds, cells=1, block_products=Products.choose().dtype,
                     join_rows=rows_kind, join_rows_bound=rows_bound)
    return out


def _joined(ids: np.ndarray, reader: Callable[[np.ndarray], np.ndarray], plan: Plan, k: int, threshold: float,
            extra: Any, clock: "_Clock", progress: bool) -> tuple[Edges, str, float]:
    """The join of `plan` (its rows made first, timed as "rows" and "join"), with the reference set's
    edges: (edges, kind of rows, their bound). The plan's probes are closed whatever happens."""
    sink = DirectedSink(len(ids), k)
    try:
        source = clock("rows", join_rows(ids, reader, progress))
        rows_kind, rows_bound = ("int8", round(source.bound, 5)) if isinstance(source, Int8Rows) else ("stored", 0.0)
        clock("join", _join(ids, reader, plan, k, threshold, sink, progress, source))
        source = None  # the int8 copy's memory, before the edges are gathered
        plan.probes.close()
        ref = _reference_edges(ids, reader, extra, k, threshold) if extra is not None else []
        return sink.result(ids, ref), rows_kind, rows_bound
    finally:
        sink.close()
        plan.probes.close()


def _sorted_ids(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, np.int64)
    if np.any(np.diff(ids) <= 0):
        raise ValueError("ids must be sorted and unique")
    return ids


def _float32(read: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda ids: np.ascontiguousarray(read(ids), dtype=np.float32)


class _Clock:
    """Wall seconds per step: clock(name, value) records the time since the previous call."""

    def __init__(self) -> None:
        import time

        self._now = time.perf_counter
        self._last = self._now()
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, value: Any) -> Any:
        now = self._now()
        self.seconds[name] = round(now - self._last, 2)
        self._last = now
        return value


@dataclass
class Cells:
    """Unit centroids in the top principal directions of the vectors (`basis`, orthonormal columns).

    Projecting onto orthonormal directions never lengthens a difference, so a pair within r stays
    within r and the probe bound holds in the projected space; assigning then costs d' (d + cells)
    per vector instead of d * cells.
    """

    centroids: np.ndarray  # (cells, d')
    basis: np.ndarray | None  # (d, d'); None: the vectors themselves (d <= PROJECTED_DIM)

    def project(self, x: np.ndarray) -> np.ndarray:
        if self.basis is None:
            return x
        import torch

        return (torch.from_numpy(x) @ torch.from_numpy(self.basis)).numpy()

    def scores(self, x: np.ndarray) -> np.ndarray:
        import torch

        return (torch.from_numpy(self.project(x)) @ torch.from_numpy(self.centroids).T).numpy()


def train_cells(ids: np.ndarray, read: Callable[[np.ndarray], np.ndarray], cells: int, seed: int = 0) -> Cells:
    """Spherical k-means (FAISS) on a sample of the vectors, in their top PROJECTED_DIM principal
    directions (of the uncentred second moment: the directions cosine similarity lives in)."""
    import faiss

    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(ids, size=min(len(ids), max(cells, 1) * TRAIN_POINTS_PER_CELL), replace=False))
    x = np.concatenate([read(sample[s : s + 65_536]) for s in range(0, len(sample), 65_536)])
    basis = None
    if x.shape[1] > PROJECTED_DIM:
        _, vecs = np.linalg.eigh((x.T @ x).astype(np.float64))
        basis = np.ascontiguousarray(vecs[:, ::-1][:, :PROJECTED_DIM], dtype=np.float32)
    out = Cells(np.empty((0, 0), np.float32), basis)
    xp = out.project(x)
    xp = xp / np.maximum(np.linalg.norm(xp, axis=1, keepdims=True), 1e-12)
    if cells == 1:
        c = xp[:1]
    else:
        km = faiss.Kmeans(xp.shape[1], cells, niter=KMEANS_ITERATIONS, spherical=True, seed=seed + 1,
                          max_points_per_centroid=TRAIN_POINTS_PER_CELL, min_points_per_centroid=1, verbose=False)
        km.train(np.ascontiguousarray(xp))
        c = np.asarray(km.centroids, np.float32)
    out.centroids = np.ascontiguousarray(c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12))
    return out


def _centroid_distances(centroids: np.ndarray) -> np.ndarray:
    """cells x cells float32, computed in place (at 10k cells each temporary would be 400 MB)."""
    d = centroids @ centroids.T
    sq = np.einsum("cd,cd->c", centroids, centroids)
    d *= -2
    d += sq[:, None]
    d += sq[None, :]
    np.maximum(d, 0.0, out=d)
    return np.sqrt(d, out=d).astype(np.float32, copy=False)


def calibrate_rho(ids: np.ndarray, read: Callable[[np.ndarray], np.ndarray], cells: Cells, seed: int = 0) -> float:
    """The probe bound rho: half the RHO_QUANTILE quantile of z (module docstring) over the exact nearest
    neighbours of sampled vectors whose homes differ, with RHO_HEADROOM; never below RHO_MIN, never above
    1 (exact). z uses the pair's full distance, since the bound is stated with the full radius r."""
    rng = np.random.default_rng(seed + 2)
    q_ids = np.sort(rng.choice(ids, size=min(CALIBRATION_QUERIES, len(ids)), replace=False))
    queries = read(q_ids)
    _, nn_ids = exact_topk(q_ids, queries, ids, read, min(CALIBRATION_NEIGHBOURS, len(ids) - 1))
    a = np.repeat(np.arange(len(q_ids)), nn_ids.shape[1])
    b = nn_ids.ravel()
    valid = b >= 0
    a, b = a[valid], b[valid]
    if not len(a):
        return RHO_EXACT
    xa, xb = queries[a], read(b) if len(b) else np.empty((0, queries.shape[1]), np.float32)
    sa, sb = cells.scores(xa), cells.scores(xb)
    ha, hb = sa.argmax(1), sb.argmax(1)
    rows = np.arange(len(a))
    cross = ha != hb
    if not cross.any():
        return min(RHO_MIN, RHO_EXACT)
    gaps = (sa[rows, ha] - sa[rows, hb]) + (sb[rows, hb] - sb[rows, ha])
    c = cells.centroids
    # the full distance, not the projected one: the probe bound is stated in terms of r, the full radius
    spread = np.linalg.norm(c[ha] - c[hb], axis=1) * np.linalg.norm(xa - xb, axis=1)
    z = gaps[cross] / np.maximum(spread[cross], 1e-12)
    return float(min(RHO_EXACT, max(RHO_MIN, float(np.quantile(z, RHO_QUANTILE)) / 2 * RHO_HEADROOM)))


def assign(ids: np.ndarray, read: Callable[[np.ndarray], np.ndarray], cells: Cells, radius: float,
           rho: float, progress: bool = False) -> Plan:
    """Home cell of every vector, and the cells it probes: g_j <= rho * radius * ||c_home - c_j||.

    A block's scores are passed over once against the widest gap the row's home allows; only the few
    cells under it are tested exactly. Probes are packed (cell, position) int64 keys (Probes: on disk
    past PROBES_HELD). (Scores stay float32: bfloat16 products were faster, but re-scoring their
    candidates exactly cost more than they saved.)"""
    import torch

    if len(ids) >= 1 << 31:
        raise ValueError(f"{len(ids)} vectors: positions must fit in 31 bits")
    n_cells_ = len(cells.centroids)
    spread = _centroid_distances(cells.centroids)
    spread *= np.float32(rho * radius)
    reach = spread.max(axis=1)
    reach *= np.float32(1 + 1e-6)
    reach += np.float32(1e-6)  # looser than the exact test below, whatever the rounding
    spread_t, reach_t = torch.from_numpy(spread), torch.from_numpy(reach)
    home = np.empty(len(ids), np.int32)
    probes = Probes(n_cells_)
    try:
        _assign_blocks(ids, read, cells, spread_t, reach_t, home, probes, progress)
        probes.settle()
    except BaseException:
        probes.close()
        raise
    return Plan(cells.centroids, home, probes, rho)


def _assign_blocks(ids: np.ndarray, read: Callable[[np.ndarray], np.ndarray], cells: Cells, spread_t: Any,
                   reach_t: Any, home: np.ndarray, probes: Probes, progress: bool) -> None:
    import torch
    from tqdm import tqdm

    cents = torch.from_numpy(cells.centroids)
    n_cells_ = len(cells.centroids)
    # a block's scores and mask are written into the same memory each time (fresh arrays of this
    # size cost page faults; together they took longer than the product itself)
    scores = torch.empty((ASSIGN_BLOCK, n_cells_), dtype=torch.float32)
    mask = torch.empty((ASSIGN_BLOCK, n_cells_), dtype=torch.bool)
    for start in tqdm(range(0, len(ids), ASSIGN_BLOCK), desc="k-NN graph: cells", unit="block",
                      disable=not progress):
        x = torch.from_numpy(cells.project(read(ids[start : start + ASSIGN_BLOCK])))
        s = torch.mm(x, cents.T, out=scores[: len(x)])
        best, h = s.max(dim=1)
        home[start : start + len(s)] = h.numpy()
        near = torch.ge(s, (best - reach_t[h])[:, None], out=mask[: len(x)])
        # np.flatnonzero: several times faster than torch.nonzero on a dense mask
        flat = torch.from_numpy(np.flatnonzero(near.numpy()))
        r, c = flat // n_cells_, flat % n_cells_
        hr = h[r]
        ok = (best[r] - s[r, c] <= spread_t[hr, c]) & (c != hr)
        r, c = r[ok], c[ok]
        probes.add(((c << 32) | (r + start)).numpy())


def _concatenate_freeing(parts: list[np.ndarray]) -> np.ndarray:
    """np.concatenate that frees each part once copied: the peak is the result plus one part, not two
    copies of everything."""
    out = np.empty(sum(len(p) for p in parts), np.int64)
    at = 0
    while parts:
        p = parts.pop(0)
        out[at : at + len(p)] = p
        at += len(p)
    return out


def _join(ids: np.ndarray, read: Callable[[np.ndarray], np.ndarray], plan: Plan, k: int, threshold: float,
          sink: "DirectedSink", progress: bool, source: JoinRows | None = None) -> None:
    """Every cell's rows (members, then visitors) against its members; hits go to `sink` both ways
    (a visitor's hit is also the member's: the pair may be found from one side only). Blocks are made
    from `source` (joinrows: the int8 copy, or the stored vectors), hits re-scored from `read`."""
    from tqdm import tqdm

    source = StoredRows(ids, read) if source is None else source
    cells = len(plan.centroids)
    members_order = np.argsort(plan.home, kind="stable")
    m_bounds = np.searchsorted(plan.home[members_order], np.arange(cells + 1))
    products = Products.choose()
    # how far a block's product may be under the pair's float32 product: the dtype's rounding (it
    # scales with the norms) and the source's own approximation
    want = float(threshold) - products.slack * source.max_norm**2 - source.bound
    buffer = _Buffer(products, ROW_BLOCK)
    bar = tqdm(total=cells, desc="k-NN graph: join", unit="cell", disable=not progress)
    for lo, hi, positions, v_bounds in plan.probes.ranges():
        for j in range(lo, hi):
            bar.update()
            visitors = positions[v_bounds[j - lo] : v_bounds[j - lo + 1]]
            _join_cell(ids, read, source, members_order[m_bounds[j] : m_bounds[j + 1]], visitors, k, threshold,
                       sink, products, want, buffer)
    bar.close()


def _join_cell(ids: np.ndarray, read: Callable[[np.ndarray], np.ndarray], source: JoinRows, members: np.ndarray,
               visitors: np.ndarray, k: int, threshold: float, sink: "DirectedSink", products: "Products",
               want: float, buffer: "_Buffer") -> None:
    """One cell: its members, then its visitors, against its members. A block's rows are copied into a
    reused buffer (fresh arrays of this size cost page faults) and compared with their own thresholds
    (want / the row's scale); the few pairs that pass are decided by their float32 products."""
    import torch

    if not len(members):
        return
    rows = np.concatenate([members, visitors])
    n_rows, n_cols = len(rows), len(members)
    cols_t = products.prepare(source.columns(members), products.pad_cols).T
    exact = _Float32(ids, read, rows, n_cols)
    lows = rounded_down(want / source.scales(rows).astype(np.float64), products.dtype)
    # padded columns are zeros: their products (0) pass a positive threshold never, a lower one maybe
    mask_columns = not bool((lows > 0).all())
    by_bits = not mask_columns  # positive thresholds: compared as the integers of their bit patterns
    skipped = partial(_skipped, n_rows, n_cols)
    exact_low = float(threshold - SLACK)

    def emit(src: np.ndarray, dst: np.ndarray, val: np.ndarray) -> None:
        keep = val >= threshold
        sink.add(src[keep], dst[keep], val[keep])

    for r0 in range(0, n_rows, ROW_BLOCK):
        r1 = min(n_rows, r0 + ROW_BLOCK)
        block = buffer.fill(source.rows(rows[r0:r1]))
        low = torch.full((len(block),), math.inf, dtype=block.dtype)  # rows past r1 (stale) never pass
        low[: r1 - r0] = lows[r0:r1]
        for c0 in range(0, n_cols, COL_BLOCK):
            c1 = min(n_cols, c0 + COL_BLOCK)
            if skipped(r0, c0):
                continue  # members against earlier members: found from the other side (below)
            s = buffer.product(block, cols_t[:, c0 : c0 + COL_BLOCK])
            if mask_columns:
                s[:, c1 - c0 :] = -math.inf
            if r0 < n_cols:
                s.diagonal(r0 - c0).fill_(-math.inf)  # members against themselves: (r, r) globally
            # columns whose own row block skips these rows: their hits here too, k per column
            by_column = r0 < n_cols and bool(skipped(c1 - 1, r0))
            (ri, ci), (ti, tj) = _block_hits(
                s, low, min(k, c1 - c0), partial(exact.block, r0, c0, c1), exact_low, by_bits,
                min(k, r1 - r0), partial(exact.block_t, r0, r1, c0) if by_column else None)
            if len(ri):
                ri, ci = ri + r0, ci + c0
                # every hit decided and valued by the pair's own float32 product, as brute force
                # scores pairs (the same value whichever dtype or source filtered it)
                val = exact.pairs(ri, ci)
                emit(rows[ri], members[ci], val)
                back = ri >= n_cols  # visitor -> member hits, also as member -> visitor
                emit(members[ci[back]], rows[ri[back]], val[back])
            if len(ti):
                ti, tj = ti + c0, tj + r0
                need = (tj < n_cols) & skipped(ti, tj)
                ti, tj = ti[need], tj[need]
                if len(ti):
                    emit(members[ti], rows[tj], exact.pairs(tj, ti))


def _skipped(n_rows: int, n_cols: int, r: Any, c: Any) -> Any:
    """Whether the block holding (row r, column c) is skipped: both in the members (rows below n_cols),
    with the column's block wholly before the row's. Such a pair (i, j) is the pair (j, i) of a
    block that is computed, and is taken from there with the column's own k cap (the join's
    member-against-member half)."""
    r0 = (r // ROW_BLOCK) * ROW_BLOCK
    c0 = (c // COL_BLOCK) * COL_BLOCK
    return (np.minimum(r0 + ROW_BLOCK, n_rows) <= n_cols) & (np.minimum(c0 + COL_BLOCK, n_cols) <= r0)


class _Buffer:
    """A block's rows in the products' dtype, and the block's products, reused from block to block
    (fresh arrays of this size cost page faults); rows padded to the dtype's row multiple (rows past
    the block's keep old values: their thresholds are +inf)."""

    def __init__(self, products: "Products", rows: int):
        self.products, self.rows, self.t, self.out = products, rows, None, None

    def fill(self, values: np.ndarray) -> Any:
        import torch

        if self.t is None or self.t.shape[1] != values.shape[1]:
            self.t = torch.zeros((self.rows, values.shape[1]), dtype=getattr(torch, self.products.dtype))
        n = len(values)
        self.t[:n].copy_(torch.from_numpy(np.ascontiguousarray(values)))
        return self.t[: -(-n // self.products.pad_rows) * self.products.pad_rows]

    def product(self, block: Any, cols: Any) -> Any:
        """block @ cols, written into the reused products (a contiguous view of them)."""
        import torch

        size = block.shape[0] * cols.shape[1]
        if self.out is None or self.out.numel() < size:
            self.out = torch.empty(max(size, self.rows * COL_BLOCK), dtype=block.dtype)
        return torch.mm(block, cols, out=self.out[:size].view(block.shape[0], cols.shape[1]))


class _Float32:
    """The float32 stored vectors of one cell's rows, read when a block has hits (they are few): the
    members (the columns) once, other rows as asked."""

    def __init__(self, ids: np.ndarray, read: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, n_cols: int):
        self.ids, self.read, self.rows, self.n_cols = ids, read, rows, n_cols
        self._cols: np.ndarray | None = None

    def cols(self) -> np.ndarray:
        if self._cols is None:
            self._cols = self.read(self.ids[self.rows[: self.n_cols]])
        return self._cols

    def of_rows(self, r: np.ndarray) -> np.ndarray:
        return self.read(self.ids[self.rows[r]])

    def pairs(self, ri: np.ndarray, ci: np.ndarray) -> np.ndarray:
        """float32 products of (row ri, column ci) pairs, one pair at a time (as brute force scores them)."""
        uniq, at = np.unique(ri, return_inverse=True)
        return _pair_cosines(self.of_rows(uniq), self.cols(), at, ci)

    def block(self, r0: int, c0: int, c1: int, rows: Any) -> Any:
        """float32 products of block rows `rows` (of the block starting at row r0) with columns c0:c1, with
        each member's own product masked as in the block."""
        r = rows.numpy() + r0
        return _masked_products(self.of_rows(r), self.cols()[c0:c1], r - c0)

    def block_t(self, r0: int, r1: int, c0: int, cols: Any) -> Any:
        """float32 products of block columns `cols` (of the block starting at column c0) with rows r0:r1:
        the transposed block's exact rows, self products masked."""
        c = cols.numpy() + c0
        return _masked_products(self.cols()[c], self.of_rows(np.arange(r0, r1)), c - r0)


def _masked_products(a: np.ndarray, b: np.ndarray, self_at: np.ndarray) -> Any:
    """a @ b.T as a torch tensor, with row i's entry self_at[i] (a vector against itself) set to -inf
    where it falls inside b."""
    import torch

    out = torch.from_numpy(a) @ torch.from_numpy(b).T
    at = torch.from_numpy(self_at)
    mine = (at >= 0) & (at < len(b))
    out[torch.nonzero(mine).flatten(), at[mine]] = -math.inf
    return out


@dataclass
class Products:
    """How the join multiplies a block: float32, or bfloat16 where the CPU does that at least BF16_SPEEDUP
    times faster (AMX). Rounding unit vectors to bfloat16 (8 significant bits: 2^-8 relative each) moves their
    product by at most 2 * 2^-8, and the float32 accumulation by less than SLACK: under BF16_SLACK
    (`slack`, scaled by the squared largest norm). The join lowers the threshold by that and by its
    rows' own bound (joinrows), divides it by each row's scale and rounds it down onto the dtype's
    grid (joinrows.rounded_down); rounding the output is monotone, so a product that reached that
    value is not taken below it: every pair at or above the threshold in float32 passes the filter,
    and every pass is re-scored in float32, so the edges are those of the float32 join. bfloat16
    blocks are padded to a few fixed shapes, since oneDNN builds (and keeps) a kernel per shape."""

    dtype: str  # "float32" or "bfloat16"
    slack: float
    pad_rows: int
    pad_cols: int

    @classmethod
    def choose(cls) -> "Products":
        if PRODUCTS == "float32" or (PRODUCTS == "auto" and not _bfloat16_faster()):
            return cls("float32", SLACK, 1, 1)
        return cls("bfloat16", BF16_SLACK, PAD_ROWS, PAD_COLS)

    def prepare(self, x: np.ndarray, pad: int) -> Any:
        import torch

        t = torch.from_numpy(x)
        if self.dtype == "float32":
            return t
        out = torch.zeros((-(-len(x) // pad) * pad, x.shape[1]), dtype=torch.bfloat16)
        out[: len(x)] = t
        return out


_BF16_FASTER: bool | None = None


def _bfloat16_faster() -> bool:
    """Whether bfloat16 block products beat float32 by BF16_SPEEDUP here: timed once per process on one
    block (about a tenth of a second); on CPUs without AMX bfloat16 is the slower of the two."""
    global _BF16_FASTER
    if _BF16_FASTER is None:
        import time

        import torch

        gen = torch.Generator().manual_seed(0)  # not the global generator: choosing must not change later draws
        a = torch.randn(ROW_BLOCK, 384, generator=gen)
        b = torch.randn(384, COL_BLOCK, generator=gen)
        seconds = {}
        for dtype in (torch.float32, torch.bfloat16):
            x, y = a.to(dtype), b.to(dtype)
            x @ y  # warm-up (kernel creation)
            t = time.perf_counter()
            for _ in range(3):
                x @ y
            seconds[dtype] = time.perf_counter() - t
        _BF16_FASTER = seconds[torch.float32] > BF16_SPEEDUP * seconds[torch.bfloat16]
        logger.debug("k-NN graph: block products in %s (float32 %.4f s, bfloat16 %.4f s)",
                     "bfloat16" if _BF16_FASTER else "float32", seconds[torch.float32], seconds[torch.bfloat16])
    return _BF16_FASTER


_NO_HITS = (np.empty(0, np.int64), np.empty(0, np.int64))
_BITS = {"bfloat16": "int16", "float32": "int32"}


def _block_hits(s: Any, low: Any, k: int, exact: Callable[[Any], Any], exact_low: float, by_bits: bool = False,
                k_t: int = 0, exact_t: Callable[[Any], Any] | None = None
                ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(rows, columns) of the entries of block `s` at or above their row's threshold `low` (a tensor,
    one per row); a row with more than k keeps k (all it can keep overall), so a block of copies costs
    k per row, not its width. With `exact_t`, also the same entries as (column, row), up to k_t per
    column (the transposed pairs of a block the join skips); else no pairs there.

    `by_bits` (every threshold positive): the pass over the whole block compares the bit patterns as
    integers, which order as the values do for positive floats (negative ones fall below) and which
    the CPU reduces several times faster than bfloat16.

    `exact(rows)` / `exact_t(columns)`: the float32 products of those rows (columns) of the block. A
    row (column) with more than its cap picks them by these (against `exact_low`), largest first and
    ties to the lower index (the lower id, as brute force breaks them), whatever dtype the block was
    computed in.
    """
    import torch

    if by_bits:
        bits = getattr(torch, _BITS[str(s.dtype).removeprefix("torch.")])
        peak = s.view(bits).amax(dim=1) >= low.view(bits)
    else:
        peak = s.amax(dim=1) >= low
    near = torch.nonzero(peak).flatten()
    if not len(near):
        return _NO_HITS, _NO_HITS
    hits = s[near] >= low[near, None]
    by_row = _capped(near, None, hits, k, exact, exact_low)
    if exact_t is None:
        return by_row, _NO_HITS
    cols = torch.nonzero(hits.any(dim=0)).flatten()
    return by_row, _capped(cols, near, hits[:, cols].T, k_t, exact_t, exact_low)


def _capped(outer: Any, inner: Any, hits: Any, k: int, exact: Callable[[Any], Any], exact_low: float
            ) -> tuple[np.ndarray, np.ndarray]:
    """(outer, inner) indices of the True entries of `hits` (rows `outer`, columns `inner`, None: all),
    at most k per row: a row with more takes its k best by `exact(its outer indices)`, the float32
    products over every inner position of the block."""
    import torch

    over = hits.sum(dim=1) > k
    rr, cc = torch.nonzero(hits[~over], as_tuple=True)
    out_r, out_c = [outer[~over][rr]], [cc if inner is None else inner[cc]]
    if bool(over.any()):
        many = outer[over]
        vals, idx = torch.sort(exact(many), dim=1, descending=True, stable=True)
        vals, idx = vals[:, :k], idx[:, :k]
        rr, cc = torch.nonzero(vals >= exact_low, as_tuple=True)
        out_r.append(many[rr])
        out_c.append(idx[rr, cc])
    return torch.cat(out_r).numpy(), torch.cat(out_c).numpy()


def _pair_cosines(x_rows: np.ndarray, x_cols: np.ndarray, ri: np.ndarray, ci: np.ndarray) -> np.ndarray:
    out = np.empty(len(ri), np.float32)
    for start in range(0, len(ri), GATHER_PAIRS):
        sl = slice(start, start + GATHER_PAIRS)
        out[sl] = np.einsum("nd,nd->n", x_rows[ri[sl]], x_cols[ci[sl]])
    return out


def _reference_edges(ids: np.ndarray, read: Callable[[np.ndarray], np.ndarray], extra: Any, k: int,
                     threshold: float) -> list[Edges]:
    ref_index, offset = extra
    kk = min(k, ref_index.ntotal)
    out: list[Edges] = []
    for start in range(0, len(ids), ASSIGN_BLOCK) if kk else ():
        chunk = ids[start : start + ASSIGN_BLOCK]
        s2, n2 = ref_index.search(read(chunk), kk)
        out.append(_above(chunk, s2, np.where(n2 >= 0, n2 + offset, -1), threshold))
    return out


def _k_best(src: np.ndarray, dst: np.ndarray, sim: np.ndarray, n: int, k: int) -> tuple[np.ndarray, ...]:
    """Each (src, dst) once (found from both sides it arrives twice), then the k best per source."""
    _, first = np.unique(src * np.int64(n) + dst, return_index=True)
    return _topk_per_row(src[first], dst[first], sim[first], k)


class DirectedSink:
    """Directed (position, position, cosine) hits, kept to the k best per source position.

    A source meets its neighbours in several cells, so its k best are only known once every cell is
    joined. Past SPILL_EDGES hits the held ones are cut to k per source (the k best of a union are
    among the k best of its parts) and go to disk in source ranges (graph.RangeFiles); each range is
    cut again on its own (a source lives in one range), then the survivors become canonical edges.
    """

    def __init__(self, n: int, k: int, limit: int | None = None):
        self.n, self.k = n, k
        self.limit = SPILL_EDGES if limit is None else limit
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.held = 0
        self.disk = RangeFiles(n, "retrieval-hits-")

    @property
    def folder(self) -> Path | None:
        return self.disk.folder

    def add(self, src: np.ndarray, dst: np.ndarray, sim: np.ndarray) -> None:
        if not len(src):
            return
        self.parts.append((src.astype(np.int64), dst.astype(np.int64), sim.astype(np.float32)))
        self.held += len(src)
        if self.held >= self.limit:
            self._spill()

    def _take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.parts:
            return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
        out = tuple(np.concatenate([p[i] for p in self.parts]) for i in range(3))
        self.parts, self.held = [], 0
        return _k_best(*out, self.n, self.k)  # type: ignore[return-value]

    def _spill(self) -> None:
        src, dst, sim = self._take()
        if not len(src):
            return
        first = self.disk.folder is None
        self.disk.write(src, src, dst, sim)
        if first:
            logger.info("k-NN graph: more than %d hits, writing them to %s", self.limit, self.disk.folder)

    def result(self, ids: np.ndarray, more: list[Edges] | None = None) -> Edges:
        """The k best per source as canonical edges between image ids, with `more` (edges between ids)."""
        edges = EdgeSink(int(ids.max()) + 1 if len(ids) else 1)
        for e in more or []:
            edges.add(e)

        def emit(src: np.ndarray, dst: np.ndarray, sim: np.ndarray) -> None:
            if len(src):
                src, dst, sim = _k_best(src, dst, sim, self.n, self.k)
                edges.add(Edges(ids[src], ids[dst], clip_cosine(sim).astype(np.float32)))

        if self.disk.folder is None:
            emit(*self._take())
            return edges.result()
        self._spill()
        for src, dst, sim in self.disk.ranges():
            emit(src, dst, sim)
        return edges.result()

    def close(self) -> None:
        """Remove the spill folder (also after a failure)."""
        self.disk.close()
