"""`retrieval cluster`: spherical k-means (FAISS) over all stored embeddings, stored per run.

Training uses at most k * MAX_POINTS_PER_CENTROID vectors (a seeded sample, read by id from the
memory-mapped store), then every image is assigned to its nearest centroid in bounded batches.
Default k = round(sqrt(N)), capped at 100,000 (the paper's count for 1.2B images). The centroids
go to <index>/clusters/run<ID>_centroids.npy (see `centroids_path`). A rerun with the same
parameters on an unchanged index reuses the stored run while its centroid file exists.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from retrieval import runs
from retrieval.errors import RetrievalError
from retrieval.report_text import plural
from retrieval.search import IndexReader
from retrieval.store import ClusterAssignment, ClusterRun, Image
from retrieval.vectors import VectorStore, clip_cosine

logger = logging.getLogger(__name__)

MAX_K = 100_000
MAX_POINTS_PER_CENTROID = 256
ASSIGN_BATCH = 65_536
RAY_SHARD_BATCHES = 4  # ASSIGN_BATCHes of ids per Ray task


def default_k(n: int) -> int:
    return max(1, min(MAX_K, round(math.sqrt(n))))


@dataclass
class ClusterOutcome:
    run_id: int
    k: int
    n_images: int
    reused: bool
    sizes: list[int]


def spherical_kmeans(train: np.ndarray, k: int, niter: int = 20, seed: int = 0) -> np.ndarray:
    """Unit-norm centroids of `train` (float32, L2-normalised rows)."""
    import faiss

    km = faiss.Kmeans(train.shape[1], k, niter=niter, spherical=True, seed=seed, verbose=False,
                      max_points_per_centroid=MAX_POINTS_PER_CENTROID, min_points_per_centroid=1)
    km.train(np.ascontiguousarray(train, dtype=np.float32))
    c = km.centroids.astype(np.float32)
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def assign(vectors: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cluster, cosine distance) of each row: the centroid of highest cosine, exact."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    sims, labels = index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
    return labels[:, 0].astype(np.int64), (1.0 - clip_cosine(sims[:, 0])).astype(np.float32)


def assign_ids(ids: np.ndarray, vectors: VectorStore, centroids: np.ndarray,
               batch: int = ASSIGN_BATCH) -> tuple[np.ndarray, np.ndarray]:
    """assign() over the stored vectors of `ids`, `batch` rows at a time (a Ray task runs this on a shard)."""
    parts = [assign(vectors.read(ids[start : start + batch]), centroids) for start in range(0, len(ids), batch)]
    if not parts:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def assign_all(vectors: VectorStore, ids: np.ndarray, centroids: np.ndarray, progress: bool = False,
               ray: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cluster and cosine distance of every id, locally or as Ray tasks over shards of RAY_SHARD_BATCHES batches.

    Shards are whole multiples of ASSIGN_BATCH, so both ways run the same searches on the same rows.
    """
    from tqdm import tqdm

    batch = ASSIGN_BATCH
    if ray is not None:
        from retrieval.distributed import map_shards, shards

        pieces = [ids[a:b] for a, b in shards(len(ids), RAY_SHARD_BATCHES * batch)]
        parts = map_shards(ray, assign_ids, pieces, vectors, centroids, batch, progress=progress, desc="assigning")
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    labels, dists = [], []
    for start in tqdm(range(0, len(ids), batch), desc="assigning", disable=not progress):
        lab, dist = assign_ids(ids[start : start + batch], vectors, centroids, batch)
        labels.append(lab)
        dists.append(dist)
    return np.concatenate(labels), np.concatenate(dists)


def run_clustering(reader: IndexReader, k: int | None = None, niter: int = 20, seed: int = 0,
                   force: bool = False, progress: bool = False, ray: str | None = None) -> ClusterOutcome:
    """k-means on a seeded sample, then every image assigned to its nearest centroid.

    `ray`, a cluster address (see retrieval.distributed), runs the assignment as Ray tasks; the
    result is the same as a local run's.
    """
    with reader.store.session() as s:
        ids = np.fromiter(s.scalars(select(Image.id).order_by(Image.id)), dtype=np.int64)
    n = len(ids)
    if n == 0:
        raise RetrievalError("the index holds no embeddings; run `retrieval index CORPUS` first")
    k = default_k(n) if k is None else k
    if k < 1:
        raise RetrievalError(f"-k must be at least 1, got {k}")
    if k > n:
        raise RetrievalError(f"-k {k} is larger than the number of indexed images ({n})")
    params = {"k": k, "niter": niter, "seed": seed, "spherical": True}
    fp = runs.fingerprint(reader.store, reader.meta.get("model_fingerprint"), params)
    if not force:
        candidates = runs.reusable(reader.store, ClusterRun, fp)
        # A run whose centroid file was deleted cannot serve `curate --mode cluster`: recompute.
        old = next((r for r in candidates if _centroid_file(reader, r) is not None), None)
        if old is not None:
            logger.info("reusing clustering run %d: same parameters, index unchanged", old.id)
            return ClusterOutcome(old.id, old.k, old.n_images, True, list(old.sizes or []))
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(ids, size=min(n, k * MAX_POINTS_PER_CENTROID), replace=False))
    centroids = spherical_kmeans(reader.vectors.read(sample), k, niter, seed)
    label, dist = assign_all(reader.vectors, ids, centroids, progress, ray)
    order = np.lexsort((ids, dist, label))  # by cluster, nearest first
    rank = np.empty(n, np.int64)
    starts = np.searchsorted(label[order], np.arange(k))
    rank[order] = np.arange(n) - np.repeat(starts, np.bincount(label, minlength=k))
    sizes = np.bincount(label, minlength=k).tolist()
    run_id = runs.start(reader.store, ClusterRun, k=k, n_images=n, fingerprint=fp, params=params)
    try:
        _save_centroids(centroids_path(reader.layout.root, run_id), centroids)
        with reader.store.session() as s, s.begin():
            for start in range(0, n, 50_000):
                sl = slice(start, start + 50_000)
                s.execute(ClusterAssignment.__table__.insert(), [
                    {"run_id": run_id, "image_id": int(i), "cluster": int(c), "distance": float(d), "rank": int(r)}
                    for i, c, d, r in zip(ids[sl], label[sl], dist[sl], rank[sl])])
            runs.complete(s, ClusterRun, run_id, sizes=sizes)
    except BaseException as exc:
        runs.fail(reader.store, ClusterRun, run_id, exc)
        raise
    return ClusterOutcome(run_id, k, n, False, sizes)


def centroids_path(index_root: Path, run_id: int) -> Path:
    """Where the centroids of clustering run `run_id` live: derived from the id, never stored."""
    return Path(index_root) / "clusters" / f"run{run_id}_centroids.npy"


def _save_centroids(path: Path, centroids: np.ndarray) -> None:
    """Write to a temp file and rename, so a killed run never leaves a torn file under a run's name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, centroids)
    os.replace(tmp, path)


def _centroid_file(reader: IndexReader, run: ClusterRun) -> Path | None:
    """The run's centroid file, or None when it is gone.

    Runs stored before the path was derived from the id also recorded it in params["centroids"]:
    that is the same file unless the index folder moved, so the derived path wins and the stored
    one is only a fallback (nothing needs migrating).
    """
    derived = centroids_path(reader.layout.root, run.id)
    if derived.is_file():
        return derived
    legacy = (run.params or {}).get("centroids")
    return Path(legacy) if legacy and Path(legacy).is_file() else None


def load_centroids(reader: IndexReader, run_id: int) -> np.ndarray:
    with reader.store.session() as s:
        run = runs.completed(s, ClusterRun, run_id)
    if run is None:
        raise RetrievalError(f"no completed clustering run {run_id}; run `retrieval cluster` first", "not_found")
    path = _centroid_file(reader, run)
    if path is None:
        raise RetrievalError(f"the centroids of clustering run {run_id} are missing "
                             f"({centroids_path(reader.layout.root, run_id)}); run `retrieval cluster --force`")
    return np.load(path)


def latest_run(reader: IndexReader) -> int | None:
    return runs.latest_id(reader.store, ClusterRun)


def members(reader: IndexReader, run_id: int, cluster: int, limit: int | None = None) -> list[tuple[int, str, float]]:
    """(image id, path, distance) of one cluster, nearest the centroid first."""
    with reader.store.session() as s:
        q = (select(ClusterAssignment.image_id, Image.path, ClusterAssignment.distance)
             .join(Image, Image.id == ClusterAssignment.image_id)
             .where(ClusterAssignment.run_id == run_id, ClusterAssignment.cluster == cluster)
             .order_by(ClusterAssignment.rank))
        if limit:
            q = q.limit(limit)
        return [(int(a), b, float(c)) for a, b, c in s.execute(q).all()]


def write_cluster_report(reader: IndexReader, outcome: ClusterOutcome, out_dir: Path, max_pixels: int,
                         per_cluster: int = 12, progress: bool = False) -> Path:
    """clusters.json (sizes, nearest members) and clusters.html (a mosaic per cluster, largest first)."""
    from retrieval.curation.report import Thumbnailer, write_grid_report
    from retrieval.layout import atomic_write_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    thumbs = Thumbnailer(out_dir, max_pixels)
    items, listing = [], []
    for c in sorted(range(outcome.k), key=lambda c: -outcome.sizes[c]):
        near = members(reader, outcome.run_id, c, per_cluster)
        listing.append({"cluster": c, "size": outcome.sizes[c], "nearest": [{"image_id": i, "path": p,
                                                                               "distance": round(d, 6)}
                                                                              for i, p, d in near]})
        items.append({"id": c, "title": f"cluster {c}: {plural(outcome.sizes[c], 'image')}",
                      "detail": "nearest the centroid first; score = cosine distance",
                      "cells": [{"src": thumbs.src(f"i{i}", reader.locate(p)), "path": p, "score": d}
                                for i, p, d in near]})
    thumbs.write_all(progress)
    doc = {"schema": "retrieval.clusters", "schema_version": 1, "run_id": outcome.run_id, "k": outcome.k,
           "n_images": outcome.n_images, "clusters": listing}
    atomic_write_bytes(out_dir / "clusters.json", json.dumps(doc, indent=1).encode())
    summary: dict[str, Any] = {"run": outcome.run_id, "k": outcome.k, "images": outcome.n_images,
                               "largest cluster": max(outcome.sizes), "smallest cluster": min(outcome.sizes),
                               "empty clusters": sum(1 for x in outcome.sizes if x == 0)}
    path = out_dir / "clusters.html"
    write_grid_report(path, f"Clusters (run {outcome.run_id})", summary, items,
                      "Spherical k-means over the stored embeddings; each mosaic shows the members nearest the centroid.")
    return path
