"""The local runner: the index update's stages (retrieval.indexer.stages) in this process.

Decoding runs in DataLoader worker processes (none on small CPU machines), the model embeds in
this process, and a writer thread (on a GPU) commits batch by batch while the next one is embedded.
Memory stays flat: images flow a few batches at a time. A file that crashes its decoder is recorded
as a "crash" failure and the run goes on (retrieval.imaging.loader).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval.indexer.overlap import InlineWriter, ThreadedWriter
from retrieval.indexer.plan import images_without_copy
from retrieval.indexer.stages import Commit, Decode, EmbedCopy, EmbedSearch, ReachWatch
from retrieval.indexer.writer import BatchCounts

from retrieval.imaging.decode import DecodeSpec, WorkItem
from retrieval.imaging.inflight import InflightMarkers
from retrieval.imaging.loader import regroup
from retrieval.layout import IndexLayout
from retrieval.sources import Source
from retrieval.store import Store
from retrieval.vectors import role_vectors

if TYPE_CHECKING:
    from retrieval.indexer.options import IndexOptions

logger = logging.getLogger(__name__)

MIN_WORKER_CHUNK = 32
CHUNKS_PER_WORKER = 8


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


def embed_all(opts: IndexOptions, source: Source, items: list[WorkItem], embedder: Any, store: Store,
              timings: dict[str, float], crashed: set[str], copy: Any = None) -> BatchCounts:
    """Decode, embed (both roles) and commit `items`, batch by batch, in order."""
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
    decode = Decode(source, DecodeSpec(search=embedder.preprocess, copy=copy.prepare if copy is not None else None),
                    s.max_pixels, chunk, workers, markers, suspects=crashed, pin_memory=pin,
                    timeout_s=s.decode_timeout_s or None)
    search = EmbedSearch(embedder)
    embed_copy = EmbedCopy(copy) if copy is not None else None
    commit = Commit(store, role_vectors(layout, "search", embedder.dim),
                    role_vectors(layout, "copy", copy.dim) if copy is not None else None)
    chunks = decode(items)
    batches = closing(regroup(chunks, s.batch_size, pin_memory=pin) if chunk < s.batch_size else chunks)
    watch = ReachWatch(source.describe())
    wait = embed = 0.0
    loop_start = time.perf_counter()
    with markers, batches as decoded, tqdm(total=len(items), unit="img", desc="indexing", disable=not opts.progress,
                                           dynamic_ncols=True, smoothing=0.1) as bar:
        def done(total: BatchCounts, n: int) -> None:
            timings.setdefault("first_batch_s", time.perf_counter() - loop_start)
            bar.update(n)
            if total.failed:
                bar.set_postfix(failed=total.failed, refresh=False)

        writer_cls = ThreadedWriter if overlap_writes(embedder.device, s.overlap) else InlineWriter
        writer = writer_cls(lambda results, vecs: commit(results, vecs[0], vecs[1]),
                            lambda vecs: (search.collect(vecs[0]), vecs[1]), done)
        with writer:
            t = time.perf_counter()
            for results, pixels in decoded:
                t1 = time.perf_counter()
                wait += t1 - t
                vecs = search.submit(pixels)
                copy_vecs = embed_copy(results) if embed_copy is not None else None
                t2 = time.perf_counter()
                embed += t2 - t1
                writer.put(results, (vecs, copy_vecs))
                watch(results)
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


def add_copy_role(opts: IndexOptions, source: Source, copy: Any, store: Store, layout: IndexLayout) -> int:
    """Give every indexed image without one a copy vector (and its PDQ hashes), decoding only for the copy role.

    Incremental and crash-safe like the main loop: each batch's vectors are fsynced before the
    transaction that marks them written commits, so a killed run resumes with the images left.
    """
    from tqdm import tqdm

    items = images_without_copy(store)
    if not items:
        return 0
    s = opts.settings
    workers = s.workers if s.workers is not None else default_workers(copy.device)
    markers = InflightMarkers(layout.decoding_dir)
    decode = Decode(source, DecodeSpec(search=None, copy=copy.prepare), s.max_pixels, s.batch_size, workers,
                    markers, timeout_s=s.decode_timeout_s or None)
    embed_copy = EmbedCopy(copy)
    commit = Commit(store, None, role_vectors(layout, "copy", copy.dim))
    done = skipped = 0
    with markers, closing(decode(items)) as decoded, tqdm(total=len(items), unit="img", desc="copy role",
                                                          disable=not opts.progress, dynamic_ncols=True) as bar:
        for results, _ in decoded:
            ok, vecs = embed_copy.backfill(results)
            skipped += len(results) - len(ok)
            if ok:
                done += commit.copy_only(ok, vecs)
            bar.update(len(results))
    markers.clean()
    if skipped:
        logger.warning("%d indexed file(s) could not be decoded for the copy role (changed or unreadable since "
                       "they were indexed); the next `retrieval index` run handles them", skipped)
    logger.info("copy role: %d image(s) embedded with %s", done, copy.model_ref)
    return done
