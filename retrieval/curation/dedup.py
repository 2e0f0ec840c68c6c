"""`retrieval dedup`: exact, near-exact and embedding duplicates, self or against a reference set.

Mirrors the DINOv2 pipeline: hash dedup, then copy detection on a k-NN graph (k = 64) whose edges
above a cosine threshold are joined with a disjoint-set; one image survives per component. With a
reference folder (relative dedup) every component that touches a reference file is removed whole.
Results are stored in SQLite; a rerun with the same parameters on an unchanged index reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select

from retrieval.curation import hashing
from retrieval.curation.graph import Edges, knn_edges, maybe_gpu
from retrieval.curation.groups import Group, Nodes, build_groups
from retrieval.curation.policy import DEFAULT_POLICY, check_policy
from retrieval.errors import RetrievalError
from retrieval.search import IndexReader
from retrieval.sources.open import source_id
from retrieval.store import (
    DedupRun,
    DuplicateGroup,
    DuplicateMember,
    Image,
    IndexRun,
    utcnow,
)

logger = logging.getLogger(__name__)

# Provisional defaults for DINOv2 CLS cosine, to be replaced by what `retrieval calibrate` measures
# with a real checkpoint (the paper's 0.6 / 0.45 are for SSCD copy-detection descriptors). 0.95 is
# the API's duplicate threshold; the reference threshold is looser (the paper's relative step is
# stricter about contamination, i.e. it removes more).
DEFAULT_THRESHOLD = 0.95
DEFAULT_REFERENCE_THRESHOLD = 0.90
DEFAULT_K = 64
SCHEMA_VERSION = 1


@dataclass
class DedupOptions:
    threshold: float | None = None  # None: DEFAULT_THRESHOLD, or DEFAULT_REFERENCE_THRESHOLD with `against`
    k: int = DEFAULT_K
    phash_distance: int = hashing.DEFAULT_PHASH_DISTANCE  # -1 disables the pHash stage
    keep: str = DEFAULT_POLICY
    max_group_diameter: float | None = None  # cosine distance (1 - cos) to the representative
    against: Path | str | None = None  # a folder or any retrieval.sources source
    embeddings: bool = True
    pixels: bool = True
    batch: int = 2048
    use_gpu: bool = True
    progress: bool = False
    force: bool = False
    max_pixels: int = 89_478_485
    workers: int = 0
    batch_size: int = 32

    @property
    def effective_threshold(self) -> float:
        if self.threshold is not None:
            return self.threshold
        return DEFAULT_REFERENCE_THRESHOLD if self.against else DEFAULT_THRESHOLD

    def validate(self) -> None:
        t = self.effective_threshold
        if not 0.0 < t <= 1.0:
            raise RetrievalError(f"--threshold must be in (0, 1], got {t}")
        if self.k < 1:
            raise RetrievalError(f"-k must be at least 1, got {self.k}")
        if self.phash_distance > 64:
            raise RetrievalError(f"--phash-distance must be at most 64 (a 64-bit hash), got {self.phash_distance}")
        if self.max_group_diameter is not None and not 0.0 <= self.max_group_diameter <= 2.0:
            raise RetrievalError(f"--max-group-diameter is a cosine distance in [0, 2], got {self.max_group_diameter}")
        check_policy(self.keep)

    def params(self) -> dict[str, Any]:
        return {"threshold": self.effective_threshold, "k": self.k, "phash_distance": self.phash_distance,
                "keep": self.keep, "max_group_diameter": self.max_group_diameter,
                "against": source_id(self.against) if self.against else None,
                "embeddings": self.embeddings, "pixels": self.pixels}


@dataclass
class DedupOutcome:
    run_id: int
    reused: bool
    counts: dict[str, Any] = field(default_factory=dict)


def load_nodes(reader: IndexReader) -> Nodes:
    with reader.store.session() as s:
        rows = s.execute(select(Image.id, Image.path, Image.sha256, Image.phash, Image.width, Image.height,
                                Image.size, Image.mtime_ns).order_by(Image.id)).all()
    if not rows:
        raise RetrievalError("the index holds no images; run `retrieval index CORPUS` first")
    cols = list(zip(*rows))
    n = len(rows)
    return Nodes(image_id=np.array(cols[0], np.int64), path=list(cols[1]), sha256=np.array(cols[2], dtype=object),
                 phash=np.array(cols[3], np.int64), width=np.array(cols[4], np.int64),
                 height=np.array(cols[5], np.int64), size=np.array(cols[6], np.int64),
                 mtime_ns=np.array(cols[7], np.int64), is_ref=np.zeros(n, bool))


def _with_references(nodes: Nodes, ref: Any) -> Nodes:
    from retrieval.store import to_signed64

    m = len(ref.paths)
    return Nodes(
        image_id=np.r_[nodes.image_id, np.full(m, -1, np.int64)],
        path=nodes.path + [ref.full_path(p) for p in ref.paths],
        sha256=np.r_[nodes.sha256, np.array(ref.sha256, dtype=object)],
        phash=np.r_[nodes.phash, np.array([to_signed64(h) for h in ref.phash], np.int64)],
        width=np.r_[nodes.width, np.zeros(m, np.int64)], height=np.r_[nodes.height, np.zeros(m, np.int64)],
        size=np.r_[nodes.size, np.zeros(m, np.int64)], mtime_ns=np.r_[nodes.mtime_ns, np.zeros(m, np.int64)],
        is_ref=np.r_[nodes.is_ref, np.ones(m, bool)])


def fingerprint(reader: IndexReader, params: dict[str, Any], extra: Any = None) -> str:
    """Changes whenever the parameters, the indexed images or the reference folder change."""
    with reader.store.session() as s:
        state = s.execute(select(func.count(Image.id), func.max(Image.id), func.max(Image.updated_at))).one()
        last_run = s.scalar(select(func.max(IndexRun.id)))
    h = hashlib.sha256(json.dumps([params, [str(x) for x in state], last_run, reader.meta.get("model_fingerprint"),
                                   extra], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _folder_state(folder: Path | str) -> list[Any]:
    from retrieval.sources.open import open_aux_source

    return [(e.path, e.size, e.mtime_ns, e.etag) for e in open_aux_source(folder, "reference").scan()]


def run_dedup(reader: IndexReader, opts: DedupOptions) -> DedupOutcome:
    """Find duplicate groups, store them as a run, and return its id (reused when nothing changed)."""
    opts.validate()
    params = opts.params()
    ref_state = _folder_state(opts.against) if opts.against else None
    fp = fingerprint(reader, params, ref_state)
    if not opts.force:
        with reader.store.session() as s:
            old = s.scalar(select(DedupRun).where(DedupRun.fingerprint == fp, DedupRun.status == "completed")
                           .order_by(DedupRun.id.desc()).limit(1))
        if old is not None:
            logger.info("reusing dedup run %d: same parameters, index unchanged", old.id)
            return DedupOutcome(run_id=old.id, reused=True, counts=old.counts or {})
    with reader.store.session() as s, s.begin():
        run = DedupRun(status="running", mode="relative" if opts.against else "self", fingerprint=fp, params=params)
        s.add(run)
        s.flush()
        run_id = run.id
    try:
        counts, groups, nodes, failures = _compute(reader, opts)
        _store(reader, run_id, nodes, groups, counts, failures)
    except BaseException as exc:
        with reader.store.session() as s, s.begin():
            row = s.get(DedupRun, run_id)
            if row is not None:
                row.status, row.error, row.finished_at = "failed", str(exc)[:2000], utcnow()
        raise
    return DedupOutcome(run_id=run_id, reused=False, counts=counts)


def _compute(reader: IndexReader, opts: DedupOptions) -> tuple[dict[str, Any], list[Group], Nodes, list[Any]]:
    timings: dict[str, float] = {}
    t = time.perf_counter()
    nodes = load_nodes(reader)
    ids = nodes.image_id
    n = len(ids)
    threshold = opts.effective_threshold
    ref = None
    failures: list[Any] = []
    if opts.against:
        from retrieval.curation.folders import embed_folder

        ref = embed_folder(opts.against, reader.embedder(), opts.max_pixels, opts.batch_size, opts.workers,
                           opts.progress, what="reference")
        failures = ref.failures
        nodes = _with_references(nodes, ref)
        timings["embed_reference_s"] = time.perf_counter() - t

    def to_pos(edges: Edges) -> Edges:
        return Edges(np.searchsorted(ids, edges.src), np.searchsorted(ids, edges.dst), edges.sim)

    parts: list[Edges] = []
    graph_stats: dict[str, Any] = {}
    exact_links: set[tuple[int, int]] = set()
    t = time.perf_counter()
    all_pos = np.arange(len(nodes))
    parts.append(hashing.sha256_edges(all_pos, nodes.sha256.astype(str)))
    if opts.pixels:
        px = to_pos(hashing.pixel_edges(reader.locate, ids, nodes.path[:n], nodes.sha256[:n], nodes.phash[:n],
                                        nodes.width[:n], nodes.height[:n], opts.max_pixels))
        exact_links = {(int(a), int(b)) for a, b in zip(np.minimum(px.src, px.dst), np.maximum(px.src, px.dst))}
        parts.append(px)
    timings["exact_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if opts.phash_distance >= 0:
        parts.append(hashing.phash_edges(all_pos, nodes.phash, opts.phash_distance, progress=opts.progress))
    timings["phash_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if opts.embeddings:
        import faiss

        index = maybe_gpu(reader.index, opts.use_gpu)
        k = min(opts.k, max(1, n - 1))
        extra = None
        offset = int(ids.max()) + 1
        if ref is not None and len(ref.paths):
            flat = faiss.IndexFlatIP(reader.dim)
            flat.add(np.ascontiguousarray(ref.vectors, dtype=np.float32))
            extra = (flat, offset)
        emb = knn_edges(index, ids, reader.vectors.read, k, threshold, opts.batch, opts.progress, extra,
                        stats=graph_stats)
        # A FAISS id the database no longer holds (an index run killed before its sync) must not
        # become an edge: searchsorted below would map it onto an unrelated image.
        # (Edges are canonical, src < dst, so a stale id can sit on either end.)
        known = ((emb.dst >= offset) | np.isin(emb.dst, ids)) & np.isin(emb.src, ids)
        emb = Edges(emb.src[known], emb.dst[known], emb.sim[known])
        is_ref_dst = emb.dst >= offset
        dst = np.where(is_ref_dst, n + (emb.dst - offset), np.searchsorted(ids, np.minimum(emb.dst, offset - 1)))
        parts.append(Edges(np.searchsorted(ids, emb.src), dst, emb.sim))
    timings["graph_s"] = time.perf_counter() - t
    edges = Edges.concat(parts).canonical()

    def vectors_of(pos: np.ndarray) -> np.ndarray:
        pos = np.asarray(pos)
        out = np.empty((len(pos), reader.dim), np.float32)
        corpus = pos < n
        if corpus.any():
            out[corpus] = reader.vectors.read(ids[pos[corpus]])
        if (~corpus).any():
            assert ref is not None
            out[~corpus] = ref.vectors[pos[~corpus] - n]
        return out

    edges = Edges(edges.src, edges.dst, edge_cosines(edges, vectors_of))
    t = time.perf_counter()
    groups = build_groups(nodes, edges, vectors_of, opts.keep, opts.phash_distance, opts.max_group_diameter,
                          exact_links)
    if ref is not None:
        # Relative mode: components that never touch a reference are not this run's business
        # (a plain `dedup` does self-deduplication).
        groups = [g for g in groups if g.touches_reference]
    timings["groups_s"] = time.perf_counter() - t
    counts = _counts(groups, nodes, n, threshold, ref, timings)
    if graph_stats:
        counts["graph"] = graph_stats  # e.g. the measured ANN pre-filter margin, for the record
    return counts, groups, nodes, failures


def edge_cosines(edges: Edges, vectors_of: Any, chunk: int = 65_536) -> np.ndarray:
    """Exact cosine of every edge from the stored vectors (hash edges included), clipped to 1."""
    out = np.empty(len(edges), np.float32)
    for start in range(0, len(edges), chunk):
        a = vectors_of(edges.src[start : start + chunk])
        b = vectors_of(edges.dst[start : start + chunk])
        out[start : start + chunk] = np.minimum(np.einsum("ij,ij->i", a, b), 1.0)
    return out


def _counts(groups: list[Group], nodes: Nodes, n: int, threshold: float, ref: Any,
            timings: dict[str, float]) -> dict[str, Any]:
    removed = [m for g in groups for m in g.members if m.action == "remove"]
    by_reason: dict[str, int] = {}
    for m in removed:
        by_reason[m.reason] = by_reason.get(m.reason, 0) + 1
    return {
        "schema_version": SCHEMA_VERSION,
        "images": n,
        "groups": len(groups),
        "images_in_groups": sum(1 for g in groups for m in g.members if not nodes.is_ref[m.pos]),
        "images_to_remove": len(removed),
        "images_to_keep": n - len(removed),
        "removed_by_reason": by_reason,
        "chained_groups": sum(1 for g in groups if g.min_pairwise < threshold),
        "largest_group": max((len(g.members) for g in groups), default=0),
        "reference_files": len(ref.paths) if ref is not None else None,
        "reference_failed": len(ref.failures) if ref is not None else None,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def _store(reader: IndexReader, run_id: int, nodes: Nodes, groups: list[Group], counts: dict[str, Any],
           failures: list[Any]) -> None:
    with reader.store.session() as s, s.begin():
        for number, g in enumerate(groups, 1):
            row = DuplicateGroup(run_id=run_id, number=number, size=len(g.members),
                                 representative_id=None if g.representative is None else int(nodes.image_id[g.representative]),
                                 reasons=",".join(g.reasons)[:64], weakest_edge=g.weakest_edge,
                                 min_pairwise=g.min_pairwise, touches_reference=g.touches_reference)
            s.add(row)
            s.flush()
            s.add_all([DuplicateMember(group_id=row.id, run_id=run_id,
                                       image_id=None if nodes.is_ref[m.pos] else int(nodes.image_id[m.pos]),
                                       path=nodes.path[m.pos], is_reference=bool(nodes.is_ref[m.pos]),
                                       action=m.action, similarity=round(m.similarity, 6), reason=m.reason)
                       for m in _ordered(g)])
        run = s.get(DedupRun, run_id)
        assert run is not None
        run.status, run.finished_at, run.counts, run.reference_failures = "completed", utcnow(), counts, failures


def _ordered(g: Group) -> list[Any]:
    """Kept members first, then by decreasing similarity to the representative."""
    return sorted(g.members, key=lambda m: (m.action != "keep", -m.similarity, m.pos))


def load_run(reader: IndexReader, run_id: int | None = None) -> dict[str, Any]:
    """A stored run as the versioned duplicates.json document (latest completed run by default)."""
    with reader.store.session() as s:
        q = select(DedupRun).where(DedupRun.status == "completed")
        run = s.get(DedupRun, run_id) if run_id is not None else s.scalar(q.order_by(DedupRun.id.desc()).limit(1))
        if run_id is not None and (run is None or run.status != "completed"):
            raise RetrievalError(f"no completed dedup run with id {run_id} in this index")
        if run is None:
            raise RetrievalError("no completed dedup run in this index; run `retrieval dedup` first")
        groups = s.scalars(select(DuplicateGroup).where(DuplicateGroup.run_id == run.id)
                           .order_by(DuplicateGroup.number)).all()
        members = s.scalars(select(DuplicateMember).where(DuplicateMember.run_id == run.id)
                            .order_by(DuplicateMember.id)).all()
    by_group: dict[int, list[dict[str, Any]]] = {}
    for m in members:
        by_group.setdefault(m.group_id, []).append({
            "image_id": m.image_id, "path": m.path, "reference": m.is_reference, "action": m.action,
            "similarity": m.similarity, "reason": m.reason})
    return {
        "schema": "retrieval.duplicates", "schema_version": SCHEMA_VERSION,
        "run": {"id": run.id, "mode": run.mode, "params": run.params, "started_at": str(run.started_at),
                "finished_at": str(run.finished_at), "applied_at": str(run.applied_at) if run.applied_at else None},
        "corpus_root": reader.corpus_name,
        "source": reader.source.to_meta(),
        "summary": run.counts or {},
        "reference_failures": run.reference_failures or [],
        "groups": [{"group": g.number, "size": g.size, "representative_id": g.representative_id,
                    "reasons": [r for r in g.reasons.split(",") if r], "weakest_edge": round(g.weakest_edge, 6),
                    "min_pairwise_similarity": round(g.min_pairwise, 6), "touches_reference": g.touches_reference,
                    "members": by_group.get(g.id, [])} for g in groups],
    }
