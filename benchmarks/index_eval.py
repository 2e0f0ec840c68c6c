"""Measure one saved FAISS index on held-out queries: recall@1 and recall@10 against exact search,
latency of single queries and of batches, and this process's memory. Prints one JSON line.

The same code measures our index and a peer's: it needs only faiss and numpy, except with
--rerank (our search path: ANN candidates re-ranked with exact cosine from the fp16 vector store,
`retrieval.ann.search_reranked`, exactly what the CLI and the API run), which imports `retrieval`.
It runs as a subprocess, one index per process, so the memory it reports is that index's alone.

Usage (normally called by benchmarks/index_quality.py):
  python benchmarks/index_eval.py --index I --queries Q.npy --truth T.npy [--params "nprobe=16"]
  python benchmarks/index_eval.py --index I --queries Q.npy --truth T.npy --rerank VECTORS.f16 --nprobe 8 --mmap
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def _status_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def peak_rss_bytes() -> int:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec, so a
    child of a big parent would report the parent's size."""
    return _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    return _status_kib("VmRSS")


def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean fraction of the exact top-k found in the returned top-k (ids; -1 never matches)."""
    hits = sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found[:, :k], truth[:, :k]))
    return hits / (len(truth) * k)


def summarise(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3),
            "mean_ms": round(float(a.mean()), 3), "samples": len(a)}


def measure(search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray, truth: np.ndarray, k: int,
            batch: int, single: int) -> dict:
    """Recall over every query (searched in batches); latency per batch and per single query.

    One untimed pass over all batches first (it also gives the ids for recall): every page the
    searches touch is then resident for both tools alike.
    """
    found = np.vstack([search(queries[i : i + batch]) for i in range(0, len(queries), batch)])
    batch_ms = []
    for i in range(0, len(queries) - batch + 1, batch):
        t = time.perf_counter()
        search(queries[i : i + batch])
        batch_ms.append(1000 * (time.perf_counter() - t))
    single_ms = []
    for i in range(min(single, len(queries))):
        q = queries[i : i + 1]
        t = time.perf_counter()
        search(q)
        single_ms.append(1000 * (time.perf_counter() - t))
    return {
        "recall_at_1": round(recall(found, truth, 1), 4),
        "recall_at_10": round(recall(found, truth, min(10, k)), 4),
        "queries": len(queries),
        "latency_single": summarise(single_ms),
        f"latency_batch{batch}": summarise(batch_ms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True, type=Path)
    parser.add_argument("--queries", required=True, type=Path)
    parser.add_argument("--truth", required=True, type=Path, help="exact top-k ids, 0-based rows of the base")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--single", type=int, default=500, help="queries timed one at a time")
    parser.add_argument("--threads", type=int, default=None, help="faiss OpenMP threads")
    parser.add_argument("--params", default="", help="faiss ParameterSpace string, e.g. 'nprobe=16,efSearch=32'")
    parser.add_argument("--nprobe", type=int, default=None, help="with --rerank: the nprobe the indexer tuned")
    parser.add_argument("--rerank", type=Path, default=None, help="fp16 vector store: search with search_reranked")
    parser.add_argument("--id-offset", type=int, default=0, help="index id of base row 0 (ours: image ids start at 1)")
    parser.add_argument("--mmap", action="store_true", help="load the index memory-mapped (as the API does)")
    args = parser.parse_args()

    import faiss

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    queries = np.ascontiguousarray(np.load(args.queries), dtype=np.float32)
    truth = np.load(args.truth)
    rss_before = current_rss_bytes()
    t = time.perf_counter()
    if args.rerank is not None:
        from retrieval import ann
        from retrieval.vectors import VectorStore

        index = ann.load_index(args.index, mmap=args.mmap)
        if args.nprobe:
            ann.set_nprobe(index, args.nprobe)
        vectors = VectorStore(args.rerank, queries.shape[1])

        def search(q: np.ndarray) -> np.ndarray:
            return ann.search_reranked(index, q, args.k, vectors.read)[1] - args.id_offset
    else:
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if args.mmap else 0
        index = faiss.read_index(str(args.index), flags)
        if args.params:
            faiss.ParameterSpace().set_index_parameters(index, args.params)

        def search(q: np.ndarray) -> np.ndarray:
            ids = index.search(q, args.k)[1]
            return np.where(ids >= 0, ids - args.id_offset, -1)
    load_s = time.perf_counter() - t
    rss_loaded = current_rss_bytes()
    result = measure(search, queries, truth, args.k, args.batch, args.single)
    result.update({
        "load_s": round(load_s, 3),
        "rss_index_loaded_bytes": rss_loaded - rss_before,
        "rss_after_search_bytes": current_rss_bytes() - rss_before,
        "peak_rss_bytes": peak_rss_bytes(),
        "faiss": faiss.__version__,
        "threads": faiss.omp_get_max_threads(),
        "mmap": args.mmap,
        "search_path": "search_reranked (exact fp16 re-rank)" if args.rerank is not None else "index.search",
    })
    print(json.dumps(result))


if __name__ == "__main__":
    main()
