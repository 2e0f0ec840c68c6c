"""Decoded batches for the pipeline: the DataLoader, made to survive a decoder crash.

A hostile file can crash a C decoder (a segfault) or get its process killed (out of memory). In a
DataLoader worker that used to stop the whole run, and the next run hit the same file again. Here:

* when a worker dies, the DataLoader is shut down, the files that were in flight (the in-flight
  markers of retrieval.imaging.inflight; the next undelivered batch when no marker names one) are decoded
  in isolation (retrieval.imaging.safe), where the culprit becomes a "crash" failure, and a new
  DataLoader goes on with the files not yet delivered;
* files in flight when an earlier run died (with `--workers 0` a crash takes the main process
  with it), and files whose last attempt crashed, are decoded in isolation before the rest.

Batches are delivered in order (the DataLoader's default), so "not yet delivered" is a suffix of
the work list, and nothing is decoded twice but the batches prefetched when a worker died.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

from retrieval.imaging.decode import (
    DecodeDataset,
    DecodeResult,
    WorkItem,
    collate_results,
)
from retrieval.imaging.inflight import InflightMarkers
from retrieval.imaging.preprocess import PreprocessConfig
from retrieval.imaging.safe import decode_isolated

logger = logging.getLogger(__name__)

Batch = tuple[list[DecodeResult], Any]

# How torch reports a dead worker ("DataLoader worker (pid 123) is killed by signal: ..." or
# "DataLoader worker (pid(s) 123) exited unexpectedly"); an exception raised *inside* a worker
# is re-raised as "Caught X in DataLoader worker process N" and is not a crash.
WORKER_DIED = re.compile(r"DataLoader worker \(pid")


@contextmanager
def _worker_deaths_reported_by_next() -> Iterator[None]:
    """While a DataLoader iterator is live, a dead worker raises only from next(), not anywhere.

    torch's SIGCHLD handler raises its RuntimeError in the main thread wherever it happens to be,
    typically inside the model's forward pass or a database write of the previous batch, where it
    cannot be told apart from a real error of that code. Without the handler, next() notices a dead
    worker itself (it checks its workers whenever it waits more than 5 s), so the error arrives
    where the next batch is expected. SIGCHLD's default action is to ignore the signal; children
    are still reaped by join() (SIG_IGN would reap them automatically and is not used).
    Must be entered after the iterator was created: torch installs its handler on first use.
    """
    if not hasattr(signal, "SIGCHLD") or threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread; torch installs none elsewhere either
        return
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous if previous is not None else signal.SIG_DFL)


def _worker_died(exc: BaseException, workers: int) -> bool:
    """Did this error from the DataLoader's next() come from a dead worker?

    Usually torch says so (WORKER_DIED). But a worker that dies just after queueing a batch leaves
    the main process fetching that batch's shared memory from it (torch hands tensors over as file
    descriptors through the dead process), which fails with EOFError or a ConnectionError instead.
    """
    if isinstance(exc, RuntimeError):
        return bool(WORKER_DIED.search(str(exc)))
    return workers > 0


def regroup(batches: Iterator[Batch], batch_size: int, pin_memory: bool = False) -> Iterator[Batch]:
    """Concatenate consecutive small batches into batches of at least `batch_size` results, in order.

    Decode workers each build a whole DataLoader batch, so with model-sized batches (256 on a GPU)
    the first batch took one worker 256 decodes, and a corpus of a few thousand images ended with
    most workers idle while the last few finished theirs. Workers now hand over small chunks and
    the model's batches are put together here. Pixels stay aligned with the embeddable results.
    """
    import torch

    results: list[DecodeResult] = []
    pixels: list[Any] = []

    def flush() -> Batch:
        if not pixels:
            batch = None
        elif len(pixels) == 1:
            batch = pixels[0]
        else:
            n = sum(len(p) for p in pixels)
            out = torch.empty((n, *pixels[0].shape[1:]), dtype=pixels[0].dtype, pin_memory=pin_memory)
            batch = torch.cat(pixels, out=out)
        done = (results.copy(), batch)
        results.clear()
        pixels.clear()
        return done

    try:
        for chunk, chunk_pixels in batches:
            results.extend(chunk)
            if chunk_pixels is not None:
                pixels.append(chunk_pixels)
            if len(results) >= batch_size:
                yield flush()
        if results:
            yield flush()
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # stopping early must shut the DataLoader down and restore the signal handler


def _isolated_batch(root: str, items: Sequence[WorkItem], config: PreprocessConfig, max_pixels: int,
                    timeout_s: float | None) -> Batch:
    return collate_results(decode_isolated(root, items, config, max_pixels, timeout_s))


def decode_batches(root: str, items: Sequence[WorkItem], config: PreprocessConfig, max_pixels: int,
                   batch_size: int, workers: int, markers: InflightMarkers | None = None,
                   suspects: Collection[str] = (), pin_memory: bool = False,
                   timeout_s: float | None = None) -> Iterator[Batch]:
    """(results, uint8 pixel batch or None) for every item, whatever the decoders do.

    `suspects`: paths to decode in isolation from the start (their last attempt crashed).
    `timeout_s`: the time one file may take to decode (a worker on a file longer is ended, and the
    file decoded in isolation, where it becomes a "timeout" failure). Close the
    generator when stopping early (`finally: batches.close()`), so the signal handler is restored.
    """
    todo = list(items)
    leftovers = markers.snapshot() if markers is not None else {}
    isolate = set(suspects) | set(leftovers.values())
    if isolate:
        first = [it for it in todo if it.path in isolate]
        todo = [it for it in todo if it.path not in isolate]
        if first:
            logger.warning("decoding %d file(s) in isolation first: their last decoding crashed or was cut short",
                           len(first))
            for start in range(0, len(first), batch_size):
                yield _isolated_batch(root, first[start : start + batch_size], config, max_pixels, timeout_s)
    if markers is not None:
        markers.discard(leftovers)  # only now: had we died above, the next run would isolate them again
    while todo:
        delivered = 0
        loader = _loader(root, todo, config, max_pixels, batch_size, workers, markers, pin_memory, timeout_s)
        it = iter(loader)
        # torch's handler stays off until the dead loader is dropped: a worker's SIGCHLD can arrive
        # after next() already failed (on its half-sent batch), and the handler would raise it again
        # wherever this code then is.
        with _worker_deaths_reported_by_next() if workers else nullcontext():
            try:
                for batch in it:
                    delivered += len(batch[0])
                    yield batch
                return
            except (RuntimeError, EOFError, ConnectionError) as exc:
                if not _worker_died(exc, workers):
                    raise
                logger.warning("a decode worker died (%s); decoding the files it may have been on in isolation",
                               exc)
            # Drop the dead DataLoader (its iterator shuts the other workers down, which finish or
            # drop their current file first, and unregisters their pids from torch's handler) before
            # reading what was left in flight.
            it = loader = None  # type: ignore[assignment]
        rest = todo[delivered:]
        if not rest:
            return
        in_flight = markers.snapshot() if markers is not None else {}
        names = set(in_flight.values())
        culprits = [i for i in rest if i.path in names] or rest[:batch_size]  # unknown: the next batch
        yield _isolated_batch(root, culprits, config, max_pixels, timeout_s)
        if markers is not None:
            markers.discard(in_flight)
        done = {i.path for i in culprits}
        todo = [i for i in rest if i.path not in done]


def _loader(root: str, items: list[WorkItem], config: PreprocessConfig, max_pixels: int, batch_size: int,
            workers: int, markers: InflightMarkers | None, pin_memory: bool, timeout_s: float | None) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(DecodeDataset(root, items, config, max_pixels, markers, timeout_s), batch_size=batch_size,
                      num_workers=workers, collate_fn=collate_results, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, persistent_workers=False)
