"""`retrieval index`: scan -> plan -> decode (worker processes) -> embed (batched) -> write -> sync index.

Each stage is timed. Memory stays flat: the only thing held for the whole corpus is the list of
paths to process; images flow through the DataLoader a few batches at a time. A file that crashes
its decoder is recorded as a "crash" failure and the run goes on (retrieval.imaging.loader).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from retrieval.indexer.overlap import InlineWriter, ThreadedWriter
from retrieval.indexer.plan import Plan, make_plan
from retrieval.indexer.writer import BatchCounts, write_batch, write_copy_batch
from sqlalchemy import delete, select, text, update

from retrieval import ann, runs
from retrieval.errors import CorpusError, IndexMismatchError
from retrieval.imaging.decode import DecodeSpec, WorkItem
from retrieval.imaging.inflight import InflightMarkers
from retrieval.imaging.loader import decode_batches, regroup
from retrieval.imaging.scan import IMAGE_EXTENSIONS
from retrieval.layout import IndexLayout, IndexLock, remove_stale_temporaries
from retrieval.settings import Settings
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


@dataclass
class IndexOptions:
    corpus: Path | str  # a folder, a URL prefix, a list or shards (retrieval.sources.open_source)
    settings: Settings
    rebuild: bool = False
    retry_failed: bool = False
    index_factory: str | None = None
    progress: bool = True


@dataclass
class IndexSummary:
    corpus: str
    index_dir: str
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    touched: int = 0
    removed: int = 0
    failed: int = 0
    known_failures: int = 0
    total_images: int = 0
    elapsed_s: float = 0.0
    images_per_s: float = 0.0
    index_type: str | None = None
    index_factory: str | None = None
    nprobe: int | None = None
    recall_at_10: float | None = None
    index_rebuilt: bool = False
    index_changed: bool = False
    model: str = ""
    copy_model: str | None = None
    copy_embedded: int = 0  # images given a copy vector by this run (new, changed and added-later)
    copy_index_type: str | None = None
    device: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    failure_kinds: dict[str, int] = field(default_factory=dict)


def default_workers(device: str) -> int:
    cpus = os.cpu_count() or 1
    if device.startswith("cuda"):
        return min(cpus, 16)
    # On CPU the model's intra-op threads already use every core, and a decode process that
    # preempts one of them stalls the whole parallel region: on 2 cores, ViT-S/14 embedded 6.1 img/s
    # with decoding in the main process, 4.1 with one decode worker and 3.7 with two
    # (benchmarks/embed_throughput.py). Decoding (draft JPEG) is ~8% of the work, so only larger
    # machines get workers, about one per 8 cores.
    return 0 if cpus <= 4 else max(1, cpus // 8)


# A remote source that stops answering (endpoint down, credentials revoked mid-run) turns every
# read into a failure after its retries; after this many in a row the run stops with one clear
# error instead of grinding through the rest. What was committed stays; the next run resumes.
UNREACHABLE_STREAK = 200


def _unreachable(results: list[Any], streak: int) -> tuple[int, str | None]:
    """The running count of consecutive reads that failed after retries, and the last reason."""
    reason = None
    for r in results:
        if r.failure_kind == "io_error" and (r.failure_reason or "").startswith("read failed after retries"):
            streak += 1
            reason = r.failure_reason
        else:
            streak = 0
    return streak, reason


MIN_WORKER_CHUNK = 32
CHUNKS_PER_WORKER = 8


def worker_chunk(n_items: int, workers: int, batch_size: int) -> int:
    """Images a decode worker hands over at a time (retrieval.imaging.loader.regroup puts model batches together).

    Small chunks keep every worker busy to the end of a run and bring the first batch sooner; large
    ones cost less inter-process traffic. Measured on an H100 with 16 decode workers, in one run
    (benchmarks/results/embed_throughput_gpu.json, ablation): 4,096 camera-sized JPEGs went
    434 -> 637 img/s from 256-image to 32-image chunks, while 16,384 web-sized ones went
    1,912 -> 1,430; this rule picked 32 and 128 and got 648 and 1,861. So each worker
    gets about CHUNKS_PER_WORKER chunks of the run, never fewer than MIN_WORKER_CHUNK images each,
    never more than a model batch.
    """
    if workers <= 0:
        return batch_size
    return max(1, min(batch_size, max(MIN_WORKER_CHUNK, -(-n_items // (workers * CHUNKS_PER_WORKER)))))


def overlap_writes(device: str, setting: bool | None) -> bool:
    """Write on a separate thread? Yes on a GPU (see indexer.overlap), unless the setting says otherwise."""
    return device.startswith("cuda") if setting is None else setting


def _no_vectors(dim: int) -> np.ndarray:
    return np.empty((0, dim), np.float32)


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


def _images_without_copy(store: Store) -> list[WorkItem]:
    """Indexed images with no copy vector yet (an index built before its copy model was added)."""
    from retrieval.store import Image

    with store.session() as s:
        rows = s.execute(select(Image.id, Image.path, Image.size, Image.mtime_ns)
                         .where(Image.copy_state == COPY_NONE).order_by(Image.id)).all()
    return [WorkItem(path=p, size=size, mtime_ns=mtime, image_id=i) for i, p, size, mtime in rows]


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
    if not plan.todo and ref == stored and not _images_without_copy(store):
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


def run_index(opts: IndexOptions) -> IndexSummary:
    """Index (or update the index of) one corpus. Safe to interrupt at any point and run again."""
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
                counts = _embed_all(opts, source, plan.todo, embedder, store, timings, plan.crashed, copy)
                summary.new, summary.changed, summary.touched, summary.failed = (
                    counts.new, counts.changed, counts.touched, counts.failed)
                embedded = counts.new + counts.changed
                summary.images_per_s = embedded / timings["embed_loop_s"] if timings.get("embed_loop_s") else 0.0
                if copy is not None:
                    summary.copy_embedded = embedded
            if copy is not None:
                t1 = time.perf_counter()
                summary.copy_embedded += _add_copy_role(opts, source, copy, store, layout)
                timings["copy_backfill_s"] = time.perf_counter() - t1

            dim = store.get_meta("dim")
            t = time.perf_counter()
            if dim is not None:
                synced = sync_index(store, role_vectors(layout, "search", dim), layout, SyncOptions(
                    memory_budget=s.memory_budget, exact_threshold=s.exact_threshold,
                    recall_target=s.recall_target, factory=opts.index_factory, force_rebuild=opts.rebuild))
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
                    recall_target=s.recall_target, force_rebuild=opts.rebuild), role="copy")
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


def _embed_all(opts: IndexOptions, source: Source, items: list[WorkItem], embedder: Any, store: Store,
               timings: dict[str, float], crashed: set[str], copy: Any = None) -> BatchCounts:
    import torch

    s = opts.settings
    workers = s.workers if s.workers is not None else default_workers(embedder.device)
    threads = torch.get_num_threads()
    if embedder.device == "cpu" and workers:
        # Leave the decode workers their cores, so they never preempt the model's threads.
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - workers)))
    try:
        return _embed_loop(opts, source, items, embedder, store, timings, workers, crashed, copy)
    finally:
        torch.set_num_threads(threads)


def _embed_loop(opts: IndexOptions, source: Source, items: list[WorkItem], embedder: Any, store: Store,
                timings: dict[str, float], workers: int, crashed: set[str], copy: Any = None) -> BatchCounts:
    from tqdm import tqdm

    s = opts.settings
    layout = IndexLayout(Path(s.index_dir))
    # A decoder crash in a worker costs the crashing file only, and one in this process (workers=0)
    # is named by the marker it leaves, so the next run decodes that file in isolation (retrieval.imaging.loader).
    markers = InflightMarkers(layout.decoding_dir)
    pin = embedder.device.startswith("cuda")
    chunk = worker_chunk(len(items), workers, s.batch_size)
    # One decode per file: the search input, the copy input (when a copy model is set) and PDQ.
    spec = DecodeSpec(search=embedder.preprocess, copy=copy.prepare if copy is not None else None)
    chunks = source.decode_stream(items, lambda reader, part: decode_batches(
        reader, part, spec, s.max_pixels, chunk, workers, markers, suspects=crashed, pin_memory=pin,
        timeout_s=s.decode_timeout_s or None))
    batches = closing(regroup(chunks, s.batch_size, pin_memory=pin) if chunk < s.batch_size else chunks)
    vectors = role_vectors(layout, "search", embedder.dim)
    copy_vectors = role_vectors(layout, "copy", copy.dim) if copy is not None else None
    wait = embed = 0.0
    loop_start = time.perf_counter()
    with markers, batches as decoded, tqdm(total=len(items), unit="img", desc="indexing", disable=not opts.progress,
                                           dynamic_ncols=True, smoothing=0.1) as bar:
        def done(total: BatchCounts, n: int) -> None:
            bar.update(n)
            if total.failed:
                bar.set_postfix(failed=total.failed, refresh=False)

        writer_cls = ThreadedWriter if overlap_writes(embedder.device, s.overlap) else InlineWriter
        writer = writer_cls(
            lambda results, vecs: write_batch(store, vectors, results, vecs[0], copy_vectors, vecs[1]),
            lambda vecs: (embedder.to_numpy(vecs[0]), vecs[1]), done)
        streak = 0
        with writer:
            t = time.perf_counter()
            for results, pixels in decoded:
                t1 = time.perf_counter()
                wait += t1 - t
                vecs = embedder.embed_async(pixels) if pixels is not None else _no_vectors(embedder.dim)
                copy_vecs = None
                if copy is not None:
                    inputs = [r.copy_pixels for r in results if r.embeddable]
                    copy_vecs = copy.embed_many(inputs) if inputs else _no_vectors(copy.dim)
                    for r in results:
                        r.copy_pixels = None
                t2 = time.perf_counter()
                embed += t2 - t1
                writer.put(results, (vecs, copy_vecs))
                streak, reason = _unreachable(results, streak)
                if streak >= UNREACHABLE_STREAK:
                    raise CorpusError(f"{source.describe()} stopped answering: the last {streak} reads failed "
                                      f"({reason}); what was indexed is kept, run again to resume")
                t = time.perf_counter()
        total = writer.total
    markers.clean()
    # embed_s: queueing the forward passes plus waiting for their vectors; with the writer thread
    # (GPU) write_s and the wait run beside decoding, and writer_backpressure_s is the time the
    # main thread was held up by them.
    timings.update(decode_wait_s=wait, embed_s=embed + writer.embed_wait_s, write_s=writer.write_s,
                   embed_loop_s=time.perf_counter() - loop_start)
    if isinstance(writer, ThreadedWriter):
        timings["writer_backpressure_s"] = writer.backpressure_s
    return total


def _add_copy_role(opts: IndexOptions, source: Source, copy: Any, store: Store, layout: IndexLayout) -> int:
    """Give every indexed image without one a copy vector (and its PDQ hashes), decoding only for the copy role.

    Incremental and crash-safe like the main loop: each batch's vectors are fsynced before the
    transaction that marks them written commits, so a killed run resumes with the images left.
    """
    from tqdm import tqdm

    items = _images_without_copy(store)
    if not items:
        return 0
    s = opts.settings
    workers = s.workers if s.workers is not None else default_workers(copy.device)
    markers = InflightMarkers(layout.decoding_dir)
    spec = DecodeSpec(search=None, copy=copy.prepare)
    copy_vectors = role_vectors(layout, "copy", copy.dim)
    chunks = closing(source.decode_stream(items, lambda reader, part: decode_batches(
        reader, part, spec, s.max_pixels, s.batch_size, workers, markers, timeout_s=s.decode_timeout_s or None)))
    done = skipped = 0
    with markers, chunks as decoded, tqdm(total=len(items), unit="img", desc="copy role", disable=not opts.progress,
                                          dynamic_ncols=True) as bar:
        for results, _ in decoded:
            ok = [r for r in results if r.failure_reason is None and r.copy_pixels is not None]
            skipped += len(results) - len(ok)
            if ok:
                vecs = copy.embed_many([r.copy_pixels for r in ok])
                done += write_copy_batch(store, copy_vectors, ok, vecs)
            bar.update(len(results))
    markers.clean()
    if skipped:
        logger.warning("%d indexed file(s) could not be decoded for the copy role (changed or unreadable since "
                       "they were indexed); the next `retrieval index` run handles them", skipped)
    logger.info("copy role: %d image(s) embedded with %s", done, copy.model_ref)
    return done
