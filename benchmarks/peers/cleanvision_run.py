"""cleanvision's duplicate checks on a folder, run inside the peer environment; prints one JSON line.

Usage (peer python): cleanvision_run.py IMAGE_DIR

Runs `Imagelab(data_path=IMAGE_DIR).find_issues({"exact_duplicates": {}, "near_duplicates": {}})`
with cleanvision's defaults (0.3.7: exact = md5 of the decoded pixels, near = identical 64-bit
pHash, no distance threshold; all CPU cores) and returns both kinds of duplicate sets as lists of
file names relative to IMAGE_DIR. cleanvision aborts the whole run on one unreadable file, so the
folder must hold valid images only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import time
import warnings


def cpu_s() -> float:
    """User + system CPU of this process and its reaped children (cleanvision's worker pool)."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("image_dir")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    from importlib.metadata import version

    from cleanvision import Imagelab

    root = os.path.abspath(args.image_dir)
    start, cpu = time.perf_counter(), cpu_s()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its report; stdout is for the JSON line
        lab = Imagelab(data_path=root)
        lab.find_issues({"exact_duplicates": {}, "near_duplicates": {}}, verbose=False)
    wall, cpu = time.perf_counter() - start, cpu_s() - cpu

    def rel(sets: list[list[str]]) -> list[list[str]]:
        return [sorted(os.path.relpath(p, root) for p in s) for s in sets]

    print(json.dumps({
        "tool": "cleanvision", "version": version("cleanvision"), "wall_s": round(wall, 3), "cpu_s": round(cpu, 2),
        "files": len(lab.issues),
        "sets": {"exact_duplicates": rel(lab.info["exact_duplicates"]["sets"]),
                 "near_duplicates": rel(lab.info["near_duplicates"]["sets"])},
        "peak_rss_mb": {"self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                        "largest_child": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)},
    }))


if __name__ == "__main__":
    main()
