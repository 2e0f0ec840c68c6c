"""Incremental re-index of an unchanged corpus: how long `retrieval index` takes when nothing changed.

Goal: seconds, not minutes, at 100k files (no decoding, no embedding, no model load). Files are tiny
PNGs and the model is a tiny DINOv2 config, so the first (full) run stays cheap; the second run's
cost is scanning (stat of every file) and comparing with the database.

Usage: python -m benchmarks.incremental_reindex [--quick] [--files N]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import save_result


def make_tiny_corpus(root: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20,000 files instead of 100,000")
    parser.add_argument("--files", type=int, default=None)
    args = parser.parse_args()
    n = args.files or (20_000 if args.quick else 100_000)
    tmp = Path(tempfile.mkdtemp(prefix="bench-incr-"))
    try:
        from retrieval.indexer.pipeline import IndexOptions, run_index

        from retrieval.settings import Settings
        from tests.conftest import save_tiny_dinov2

        model = save_tiny_dinov2(tmp / "tiny-dinov2")
        corpus = tmp / "corpus"
        t = time.perf_counter()
        make_tiny_corpus(corpus, n)
        make_s = time.perf_counter() - t
        settings = Settings(index_dir=tmp / "idx", model=str(model), batch_size=256)
        first = run_index(IndexOptions(corpus=corpus, settings=settings, progress=False))
        t = time.perf_counter()
        second = run_index(IndexOptions(corpus=corpus, settings=settings, progress=False))
        second_wall = time.perf_counter() - t
        assert second.new == second.changed == second.removed == 0 and second.device == "-"
        result = {
            "files": n, "make_corpus_s": round(make_s, 1),
            "first_run": {"wall_s": round(first.elapsed_s, 1), "images_per_s": round(first.images_per_s, 1),
                          "index": first.index_factory, "timings": first.timings},
            "unchanged_rerun": {"wall_s": round(second_wall, 2), "timings": second.timings,
                                "model_loaded": second.device != "-"},
        }
        path = save_result("incremental_reindex" + ("_quick" if args.quick else ""), result)
        print(f"{n} files: first run {first.elapsed_s:.1f} s ({first.index_factory}); unchanged re-run "
              f"{second_wall:.2f} s (scan {second.timings.get('scan_s')} s, plan {second.timings.get('plan_s')} s) "
              f"-> {path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
