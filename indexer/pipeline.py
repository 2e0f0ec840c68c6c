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
from retrieval.indexer.writer import BatchCounts, write_batch
from sqlalchemy import delete, text

from retrieval import ann
from retrieval.errors import CorpusError, IndexMismatchError
from retrieval.imaging.decode import WorkItem
from retrieval.imaging.inflight import InflightMarkers
from retrieval.imaging.loader import decode_batches, regroup
from retrieval.imaging.scan import IMAGE_EXTENSIONS
from retrieval.layout import IndexLayout, IndexLock
from retrieval.settings import Settings
from retrieval.sources import Source, open_source
from retrieval.store import (
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
from retrieval.vectors import VectorStore

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
    for path in (layout.vectors_path, layout.faiss_path):
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


def run_index(opts: IndexOptions) -> IndexSummary:
    """Index (or update the index of) one corpus. Safe to interrupt at any point and run again."""
    s = opts.settings
    source = open_source(opts.corpus)
    layout = IndexLayout(Path(s.index_dir))
    started = time.perf_counter()
    timings: dict[str, float] = {}
    with IndexLock(layout):
        store = Store(s.db_url or layout.default_db_url())
        try:
            _close_killed_runs(store)
            previous_ref = store.get_meta("model_ref")  # --rebuild keeps the model unless --model says otherwise
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
            if opts.index_factory not in (None, "auto") and dim:
                # Refuse a bad factory string before spending time on embedding.
                ann.new_index(ann.IndexSpec(kind="custom", factory=opts.index_factory, n=0, dim=dim))
            timings["model_load_s"] = time.perf_counter() - t
            summary = IndexSummary(corpus=root, index_dir=str(layout.root.resolve()),
                                   unchanged=plan.unchanged, known_failures=plan.known_failures,
                                   removed=len(plan.removed_ids))
            run = _start_run(store, source, embedder)
            summary.model = store.get_meta("model_ref") or ""
            summary.device = embedder.device if embedder else "-"

            remove_images(store, plan.removed_ids, plan.removed_failure_paths)
            if plan.todo:
                assert embedder is not None
                counts = _embed_all(opts, source, plan.todo, embedder, store, timings, plan.crashed)
                summary.new, summary.changed, summary.touched, summary.failed = (
                    counts.new, counts.changed, counts.touched, counts.failed)
                embedded = counts.new + counts.changed
                summary.images_per_s = embedded / timings["embed_loop_s"] if timings.get("embed_loop_s") else 0.0

            dim = store.get_meta("dim")
            t = time.perf_counter()
            if dim is not None:
                synced = sync_index(store, VectorStore(layout.vectors_path, dim), layout, SyncOptions(
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
            timings["index_s"] = time.perf_counter() - t
            summary.total_images = store.count_images()
            summary.failure_kinds = _failure_kinds(store)
            summary.elapsed_s = time.perf_counter() - started
            summary.timings = {k: round(v, 3) for k, v in timings.items()}
            _finish_run(store, run, summary)
            return summary
        except BaseException as exc:
            _fail_running(store, exc)
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
    with store.session() as s, s.begin():
        run = IndexRun(status="running", corpus_root=root,
                       model_ref=meta.get("model_ref") or (embedder.model_ref if embedder else ""),
                       model_fingerprint=meta.get("model_fingerprint") or "",
                       dim=meta.get("dim") or 0, preprocess=meta.get("preprocess") or {},
                       device=f"{embedder.device}/{embedder.precision}" if embedder else "-")
        s.add(run)
        s.flush()
        return run.id


def _finish_run(store: Store, run_id: int, summary: IndexSummary) -> None:
    with store.session() as s, s.begin():
        run = s.get(IndexRun, run_id)
        assert run is not None
        run.status = "completed"
        run.finished_at = utcnow()
        run.index_type = summary.index_type
        spec = store.get_meta("index")
        run.index_params = spec
        run.counts = {k: getattr(summary, k) for k in
                      ("new", "changed", "unchanged", "touched", "removed", "failed", "known_failures", "total_images")}
        run.timings = summary.timings
        run.images_per_s = summary.images_per_s


def _close_killed_runs(store: Store) -> None:
    """Runs still 'running' while we hold the lock were killed; this run finishes their work."""
    with store.session() as s, s.begin():
        for run in s.query(IndexRun).filter(IndexRun.status == "running"):
            run.status = "interrupted"
            run.error = "the process was killed before the run finished; a later run resumed its work"


def _fail_running(store: Store, exc: BaseException) -> None:
    try:
        with store.session() as s, s.begin():
            for run in s.query(IndexRun).filter(IndexRun.status == "running"):
                run.status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
                run.finished_at = utcnow()
                run.error = str(exc)[:2000]
    except Exception:  # noqa: BLE001 - never mask the original error
        logger.exception("could not record the failed run")


def _embed_all(opts: IndexOptions, source: Source, items: list[WorkItem], embedder: Any, store: Store,
               timings: dict[str, float], crashed: set[str]) -> BatchCounts:
    import torch

    s = opts.settings
    workers = s.workers if s.workers is not None else default_workers(embedder.device)
    threads = torch.get_num_threads()
    if embedder.device == "cpu" and workers:
        # Leave the decode workers their cores, so they never preempt the model's threads.
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - workers)))
    try:
        return _embed_loop(opts, source, items, embedder, store, timings, workers, crashed)
    finally:
        torch.set_num_threads(threads)


def _embed_loop(opts: IndexOptions, source: Source, items: list[WorkItem], embedder: Any, store: Store,
                timings: dict[str, float], workers: int, crashed: set[str]) -> BatchCounts:
    from tqdm import tqdm

    s = opts.settings
    layout = IndexLayout(Path(s.index_dir))
    # A decoder crash in a worker costs the crashing file only, and one in this process (workers=0)
    # is named by the marker it leaves, so the next run decodes that file in isolation (retrieval.imaging.loader).
    markers = InflightMarkers(layout.decoding_dir)
    pin = embedder.device.startswith("cuda")
    chunk = worker_chunk(len(items), workers, s.batch_size)
    chunks = source.decode_stream(items, lambda reader, part: decode_batches(
        reader, part, embedder.preprocess, s.max_pixels, chunk, workers, markers, suspects=crashed, pin_memory=pin))
    batches = closing(regroup(chunks, s.batch_size, pin_memory=pin) if chunk < s.batch_size else chunks)
    vectors = VectorStore(layout.vectors_path, embedder.dim)
    wait = embed = 0.0
    loop_start = time.perf_counter()
    with markers, batches as decoded, tqdm(total=len(items), unit="img", desc="indexing", disable=not opts.progress,
                                           dynamic_ncols=True, smoothing=0.1) as bar:
        def done(total: BatchCounts, n: int) -> None:
            bar.update(n)
            if total.failed:
                bar.set_postfix(failed=total.failed, refresh=False)

        writer_cls = ThreadedWriter if overlap_writes(embedder.device, s.overlap) else InlineWriter
        writer = writer_cls(lambda results, vecs: write_batch(store, vectors, results, vecs), embedder.to_numpy,
                            done)
        streak = 0
        with writer:
            t = time.perf_counter()
            for results, pixels in decoded:
                t1 = time.perf_counter()
                wait += t1 - t
                vecs = embedder.embed_async(pixels) if pixels is not None else _no_vectors(embedder.dim)
                t2 = time.perf_counter()
                embed += t2 - t1
                writer.put(results, vecs)
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
