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
   neighbours need not be above the threshold). rho = 1 would be exact by the triangle
   inequality but, in hundreds of dimensions, probes nearly every cell.
3. Join: per cell, the rows (its members, then the visitors probing it) are multiplied with its
   members (float32 BLAS through torch); a product within SLACK of the threshold is re-scored one
   pair at a time, as every other path of the graph scores pairs, so a pair the probes reach is
   decided exactly as brute force decides it. (bfloat16 products were slower here: oneDNN compiles
   a kernel per matrix shape, and its kernel cache kept hundreds of MB.)
4. Each vector keeps its k best (by cosine, ties by id) over all the cells it met; the edges are
   made canonical with graph.EdgeSink (spilled to disk when large).

The loss is in step 2 only; `retrieval dedup` measures it on every run (graph.sampled_edge_recall).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from retrieval.curation.graph import SPILL_EDGES, EdgeSink, Edges, _above, _topk_per_row
from retrieval.vectors import clip_cosine

logger = logging.getLogger(__name__)

MIN_VECTORS = 20_000  # below this the exact scan (graph.scan_edges) is cheap enough
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
ASSIGN_BLOCK = 4096  # vectors scored against every centroid at once (4096 x cells float32)
ROW_BLOCK = 4096  # rows x columns of one product in the join
COL_BLOCK = 8192
# float32 products of unit vectors in a different summation order differ by at most ~d * 2^-24 (d <= 2048)
SLACK = 1e-4


@dataclass
class Plan:
    """The partition: home cell per position, and the (position, cell) probes beyond the home."""

    centroids: np.ndarray
    home: np.ndarray  # int32, per position
    probe_pos: np.ndarray  # int64, sorted by (cell, position)
    probe_cell: np.ndarray  # int32
    rho: float


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
    ids = np.asarray(ids, np.int64)
    if len(ids) < 2:
        return Edges.empty()
    if np.any(np.diff(ids) <= 0):
        raise ValueError("ids must be sorted and unique")
    reader = _float32(read)
    radius = math.sqrt(max(0.0, 2.0 - 2.0 * threshold))
    cells = n_cells(len(ids))
    clock = _Clock()
    partition = clock("train", train_cells(ids, reader, cells, seed))
    rho = clock("calibrate", calibrate_rho(ids, reader, partition, seed))
    plan = clock("assign", assign(ids, reader, partition, radius, rho, progress))
    directed, ref_edges = clock("join", _join(ids, reader, plan, k, threshold, extra, progress))
    logger.info("k-NN graph: %d cells, %.2f probes per vector (rho %.3f); seconds per step %s", cells,
                1.0 + len(plan.probe_pos) / len(ids), rho, clock.seconds)
    if stats is not None:
        stats["partition_s"] = clock.seconds
        stats["candidates"] = "partitioned join"
        stats["cells"] = cells
        stats["probe_rho"] = round(rho, 4)
        stats["probes_per_vector"] = round(1.0 + len(plan.probe_pos) / len(ids), 3)
    out = directed.result(k, ids)
    if ref_edges:
        out = Edges.concat([out, Edges.concat(ref_edges).canonical()]).canonical()
    return out


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
    g = centroids @ centroids.T
    sq = np.einsum("cd,cd->c", centroids, centroids)
    return np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * g, 0.0)).astype(np.float32)


def calibrate_rho(ids: np.ndarray, read: Callable[[np.ndarray], np.ndarray], cells: Cells, seed: int = 0) -> float:
    """The probe bound rho: half the RHO_QUANTILE quantile of z (module docstring) over the exact nearest
    neighbours of sampled vectors whose homes differ, with RHO_HEADROOM; never below RHO_MIN, never above
    1 (exact). z uses the pair's full distance, since the bound is stated with the full radius r."""
    rng = np.random.default_rng(seed + 2)
    q_ids = np.sort(rng.choice(ids, size=min(CALIBRATION_QUERIES, len(ids)), replace=False))
    queries = read(q_ids)
    nn_ids = exact_neighbours(q_ids, queries, ids, read, min(CALIBRATION_NEIGHBOURS, len(ids) - 1))
    a = np.repeat(np.arange(len(q_ids)), nn_ids.shape[1])
    b = nn_ids.ravel()
    valid = b >= 0
    a, b = a[valid], b[valid]
    if not len(a):
        return 1.0
    xa, xb = queries[a], read(b) if len(b) else np.empty((0, queries.shape[1]), np.float32)
    sa, sb = cells.scores(xa), cells.scores(xb)
    ha, hb = sa.argmax(1), sb.argmax(1)
    rows = np.arange(len(a))
    cross = ha != hb
    if not cross.any():
        return RHO_MIN
    gaps = (sa[rows, ha] - sa[rows, hb]) + (sb[rows, hb] - sb[rows, ha])
    c = cells.centroids
    # the full distance, not the projected one: the probe bound is stated in terms of r, the full radius
    spread = np.linalg.norm(c[ha] - c[hb], axis=1) * np.linalg.norm(xa - xb, axis=1)
    z = gaps[cross] / np.maximum(spread[cross], 1e-12)
    return float(min(1.0, max(RHO_MIN, float(np.quantile(z, RHO_QUANTILE)) / 2 * RHO_HEADROOM)))


def exact_neighbours(q_ids: np.ndarray, queries: np.ndarray, ids: np.ndarray, read: Callable[[np.ndarray], np.ndarray],
                     k: int, block: int = 65_536) -> np.ndarray:
    """Ids of the exact top k of each query over every vector of `ids` (itself excluded), -1 padded."""
    import torch

    q = torch.from_numpy(np.ascontiguousarray(queries, np.float32))
    best_s = torch.full((len(q_ids), 0), -math.inf)
    best_i = torch.full((len(q_ids), 0), -1, dtype=torch.int64)
    own = torch.from_numpy(q_ids)
    for start in range(0, len(ids), block):
        b = torch.from_numpy(ids[start : start + block])
        s = q @ torch.from_numpy(read(ids[start : start + block])).T
        s[own[:, None] == b[None, :]] = -math.inf
        s = torch.cat([best_s, s], dim=1)
        i = torch.cat([best_i, b.expand(len(q_ids), -1)], dim=1)
        top = torch.topk(s, min(k, s.shape[1]), dim=1)
        best_s, best_i = top.values, torch.gather(i, 1, top.indices)
    return np.where(np.isfinite(best_s.numpy()), best_i.numpy(), -1)


def assign(ids: np.ndarray, read: Callable[[np.ndarray], np.ndarray], cells: Cells, radius: float,
           rho: float, progress: bool = False) -> Plan:
    """Home cell of every vector, and the cells it probes: g_j <= rho * radius * ||c_home - c_j||."""
    from tqdm import tqdm

    import torch

    spread = _centroid_distances(cells.centroids) * np.float32(rho * radius)
    widest = torch.from_numpy(spread.max(axis=1))
    cents = torch.from_numpy(cells.centroids)
    home = np.empty(len(ids), np.int32)
    pos_parts: list[np.ndarray] = []
    cell_parts: list[np.ndarray] = []
    for start in tqdm(range(0, len(ids), ASSIGN_BLOCK), desc="k-NN graph: cells", unit="block",
                      disable=not progress):
        s = torch.from_numpy(cells.project(read(ids[start : start + ASSIGN_BLOCK]))) @ cents.T
        best, h = s.max(dim=1)
        home[start : start + len(s)] = h.numpy()
        # a cheap first cut by the widest spread of each home, then the exact bound on what is left
        r, c = torch.nonzero(s >= (best - widest[h])[:, None], as_tuple=True)
        r, c = r.numpy(), c.numpy()
        hr = h.numpy()[r]
        ok = (c != hr) & (best.numpy()[r] - s.numpy()[r, c] <= spread[hr, c])
        pos_parts.append((r[ok] + start).astype(np.int64))
        cell_parts.append(c[ok].astype(np.int32))
    pos = np.concatenate(pos_parts) if pos_parts else np.empty(0, np.int64)
    cell = np.concatenate(cell_parts) if cell_parts else np.empty(0, np.int32)
    order = np.argsort(cell.astype(np.int64) * len(ids) + pos)  # by (cell, position)
    return Plan(cells.centroids, home, pos[order], cell[order], rho)


def _join(ids: np.ndarray, read: Callable[[np.ndarray], np.ndarray], plan: Plan, k: int, threshold: float,
          extra: Any, progress: bool) -> tuple["DirectedSink", list[Edges]]:
    import torch
    from tqdm import tqdm

    cells = len(plan.centroids)
    members_order = np.argsort(plan.home, kind="stable")
    m_bounds = np.searchsorted(plan.home[members_order], np.arange(cells + 1))
    v_bounds = np.searchsorted(plan.probe_cell, np.arange(cells + 1))
    sink = DirectedSink(len(ids))
    ref_edges: list[Edges] = []
    low = np.float32(threshold - SLACK)
    for j in tqdm(range(cells), desc="k-NN graph: join", unit="cell", disable=not progress):
        members = members_order[m_bounds[j] : m_bounds[j + 1]]
        if not len(members):
            continue
        visitors = plan.probe_pos[v_bounds[j] : v_bounds[j + 1]]
        rows = np.concatenate([members, visitors])
        x_rows = read(ids[rows])
        x_cols = x_rows[: len(members)]
        cols_t = torch.from_numpy(x_cols).T
        rows_t = torch.from_numpy(x_rows)
        for r0 in range(0, len(rows), ROW_BLOCK):
            r1 = min(len(rows), r0 + ROW_BLOCK)
            for c0 in range(0, len(members), COL_BLOCK):
                c1 = min(len(members), c0 + COL_BLOCK)
                s = rows_t[r0:r1] @ cols_t[:, c0:c1]
                if r0 < len(members):
                    s.diagonal(r0 - c0).fill_(-1.0)  # members against themselves: (r, r) globally
                near = torch.nonzero(s.amax(dim=1) >= float(low)).flatten()  # rows with a hit: one pass
                if not len(near):
                    continue
                hit = torch.nonzero(s[near] >= float(low)).numpy()
                ri, ci = near.numpy()[hit[:, 0]] + r0, hit[:, 1] + c0
                sims = np.einsum("nd,nd->n", x_rows[ri], x_cols[ci])
                keep = sims >= threshold
                src, dst, sims = rows[ri[keep]], members[ci[keep]], sims[keep]
                if len(src) > k * (r1 - r0):
                    src, dst, sims = _topk_per_row(src, dst, sims, k)
                sink.add(src, dst, sims)
    if extra is not None:
        ref_index, offset = extra
        kk = min(k, ref_index.ntotal)
        if kk:
            for start in range(0, len(ids), ASSIGN_BLOCK):
                chunk = ids[start : start + ASSIGN_BLOCK]
                s2, n2 = ref_index.search(read(chunk), kk)
                ref_edges.append(_above(chunk, s2, np.where(n2 >= 0, n2 + offset, -1), threshold))
    return sink, ref_edges


class DirectedSink:
    """Directed (position, position, cosine) hits, kept to the k best per source position at the end.

    A source meets its neighbours in several cells, so its k best are only known once every cell is
    joined. Past SPILL_EDGES hits they go to disk in SPILL_PARTS source ranges; each range is cut to
    k per source on its own (a source lives in one range), then the survivors become canonical edges.
    """

    PARTS = 16

    def __init__(self, n: int, limit: int | None = None):
        self.n = n
        self.limit = SPILL_EDGES if limit is None else limit
        self.width = max(1, -(-n // self.PARTS))
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.held = 0
        self.folder: Path | None = None
        self.files: list[list[Path]] = [[] for _ in range(self.PARTS)]

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
        return out  # type: ignore[return-value]

    def _spill(self) -> None:
        src, dst, sim = self._take()
        if not len(src):
            return
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="retrieval-hits-"))
            logger.info("k-NN graph: more than %d hits, writing them to %s", self.limit, self.folder)
        part = np.minimum(src // self.width, self.PARTS - 1)
        for p in np.unique(part).tolist():
            sel = part == p
            path = self.folder / f"p{p:02d}-{len(self.files[p]):05d}.npz"
            np.savez(path, src=src[sel], dst=dst[sel], sim=sim[sel])
            self.files[p].append(path)

    def result(self, k: int, ids: np.ndarray) -> Edges:
        """The k best per source, as canonical edges between image ids."""
        edges = EdgeSink(int(ids.max()) + 1 if len(ids) else 1)

        def emit(src: np.ndarray, dst: np.ndarray, sim: np.ndarray) -> None:
            if len(src):
                src, dst, sim = _topk_per_row(src, dst, sim, k)
                edges.add(Edges(ids[src], ids[dst], clip_cosine(sim).astype(np.float32)))

        if self.folder is None:
            emit(*self._take())
            return edges.result()
        self._spill()
        try:
            for files in self.files:
                pieces = []
                for f in files:
                    with np.load(f) as d:
                        pieces.append((d["src"], d["dst"], d["sim"]))
                if pieces:
                    emit(*(np.concatenate([p[i] for p in pieces]) for i in range(3)))
                for f in files:
                    f.unlink()
            return edges.result()
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
