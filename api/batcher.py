"""Dynamic batching: concurrent embedding requests share one forward pass.

Each request submits one preprocessed uint8 crop (3, H, W). A single background task takes the
first waiting request, collects more until `max_batch` are waiting or `max_wait_s` has passed,
runs one forward pass in a worker thread (the event loop never blocks on the model), and answers
each request's future with its own row. Items are grouped by embedder, so a model swapped by a
re-index never mixes vectors of two models in one pass.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, Callable

import numpy as np
from starlette.concurrency import run_in_threadpool

logger = logging.getLogger(__name__)

EmbedFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class BatcherStats:
    batches: int = 0
    items: int = 0
    largest_batch: int = 0
    sizes: list[int] = field(default_factory=list)  # the last 1000 batch sizes, for tests and /stats

    def record(self, n: int) -> None:
        self.batches += 1
        self.items += n
        self.largest_batch = max(self.largest_batch, n)
        self.sizes.append(n)
        del self.sizes[:-1000]


class Batcher:
    """`await batcher.embed(fn, pixels)` -> that image's vector, computed in a shared batch."""

    def __init__(self, max_batch: int = 16, max_wait_s: float = 0.005):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.max_batch = max_batch
        self.max_wait_s = max(0.0, max_wait_s)
        self.stats = BatcherStats()
        self._queue: asyncio.Queue[tuple[EmbedFn, np.ndarray, asyncio.Future[np.ndarray]]] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._run(), name="embed-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._queue is not None:  # nobody waits forever on a stopped batcher
            while not self._queue.empty():
                _, _, fut = self._queue.get_nowait()
                if not fut.done():
                    fut.set_exception(RuntimeError("the server is shutting down"))

    async def embed(self, fn: EmbedFn, pixels: np.ndarray) -> np.ndarray:
        if self._queue is None or self._task is None:
            raise RuntimeError("batcher not started")
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self._queue.put((fn, pixels, fut))
        return await fut

    async def _collect(self) -> list[tuple[EmbedFn, np.ndarray, asyncio.Future[np.ndarray]]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            live = [item for item in batch if not item[2].done()]  # drop requests whose client left
            for _, group_iter in groupby(live, key=lambda item: id(item[0])):
                group = list(group_iter)
                fn = group[0][0]
                try:
                    stacked = np.stack([pixels for _, pixels, _ in group])
                    vectors = await run_in_threadpool(fn, stacked)
                    self.stats.record(len(group))
                except Exception as exc:  # noqa: BLE001 - every waiter learns about the failure
                    logger.exception("embedding a batch of %d failed", len(group))
                    for _, _, fut in group:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for row, (_, _, fut) in zip(vectors, group):
                    if not fut.done():
                        fut.set_result(np.asarray(row))


def describe(b: Batcher) -> dict[str, Any]:
    return {"max_batch": b.max_batch, "max_wait_ms": b.max_wait_s * 1000, "batches": b.stats.batches,
            "items": b.stats.items, "largest_batch": b.stats.largest_batch}
