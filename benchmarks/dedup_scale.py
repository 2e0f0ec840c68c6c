"""Dedup at scale: `retrieval dedup` (sha256 + pHash + k = 64 k-NN graph + components) over 100k / 1M vectors.

What is measured, per size N (d = 384, the ViT-S/14 width):
* the index the indexer would build for N vectors (`sync_index` with default settings), timed apart;
* `run_dedup` with the defaults (k = 64, cosine >= 0.95, pHash radius 8, groups stored in SQLite),
  in a child process of its own, so its peak RSS is the dedup's alone: wall time per stage and peak RSS;
* quality of the approximate graph: planted duplicate pairs found, and for a sample of nodes, the
  k-NN edges above the threshold found vs exact brute force (a flat index over the same vectors);
* side by side: imagededup's `find_duplicates(encoding_map=...)` (its CNN-encoding path: cosine over
  all pairs) on the first n vectors for the sizes where it completes within a time limit, run in
  its own environment (benchmarks/peers/imagededup_scale.py).

The corpus is synthetic (no image files): clustered unit vectors where nearest distinct neighbours
sit at cosine ~0.6-0.8 (as real DINOv2 neighbours do), plus planted copy groups at cosine ~0.97-0.99,
exact copies sharing sha256 and pHash, and random 64-bit pHashes with planted near-collisions.
The pixel-identity stage is off (it decodes files, and there are none); everything else is the
library path the CLI runs.

Usage: python -m benchmarks.dedup_scale [--quick] [--sizes 100000 1000000] [--peer-sizes ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import save_result
from benchmarks.index_eval import peak_rss_bytes

DIM = 384
COPY_FRACTION = 0.01  # originals that get planted copies
EXACT_COPY_SHARE = 0.2  # of the copies: byte-identical (same sha256, pHash and vector)
PHASH_NEAR_SHARE = 0.5  # of the other copies: pHash within 0-4 bits (re-encoded / resized)
SAMPLE_NODES = 2000  # nodes whose exact k-NN edges are checked against the graph
KEEP_OTHER = False  # --keep-other
SPILL_ABOVE = 2_000_000  # larger corpora keep their float32 vectors in a memory-mapped file


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_corpus(n: int, dim: int = DIM, seed: int = 0, spill: Path | None = None) -> dict[str, Any]:
    """Synthetic vectors, hashes and the planted copy pairs (original position, copy position).

    With `spill`, the vectors live in a memory-mapped float16 .npy file there (the precision the index
    stores them in; 10M x 384 float32 would take 15 GB of disk beside the index's own copy)."""
    rng = np.random.default_rng(seed)
    n_centres = max(16, n // 100)
    centres = _unit(rng.standard_normal((n_centres, dim), dtype=np.float32))
    # cos between two members of one cluster ~ 1 / (1 + sigma^2 d): 0.6 at sigma^2 d = 2/3
    sigma = np.float32(np.sqrt((2 / 3) / dim))
    if spill is not None:
        vecs = np.lib.format.open_memmap(spill, mode="w+", dtype=np.float16, shape=(n, dim))
    else:
        vecs = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        c = rng.integers(0, n_centres, stop - start)
        vecs[start:stop] = _unit(centres[c] + sigma * rng.standard_normal((stop - start, dim), dtype=np.float32))
    phash = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, n, dtype=np.int64, endpoint=True)
    sha = np.array([f"{i:064x}" for i in range(n)], dtype=object)

    # planted copies: an original at `o`, 1-3 copies written over other positions
    n_orig = int(n * COPY_FRACTION)
    positions = rng.permutation(n)
    originals = positions[:n_orig]
    n_copies = rng.integers(1, 4, n_orig)
    copies = positions[n_orig : n_orig + int(n_copies.sum())]
    pair_orig = np.repeat(originals, n_copies)
    tau = np.float32(np.sqrt(0.04 / dim))  # cos ~ 1/sqrt(1 + tau^2 d) ~ 0.98
    kind = rng.random(len(copies))
    exact = kind < EXACT_COPY_SHARE
    vecs[copies] = _unit(vecs[pair_orig] + tau * rng.standard_normal((len(copies), dim), dtype=np.float32))
    vecs[copies[exact]] = vecs[pair_orig[exact]]
    sha[copies[exact]] = sha[pair_orig[exact]]
    phash[copies[exact]] = phash[pair_orig[exact]]
    near = ~exact & (kind < EXACT_COPY_SHARE + (1 - EXACT_COPY_SHARE) * PHASH_NEAR_SHARE)
    flips = np.zeros(len(copies), np.int64)
    for j in np.flatnonzero(near):
        for bit in rng.choice(64, rng.integers(0, 5), replace=False):
            flips[j] |= np.int64(1) << np.int64(bit) if bit < 63 else np.int64(np.iinfo(np.int64).min)
    phash[copies[near]] = phash[pair_orig[near]] ^ flips[near]
    return {"vectors": vecs, "phash": phash, "sha256": sha, "pairs": np.stack([pair_orig, copies], axis=1),
            "exact": exact, "phash_near": near}


def build_index_dir(root: Path, corpus: dict[str, Any], ann_index: bool | None = None) -> dict[str, Any]:
    """An index directory as `retrieval index` would leave it, written straight from the arrays.

    `ann_index`: also build the FAISS index (`sync_index` with default settings). By default only where
    the dedup reads it: where the index is flat (below the default exact threshold) or below
    partition.MIN_VECTORS; larger corpora are joined from the vectors file, and the index build (about
    half an hour at 1M on two cores) measures the indexer, not the dedup."""
    from retrieval.curation import partition
    from sqlalchemy import insert

    from retrieval.layout import IndexLayout
    from retrieval.settings import Settings
    from retrieval.store import Image, Store, utcnow
    from retrieval.sync import SyncOptions, sync_index
    from retrieval.vectors import VectorStore

    layout = IndexLayout(root)
    root.mkdir(parents=True, exist_ok=True)
    store = Store(layout.default_db_url())
    vecs = corpus["vectors"]
    n, dim = vecs.shape
    t = time.perf_counter()
    with store.session() as s, s.begin():
        store.set_meta(s, corpus_root=str(root / "corpus"), model_ref="synthetic", model_fingerprint="synthetic",
                       dim=dim, preprocess={}, created_at=utcnow().isoformat())
    now = utcnow()
    for start in range(0, n, 50_000):
        rows = [{"id": i + 1, "path": f"d{i // 1000:04d}/{i:07d}.jpg", "size": 100_000 + i % 997, "mtime_ns": 0,
                 "sha256": corpus["sha256"][i], "width": 640, "height": 480, "format": "JPEG",
                 "phash": int(corpus["phash"][i]), "indexed": False, "added_at": now, "updated_at": now}
                for i in range(start, min(n, start + 50_000))]
        with store.session() as s, s.begin():
            s.execute(insert(Image), rows)
    vector_store = VectorStore(layout.vectors_path, dim)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        vector_store.write(np.arange(start + 1, stop + 1), np.asarray(vecs[start:stop], np.float32))
    write_s = time.perf_counter() - t
    if ann_index is None:
        ann_index = n < max(partition.MIN_VECTORS, Settings().exact_threshold)
    if not ann_index:
        store.close()
        return {"write_rows_and_vectors_s": round(write_s, 1), "index_build_s": None,
                "index": "not built (the dedup joins the vectors file: retrieval.curation.partition)",
                "index_params": {}}
    settings = Settings()
    t = time.perf_counter()
    result = sync_index(store, vector_store, layout, SyncOptions(
        memory_budget=settings.memory_budget, exact_threshold=settings.exact_threshold,
        recall_target=settings.recall_target))
    store.close()
    assert result.spec is not None
    return {"write_rows_and_vectors_s": round(write_s, 1), "index_build_s": round(time.perf_counter() - t, 1),
            "index": result.spec.factory, "index_params": {k: v for k, v in result.spec.params.items()
                                                          if k in ("nprobe", "recall_at_10", "fallback_for")}}


def child_dedup(index_dir: Path) -> dict[str, Any]:
    """Runs in its own process: one `run_dedup` with the defaults, then its peak RSS. The libraries it
    imports lazily (torch, faiss) are imported first and timed apart, as the imagededup runner does
    with its own (benchmarks/peers/imagededup_scale.py), so wall_s is the work on both sides."""
    t = time.perf_counter()
    import faiss  # noqa: F401
    import torch  # noqa: F401

    from retrieval.curation.dedup import DedupOptions, run_dedup
    from retrieval.layout import IndexLayout
    from retrieval.search import IndexReader

    import_s = time.perf_counter() - t
    t = time.perf_counter()
    reader = IndexReader(IndexLayout(index_dir), writable=True)  # the run is stored in the index
    outcome = run_dedup(reader, DedupOptions(pixels=False, use_gpu=False, force=True))
    wall = time.perf_counter() - t
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"run_id": outcome.run_id, "import_s": round(import_s, 1), "wall_s": round(wall, 1), "counts": outcome.counts,
            # CPU time of the dedup process (all threads): on a shared machine, where wall time
            # depends on what else runs, this is the figure that compares across runs.
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            # VmHWM (index_eval.peak_rss_bytes), not ru_maxrss: Linux carries ru_maxrss over fork + exec,
            # so this child of the corpus-holding parent would report the parent's peak.
            "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1), "rss_at_end_mb": read_rss_mb()}


def read_rss_mb() -> dict[str, float]:
    """This process's resident memory now, split into anonymous (its own) and file-backed pages
    (page cache of memory-mapped files, e.g. the vectors, which the kernel can drop at will)."""
    out: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = round(int(line.split()[1]) / 1024, 1)
    return out


def found_groups(index_dir: Path, run_id: int) -> dict[int, int]:
    """image id -> group number of the stored run."""
    from sqlalchemy import select

    from retrieval.layout import IndexLayout
    from retrieval.store import DuplicateGroup, DuplicateMember, Store

    store = Store(IndexLayout(index_dir).default_db_url())
    with store.session() as s:
        rows = s.execute(select(DuplicateMember.image_id, DuplicateGroup.number)
                         .join(DuplicateGroup, DuplicateGroup.id == DuplicateMember.group_id)
                         .where(DuplicateMember.run_id == run_id)).all()
    store.close()
    return {int(i): int(g) for i, g in rows}


def graph_quality(corpus: dict[str, Any], groups: dict[int, int], k: int = 64, threshold: float = 0.95,
                  seed: int = 1) -> dict[str, Any]:
    """Planted pairs put in one group, and exact k-NN edges above the threshold recovered, on a sample."""

    pairs = corpus["pairs"] + 1  # positions -> image ids
    same = np.array([groups.get(int(a), -1) == groups.get(int(b), -2) for a, b in pairs])
    by_kind = {"exact": corpus["exact"], "phash_near": corpus["phash_near"],
               "embedding_only": ~corpus["exact"] & ~corpus["phash_near"]}
    vecs = corpus["vectors"]
    rng = np.random.default_rng(seed)
    # sample among nodes that have planted partners (where edges exist) plus random nodes
    planted_nodes = np.unique(corpus["pairs"])
    sample = np.unique(np.r_[rng.choice(planted_nodes, min(SAMPLE_NODES // 2, len(planted_nodes)), replace=False),
                             rng.choice(len(vecs), SAMPLE_NODES // 2, replace=False)])
    sims, nbrs = exact_topk(vecs, sample, k + 1)
    truth = 0
    found = 0
    for row, node in enumerate(sample):
        keep = (nbrs[row] != node) & (sims[row] >= threshold)
        for other in nbrs[row][keep][:k]:
            truth += 1
            found += groups.get(int(node) + 1, -1) == groups.get(int(other) + 1, -2)
    return {
        "planted_pairs": len(pairs),
        "planted_pairs_grouped": {name: round(float(same[mask].mean()), 4) if mask.any() else None
                                  for name, mask in by_kind.items()},
        "sample_nodes": len(sample),
        "exact_edges_above_threshold": truth,
        "edge_recall_in_groups": round(found / truth, 4) if truth else None,
    }


def exact_topk(vecs: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The library's blocked exact top-k (graph.exact_topk) of vecs[rows] over all of vecs, by position."""
    from retrieval.curation.graph import exact_topk as scan

    read = lambda pos: np.asarray(vecs[pos], np.float32)  # noqa: E731 - float16 spill or float32
    return scan(np.asarray(rows), read(rows), np.arange(len(vecs)), read, k, block=131_072)


def partition(labels: dict[int, int]) -> set[frozenset[int]]:
    """{node: group} -> the set of groups (as frozensets of nodes)."""
    out: dict[int, set[int]] = {}
    for node, g in labels.items():
        out.setdefault(g, set()).add(node)
    return {frozenset(v) for v in out.values()}


def pair_components(pairs: np.ndarray, n: int) -> set[frozenset[int]]:
    """Connected components (size >= 2) of an (m, 2) pair list over nodes 0..n-1."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(pairs):
        return set()
    _, labels = connected_components(coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n)),
                                     directed=False)
    in_pair = np.zeros(n, bool)
    in_pair[pairs.ravel()] = True
    return partition({int(i): int(labels[i]) for i in np.flatnonzero(in_pair)})


def run_peer(vectors: np.ndarray, n: int, threshold: float, tmp: Path, timeout: float) -> dict[str, Any]:
    from benchmarks.peers import HERE, PeerUnavailable, run_json

    path = tmp / f"peer-{n}.npy"
    pairs_path = tmp / f"peer-{n}-pairs.npy"
    np.save(path, vectors[:n])
    try:
        out = run_json("imagededup", HERE / "imagededup_scale.py",
                       ["--vectors", str(path), "--threshold", str(threshold), "--mode", "cnn",
                        "--pairs-out", str(pairs_path)], timeout=timeout)
        if pairs_path.exists():
            out["groups"] = pair_components(np.load(pairs_path), n)
        return out
    except PeerUnavailable as exc:
        return {"n": n, "error": str(exc)}
    finally:
        path.unlink(missing_ok=True)
        pairs_path.unlink(missing_ok=True)


def ours_on_subset(corpus: dict[str, Any], n: int, tmp: Path) -> dict[str, Any]:
    """Our dedup on the first n vectors (the peer's input), for the side-by-side ratio."""
    sub = {key: corpus[key][:n] for key in ("vectors", "phash", "sha256")}
    index_dir = tmp / f"sub-{n}"
    build = build_index_dir(index_dir, sub)
    res = _spawn_child(index_dir)
    # image id -> position, the peer's node numbering
    groups = partition({i - 1: g for i, g in found_groups(index_dir, res["run_id"]).items()})
    shutil.rmtree(index_dir, ignore_errors=True)
    return {"n": n, "index": build["index"], "index_build_s": build["index_build_s"], "dedup_wall_s": res["wall_s"],
            "dedup_cpu_s": res["cpu_s"], "peak_rss_mb": res["peak_rss_mb"], "groups": res["counts"].get("groups"), "group_sets": groups}


def _spawn_child(index_dir: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.dedup_scale", "--child", str(index_dir)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"dedup child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100k vectors, peer at 10k and 20k")
    parser.add_argument("--sizes", "--n", type=int, nargs="*", default=None, help="corpus sizes (e.g. --n 10000000)")
    parser.add_argument("--peer-sizes", type=int, nargs="*", default=None)
    parser.add_argument("--peer-timeout", type=float, default=900.0)
    parser.add_argument("--keep-other", action="store_true",
                        help="keep the saved sizes (or side by side) when this run measures only the other part")
    parser.add_argument("--ann-index", action="store_true",
                        help="build the FAISS index at every size (by default only where the dedup reads it)")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global KEEP_OTHER
    KEEP_OTHER = args.keep_other
    if args.child is not None:
        print(json.dumps(child_dedup(args.child)))
        return
    sizes = args.sizes if args.sizes is not None else ([100_000] if args.quick else [100_000, 1_000_000])
    peer_sizes = args.peer_sizes if args.peer_sizes is not None else ([10_000, 20_000] if args.quick
                                                                      else [10_000, 20_000, 40_000])
    tmp = Path(tempfile.mkdtemp(prefix="bench-dedup-"))
    results: list[dict[str, Any]] = []
    peers: list[dict[str, Any]] = []
    try:
        # side by side first (small sizes, minutes), on the first n of one corpus of the largest peer size
        if peer_sizes:
            corpus = make_corpus(max(peer_sizes))
            for m in sorted(peer_sizes):
                peers.append(side_by_side(corpus, m, tmp, args.peer_timeout))
                save(results, peers, args.quick)
                if "error" in peers[-1]["imagededup"]:
                    break  # it will not complete at a larger size either
            del corpus
        for n in sizes:
            t = time.perf_counter()
            corpus = make_corpus(n, spill=tmp / f"vectors-{n}.npy" if n > SPILL_ABOVE else None)
            make_s = time.perf_counter() - t
            index_dir = tmp / f"idx-{n}"
            build = build_index_dir(index_dir, corpus, ann_index=True if args.ann_index else None)
            print(f"N={n}: index {build['index']} ({build['index_build_s']} s)", flush=True)
            dedup = _spawn_child(index_dir)
            quality = graph_quality(corpus, found_groups(index_dir, dedup["run_id"]))
            row = {"n": n, "dim": DIM, "make_corpus_s": round(make_s, 1), **build, "dedup": dedup, "quality": quality}
            results.append(row)
            print(f"N={n}: dedup {dedup['wall_s']} s (CPU {dedup['cpu_s']} s), peak RSS {dedup['peak_rss_mb']} MB, "
                  f"stages {dedup['counts'].get('timings')}, graph {dedup['counts'].get('graph')}, "
                  f"quality {quality}", flush=True)
            shutil.rmtree(index_dir, ignore_errors=True)
            save(results, peers, args.quick)
            del corpus
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    save(results, peers, args.quick)


def side_by_side(corpus: dict[str, Any], m: int, tmp: Path, timeout: float) -> dict[str, Any]:
    """imagededup and our dedup on the first m vectors; their groups compared."""
    peer = run_peer(corpus["vectors"], m, 0.95, tmp, timeout)
    ours = ours_on_subset(corpus, m, tmp)
    mine, theirs = ours.pop("group_sets"), peer.pop("groups", None)
    entry = {"n": m, "imagededup": peer, "ours": ours}
    if theirs is not None:
        entry["identical_groups"] = mine == theirs
        entry["groups_only_ours"] = len(mine - theirs)
        entry["groups_only_imagededup"] = len(theirs - mine)
    if "wall_s" in peer:
        entry["speedup_vs_imagededup"] = round(peer["wall_s"] / ours["dedup_wall_s"], 1)
    if "cpu_s" in peer and ours.get("dedup_cpu_s"):
        # on a shared machine wall time depends on the neighbours; CPU time is the steadier ratio
        entry["cpu_speedup_vs_imagededup"] = round(peer["cpu_s"] / ours["dedup_cpu_s"], 2)
    print(f"n={m}: imagededup {peer.get('wall_s', peer.get('error'))} s vs ours {ours['dedup_wall_s']} s, "
          f"identical groups {entry.get('identical_groups')}", flush=True)
    return entry


def save(results: list[dict[str, Any]], peers: list[dict[str, Any]], quick: bool) -> Path | None:
    """Write what has been measured so far (called after every size and every side-by-side size).

    With --keep-other, a part this run does not measure (sizes, or the side by side) is kept from the
    saved result, so the two parts can be run at different times."""
    if KEEP_OTHER:
        from benchmarks.common import RESULTS

        old_path = RESULTS / ("dedup_scale" + ("_quick" if quick else "") + ".json")
        if old_path.exists():
            old = json.loads(old_path.read_text())
            measured = {r["n"] for r in results}  # sizes this run measured replace their old rows only
            results = sorted([r for r in old.get("sizes", []) if r["n"] not in measured] + results, key=lambda r: r["n"])
            peers = peers or old.get("side_by_side", [])
    if not results and not peers:
        return None
    largest = max(results, key=lambda r: r["n"]) if results else {"n": 0, "dedup": {"wall_s": None, "peak_rss_mb": 0}}
    both = [p for p in peers if "speedup_vs_imagededup" in p]
    recalls = [r["dedup"]["counts"].get("graph", {}).get("edge_recall_sample", {}).get("recall") for r in results]
    recalls = [r for r in recalls if r is not None]
    wall, rss = largest["dedup"]["wall_s"], largest["dedup"]["peak_rss_mb"]
    goals = {
        "1M_under_3_min": None if largest["n"] != 1_000_000 else wall < 180,
        "10M_under_1_hour": None if largest["n"] < 10_000_000 else wall < 3600,
        "under_8_GB": rss < 8192 if results else None,
        "knn_edge_recall_at_threshold_at_least_0.995": min(recalls) >= 0.995 if recalls else None,
        "20x_faster_than_imagededup_at_largest_common_size": (both[-1]["speedup_vs_imagededup"] >= 20) if both else None,
        "identical_groups_where_both_run": all(p.get("identical_groups") for p in peers if "identical_groups" in p)
        if any("identical_groups" in p for p in peers) else None,
    }
    path = save_result("dedup_scale" + ("_quick" if quick else ""), {"sizes": results, "side_by_side": peers, "goals": goals})
    print(f"goals {goals} -> {path}", flush=True)
    return path


if __name__ == "__main__":
    main()
