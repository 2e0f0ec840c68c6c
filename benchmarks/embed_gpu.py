"""Embedding throughput on a GPU: ViT-S/14 and ViT-B/14 shapes at fp16 and bf16, end to end from
JPEG files on disk to vectors in the index, against the same yardsticks as the CPU benchmark
(benchmarks/embed_throughput.py), all measured in one run on the same two corpora:

* forward-only: the model on ready uint8 tensors at the same batch size (the ceiling);
* the model card's reference loop (AutoImageProcessor + AutoModel on the GPU), once per shape;
* what can feed the GPU: CPU decoding alone (the indexer's decode workers, no model) and, where
  torchvision is installed, nvJPEG decoding on the GPU alone (torchvision.io.decode_jpeg(device=
  'cuda') plus resize and crop on the GPU). These say what limits the end-to-end number.

Needs CUDA; without it the script says so and writes nothing (`python -m benchmarks` skips it).
Usage: python -m benchmarks.embed_gpu [--quick] [--images N] [--batch-size B] [--shapes vits14 vitb14]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import dinov2_dir, save_result
from benchmarks.embed_throughput import (
    SIZES_MP,
    end_to_end,
    forward_only,
    make_corpus,
    reference,
)


def cpu_decode_only(corpus: Path, files: list[Path], model_dir: Path, batch: int, workers: int) -> float:
    """Images/s of the indexer's decode stage alone (same DataLoader, workers, batch; no model)."""
    from retrieval.indexer.runners.local import worker_chunk

    from retrieval.imaging.decode import WorkItem
    from retrieval.imaging.loader import decode_batches, regroup
    from retrieval.imaging.preprocess import PreprocessConfig
    from retrieval.settings import Settings

    config = PreprocessConfig.from_model_dir(model_dir)
    items = [WorkItem(path=str(f.relative_to(corpus)), size=f.stat().st_size, mtime_ns=f.stat().st_mtime_ns)
             for f in files]
    t = time.perf_counter()
    n = 0
    chunk = worker_chunk(len(items), workers, batch)  # as the indexer does
    chunks = decode_batches(str(corpus), items, config, Settings().max_pixels, chunk, workers, pin_memory=True)
    for results, _pixels in regroup(chunks, batch, pin_memory=True):
        n += len(results)
    return n / (time.perf_counter() - t)


def nvjpeg_decode_only(files: list[Path], batch: int, short_edge: int = 256, crop: int = 224) -> float | None:
    """Images/s of file read + nvJPEG decode + resize + centre crop, all on the GPU (None: no torchvision)."""
    try:
        import torch
        import torch.nn.functional as F
        from torchvision.io import decode_jpeg
    except ImportError:
        return None

    def one_batch(paths: list[Path]) -> torch.Tensor:
        data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
        images = decode_jpeg(data, device="cuda")
        out = []
        for img in images:
            h, w = img.shape[-2:]
            s = short_edge / min(h, w)
            x = F.interpolate(img[None].float(), size=(max(crop, round(h * s)), max(crop, round(w * s))),
                              mode="bicubic", antialias=True)
            top, left = (x.shape[-2] - crop) // 2, (x.shape[-1] - crop) // 2
            out.append(x[..., top : top + crop, left : left + crop].clamp_(0, 255).to(torch.uint8))
        return torch.cat(out)

    one_batch(files[:batch])  # warm-up: nvJPEG handles, kernels
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(0, len(files), batch):
        one_batch(files[i : i + batch])
    torch.cuda.synchronize()
    return len(files) / (time.perf_counter() - t)


def _ablation(model_dir: Path, tmp: Path, batch: int, workers: int, precision: str, forward: float) -> dict[str, Any]:
    """The GPU pipeline choices changed one at a time: decode workers hand over 32-image chunks, or
    whole model batches (as before), instead of the chunk size picked from the run's size; batches
    are written by the main thread instead of the writer thread."""
    from retrieval.indexer.runners import local as pipeline

    choose = pipeline.worker_chunk
    out: dict[str, Any] = {}
    try:
        for chunk, overlap in ((32, True), (batch, True), ("auto", False)):
            pipeline.worker_chunk = choose if chunk == "auto" else (lambda n, w, b, c=chunk: c)
            for name in CORPORA:
                key = f"{name}/chunk-{chunk}/{'thread' if overlap else 'inline'}"
                e2e = end_to_end(model_dir, tmp / name, tmp / f"idx-ablation-{key.replace('/', '-')}", batch,
                                 workers, "cuda", precision, overlap=overlap)
                e2e["ratio_vs_forward_only"] = round(e2e["images_per_s"] / forward, 3)
                out[key] = e2e
                print(f"ablation {key}: {e2e['images_per_s']:.0f} img/s, timings {e2e['timings']}", flush=True)
        return out
    finally:
        pipeline.worker_chunk = choose


# "photos": camera-sized JPEGs (0.3-12 MP, the CPU benchmark's mix); "web": 500x375, the size of a
# typical ImageNet image, standing in for datasets that are stored already resized.
# The web corpus has 4x the images: each decodes ~10x faster, and a run must last long enough for
# the decode workers' start-up to be a small part of it.
CORPORA = {"photos": (SIZES_MP, 1), "web": ([(500, 375)], 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,024 (web: 4,096) images, ViT-S/14 at bf16 only")
    parser.add_argument("--images", type=int, default=None, help="images in the photos corpus (the web corpus has 4x)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--shapes", nargs="*", default=None, choices=["vits14", "vitb14"])
    parser.add_argument("--precisions", nargs="*", default=None, choices=["bf16", "fp16"])
    parser.add_argument("--workers", type=int, nargs="*", default=None,
                        help="decode workers to try (default: the indexer's choice)")
    parser.add_argument("--out", type=Path, default=None, help="also copy the JSON here")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("embed_gpu: no CUDA device here; nothing measured (the CPU numbers are embed_throughput's)")
        return 0
    from retrieval.indexer.runners.local import default_workers, worker_chunk

    n = args.images or (1024 if args.quick else 4096)
    shapes = args.shapes or (["vits14"] if args.quick else ["vits14", "vitb14"])
    precisions = args.precisions or (["bf16"] if args.quick else ["bf16", "fp16"])
    default = default_workers("cuda")
    sweep = args.workers or [default]
    batch = args.batch_size
    tmp = Path(tempfile.mkdtemp(prefix="bench-embed-gpu-"))
    try:
        results: dict[str, Any] = {"batch_size": batch, "default_workers": default, "corpora": {},
                                   "runs": []}
        files: dict[str, list[Path]] = {}
        for name, (sizes, times) in CORPORA.items():
            root = tmp / name
            t = time.perf_counter()
            make_corpus(root, n * times, jobs=os.cpu_count() or 1, sizes=sizes)
            files[name] = sorted(root.rglob("*.jpg"), key=lambda p: p.name)
            info = {"images": n * times, "worker_chunk": worker_chunk(n * times, default, batch),
                    "sizes": [f"{w}x{h}" for w, h in sizes],
                    "mean_kb": round(sum(f.stat().st_size for f in files[name]) / (n * times) / 1e3, 1)}
            info["cpu_decode_only_img_s"] = {str(w): cpu_decode_only(root, files[name], dinov2_dir(tmp, shapes[0]),
                                                                      batch, w) for w in sweep}
            info["nvjpeg_decode_only_img_s"] = nvjpeg_decode_only(files[name], 64)
            results["corpora"][name] = info
            print(f"{name}: {n * times} JPEGs ({info['mean_kb']} KB each) made in {time.perf_counter() - t:.0f} s; "
                  f"decode only: CPU {info['cpu_decode_only_img_s']} img/s, nvJPEG {info['nvjpeg_decode_only_img_s']}",
                  flush=True)
        for shape in shapes:
            model_dir = dinov2_dir(tmp, shape)
            for k, precision in enumerate(precisions):
                run: dict[str, Any] = {"shape": shape, "precision": precision}
                run["forward_only_img_s"] = forward_only(model_dir, batch, max(16, 4 * n // batch), "cuda", precision)
                run["end_to_end"] = {}
                for name in CORPORA:
                    for w in sweep:
                        e2e = end_to_end(model_dir, tmp / name, tmp / f"idx-{shape}-{precision}-{name}-{w}", batch, w,
                                         "cuda", precision)
                        e2e["ratio_vs_forward_only"] = round(e2e["images_per_s"] / run["forward_only_img_s"], 3)
                        run["end_to_end"][f"{name}/{w}"] = e2e
                        print(f"{shape} {precision} {name} workers={w}: forward-only {run['forward_only_img_s']:.0f}"
                              f" img/s, end to end {e2e['images_per_s']:.0f} img/s "
                              f"({e2e['ratio_vs_forward_only']:.2f}x), timings {e2e['timings']}", flush=True)
                if shape == shapes[0] and k == 0:
                    run["ablation"] = _ablation(model_dir, tmp, batch, default, precision, run["forward_only_img_s"])
                if k == 0:  # the reference loop is CPU-bound preprocessing: once per shape is enough
                    run["reference_img_s"] = {name: reference(model_dir, files[name][:128], 64, "cuda", precision,
                                                              n_single=32) for name in CORPORA}
                    print(f"{shape} reference loop: {run['reference_img_s']}", flush=True)
                results["runs"].append(run)
        path = save_result("embed_throughput_gpu" + ("_quick" if args.quick else ""), results)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, args.out / path.name)
        print(f"-> {path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
