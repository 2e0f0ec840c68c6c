"""The k-NN similarity graph, built in bounded-memory batches through the FAISS index.

For each batch of image ids: the ANN index proposes candidates (depth k+1 on an exact index,
the usual re-rank depth on IVF-PQ), their exact cosine is computed from the stored fp16 vectors,
the top k (self excluded) are kept and only edges at or above the threshold leave the batch.
Memory is O(batch * depth * dim) plus the surviving edges, whatever the corpus size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from retrieval import ann

logger = logging.getLogger(__name__)

BATCH = 2048
GATHER_CHUNK = 64  # queries whose candidate vectors are gathered at once (64 * 640 * 384 * 4 B = 63 MB)


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
    """Exact cosine of queries[i] with every candidate id cand[i, j] (-1 -> -inf)."""
    out = np.full(cand.shape, -np.inf, dtype=np.float32)
    for start in range(0, len(cand), GATHER_CHUNK):
        c = cand[start : start + GATHER_CHUNK]
        valid = c >= 0
        if not valid.any():
            continue
        uniq, inv = np.unique(c[valid], return_inverse=True)
        vecs = read(uniq)
        full = np.zeros(c.shape, dtype=np.int64)
        full[valid] = inv
        sims = np.einsum("qd,qkd->qk", queries[start : start + GATHER_CHUNK], vecs[full])
        out[start : start + GATHER_CHUNK] = np.where(valid, sims, -np.inf)
    return out


def search_exact_topk(index: Any, queries: np.ndarray, query_ids: np.ndarray | None, k: int,
                      read: Callable[[np.ndarray], np.ndarray], exact_index: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by exact cosine among the ANN candidates, `query_ids[i]` excluded from row i."""
    extra = 1 if query_ids is not None else 0
    depth = k + extra if exact_index else ann.rerank_depth(k) + extra
    depth = min(depth, max(1, index.ntotal))
    _, cand = index.search(queries, depth)
    if query_ids is not None:
        cand = np.where(cand == query_ids[:, None], -1, cand)
    sims = exact_rows(queries, cand, read)
    kk = min(k, cand.shape[1])
    top = np.argsort(-sims, axis=1, kind="stable")[:, :kk]
    return np.take_along_axis(sims, top, axis=1), np.take_along_axis(cand, top, axis=1)


def is_exact_index(index: Any) -> bool:
    import faiss

    inner = index.index if isinstance(index, (faiss.IndexIDMap, faiss.IndexIDMap2)) else index
    return isinstance(inner, faiss.IndexFlat)


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
              batch: int = BATCH, progress: bool = False, extra: Any = None) -> Edges:
    """Edges (i, j, exact cosine) with j among the k nearest of i and cosine >= threshold.

    `extra`, when given, is an (index, offset) pair searched as well (a reference set): its
    ids are shifted by `offset` so they never collide with image ids.
    """
    from tqdm import tqdm

    exact = is_exact_index(index)
    parts: list[Edges] = []
    for start in tqdm(range(0, len(ids), batch), desc="k-NN graph", unit="batch", disable=not progress):
        chunk = np.asarray(ids[start : start + batch], dtype=np.int64)
        queries = read(chunk)
        sims, nbrs = search_exact_topk(index, queries, chunk, k, read, exact)
        parts.append(_above(chunk, sims, nbrs, threshold))
        if extra is not None:
            ref_index, offset = extra
            kk = min(k, ref_index.ntotal)
            if kk:
                s, n = ref_index.search(queries, kk)  # a flat index over float32 vectors: exact already
                parts.append(_above(chunk, s, np.where(n >= 0, n + offset, -1), threshold))
    return Edges.concat(parts).canonical()


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
