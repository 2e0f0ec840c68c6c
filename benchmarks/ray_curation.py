"""Curation and index build on Ray vs in-process, at equal resources, and from 1 to 2 worker nodes.

Three stages of the same synthetic index folder (clustered unit vectors, benchmarks.dedup_scale's
corpus), each run three ways in one process:

* local: the library function in this process, FAISS limited to one thread (one CPU);
* Ray, 1 worker node of 1 CPU (the head node has no CPUs: every task runs on worker nodes);
* Ray, 2 worker nodes of 1 CPU each.

Stages: dedup's k-NN graph (retrieval.curation.graph.knn_edges, k = 64), cluster assignment
(retrieval.curation.clusters.assign_all against max(sqrt(N), 1024) centroids) and the IVF-PQ index build
(retrieval.sync.sync_index with a forced rebuild; the add phase is what runs in shards).

Wall time on a shared 2-core machine says little about speed-up, so every run also records the
CPU seconds its whole process tree used (this process, the Ray nodes and their workers, read from
/proc): `CPU ratio` = Ray's CPU seconds / local's for the same work is the overhead that does not
depend on what else the machine runs. The cluster's idle CPU use (GCS, raylets, agents; measured
over 5 s with no task) is recorded too, so that the renderer can separate the per-task overhead
from the daemons' background cost, which grows with wall time. Linux only.

Usage: python -m benchmarks.ray_curation [--quick] [--n N] [--dim D]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.common import save_result

K = 64
THRESHOLD = 0.9


# --- CPU accounting ---------------------------------------------------------------------------
def _tree_cpu_s(root: int | None = None) -> float:
    """User + system CPU seconds of `root` (default: this process) and every living descendant."""
    root = os.getpid() if root is None else root
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        parent[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total = 0.0
    for pid, c in cpu.items():
        p = pid
        while p and p != root:
            p = parent.get(p, 0)
        if p == root:
            total += c
    return total


def measure(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """fn()'s result, its wall seconds and the CPU seconds the process tree used meanwhile."""
    cpu0, t0 = _tree_cpu_s(), time.perf_counter()
    out = fn()
    wall, cpu = time.perf_counter() - t0, _tree_cpu_s() - cpu0
    return out, {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}


# --- the stages ----------------------------------------------------------------------------------
def graph_stage(reader: Any, ids: np.ndarray, batch: int, ray: str | None) -> int:
    from retrieval.curation.graph import RayGraph, knn_edges

    on_ray = None if ray is None else RayGraph(ray, str(reader.layout.faiss_path.resolve()), reader.nprobe,
                                               reader.vectors)
    return len(knn_edges(reader.index, ids, reader.vectors.read, K, THRESHOLD, batch=batch, ray=on_ray))


def assign_stage(reader: Any, ids: np.ndarray, centroids: np.ndarray, ray: str | None) -> np.ndarray:
    from retrieval.curation.clusters import assign_all

    return assign_all(reader.vectors, ids, centroids, ray=ray)[0]


def build_stage(index_dir: Path, ray: str | None) -> dict[str, Any]:
    from retrieval.layout import IndexLayout
    from retrieval.settings import Settings
    from retrieval.store import Store
    from retrieval.sync import SyncOptions, sync_index
    from retrieval.vectors import role_vectors

    layout, s = IndexLayout(index_dir), Settings()
    store = Store(layout.default_db_url())
    try:
        r = sync_index(store, role_vectors(layout, "search", store.get_meta("dim")), layout, SyncOptions(
            memory_budget=s.memory_budget, exact_threshold=1000, recall_target=s.recall_target,
            force_rebuild=True, ray_address=ray))
    finally:
        store.close()
    assert r.spec is not None
    return {"index": r.spec.factory, "nprobe": r.spec.params.get("nprobe"),
            "recall_at_10": r.spec.params.get("recall_at_10"), **r.timings}


# --- the cluster -------------------------------------------------------------------------------
def start_cluster(tmp: Path) -> Any:
    """A Ray head with no CPUs on 127.0.0.1 (see tests/distributed/conftest.py for the loopback workaround)."""
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=str(tmp))
    from ray.cluster_utils import Cluster

    return Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 200 * 2**20,
                                                          "include_dashboard": False})


def add_worker(cluster: Any) -> None:
    cluster.add_node(num_cpus=1, object_store_memory=200 * 2**20)
    cluster.wait_for_nodes()


def warm_up(address: str, nodes: int, dim: int) -> float:
    """Start a worker process per node and import the library there before timing (a first task pays
    process start and imports); then the cluster's idle CPU use, in CPU seconds per wall second."""
    from retrieval.curation.clusters import assign
    from retrieval.distributed import map_shards

    x = np.eye(4, dim, dtype=np.float32)
    map_shards(address, assign, [x] * (2 * nodes), x)
    _, idle = measure(lambda: time.sleep(5.0))  # GCS, raylets, agents: paid for as long as the run lasts
    return round(idle["cpu_s"] / idle["wall_s"], 4)


# --- main ------------------------------------------------------------------------------------------
def run(n: int, dim: int, tmp: Path) -> dict[str, Any]:
    import faiss

    from benchmarks.dedup_scale import build_index_dir, make_corpus
    from retrieval import ivf_build
    from retrieval.curation import clusters, graph
    from retrieval.curation.clusters import default_k, spherical_kmeans
    from retrieval.layout import IndexLayout
    from retrieval.search import IndexReader

    faiss.omp_set_num_threads(1)  # local = one CPU, like one Ray task
    corpus = make_corpus(n, dim)
    index_dir = tmp / "idx"
    build_index_dir(index_dir, corpus)
    del corpus
    # Shards: 8 per stage, so that two nodes have work to share and tasks are not trivially small.
    graph.RAY_SHARD_BATCHES = 1
    batch = max(256, n // 8)
    clusters.ASSIGN_BATCH, clusters.RAY_SHARD_BATCHES = batch, 1
    ivf_build.ADD_SHARD = batch

    out: dict[str, Any] = {"n": n, "dim": dim, "k": K, "threshold": THRESHOLD, "shard": batch,
                           "load_average": [round(os.getloadavg()[0], 2)], "stages": {}}
    build_local, t = measure(lambda: build_stage(index_dir, None))
    out["stages"]["index_build"] = {"local": {**t, **build_local}}
    reader = IndexReader(IndexLayout(index_dir))
    ids = np.fromiter(reader.store.image_ids(), dtype=np.int64)
    out["index"] = build_local["index"]
    edges, t = measure(lambda: graph_stage(reader, ids, batch, None))
    out["stages"]["graph"] = {"local": {**t, "edges": edges}}
    k = max(default_k(n), 1024)  # enough work per image for the assignment to be measurable at small N
    rng = np.random.default_rng(0)
    centroids = spherical_kmeans(reader.vectors.read(np.sort(rng.choice(ids, min(n, k * 64), replace=False))), k, 10)
    labels, t = measure(lambda: assign_stage(reader, ids, centroids, None))
    out["stages"]["assign"] = {"local": {**t, "clusters": k}}
    out["identical"] = {}

    cluster = start_cluster(tmp / "ray")
    try:
        for nodes in (1, 2):
            add_worker(cluster)
            key = f"ray_{nodes}_node{'s' if nodes > 1 else ''}"
            out.setdefault("idle_cpu_per_s", {})[key] = warm_up(cluster.address, nodes, dim)
            e, t = measure(lambda: graph_stage(reader, ids, batch, cluster.address))
            out["stages"]["graph"][key] = {**t, "edges": e}
            lab, t = measure(lambda: assign_stage(reader, ids, centroids, cluster.address))
            out["stages"]["assign"][key] = t
            out["identical"][key] = {"graph_edges": e == edges, "assignments": bool(np.array_equal(lab, labels))}
            b, t = measure(lambda: build_stage(index_dir, cluster.address))
            out["stages"]["index_build"][key] = {**t, **b}
            logging.getLogger(__name__).warning("%s done", key)
    finally:
        reader.close()
        import ray

        ray.shutdown()
        cluster.shutdown()
    out["load_average"].append(round(os.getloadavg()[0], 2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 vectors of d = 128 (default 100,000 of 384)")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--dim", type=int, default=None)
    args = parser.parse_args()
    try:
        import ray  # noqa: F401
    except ImportError:
        print("benchmarks.ray_curation needs Ray (pip install '.[ray]'); nothing measured", file=sys.stderr)
        return
    n = args.n or (20_000 if args.quick else 100_000)
    dim = args.dim or (128 if args.quick else 384)
    tmp = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))  # Ray's socket paths must stay short
    try:
        result = run(n, dim, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    path = save_result("ray_curation_quick" if args.quick else "ray_curation", result)
    print(path)


if __name__ == "__main__":
    main()
