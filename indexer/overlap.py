"""The embed stage's hand-off to the write stage: inline, or on a writer thread (GPU).

On a GPU the model is fast enough that everything around it shows: the main thread waited for
each batch's vectors (`.cpu()`), then wrote the batch to SQLite and the vector file, and only then
asked the DataLoader for the next batch, so the GPU sat idle during the writes and the decode
workers' output sat in the queue during the forward pass. With a writer thread the main thread
only queues the forward pass (Embedder.embed_async) and moves on; the writer thread waits for the
vectors and writes, in batch order, one transaction per batch as before, so an interrupted run
resumes exactly as it did (at most the batches still queued here are embedded again).

On CPU the model's threads already use every core, so the inline writer is used there.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from retrieval.indexer.writer import BatchCounts

# results of one batch, and its vectors: a device tensor still being computed, or None (nothing to embed)
Job = tuple[list[Any], Any]
WriteFn = Callable[[list[Any], np.ndarray], BatchCounts]
_STOP = object()


class InlineWriter:
    """Collect vectors and write each batch right away, in the calling thread."""

    def __init__(self, write: WriteFn, collect: Callable[[Any], np.ndarray], on_done: Callable[[BatchCounts, int], None]):
        """`on_done(total, n)` after each batch: the counts so far, and how many results it held."""
        self._write, self._collect, self._on_done = write, collect, on_done
        self.total = BatchCounts()
        self.embed_wait_s = self.write_s = self.backpressure_s = 0.0

    def __enter__(self) -> InlineWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def put(self, results: list[Any], vectors: Any) -> None:
        t = time.perf_counter()
        vecs = self._collect(vectors)
        t1 = time.perf_counter()
        counts = self._write(results, vecs)
        self.write_s += time.perf_counter() - t1
        self.embed_wait_s += t1 - t
        add_counts(self.total, counts)
        self._on_done(self.total, len(results))

    def close(self) -> None:
        return None


class ThreadedWriter(InlineWriter):
    """Same contract, but collecting and writing happen on one background thread, in order.

    `put` blocks when `depth` batches are already waiting (bounded memory, and the GPU is never
    more than `depth` batches ahead of the database). An error on the writer thread is raised by
    the next `put` or by `close`; leaving the `with` block on an error of the caller's drops the
    batches not yet written (the next run embeds them again) and waits for the thread.
    """

    def __init__(self, write: WriteFn, collect: Callable[[Any], np.ndarray],
                 on_done: Callable[[BatchCounts, int], None], depth: int = 2):
        super().__init__(write, collect, on_done)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._abandon = threading.Event()
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)

    def __enter__(self) -> ThreadedWriter:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is not None:
            self._abandon.set()
            self._drain()
        self.close(raise_error=exc_type is None)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            if self._error is not None or self._abandon.is_set():
                continue  # keep consuming so put() never blocks forever; nothing more is written
            try:
                super().put(*job)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, results: list[Any], vectors: Any) -> None:
        self._raise_if_failed()
        t = time.perf_counter()
        while True:
            try:
                self._queue.put((results, vectors), timeout=0.5)
                break
            except queue.Full:
                self._raise_if_failed()
                if not self._thread.is_alive():
                    raise RuntimeError("the index writer thread stopped") from None
        self.backpressure_s += time.perf_counter() - t

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return

    def close(self, raise_error: bool = True) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        if raise_error:
            self._raise_if_failed()


def add_counts(total: BatchCounts, counts: BatchCounts) -> None:
    for key in ("new", "changed", "touched", "failed"):
        setattr(total, key, getattr(total, key) + getattr(counts, key))
