"""Decode files in a throwaway process, so that a decoder crash costs one file and names it.

Used for the files that were in flight when a decode process died (retrieval.imaging.inflight) and for
files whose last attempt crashed. A helper process decodes the files one after another and sends
each result back as soon as it has it; when the helper dies, the file it was on is the culprit:
it becomes a failure of kind "crash" (reason: the signal), and a fresh helper takes the rest.
One process per crash plus one, not one per file.

Helpers are forked where the platform allows it, like the DataLoader's workers: they then decode
with exactly the parent's decoder state (registered Pillow plugins, pixel limits) and start in
milliseconds. They only run the decoding code the DataLoader workers also run after a fork.
"""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing
import signal
from multiprocessing.connection import Connection
from typing import Any, Sequence

from retrieval.imaging.decode import DecodeResult, WorkItem, decode_one
from retrieval.imaging.preprocess import PreprocessConfig

logger = logging.getLogger(__name__)

CRASH_KIND = "crash"


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


def _context() -> Any:
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def _decode_serially(conn: Connection, root: str, items: Sequence[WorkItem], config: PreprocessConfig,
                     max_pixels: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills us
    faulthandler.disable()  # a crash here is expected: the parent reports it, naming the file
    for item in items:
        conn.send(decode_one(root, item, config, max_pixels))
    conn.close()


def decode_isolated(root: str, items: Sequence[WorkItem], config: PreprocessConfig,
                    max_pixels: int) -> list[DecodeResult]:
    """One DecodeResult per item, in order; a file that kills its decoder is a "crash" failure."""
    ctx = _context()
    out: list[DecodeResult] = []
    todo = list(items)
    while todo:
        receiver, sender = ctx.Pipe(duplex=False)
        helper = ctx.Process(target=_decode_serially, args=(sender, root, todo, config, max_pixels), daemon=True)
        helper.start()
        sender.close()  # the helper holds the only write end: EOF on our side means it is gone
        done = 0
        try:
            while done < len(todo):
                try:
                    out.append(receiver.recv())
                except EOFError:
                    break
                done += 1
        finally:
            receiver.close()
            if helper.is_alive() and done < len(todo):
                helper.kill()  # we are leaving on an exception (Ctrl-C): do not leave it decoding
            helper.join()
        if done < len(todo):
            culprit = todo[done]
            reason = crash_reason(helper.exitcode)
            logger.warning("%s: %s", culprit.path, reason)
            out.append(DecodeResult(item=culprit, failure_kind=CRASH_KIND, failure_reason=reason))
            done += 1
        todo = todo[done:]
    return out
