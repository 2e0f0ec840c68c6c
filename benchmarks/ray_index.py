"""`retrieval index --ray` vs the local runner: the Ray runner's overhead, and 1 vs 2 worker nodes.

One process builds a corpus, then indexes it (each into a fresh index folder, same settings) with
1. the local runner (decoding in this process, the model's threads on every core);
2. the Ray runner on a one-node cluster started on this machine (the same cores);
3. the Ray runner on the same cluster with a second node added (one more node, same machine).
The peers run back to back in the same run. Wall time is the update's embed loop (decode + embed +
commit); cluster start, model load and FAISS are reported apart. CPU time is summed over this
process and every process under it (Ray's raylets and workers), so img per CPU-second compares the
runners' work independently of how busy the shared machine was. On one machine the second node
adds no cores: the 1 -> 2 node speed-up here says whether the pipeline spreads, not how a real
cluster scales (that needs real machines: the per-node rate is what an extrapolation should use).

The model is a DINOv2-shaped random checkpoint (no semantics: speed only), smaller than ViT-S/14
so that a run stays short on a shared 2-core machine.

Usage: python -m benchmarks.ray_index [--quick] [--images N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import save_result

HIDDEN, LAYERS, HEADS = 192, 6, 3  # ViT-Ti/14-like, 6 layers


def _model(root: Path) -> Path:
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    path = root / "dinov2-ti6-random"
    config = Dinov2Config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          intermediate_size=4 * HIDDEN, patch_size=14, image_size=518)
    Dinov2Model(config).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return path


def _cpu_seconds() -> float:
    """CPU time of this process and all its descendants (live ones; Ray's stay alive during a run)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def _run(name: str, corpus: Path, model: Path, folder: Path, address: str | None) -> dict[str, Any]:
    from retrieval.index import make_settings

    import retrieval

    index = retrieval.Index(make_settings(index_dir=folder, model=str(model), device="cpu", workers=0,
                                          batch_size=32))
    cpu, t = _cpu_seconds(), time.perf_counter()
    summary = index.update(corpus, progress=False, ray=address)
    wall, cpu = time.perf_counter() - t, _cpu_seconds() - cpu
    loop = summary.timings.get("embed_loop_s", wall)
    embedded = summary.new + summary.changed
    first = summary.timings.get("first_batch_s")
    steady = (embedded - 32) / (loop - first) if first is not None and loop > first and embedded > 32 else None
    row = {"case": name, "images": embedded, "wall_s": round(wall, 2), "loop_s": round(loop, 2),
           "images_per_s": round(embedded / loop, 2), "cpu_s": round(cpu, 2),
           "first_batch_s": round(first, 2) if first is not None else None,
           "after_first_batch_images_per_s": round(steady, 2) if steady else None,
           "images_per_cpu_s": round(embedded / cpu, 3) if cpu else None,
           "timings": summary.timings}
    print(f"{name:>12}: {row['images_per_s']} img/s (loop {loop:.1f} s, wall {wall:.1f} s, cpu {cpu:.1f} s)")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="96 images instead of 384")
    parser.add_argument("--images", type=int, default=None)
    args = parser.parse_args()
    n = args.images or (96 if args.quick else 384)
    tmp = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))  # short: Ray's Unix socket paths
    os.makedirs(tmp / "ray", exist_ok=True)
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=str(tmp))
    try:
        import ray
        from ray.cluster_utils import Cluster

        from tests.conftest import make_corpus

        model = _model(tmp)
        corpus = tmp / "corpus"
        make_corpus(corpus, n, size=(320, 240))
        cores = os.cpu_count() or 1
        load_before = os.getloadavg()[0]
        rows = [_run("local", corpus, model, tmp / "local", None)]
        t = time.perf_counter()
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": cores, "object_store_memory": 200 * 2**20, "include_dashboard": False})
        start_s = time.perf_counter() - t
        try:
            rows.append(_run("ray 1 node", corpus, model, tmp / "ray1", cluster.address))
            t = time.perf_counter()
            cluster.add_node(num_cpus=cores, object_store_memory=200 * 2**20)
            cluster.wait_for_nodes()
            add_s = time.perf_counter() - t
            rows.append(_run("ray 2 nodes", corpus, model, tmp / "ray2", cluster.address))
        finally:
            ray.shutdown()
            cluster.shutdown()
        local, one, two = rows
        result = {
            "images": n, "image_size": [320, 240], "batch_size": 32,
            "model": f"random DINOv2 config, hidden {HIDDEN}, {LAYERS} layers, patch 14, 224 crop",
            "nodes_on_one_machine": True, "node_cpus": cores,
            "cluster_start_s": round(start_s, 1), "node_add_s": round(add_s, 1),
            "rows": rows, "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
            "ray_overhead": round(local["images_per_s"] / one["images_per_s"] - 1, 3),
            "ray_overhead_cpu": round(local["images_per_cpu_s"] / one["images_per_cpu_s"] - 1, 3),
            "speedup_1_to_2_nodes": round(two["images_per_s"] / one["images_per_s"], 3),
            "speedup_1_to_2_nodes_cpu": round(two["images_per_cpu_s"] / one["images_per_cpu_s"], 3),
            # Read by benchmarks/ray_curation.py's extrapolation: one node's indexing rate (this machine, CPU).
            "per_node_images_per_s": one["images_per_s"],
            "per_node_device": "cpu",
        }
        path = save_result("ray_index_quick" if args.quick else "ray_index", result)
        print(f"wrote {path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
