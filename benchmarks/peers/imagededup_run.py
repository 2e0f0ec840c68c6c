"""imagededup PHash on a folder, run inside the peer environment; prints one JSON line.

Usage (peer python): imagededup_run.py IMAGE_DIR [--thresholds 10,8]

`PHash().find_duplicates(image_dir=D, max_distance_threshold=T)` is, in imagededup's own code,
`encode_images(D)` followed by `_find_duplicates_dict(encoding_map, T)`; this script makes the same
two calls with the public API, encoding once and searching once per threshold:
`encode_images(image_dir=D)` then `find_duplicates(encoding_map=..., max_distance_threshold=T)`.
A threshold's wall_s (and cpu_s) is encode + its search, i.e. what find_duplicates(image_dir=D, ...)
costs end to end. imagededup's defaults otherwise: all CPU cores, brute-force Cython search. The
duplicate map {file: [files]} is returned as sorted unique pairs of file names.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
import warnings


def cpu_s() -> float:
    """User + system CPU of this process and its reaped children (imagededup's worker pools)."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def peak_rss_mb() -> dict[str, float]:
    return {"self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "largest_child": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("image_dir")
    parser.add_argument("--thresholds", default="10,8")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.INFO)
    from importlib.metadata import version

    from imagededup.methods import PHash

    method = PHash(verbose=False)
    start, cpu = time.perf_counter(), cpu_s()
    encodings = method.encode_images(image_dir=args.image_dir)
    encode_s, encode_cpu = time.perf_counter() - start, cpu_s() - cpu
    runs = []
    for t in [int(x) for x in args.thresholds.split(",")]:
        start, cpu = time.perf_counter(), cpu_s()
        dup = method.find_duplicates(encoding_map=encodings, max_distance_threshold=t)
        find_s, find_cpu = time.perf_counter() - start, cpu_s() - cpu
        pairs = sorted({tuple(sorted((a, b))) for a, bs in dup.items() for b in bs})
        runs.append({"max_distance_threshold": t, "wall_s": round(encode_s + find_s, 3), "find_s": round(find_s, 3),
                     "cpu_s": round(encode_cpu + find_cpu, 2), "files_hashed": len(dup),
                     "pairs": [list(p) for p in pairs]})
    print(json.dumps({"tool": "imagededup", "version": version("imagededup"), "method": "PHash",
                      "encode_s": round(encode_s, 3), "encode_cpu_s": round(encode_cpu, 2), "runs": runs,
                      "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main()
