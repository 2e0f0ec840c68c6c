"""`retrieval index`: lock -> scan -> plan -> runner (decode, embed, commit) -> sync the FAISS index -> record the run.

The runner drives the stages of retrieval.indexer.stages: retrieval.indexer.runners.local in this
process, retrieval.indexer.runners.ray on a Ray cluster (the driver still commits). Everything
around the runner (the lock, the plan, model checks, the FAISS sync, the run record) is the same
for both. Each stage is timed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from retrieval.indexer.options import IndexOptions, IndexSummary
from retrieval.indexer.plan import Plan, images_without_copy, make_plan
from retrieval.indexer.runners import local
from sqlalchemy import delete, text, update

from retrieval import ann, runs
from retrieval.errors import CorpusError, IndexMismatchError
from retrieval.imaging.scan import IMAGE_EXTENSIONS
from retrieval.layout import IndexLayout, IndexLock, remove_stale_temporaries
from retrieval.sources import Source, open_source
from retrieval.store import (
    COPY_NONE,
    ClusterAssignment,
    ClusterRun,
    CurationItem,
    CurationRun,
    DedupRun,
    DuplicateGroup,
    DuplicateMember,
    Failure,
    Image,
    IndexRun,
    Meta,
    Store,
    remove_images,
    utcnow,
)
from retrieval.sync import SyncOptions, sync_index
from retrieval.vectors import role_vectors, upgrade_legacy

logger = logging.getLogger(__name__)


def _reset_index(layout: IndexLayout, store: Store) -> None:
    """--rebuild: forget images, failures, meta and curation runs (index run history stays).

    Image ids restart at 1, so stored dedup, clustering and curation runs would point at other
    images: they go too (their reports on disk stay).
    """
    with store.session() as s, s.begin():
        for table in (DuplicateMember, DuplicateGroup, DedupRun, ClusterAssignment, ClusterRun, CurationItem,
                      CurationRun):
            s.execute(delete(table))
        s.execute(delete(Image))
        s.execute(delete(Failure))
        s.execute(delete(Meta))
        if store.engine.dialect.name == "sqlite":
            s.execute(text("DELETE FROM sqlite_sequence WHERE name = 'images'"))
        elif store.engine.dialect.name == "postgresql":
            s.execute(text("SELECT setval(pg_get_serial_sequence('images', 'id'), 1, false)"))
    for path in (layout.vectors_path, layout.legacy_vectors_path, layout.faiss_path, layout.vectors_for("copy"),
                 layout.faiss_for("copy")):
        if path.exists():
            path.unlink()


def _check_corpus(source: Source, store: Store) -> str:
    root = source.uri
    recorded = store.get_meta("corpus_root")
    if recorded and recorded != root:
        raise IndexMismatchError(
            f"this index holds the corpus {recorded}, not {root}; use another --index-dir for a new corpus, "
            f"or re-index with --rebuild"
        )
    return root


def _check_model(store: Store, embedder: Any) -> None:
    dim = store.get_meta("dim")
    if dim is not None and dim != embedder.dim:
        raise IndexMismatchError(
            f"model '{embedder.model_ref}' gives {embedder.dim}-d embeddings but the index holds {dim}-d ones "
            f"from '{store.get_meta('model_ref')}'; re-index with --rebuild"
        )
    fingerprint = store.get_meta("model_fingerprint")
    if fingerprint is not None and fingerprint != embedder.fingerprint:
        raise IndexMismatchError(
            f"model '{embedder.model_ref}' has other weights than '{store.get_meta('model_ref')}' that built this "
            f"index, so their embeddings are not comparable; pass the same --model or re-index with --rebuild"
        )


def _load_model_if_needed(opts: IndexOptions, store: Store, plan: Plan, previous_ref: str | None) -> Any:
    """The embedder, unless nothing needs embedding. Without --model: the model the index was built with."""
    from retrieval.model import load_embedder

    s = opts.settings
    stored_ref = store.get_meta("model_ref") or previous_ref
    explicit = "model" in s.model_fields_set
    model_ref = s.model if (explicit or stored_ref is None) else stored_ref
    if not plan.todo and not (explicit and stored_ref not in (None, model_ref)):
        return None  # nothing to embed and no new model to check: skip the slow load
    embedder = load_embedder(model_ref, device=s.device, precision=s.precision)
    _check_model(store, embedder)
    return embedder


COPY_META = ("copy_model_ref", "copy_model_fingerprint", "copy_dim", "copy_preprocess", "copy_index")


def _reset_copy_role(layout: IndexLayout, store: Store) -> None:
    """Another copy model: forget every copy vector (the search role is untouched)."""
    from retrieval.store import Image

    with store.session() as s, s.begin():
        s.execute(update(Image).values(copy_state=COPY_NONE))
        store.set_meta(s, **{key: None for key in COPY_META})
    for path in (layout.vectors_for("copy"), layout.faiss_for("copy")):
        if path.exists():
            path.unlink()


def _load_copy_model(opts: IndexOptions, store: Store, layout: IndexLayout, plan: Plan,
                     previous_ref: str | None = None) -> Any:
    """The copy embedder, when the index has (or is asked for) one and something needs it.

    A copy model sticks to the index like the search model: later runs use it without the option.
    Another copy model (other weights) replaces the copy role: its vectors are embedded again.
    """
    from retrieval.embedding.copy import load_copy_embedder

    s = opts.settings
    stored = store.get_meta("copy_model_ref")
    ref = s.copy_model or stored or previous_ref  # --rebuild keeps the copy model too
    if not ref:
        return None
    if not plan.todo and ref == stored and not images_without_copy(store):
        return None  # nothing to embed: skip the load
    copy = load_copy_embedder(ref, device=s.device, precision=s.precision)
    fingerprint = store.get_meta("copy_model_fingerprint")
    if fingerprint is not None and fingerprint != copy.fingerprint:
        logger.warning("copy model '%s' differs from '%s' that embedded the copy role; embedding the copy role again",
                       ref, stored)
        _reset_copy_role(layout, store)
    with store.session() as sess, sess.begin():
        store.set_meta(sess, copy_model_ref=ref, copy_model_fingerprint=copy.fingerprint, copy_dim=copy.dim,
                       copy_preprocess=copy.preprocess_dict())
    return copy


def run_index(opts: IndexOptions, runner: Any = None) -> IndexSummary:
    """Index (or update the index of) one corpus. Safe to interrupt at any point and run again.

    `runner`: a module with `embed_all` and `add_copy_role` (retrieval.indexer.runners.local by default).
    """
    runner = runner or local
    s = opts.settings
    source = open_source(opts.corpus)
    layout = IndexLayout(Path(s.index_dir))
    started = time.perf_counter()
    timings: dict[str, float] = {}
    with IndexLock(layout):
        for name in remove_stale_temporaries(layout.root):
            logger.info("removed %s, left by an interrupted save", name)
        store = Store(s.db_url or layout.default_db_url())
        run: int | None = None
        try:
            # Runs still 'running' while we hold the lock were killed; this run finishes their work.
            runs.close_abandoned(store, IndexRun, "the process was killed before the run finished; "
                                                  "a later run resumed its work")
            previous_ref = store.get_meta("model_ref")  # --rebuild keeps the model unless --model says otherwise
            previous_copy = store.get_meta("copy_model_ref")
            if opts.rebuild:
                _reset_index(layout, store)
            root = _check_corpus(source, store)

            t = time.perf_counter()
            entries = list(source.scan(cache_dir=layout.root, exclude=(layout.root,)))
            timings["scan_s"] = time.perf_counter() - t
            t = time.perf_counter()
            plan = make_plan(store, entries, retry_failed=opts.retry_failed)
            timings["plan_s"] = time.perf_counter() - t
            if plan.scanned == 0 and store.count_images() == 0:
                raise CorpusError(
                    f"no images found in {opts.corpus} (looked for {', '.join(sorted(IMAGE_EXTENSIONS)[:8])}, ... "
                    f"and image file signatures)"
                )

            t = time.perf_counter()
            embedder = _load_model_if_needed(opts, store, plan, previous_ref)
            dim = store.get_meta("dim") or (embedder.dim if embedder else None)
            if dim and store.get_meta("dim"):
                upgrade_legacy(layout.legacy_vectors_path, layout.vectors_path, dim)  # pre-.npy index folders
            copy = _load_copy_model(opts, store, layout, plan, previous_copy)
            if opts.index_factory not in (None, "auto") and dim:
                # Refuse a bad factory string before spending time on embedding.
                ann.new_index(ann.IndexSpec(kind="custom", factory=opts.index_factory, n=0, dim=dim))
            timings["model_load_s"] = time.perf_counter() - t
            summary = IndexSummary(corpus=root, index_dir=str(layout.root.resolve()),
                                   unchanged=plan.unchanged, known_failures=plan.known_failures,
                                   removed=len(plan.removed_ids))
            run = _start_run(store, source, embedder)
            summary.model = store.get_meta("model_ref") or ""
            summary.copy_model = store.get_meta("copy_model_ref")
            summary.device = embedder.device if embedder else "-"

            remove_images(store, plan.removed_ids, plan.removed_failure_paths)
            if plan.todo:
                assert embedder is not None
                counts = runner.embed_all(opts, source, plan.todo, embedder, store, timings, plan.crashed, copy)
                summary.new, summary.changed, summary.touched, summary.failed = (
                    counts.new, counts.changed, counts.touched, counts.failed)
                embedded = counts.new + counts.changed
                summary.images_per_s = embedded / timings["embed_loop_s"] if timings.get("embed_loop_s") else 0.0
                if copy is not None:
                    summary.copy_embedded = embedded
            if copy is not None:
                t1 = time.perf_counter()
                summary.copy_embedded += runner.add_copy_role(opts, source, copy, store, layout)
                timings["copy_backfill_s"] = time.perf_counter() - t1

            dim = store.get_meta("dim")
            t = time.perf_counter()
            if dim is not None:
                synced = sync_index(store, role_vectors(layout, "search", dim), layout, SyncOptions(
                    memory_budget=s.memory_budget, exact_threshold=s.exact_threshold,
                    recall_target=s.recall_target, factory=opts.index_factory, force_rebuild=opts.rebuild,
                    ray_address=opts.ray))
                timings.update(synced.timings)
                summary.index_rebuilt = synced.rebuilt
                summary.index_changed = synced.changed
                if synced.spec is not None:
                    summary.index_type = synced.spec.kind
                    summary.index_factory = synced.spec.factory
                    summary.nprobe = synced.spec.params.get("nprobe")
                    summary.recall_at_10 = synced.spec.params.get("recall_at_10")
            copy_dim = store.get_meta("copy_dim")
            if copy_dim is not None:
                t1 = time.perf_counter()
                synced = sync_index(store, role_vectors(layout, "copy", copy_dim), layout, SyncOptions(
                    memory_budget=s.memory_budget, exact_threshold=s.exact_threshold,
                    recall_target=s.recall_target, force_rebuild=opts.rebuild, ray_address=opts.ray), role="copy")
                timings["copy_index_s"] = time.perf_counter() - t1
                summary.copy_index_type = synced.spec.kind if synced.spec is not None else None
            timings["index_s"] = time.perf_counter() - t
            summary.total_images = store.count_images()
            summary.failure_kinds = _failure_kinds(store)
            summary.elapsed_s = time.perf_counter() - started
            summary.timings = {k: round(v, 3) for k, v in timings.items()}
            _finish_run(store, run, summary)
            return summary
        except BaseException as exc:
            runs.fail(store, IndexRun, run, exc)
            raise
        finally:
            store.close()


def _failure_kinds(store: Store) -> dict[str, int]:
    from sqlalchemy import func, select

    with store.session() as s:
        return dict(s.execute(select(Failure.kind, func.count()).group_by(Failure.kind)).all())


def _start_run(store: Store, source: Source, embedder: Any) -> int:
    root = source.uri
    with store.session() as s, s.begin():
        if source.kind != "folder" and store.get_meta("source") is None:
            store.set_meta(s, source=source.to_meta())  # a folder index stays as it always was
        if embedder is not None and store.get_meta("dim") is None:
            store.set_meta(s, corpus_root=root, model_ref=embedder.model_ref, model_fingerprint=embedder.fingerprint,
                           dim=embedder.dim, preprocess=embedder.preprocess.to_dict(), created_at=utcnow().isoformat())
        elif store.get_meta("corpus_root") is None:
            store.set_meta(s, corpus_root=root)
    meta = store.all_meta()
    return runs.start(store, IndexRun, corpus_root=root,
                      model_ref=meta.get("model_ref") or (embedder.model_ref if embedder else ""),
                      model_fingerprint=meta.get("model_fingerprint") or "",
                      dim=meta.get("dim") or 0, preprocess=meta.get("preprocess") or {},
                      device=f"{embedder.device}/{embedder.precision}" if embedder else "-")


def _finish_run(store: Store, run_id: int, summary: IndexSummary) -> None:
    with store.session() as s, s.begin():
        runs.complete(s, IndexRun, run_id, index_type=summary.index_type, index_params=store.get_meta("index"),
                      counts={k: getattr(summary, k) for k in ("new", "changed", "unchanged", "touched", "removed",
                                                                "failed", "known_failures", "total_images")},
                      timings=summary.timings, images_per_s=summary.images_per_s)
