"""The k-NN graph's candidate generation alone: range search at threshold - margin vs a fixed re-rank depth.

On one IVF-PQ index over N synthetic vectors (the corpus of benchmarks/dedup_scale.py: clustered,
d = 384, 1% planted copies), `graph.knn_edges` runs twice with k = 64 at cosine >= 0.95:
* range: candidates from a FAISS range search at the measured threshold - margin (what dedup does);
* depth: the previous path, the top `ann.rerank_depth(k)` candidates per image, those scoring
  below threshold - margin dropped before the exact re-rank.
CPU seconds (all threads) and wall of each, the edges found, and the edge recall at the threshold
against brute force on a sample of nodes (half of them with planted copies). The index is built
here directly (IVF with nlist ~ 4 sqrt(N), PQ96, nprobe fixed), timed apart.

Usage: python -m benchmarks.dedup_graph [--n 50000] [--nprobe 8]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from benchmarks.common import save_result
from benchmarks.dedup_scale import exact_topk, make_corpus


def edge_recall(edges: Any, vecs: np.ndarray, sample: np.ndarray, k: int, threshold: float) -> dict[str, Any]:
    sims, nbrs = exact_topk(vecs, sample, k + 1)
    have = set(zip(edges.src.tolist(), edges.dst.tolist()))
    truth = found = 0
    for row, node in enumerate(sample.tolist()):
        keep = (nbrs[row] != node) & (sims[row] >= threshold)
        for other in nbrs[row][keep][:k].tolist():
            truth += 1
            found += (min(node, other), max(node, other)) in have
    return {"true_edges": truth, "recall": round(found / truth, 5) if truth else None}


def main() -> None:
    import faiss

    from retrieval import ann
    from retrieval.curation import graph

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--nprobe", type=int, default=8)
    args = parser.parse_args()
    n, k, threshold = args.n, 64, 0.95
    corpus = make_corpus(n)
    vecs = corpus["vectors"]
    stored = vecs.astype(np.float16)  # what the vector file holds
    read = lambda ids: stored[np.asarray(ids)].astype(np.float32)  # noqa: E731
    nlist = ann.choose_nlist(n)
    t, c = time.perf_counter(), time.process_time()
    spec = ann.IndexSpec(kind="custom", factory=f"IVF{nlist},PQ96", n=n, dim=vecs.shape[1])
    index = ann.new_index(spec)
    rng = np.random.default_rng(0)
    index.train(read(np.sort(rng.choice(n, min(n, ann.train_sample_size(spec)), replace=False))))
    ids = np.arange(n, dtype=np.int64)
    ann.add(index, ids, read(ids))
    ann.set_nprobe(index, args.nprobe)
    build = {"factory": spec.factory, "nprobe": args.nprobe, "wall_s": round(time.perf_counter() - t, 1),
             "cpu_s": round(time.process_time() - c, 1)}
    print(build, flush=True)
    planted = np.unique(corpus["pairs"])
    sample = np.unique(np.r_[rng.choice(planted, min(1000, len(planted)), replace=False), rng.choice(n, 1000, replace=False)])
    runs = {}
    for name, ranged in (("range", True), ("depth", False)):
        original = graph.supports_range_search
        graph.supports_range_search = (lambda index: True) if ranged else (lambda index: False)  # type: ignore[assignment]
        try:
            stats: dict[str, Any] = {}
            t, c = time.perf_counter(), time.process_time()
            edges = graph.knn_edges(index, ids, read, k, threshold, stats=stats)
            runs[name] = {"wall_s": round(time.perf_counter() - t, 1), "cpu_s": round(time.process_time() - c, 1),
                          "edges": len(edges), **stats, "edge_recall_sample": edge_recall(edges, vecs, sample, k, threshold)}
        finally:
            graph.supports_range_search = original  # type: ignore[assignment]
        print(name, runs[name], flush=True)
    save_result("dedup_graph", {"n": n, "dim": int(vecs.shape[1]), "k": k, "threshold": threshold, "index": build,
                                "faiss_threads": faiss.omp_get_max_threads(), "runs": runs})


if __name__ == "__main__":
    main()
