"""Upload decoding for the server: retrieval.imaging.safe's DecoderPool behind an async call.

A decoder that crashes or hangs on a hostile upload costs that request (422), never the server
or the other clients. `RETRIEVAL_UPLOAD_DECODE_WORKERS` helpers (0 = decode on a thread of the
server process, with no isolation and no time limit), started with "spawn" by default.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from retrieval.errors import ImageDecodeError, RetrievalError
from retrieval.imaging.preprocess import PreprocessConfig
from retrieval.imaging.safe import DecoderDied, DecoderPool, decode_bytes

logger = logging.getLogger(__name__)

CRASH_DETAIL = "the image crashed the image decoder"
TIMEOUT_DETAIL = "the image took too long to decode"


class DecoderCrashed(RetrievalError):
    """The upload crashed its decoding process or ran past the time limit; str() is the HTTP detail."""

    kind = "unprocessable"


class UploadDecoder:
    """`await decoder.decode(data, config, max_pixels)` -> uint8 (3, H, W) pixels, or ImageDecodeError."""

    def __init__(self, workers: int, start_method: str = "spawn", timeout_s: float | None = None):
        self.workers = workers
        self.pool = DecoderPool(workers, start_method, timeout_s or None) if workers > 0 else None

    @property
    def crashes(self) -> int:
        return self.pool.deaths if self.pool is not None else 0

    def start(self) -> None:
        if self.pool is not None:
            self.pool.start()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    async def decode(self, data: bytes, config: PreprocessConfig, max_pixels: int) -> np.ndarray:
        loop = asyncio.get_running_loop()
        try:
            if self.pool is None:
                out = await loop.run_in_executor(None, decode_bytes, data, config, max_pixels)
            else:
                out = await loop.run_in_executor(None, self.pool.run, decode_bytes, data, config, max_pixels)
        except DecoderDied as died:
            logger.warning("an upload %s: %s", "timed out" if died.kind == "timeout" else "crashed its decoder",
                           died.reason)
            raise DecoderCrashed(TIMEOUT_DETAIL if died.kind == "timeout" else CRASH_DETAIL) from None
        if isinstance(out, tuple):
            kind, reason = out
            raise ImageDecodeError(reason, kind)
        return out
