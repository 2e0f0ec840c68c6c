"""`retrieval curate`: retrieval-based curation from a query folder (DINOv2 paper, A.3).

* sample: the k nearest corpus images of every query (paper: 4); an image retrieved by several
  queries counts once and the collisions are reported;
* cluster: for small query sets, from every cluster (of a `retrieval cluster` run) holding more
  than `min_queries` query images, sample up to M images (paper: 10,000), at most `max_images`.

Runs are stored; a rerun with the same parameters and query files (by content) on an unchanged
index, and in cluster mode with the same clustering run, reuses the stored run (`force` recomputes).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from retrieval import runs
from retrieval.curation.graph import is_exact_index, mapped_index, search_exact_topk
from retrieval.errors import RetrievalError
from retrieval.report_text import plural
from retrieval.search import IndexReader
from retrieval.sources.open import open_aux_source, source_id
from retrieval.store import (
    ClusterAssignment,
    CurationItem,
    CurationRun,
    Image,
    chunked,
)

logger = logging.getLogger(__name__)

QUERY_BATCH = 2048  # queries searched (or assigned) at once, locally and inside a Ray task
RAY_SHARD_BATCHES = 8  # QUERY_BATCHes per Ray task


@dataclass
class CurateOptions:
    queries: Path | str  # a folder or any retrieval.sources source (URL prefix, list, shards)
    mode: str = "sample"
    k: int = 4
    per_cluster: int = 10_000
    min_queries: int = 3
    max_images: int = 1_000_000
    cluster_run: int | None = None
    seed: int = 0
    progress: bool = False
    max_pixels: int = 89_478_485
    batch_size: int = 32
    workers: int = 0
    force: bool = False
    ray: str | None = None  # a Ray cluster address (retrieval.distributed): the query searches run there

    def validate(self) -> None:
        if self.mode not in ("sample", "cluster"):
            raise RetrievalError(f"--mode must be sample or cluster, got {self.mode!r}")
        if self.k < 1 or self.per_cluster < 1 or self.max_images < 1:
            raise RetrievalError("-k, --per-cluster and --max-images must be at least 1")

    def params(self) -> dict[str, Any]:
        """What the stored run records (every option, whether or not its mode uses it)."""
        return {"mode": self.mode, "queries": source_id(self.queries), "k": self.k,
                "per_cluster": self.per_cluster, "min_queries": self.min_queries, "max_images": self.max_images,
                "seed": self.seed}

    def result_params(self, cluster_run: int | None) -> dict[str, Any]:
        """Only what the result depends on: another -k in cluster mode (or seed in sample mode) reuses the run.

        The query folder's location is not part of it (its files' content is, see `folder_content`);
        max_pixels is, as it decides which query files fail.
        """
        p: dict[str, Any] = {"mode": self.mode, "max_images": self.max_images, "max_pixels": self.max_pixels}
        if self.mode == "sample":
            p["k"] = self.k
        else:
            p.update(per_cluster=self.per_cluster, min_queries=self.min_queries, seed=self.seed,
                     cluster_run=cluster_run)
        return p


@dataclass
class CurateOutcome:
    run_id: int
    counts: dict[str, Any]
    items: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)
    reused: bool = False


def sample_based(query_paths: list[str], sims: np.ndarray, nbrs: np.ndarray) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Unique images from per-query top-k lists, each with its best query and how often it was retrieved."""
    best: dict[int, dict[str, Any]] = {}
    retrieved = 0
    for q, (row_s, row_n) in enumerate(zip(sims, nbrs)):
        for s, i in zip(row_s.tolist(), row_n.tolist()):
            if i < 0:
                continue
            retrieved += 1
            item = best.get(i)
            if item is None:
                best[i] = {"image_id": i, "how": "sample", "query": query_paths[q], "score": float(s), "times_retrieved": 1}
            else:
                item["times_retrieved"] += 1
                if s > item["score"]:
                    item["query"], item["score"] = query_paths[q], float(s)
    items = sorted(best.values(), key=lambda d: (-d["score"], d["image_id"]))
    counts = {"retrieved": retrieved, "unique_images": len(items), "collisions": retrieved - len(items),
              "images_retrieved_more_than_once": sum(1 for d in items if d["times_retrieved"] > 1)}
    return items, counts


def run_curation(reader: IndexReader, opts: CurateOptions) -> CurateOutcome:
    """Curate, store the run and return it (an identical stored run is reused unless `opts.force`)."""
    from retrieval.curation.folders import embed_folder, folder_content

    opts.validate()
    n = reader.store.count_images()
    if n == 0:
        raise RetrievalError("the index holds no embeddings; run `retrieval index CORPUS` first")
    open_aux_source(opts.queries, "query")  # one clear line when the query set does not exist
    cluster_run = None
    if opts.mode == "cluster":
        from retrieval.curation.clusters import latest_run, load_centroids

        cluster_run = opts.cluster_run or latest_run(reader)
        if cluster_run is None:
            raise RetrievalError("--mode cluster needs a clustering run; run `retrieval cluster` first")
        centroids = load_centroids(reader, cluster_run)
    fp = runs.fingerprint(reader.store, reader.meta.get("model_fingerprint"), opts.result_params(cluster_run),
                          folder_content(opts.queries))
    if not opts.force:
        reused = _reuse(reader, fp)
        if reused is not None:
            return reused
    q = embed_folder(opts.queries, reader.embedder(), opts.max_pixels, opts.batch_size, opts.workers,
                     opts.progress, what="query")
    if not q.paths:
        raise RetrievalError(f"no usable query image in {opts.queries} ({len(q.failures)} failed)")
    counts: dict[str, Any] = {"queries": len(q.paths), "queries_failed": len(q.failures), "images": n}
    if opts.mode == "sample":
        k = min(opts.k, n)
        sims, nbrs = nearest(reader, q.vectors, k, opts.ray, opts.progress)
        items, c = sample_based(q.paths, sims, nbrs)
        items = items[: opts.max_images]
        counts.update(c, k=k)
    else:
        labels = query_clusters(q.vectors, centroids, opts.ray, opts.progress)
        per = np.bincount(labels, minlength=len(centroids))
        chosen = [int(c) for c in np.argsort(-per, kind="stable") if per[c] > opts.min_queries]
        rng = np.random.default_rng(opts.seed)
        items = []
        with reader.store.session() as s:
            for c in chosen:
                ids = np.array(s.scalars(select(ClusterAssignment.image_id).where(
                    ClusterAssignment.run_id == cluster_run, ClusterAssignment.cluster == c)
                    .order_by(ClusterAssignment.image_id)).all(), dtype=np.int64)
                take = ids if len(ids) <= opts.per_cluster else np.sort(rng.choice(ids, opts.per_cluster, replace=False))
                items += [{"image_id": int(i), "how": "cluster", "cluster": c, "query": None, "score": None,
                           "times_retrieved": int(per[c])} for i in take]
        capped = len(items) > opts.max_images
        items = items[: opts.max_images]
        counts.update(clusters_with_queries=int((per > 0).sum()), clusters_selected=len(chosen),
                      unique_images=len(items), capped=capped)
    with reader.store.session() as s:
        paths = {i: p for part in chunked(d["image_id"] for d in items)
                 for i, p in s.execute(select(Image.id, Image.path).where(Image.id.in_(part)))}
    for d in items:
        d["path"] = paths.get(d["image_id"], "")
    with reader.store.session() as s, s.begin():
        run = runs.add_completed(s, CurationRun, mode=opts.mode, fingerprint=fp, params=opts.params(), counts=counts,
                                 query_failures=q.failures, cluster_run_id=cluster_run)
        s.add_all([CurationItem(run_id=run.id, image_id=d["image_id"], path=d["path"], how=d["how"], query=d["query"],
                                score=d["score"], times_retrieved=d["times_retrieved"], cluster=d.get("cluster"))
                   for d in items])
        run_id = run.id
    return CurateOutcome(run_id, counts, items, q.failures)


@dataclass(frozen=True)
class TopkJob:
    """What a Ray task needs to search a shard of queries: the index folder is on shared storage."""

    faiss_path: str
    nprobe: int
    vectors: Any  # a VectorStore: pickles as (path, dim) and maps the file on the worker
    k: int
    exact: bool


def topk_batches(queries: np.ndarray, index: Any, read: Any, k: int, exact: bool) -> tuple[np.ndarray, np.ndarray]:
    """search_exact_topk over QUERY_BATCH rows at a time (the same searches locally and in a task)."""
    parts = [search_exact_topk(index, queries[a : a + QUERY_BATCH], None, k, read, exact)
             for a in range(0, len(queries), QUERY_BATCH)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def topk_task(queries: np.ndarray, job: TopkJob) -> tuple[np.ndarray, np.ndarray]:
    """A Ray task: the exact top k of a shard of query vectors, from the memory-mapped index."""
    return topk_batches(queries, mapped_index(job.faiss_path, job.nprobe), job.vectors.read, job.k, job.exact)


def nearest(reader: IndexReader, queries: np.ndarray, k: int, ray: str | None = None,
            progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(exact cosine, id) of the k nearest corpus images of every query, locally or as Ray tasks."""
    exact = is_exact_index(reader.index)
    if ray is None:
        return topk_batches(queries, reader.index, reader.vectors.read, k, exact)
    from retrieval.distributed import map_shards, shards

    job = TopkJob(str(reader.layout.faiss_path.resolve()), reader.nprobe, reader.vectors, k, exact)
    pieces = [queries[a:b] for a, b in shards(len(queries), RAY_SHARD_BATCHES * QUERY_BATCH)]
    parts = map_shards(ray, topk_task, pieces, job, progress=progress, desc="searching")
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def query_clusters(queries: np.ndarray, centroids: np.ndarray, ray: str | None = None,
                   progress: bool = False) -> np.ndarray:
    """The nearest centroid of every query, locally or as Ray tasks (QUERY_BATCH rows per search)."""
    from retrieval.curation.clusters import assign

    pieces = [queries[a : a + QUERY_BATCH] for a in range(0, len(queries), QUERY_BATCH)]
    if ray is None:
        parts = [assign(p, centroids) for p in pieces]
    else:
        from retrieval.distributed import map_shards

        parts = map_shards(ray, assign, pieces, centroids, progress=progress, desc="assigning queries")
    return np.concatenate([p[0] for p in parts])


def _reuse(reader: IndexReader, fp: str) -> CurateOutcome | None:
    """The newest completed run with this fingerprint, items in the order the run produced them."""
    run = next(iter(runs.reusable(reader.store, CurationRun, fp)), None)
    if run is None:
        return None
    with reader.store.session() as s:
        rows = s.scalars(select(CurationItem).where(CurationItem.run_id == run.id)).all()
    logger.info("reusing curation run %d: same parameters and queries, index unchanged", run.id)
    # sample: best score first; cluster: clusters by decreasing query count (ties: lower cluster), then ids.
    key = ((lambda r: (-(r.score or 0.0), r.image_id)) if run.mode == "sample"
           else (lambda r: (-r.times_retrieved, r.cluster or 0, r.image_id)))
    items = [_item(r) for r in sorted(rows, key=key)]
    return CurateOutcome(run.id, run.counts or {}, items, list(run.query_failures or []), reused=True)


def _item(row: CurationItem) -> dict[str, Any]:
    """A stored item as `run_curation` builds it (same keys, same order: the manifest stays byte-identical)."""
    d: dict[str, Any] = {"image_id": row.image_id, "how": row.how}
    if row.how == "cluster":
        d["cluster"] = row.cluster
    d.update(query=row.query, score=row.score, times_retrieved=row.times_retrieved, path=row.path)
    return d


def write_curation_report(reader: IndexReader, outcome: CurateOutcome, out_dir: Path, max_pixels: int,
                          progress: bool = False, max_rows: int = 2000) -> dict[str, Path]:
    """curated.txt, manifest.csv, manifest.json and curation.html (rows of up to 12 images per query or cluster)."""
    from retrieval.curation.report import (
        Thumbnailer,
        write_grid_report,
        write_text_lines,
    )
    from retrieval.layout import atomic_write_bytes

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {n: out_dir / n for n in ("curated.txt", "manifest.csv", "manifest.json", "curation.html")}
    write_text_lines(files["curated.txt"], (d["path"] for d in outcome.items))
    with open(files["manifest.csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "image_id", "how", "query", "score", "times_retrieved", "cluster"])
        for d in outcome.items:
            w.writerow([d["path"], d["image_id"], d["how"], d["query"] or "",
                        "" if d["score"] is None else f"{d['score']:.6f}", d["times_retrieved"],
                        "" if d.get("cluster") is None else d["cluster"]])
    atomic_write_bytes(files["manifest.json"], json.dumps({
        "schema": "retrieval.curation", "schema_version": 1, "run_id": outcome.run_id, "counts": outcome.counts,
        "query_failures": outcome.failures, "items": outcome.items}, indent=1).encode())
    rows: dict[str, list[dict[str, Any]]] = {}
    for d in outcome.items:
        key = f"query {d['query']}" if d["how"] == "sample" else f"cluster {d['cluster']}"
        rows.setdefault(key, []).append(d)
    thumbs = Thumbnailer(out_dir, max_pixels)
    items = [{"id": i, "title": key, "detail": plural(len(ds), "image"),
              "cells": [{"src": thumbs.src(f"i{d['image_id']}", reader.locate(d["path"])), "path": d["path"],
                         "score": d["score"], "reason": f"retrieved {d['times_retrieved']}x" if d["how"] == "sample"
                         else None} for d in ds[:12]]}
             for i, (key, ds) in enumerate(list(rows.items())[:max_rows])]
    thumbs.write_all(progress)
    write_grid_report(files["curation.html"], f"Curation (run {outcome.run_id})", outcome.counts, items,
                      "Each row: the curated images a query retrieved (best query per image) or a sampled cluster.")
    return files
