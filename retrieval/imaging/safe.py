"""The one crash-isolated decoder: a decoder that crashes or hangs costs one file, never the run or the server.

Image decoders are C code, and a hostile file can crash one (a segfault, an out-of-memory kill) or
make it spin. Here files are decoded in helper processes, one job at a time: when a helper dies,
the job it was on is the culprit and becomes a failure of kind "crash" (reason: the signal); when
a job runs past its time limit, the helper is killed and the job is a "timeout" failure. A fresh
helper takes the next job. Used by

* the indexer, for the files in flight when a decode worker died and for files whose last attempt
  crashed or timed out (`decode_isolated`, called by retrieval.imaging.loader);
* the API, for every upload (`DecoderPool`, wrapped by retrieval.api.decoding);
* curation's folder embedding, through the indexer's loader.

The time limit is enforced twice: inside the helper an interval timer delivers SIGALRM with its
default action (the kernel ends the process, even one stuck inside a C call), and the parent stops
waiting a little later and kills the helper should that signal be blocked.

Helpers are forked where the platform allows it for the indexer, like the DataLoader's workers: they
then decode with exactly the parent's decoder state (registered Pillow plugins, pixel limits) and
start in milliseconds. The server starts its helpers with "spawn" by default: forking a process that
runs threads can copy a lock some thread holds and hang the child.
"""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing
import queue
import signal
import threading
from multiprocessing.connection import Connection
from typing import Any, Callable, Sequence

import numpy as np

from retrieval.errors import ImageDecodeError
from retrieval.imaging.decode import (
    TIMEOUT_KIND,
    DecodeResult,
    WorkItem,
    decode_one,
    hard_time_limit,
    timeout_reason,
)
from retrieval.imaging.preprocess import PreprocessConfig

logger = logging.getLogger(__name__)

CRASH_KIND = "crash"
# How long the parent waits beyond the helper's own limit before it kills the helper itself.
KILL_GRACE_S = 2.0


class DecoderDied(Exception):
    """A helper died (kind "crash") or ran past its time limit (kind "timeout") on this job."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def crash_reason(exitcode: int | None) -> str:
    """A person-readable reason from a dead helper's exit code (negative: killed by that signal)."""
    if exitcode is not None and exitcode < 0:
        number = -exitcode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = "unknown signal"
        if number == signal.SIGKILL:
            return f"decoder was killed (signal {number}, {name}) while decoding this file; most likely out of memory"
        return f"decoder crashed (signal {number}, {name}) while decoding this file"
    return f"decoder process exited with code {exitcode} while decoding this file"


def death(exitcode: int | None, timeout_s: float | None) -> DecoderDied:
    """What a helper's end means: SIGALRM is its own time limit going off, anything else a crash."""
    if exitcode == -signal.SIGALRM and timeout_s:
        return DecoderDied(TIMEOUT_KIND, timeout_reason(timeout_s))
    return DecoderDied(CRASH_KIND, crash_reason(exitcode))


def context(start_method: str | None = None) -> Any:
    """A multiprocessing context: `start_method`, or fork where the platform has it."""
    if start_method is None:
        start_method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    return multiprocessing.get_context(start_method)


def _serve(conn: Connection) -> None:
    """A helper's loop: (function, args, time limit) in, the function's result out, until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills us
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    faulthandler.disable()  # a crash here is expected: the parent reports it, naming the job
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        fn, args, timeout_s = job
        with hard_time_limit(timeout_s):
            out = fn(*args)
        conn.send(out)


class Helper:
    """One decoding process. `call(fn, args)` runs fn(*args) there, or raises DecoderDied."""

    def __init__(self, ctx: Any, timeout_s: float | None = None):
        self.timeout_s = timeout_s
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.process.start()
        child.close()  # the helper holds the only other end: EOF on ours means it is gone

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        limit = self.timeout_s
        try:
            self.conn.send((fn, args, limit))
            if not self.conn.poll(None if not limit else limit + KILL_GRACE_S):
                self.close()
                raise DecoderDied(TIMEOUT_KIND, timeout_reason(limit))
            return self.conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self.process.join()
            raise death(self.process.exitcode, limit) from None
        except BaseException:
            self.close()  # Ctrl-C while waiting: do not leave it decoding
            raise

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def close(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def _decode_file(root: str, item: WorkItem, config: PreprocessConfig, max_pixels: int) -> DecodeResult:
    return decode_one(root, item, config, max_pixels)


def decode_isolated(root: str, items: Sequence[WorkItem], config: PreprocessConfig, max_pixels: int,
                    timeout_s: float | None = None) -> list[DecodeResult]:
    """One DecodeResult per item, in order; a file that kills or hangs its decoder is a failure of its own kind."""
    ctx = context()
    out: list[DecodeResult] = []
    helper: Helper | None = None
    try:
        for item in items:
            if helper is None:
                helper = Helper(ctx, timeout_s)
            try:
                out.append(helper.call(_decode_file, root, item, config, max_pixels))
            except DecoderDied as died:
                helper = None
                logger.warning("%s: %s", item.path, died.reason)
                out.append(DecodeResult(item=item, failure_kind=died.kind, failure_reason=died.reason))
    finally:
        if helper is not None:
            helper.close()
    return out


def decode_bytes(data: bytes, config: PreprocessConfig, max_pixels: int) -> np.ndarray | tuple[str, str]:
    """In a helper: model-input pixels, or (kind, reason) for a decode error (plain values pickle reliably)."""
    from retrieval.imaging.preprocess import load_and_preprocess

    try:
        pixels, _ = load_and_preprocess(data, config, max_pixels)
    except ImageDecodeError as exc:
        return exc.failure_kind, str(exc)
    return pixels


class DecoderPool:
    """`workers` helpers shared by threads: `run(fn, *args)` takes an idle one, so a job has a helper to itself.

    A job that crashes or hangs its helper raises DecoderDied for that job alone and the helper is
    replaced; the other jobs are unaffected.
    """

    def __init__(self, workers: int, start_method: str | None = "spawn", timeout_s: float | None = None):
        if workers < 1:
            raise ValueError(f"a decoder pool needs at least one helper, got {workers}")
        self.workers = workers
        self.timeout_s = timeout_s
        self._ctx = context(start_method)
        self._idle: queue.Queue[Helper] = queue.Queue()
        self._all: set[Helper] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.deaths = 0  # helpers lost to a crash or a timeout (metrics, tests)

    def _new(self) -> Helper:
        helper = Helper(self._ctx, self.timeout_s)
        with self._lock:
            self._all.add(helper)
        return helper

    def start(self) -> None:
        """Start the helpers now, not on the first job."""
        while len(self._all) < self.workers:
            self._idle.put(self._new())

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._closed:
            raise RuntimeError("the decoder pool is closed")
        if not self._all:
            self.start()
        helper = self._idle.get()
        try:
            out = helper.call(fn, *args)
        except DecoderDied:
            self.deaths += 1
            self._replace(helper)
            raise
        except BaseException:
            self._replace(helper)
            raise
        self._idle.put(helper)
        return out

    def _replace(self, helper: Helper) -> None:
        helper.close()
        with self._lock:
            self._all.discard(helper)
        if not self._closed:
            self._idle.put(self._new())

    def close(self) -> None:
        self._closed = True
        with self._lock:
            helpers, self._all = list(self._all), set()
        for helper in helpers:
            helper.close()
