"""Run every benchmark: `python -m benchmarks [--quick]`. Each writes JSON under benchmarks/results/,
then the README's benchmark tables are rendered from those files."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = [
    "benchmarks.embed_throughput",
    "benchmarks.embed_gpu",  # says so and measures nothing without CUDA
    "benchmarks.index_quality",
    "benchmarks.dedup_scale",
    "benchmarks.dedup_quality",
    "benchmarks.api_batching",
    "benchmarks.incremental_reindex",
    "benchmarks.ray_curation",  # says so and measures nothing without Ray
]


def main() -> int:
    extra = [a for a in sys.argv[1:] if a == "--quick"]
    failed = 0
    for module in BENCHMARKS:
        print(f"== {module} {' '.join(extra)}", flush=True)
        failed += subprocess.call([sys.executable, "-m", module, *extra]) != 0
    # The README's benchmark tables are rendered from the JSON just written (benchmarks/render.py).
    failed += subprocess.call([sys.executable, "-m", "benchmarks.render"]) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
