"""imagededup PHash on a folder, run inside the peer environment; prints one JSON line.

Usage (peer python): imagededup_run.py IMAGE_DIR [--thresholds 10,8]

For each Hamming threshold this is exactly what an imagededup user runs:
`PHash().find_duplicates(image_dir=IMAGE_DIR, max_distance_threshold=T)` (encoding included, so
each run's wall time is end to end; imagededup's defaults: all CPU cores, brute-force Cython search).
The duplicate map {file: [files]} is returned as sorted unique pairs of file names.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
import warnings


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

    runs = []
    for t in [int(x) for x in args.thresholds.split(",")]:
        start = time.perf_counter()
        dup = PHash(verbose=False).find_duplicates(image_dir=args.image_dir, max_distance_threshold=t)
        wall = time.perf_counter() - start
        pairs = sorted({tuple(sorted((a, b))) for a, bs in dup.items() for b in bs})
        runs.append({"max_distance_threshold": t, "wall_s": round(wall, 3), "files_hashed": len(dup),
                     "pairs": [list(p) for p in pairs]})
    print(json.dumps({"tool": "imagededup", "version": version("imagededup"), "method": "PHash", "runs": runs,
                      "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main()
