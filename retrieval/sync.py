"""Bring the FAISS index in line with the database, incrementally when possible.

The database and the fp16 vector file are the source of truth; the FAISS file is derived. Each
image row has an `indexed` flag, cleared whenever its vector is (re)written and set only after
an index containing that vector has been renamed into place. So whatever moment a run was killed
at, the next sync computes from (index ids, database ids, unindexed rows) exactly what to remove
and add: the index heals itself, and never holds an id twice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select, update

from retrieval import ann
from retrieval.layout import IndexLayout
from retrieval.store import COPY_INDEXED, COPY_WRITTEN, Image, Store, utcnow
from retrieval.vectors import VectorStore

logger = logging.getLogger(__name__)

RETUNE_FRACTION = 0.1  # re-measure nprobe once this fraction of the index changed since tuning
SEED = 0


@dataclass
class SyncOptions:
    memory_budget: int
    exact_threshold: int
    recall_target: float
    factory: str | None = None
    force_rebuild: bool = False
    ray_address: str | None = None  # an IVF index is then trained, filled and merged on this Ray cluster
    progress: bool = False


@dataclass
class SyncResult:
    spec: ann.IndexSpec | None
    changed: bool = False
    rebuilt: bool = False
    added: int = 0
    removed: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)


def meta_key(role: str) -> str:
    """The meta key of a role's FAISS spec: `index` (search), `copy_index` (copy)."""
    return "index" if role == "search" else f"{role}_index"


def _db_ids(store: Store, role: str = "search") -> np.ndarray:
    if role == "search":
        return np.fromiter(store.image_ids(), dtype=np.int64)
    with store.session() as s:
        rows = s.scalars(select(Image.id).where(Image.copy_state >= COPY_WRITTEN).order_by(Image.id))
        return np.fromiter(rows, dtype=np.int64)


def _stale_ids(store: Store, role: str = "search") -> np.ndarray:
    stale = Image.indexed.is_(False) if role == "search" else Image.copy_state == COPY_WRITTEN
    with store.session() as s:
        rows = s.scalars(select(Image.id).where(stale).order_by(Image.id))
        return np.fromiter(rows, dtype=np.int64)


def _mark_indexed(store: Store, role: str = "search") -> None:
    # Safe as a blanket update: the caller holds the index lock, so no writer added rows since.
    with store.session() as s, s.begin():
        if role == "search":
            s.execute(update(Image).where(Image.indexed.is_(False)).values(indexed=True, updated_at=utcnow()))
        else:
            s.execute(update(Image).where(Image.copy_state == COPY_WRITTEN).values(copy_state=COPY_INDEXED))


def _needs_rebuild(old: ann.IndexSpec | None, new: ann.IndexSpec, opts: SyncOptions) -> str | None:
    if opts.force_rebuild:
        return "rebuild requested"
    if old is None:
        return "no index yet"
    if old.params.get("fallback_for"):
        # A more precise index replaced the automatic choice because that one missed the recall
        # target: judge the automatic choice it stands for, or every run would rebuild.
        old = ann.IndexSpec.from_dict(old.params["fallback_for"])
    if old.kind != new.kind or old.dim != new.dim:
        return f"index type changes from {old.kind} to {new.kind} at {new.n:,} vectors"
    if new.kind == "ivfpq" and old.nlist and new.nlist:
        # Hysteresis: IVF works fine with half or twice the ideal list count, so retrain only when
        # the ideal is 4x away (a corpus hovering at a power-of-two boundary never retrains), or
        # when the code no longer fits the memory budget.
        ratio = max(new.nlist, old.nlist) / min(new.nlist, old.nlist)
        if ratio >= 4 or (old.pq_m or 0) > (new.pq_m or 0):
            return f"corpus size now calls for {new.factory} (was {old.factory})"
    if new.kind == "custom" and old.factory != new.factory:
        return f"index factory changed to {new.factory}"
    return None


def _pick_queries(ids: np.ndarray, n_queries: int) -> np.ndarray:
    rng = np.random.default_rng(SEED)
    return np.sort(rng.choice(ids, size=min(n_queries, len(ids)), replace=False))


def _train_sample(spec: ann.IndexSpec, ids: np.ndarray, held_out: np.ndarray) -> np.ndarray:
    pool = np.setdiff1d(ids, held_out) if len(ids) - len(held_out) >= ann.train_sample_size(spec) else ids
    rng = np.random.default_rng(SEED)
    return np.sort(rng.choice(pool, size=min(ann.train_sample_size(spec), len(pool)), replace=False))


def _build(spec: ann.IndexSpec, ids: np.ndarray, held_out: np.ndarray, vectors: VectorStore,
           timings: dict[str, float], opts: SyncOptions | None = None, faiss_path: Path | None = None) -> Any:
    """The index of `spec` holding `ids`; an IVF index on opts.ray_address is trained in one Ray task and
    filled in shards (retrieval.ivf_build). An IVF index whose lists exceed the memory budget is filled
    in shards (Ray tasks, or one after the other here) and merged on disk beside `faiss_path`."""
    from retrieval import ivf_build

    index = ann.new_index(spec)
    address = opts.ray_address if opts is not None else None
    on_ray = address is not None and ivf_build.is_ivf(index)
    if not index.is_trained:
        t = time.perf_counter()
        sample = _train_sample(spec, ids, held_out)
        if on_ray:
            index = ivf_build.train_on_ray(address, spec, sample, vectors)
        else:
            logger.info("training %s on %d vectors", spec.factory, len(sample))
            index.train(vectors.read(sample))
        timings["train_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    ivfdata = None
    if (opts is not None and faiss_path is not None and ivf_build.is_ivf(index)
            and ivf_build.merged_bytes(index, len(ids)) > opts.memory_budget):
        ivfdata = ivf_build.ivfdata_path(faiss_path)
        logger.info("the inverted lists exceed --memory-budget: merging them on disk into %s", ivfdata)
    if on_ray or ivfdata is not None:  # locally too: in shards, one at a time, merged on disk
        index = ivf_build.add_in_shards(address if on_ray else None, index, ids, vectors, ivfdata,
                                        progress=opts.progress if opts is not None else False)
    else:
        for chunk_ids, chunk in vectors.iter_batches(ids):
            ann.add(index, chunk_ids, chunk)
    if on_ray or ivfdata is not None:
        spec.params["on_disk"] = str(ivfdata.resolve()) if ivfdata is not None else None
    else:
        spec.params.pop("on_disk", None)
    timings["add_s"] = round(time.perf_counter() - t, 3)
    return index


def _build_meeting_target(desired: ann.IndexSpec, ids: np.ndarray, vectors: VectorStore, opts: SyncOptions,
                          timings: dict[str, float], faiss_path: Path | None = None) -> tuple[Any, ann.IndexSpec]:
    """Build `desired`; if it misses the recall target even at the largest nprobe, build the next
    more precise index that fits the memory budget (the automatic choice is recorded with it)."""
    held_out = _pick_queries(ids, ann.TUNE_QUERIES) if desired.kind != "flat" else np.empty(0, np.int64)
    index = _build(desired, ids, held_out, vectors, timings, opts, faiss_path)
    kept = {k: desired.params[k] for k in ("fallback_for", "missed", "on_disk") if k in desired.params}
    desired.params = {**_tune(index, desired, ids, vectors, opts.recall_target, timings), **kept}
    desired.n = len(ids)
    if desired.params.get("recall_at_10", 1.0) >= opts.recall_target:
        return index, desired
    missed = {"factory": desired.factory, "recall_at_10": desired.params.get("recall_at_10")}
    for fallback in ann.precise_fallbacks(desired, opts.memory_budget):
        logger.warning("%s reaches recall@10 %.3f only, below the target %.2f; trying %s", desired.factory,
                       desired.params.get("recall_at_10", 0.0), opts.recall_target, fallback.factory)
        index = _build(fallback, ids, held_out, vectors, timings, opts, faiss_path)
        on_disk = fallback.params.get("on_disk")
        fallback.params = _tune(index, fallback, ids, vectors, opts.recall_target, timings)
        if on_disk is not None:
            fallback.params["on_disk"] = on_disk
        fallback.params["fallback_for"] = {**desired.to_dict(), "params": {}}
        fallback.params["missed"] = missed
        if fallback.params.get("recall_at_10", 1.0) >= opts.recall_target:
            return index, fallback
    logger.warning("no index within the memory budget reaches recall@10 %.2f; raise --memory-budget",
                   opts.recall_target)
    return index, fallback if ann.precise_fallbacks(desired, opts.memory_budget) else desired


def _tune(index: Any, spec: ann.IndexSpec, ids: np.ndarray, vectors: VectorStore, target: float,
          timings: dict[str, float]) -> dict[str, Any]:
    if spec.kind == "flat":
        return {"nprobe": None, "recall_at_10": 1.0, "exact": True, "tuned_n": len(ids)}
    t = time.perf_counter()
    queries = _pick_queries(ids, ann.TUNE_QUERIES)
    truth = ann.exact_knn(vectors.read(queries), vectors.iter_batches(ids), ann.TUNE_K, exclude=queries)
    tuned = ann.tune_nprobe(index, spec, queries, truth, vectors.read, target)
    tuned["tuned_n"] = len(ids)
    timings["tune_s"] = round(time.perf_counter() - t, 3)
    return tuned


def sync_index(store: Store, vectors: VectorStore, layout: IndexLayout, opts: SyncOptions,
               role: str = "search") -> SyncResult:
    """Make the role's FAISS file hold exactly the database's images (for the copy role: those with a
    copy vector), rebuilding when the policy says so."""
    started = time.perf_counter()
    ids = _db_ids(store, role)
    faiss_path = layout.faiss_for(role)
    key = meta_key(role)
    old_spec_dict = store.get_meta(key)
    old_spec = ann.IndexSpec.from_dict(old_spec_dict) if old_spec_dict else None
    if len(ids) == 0:
        if faiss_path.exists():
            faiss_path.unlink()
        with store.session() as s, s.begin():
            store.set_meta(s, **{key: None})
        return SyncResult(spec=None)
    factory = opts.factory
    if factory is None and old_spec is not None and old_spec.kind == "custom":
        factory = old_spec.factory  # a custom factory sticks (also through `dedup --apply`) until "auto"
    desired = ann.choose_index_spec(len(ids), vectors.dim, opts.memory_budget, opts.exact_threshold,
                                    None if factory == "auto" else factory)
    reason = _needs_rebuild(old_spec, desired, opts)
    if reason is None and not faiss_path.exists():
        reason = "index file missing"
    stale = _stale_ids(store, role)
    timings: dict[str, float] = {}
    result = SyncResult(spec=desired)

    if reason is None:
        index = ann.load_index(faiss_path)
        present = ann.index_ids(index)
        to_remove = np.union1d(np.setdiff1d(present, ids), np.intersect1d(stale, present))
        to_add = np.union1d(stale, np.setdiff1d(ids, present))
        if len(to_remove) == 0 and len(to_add) == 0:
            return SyncResult(spec=old_spec, seconds=time.perf_counter() - started)
        if old_spec.params.get("on_disk"):
            reason = "an index with on-disk inverted lists is rebuilt, not patched in place"
        elif old_spec.kind == "flat":
            reason = "exact index refreshed"  # rebuilding a flat index is as cheap as patching it
            if old_spec.params.get("fallback_for"):
                desired = old_spec  # an exact fallback stays exact: re-training what it replaced would miss again
        else:
            try:
                result.removed = ann.remove(index, to_remove)
            except RuntimeError:  # e.g. HNSW cannot delete ids: rebuild from the vector file
                reason = f"{old_spec.factory} cannot remove ids"
        if reason is None:
            for chunk_ids, chunk in vectors.iter_batches(to_add):
                ann.add(index, chunk_ids, chunk)
            result.added = len(to_add)
            spec = old_spec
            spec.n = len(ids)
            changed = len(to_add) + len(to_remove)
            tuned_n = spec.params.get("tuned_n", 0)
            if changed + abs(len(ids) - tuned_n) > RETUNE_FRACTION * max(tuned_n, 1):
                kept = {k: spec.params[k] for k in ("fallback_for", "missed") if k in spec.params}
                spec.params = {**_tune(index, spec, ids, vectors, opts.recall_target, timings), **kept}
                if spec.params.get("recall_at_10", 1.0) < opts.recall_target:
                    reason = "recall fell below the target"
            else:
                ann.set_nprobe(index, spec.params.get("nprobe") or 1)
            result.spec = spec
    lists_before = set(faiss_path.parent.glob(f"{faiss_path.name}.*.ivfdata"))
    try:
        if reason is not None:
            logger.info("building the index: %s", reason)
            index, built = _build_meeting_target(desired, ids, vectors, opts, timings, faiss_path)
            result.spec, result.rebuilt, result.added = built, True, len(ids)
        ann.save_index(index, faiss_path)
    except BaseException:
        # The lists files this build wrote belong to no FAISS file: they must not fill the disk.
        for f in set(faiss_path.parent.glob(f"{faiss_path.name}.*.ivfdata")) - lists_before:
            f.unlink(missing_ok=True)
        raise
    assert result.spec is not None
    from retrieval.ivf_build import remove_stale_ivfdata

    remove_stale_ivfdata(faiss_path, result.spec.params.get("on_disk"))  # earlier on-disk builds' lists
    result.changed = True
    result.spec.params["built_at"] = utcnow().isoformat()
    with store.session() as s, s.begin():
        store.set_meta(s, **{key: result.spec.to_dict()})
    _mark_indexed(store, role)
    result.seconds = time.perf_counter() - started
    result.timings = timings
    return result
