"""Embedding throughput, end to end from JPEG files to vectors in the index, against two yardsticks
measured in the same run, same batch size, same threads:

* forward-only: the model on ready uint8 tensors (the ceiling: no decoding, no I/O);
* the reference loop of the model's documentation: AutoImageProcessor + AutoModel, one image at a
  time and batched, images opened with PIL.

Usage: python -m benchmarks.embed_throughput [--quick] [--images N] [--batch-size B]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import save_result, vit_s14_dir

SIZES_MP = [(640, 480), (1280, 960), (2048, 1536), (4000, 3000)]  # 0.3, 1.2, 3.1, 12 MP


def _make_one(root: Path, sizes: list[tuple[int, int]], i: int) -> None:
    from tests.images import photo

    w, h = sizes[i % len(sizes)]
    img = photo(w // 8, h // 8, seed=i).resize((w, h))  # smooth upscaling: realistic JPEG sizes
    (root / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
    img.save(root / f"d{i % 4}" / f"img{i:05d}.jpg", quality=90)


def make_corpus(root: Path, n: int, jobs: int = 1, sizes: list[tuple[int, int]] = SIZES_MP) -> None:
    """n JPEGs cycling through `sizes`; `jobs` processes write them (a GPU run needs thousands)."""
    if jobs <= 1:
        for i in range(n):
            _make_one(root, sizes, i)
        return
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    with ProcessPoolExecutor(jobs) as pool:
        list(pool.map(partial(_make_one, root, sizes), range(n), chunksize=16))


def forward_only(model_dir: Path, batch: int, n_batches: int, device: str = "auto", precision: str = "auto") -> float:
    from retrieval.model import load_embedder

    embedder = load_embedder(str(model_dir), device=device, precision=precision)
    x = np.random.default_rng(0).integers(0, 255, (batch, 3, 224, 224), dtype=np.uint8)
    for _ in range(3):
        embedder.embed(x)  # warm-up (on a GPU: kernel selection, allocator)
    t = time.perf_counter()
    for _ in range(n_batches):
        embedder.embed(x)  # returns numpy: the GPU work is finished when it returns
    return batch * n_batches / (time.perf_counter() - t)


def reference(model_dir: Path, files: list[Path], batch: int, device: str = "cpu", precision: str = "fp32",
              n_single: int | None = None) -> dict[str, float]:
    """The model card's loop; on a GPU the model and inputs are moved there in the run's precision."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=dtype).to(device).eval()

    def run(images: Any) -> None:
        inputs = processor(images=images, return_tensors="pt").to(device)
        model(pixel_values=inputs["pixel_values"].to(dtype)).pooler_output.cpu()

    out = {}
    single = files[: n_single or len(files)]
    with torch.inference_mode():
        run(Image.open(files[0]))
        t = time.perf_counter()
        for f in single:
            run(Image.open(f))
        out["one_at_a_time"] = len(single) / (time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(0, len(files), batch):
            run([Image.open(f) for f in files[i : i + batch]])
        out["batched"] = len(files) / (time.perf_counter() - t)
    return out


def end_to_end(model_dir: Path, corpus: Path, index_dir: Path, batch: int, workers: int | None,
               device: str = "auto", precision: str = "auto", overlap: bool | None = None) -> dict[str, Any]:
    from retrieval.indexer.pipeline import IndexOptions, run_index

    from retrieval.settings import Settings

    settings = Settings(index_dir=index_dir, model=str(model_dir), batch_size=batch, workers=workers,
                        device=device, precision=precision, overlap=overlap)
    summary = run_index(IndexOptions(corpus=corpus, settings=settings, progress=False))
    return {"images_per_s": summary.images_per_s, "wall_s": summary.elapsed_s, "timings": summary.timings,
            "workers": workers, "device": summary.device}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64 images (a few minutes on 2 cores)")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="*", default=[None], help="decode workers to try (default: auto)")
    args = parser.parse_args()
    n = args.images or (64 if args.quick else 512)
    tmp = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    try:
        model_dir = vit_s14_dir(tmp)
        corpus = tmp / "corpus"
        make_corpus(corpus, n)
        # Ordered by image number, so any prefix (the reference loop uses the first 64) has the same
        # mix of 0.3-12 MP sizes as the whole corpus.
        files = sorted(corpus.rglob("*.jpg"), key=lambda p: p.name)
        results = {"images": n, "batch_size": args.batch_size, "sizes": [f"{w}x{h}" for w, h in SIZES_MP]}
        results["forward_only_img_s"] = forward_only(model_dir, args.batch_size, max(2, n // args.batch_size))
        results["end_to_end"] = [end_to_end(model_dir, corpus, tmp / f"idx-{w}", args.batch_size, w) for w in args.workers]
        results["reference_img_s"] = reference(model_dir, files[: min(n, 64)], args.batch_size)
        best_e2e = max(r["images_per_s"] for r in results["end_to_end"])
        results["ratio_vs_forward_only"] = round(best_e2e / results["forward_only_img_s"], 3)
        results["ratio_vs_best_reference"] = round(best_e2e / max(results["reference_img_s"].values()), 3)
        path = save_result("embed_throughput" + ("_quick" if args.quick else ""), results)
        print(f"forward-only {results['forward_only_img_s']:.1f} img/s; end-to-end best {best_e2e:.1f} img/s "
              f"({results['ratio_vs_forward_only']:.2f}x forward-only); reference "
              + ", ".join(f"{k} {v:.1f}" for k, v in results["reference_img_s"].items())
              + f" img/s ({results['ratio_vs_best_reference']:.2f}x best reference) -> {path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
