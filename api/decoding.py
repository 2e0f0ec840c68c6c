"""Upload decoding in helper processes: a decoder that crashes costs one request, not the server.

Image decoders are C code, and a hostile file can crash one (a segfault, or the kernel killing the
process for memory). Decoding uploads on a thread of the server process meant such an upload took
the whole server down, every other client's requests with it. Here uploads are decoded and
preprocessed in a small process pool (`RETRIEVAL_UPLOAD_DECODE_WORKERS`, 0 = on a thread as before):

* a worker that dies breaks the pool: it is replaced, and every request that was in it is decoded
  again, each alone in a process of its own, so only the upload that crashes a decoder gets the
  error (422, "the image crashed the image decoder") and the others are answered as usual;
* workers are started with "spawn" by default: forking a server that runs threads (the event
  loop's thread pool, the model's) can copy a lock some thread holds and hang the child.

The indexer protects itself the same way (retrieval.imaging.loader / retrieval.imaging.isolate).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from retrieval.errors import ImageDecodeError, RetrievalError
from retrieval.imaging.preprocess import PreprocessConfig

logger = logging.getLogger(__name__)

CRASH_DETAIL = "the image crashed the image decoder"


class DecoderCrashed(RetrievalError):
    """The upload crashed the decoding process, twice."""

    kind = "unprocessable"


def _decode(data: bytes, config: PreprocessConfig, max_pixels: int) -> np.ndarray | tuple[str, str]:
    """In a worker: pixels, or (kind, reason) for a decode error (plain values pickle reliably)."""
    from retrieval.imaging.preprocess import load_and_preprocess

    try:
        pixels, _ = load_and_preprocess(data, config, max_pixels)
    except ImageDecodeError as exc:
        return exc.failure_kind, str(exc)
    return pixels


def _ready() -> bool:
    return True


class UploadDecoder:
    """`await decoder.decode(data, config, max_pixels)` -> uint8 (3, H, W) pixels, or ImageDecodeError."""

    def __init__(self, workers: int, start_method: str = "spawn"):
        self.workers = workers
        self.start_method = start_method
        self._pool: ProcessPoolExecutor | None = None
        self.crashes = 0  # worker deaths seen (metrics, tests)

    def _new_pool(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(self.start_method))
        for _ in range(self.workers):
            pool.submit(_ready)  # start the workers now, not on the first upload
        return pool

    def start(self) -> None:
        if self.workers > 0 and self._pool is None:
            self._pool = self._new_pool()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def decode(self, data: bytes, config: PreprocessConfig, max_pixels: int) -> np.ndarray:
        loop = asyncio.get_running_loop()
        if self.workers <= 0:
            out = await loop.run_in_executor(None, _decode, data, config, max_pixels)
        else:
            out = await self._in_pool(loop, data, config, max_pixels)
        if isinstance(out, tuple):
            kind, reason = out
            raise ImageDecodeError(reason, kind)
        return out

    async def _in_pool(self, loop: asyncio.AbstractEventLoop, data: bytes, config: PreprocessConfig,
                       max_pixels: int) -> Any:
        if self._pool is None:
            self._pool = self._new_pool()
        pool = self._pool
        try:
            return await loop.run_in_executor(pool, _decode, data, config, max_pixels)
        except BrokenProcessPool:
            if self._pool is pool:  # the first request to notice replaces it; the others use the new one
                self.crashes += 1
                logger.warning("an upload decoder process died; starting new ones")
                pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
        # This upload, or another one in the pool with it, crashed a decoder: decode it again alone,
        # so that a crashing upload cannot take an innocent one down with it twice.
        solo = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(self.start_method))
        try:
            return await loop.run_in_executor(solo, _decode, data, config, max_pixels)
        except BrokenProcessPool:
            self.crashes += 1
            raise DecoderCrashed(CRASH_DETAIL) from None
        finally:
            solo.shutdown(wait=False, cancel_futures=True)
