"""Build an index with `autofaiss.build_index` at a given memory budget (runs in the autofaiss peer env).

autofaiss picks the index type from N, d and `max_index_memory_usage`, trains it, then tunes its
search parameters itself (nprobe/efSearch for at most `max_index_query_time_ms` per query, at
least `min_nearest_neighbors_to_retrieve` results): everything is left at its defaults except the
budget, the metric (inner product: vectors are unit length) and the thread count. The chosen
parameter string (`index_param`) is returned so the evaluation applies exactly that.

Prints one JSON line: build time of the whole `build_index` call, this process's peak RSS (and its
RSS before building, i.e. the imports), the index file's size, autofaiss's own infos.

Usage: python benchmarks/peers/autofaiss_build.py --embeddings DIR --index PATH --infos PATH
           --max-index-memory BYTES [--current-memory BYTES] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import time
from importlib.metadata import version


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    """VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec (the parent's size would show)."""
    try:
        return _status_bytes("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embeddings", required=True, help="folder holding the base vectors as .npy (float32)")
    parser.add_argument("--index", required=True)
    parser.add_argument("--infos", required=True)
    parser.add_argument("--max-index-memory", required=True, type=int, help="bytes")
    parser.add_argument("--current-memory", type=int, default=None, help="bytes of RAM for building")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import faiss
    import numpy
    from autofaiss import build_index

    baseline = peak_rss_bytes()  # after imports
    current = args.current_memory or 32 * 1024**3  # autofaiss's own default is "32G"
    t = time.perf_counter()
    index, infos = build_index(
        embeddings=args.embeddings,
        index_path=args.index,
        index_infos_path=args.infos,
        max_index_memory_usage=f"{args.max_index_memory}B",
        current_memory_available=f"{current}B",
        metric_type="ip",
        nb_cores=args.threads,
        verbose=logging.WARNING,
    )
    build_s = time.perf_counter() - t
    out = {
        "autofaiss": version("autofaiss"), "faiss": faiss.__version__, "numpy": numpy.__version__,
        "max_index_memory_usage": args.max_index_memory, "current_memory_available": current,
        "threads": args.threads, "build_s": round(build_s, 3), "peak_rss_bytes": peak_rss_bytes(),
        "baseline_rss_bytes": baseline,
    }
    if index is None or not infos:
        out["error"] = "autofaiss.build_index returned no index (see its log: budget too small or not enough memory)"
    else:
        out.update({"index_key": infos.get("index_key"), "index_param": infos.get("index_param"),
                    "index_bytes": os.path.getsize(args.index), "infos": infos})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
