"""The contract every source follows, and the bounded, retried byte reader they share.

Remote reads go through fsspec (s3fs, gcsfs, adlfs, ...) or httpx for plain http(s) URLs, with a
timeout, a few retries with exponential backoff for transient errors (timeouts, connection
resets, 5xx), and a size limit. Any read that still fails raises ReadFailure(kind, reason): the
decoder turns it into a recorded failure of that file, never a crash of the run.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.errors import ReadFailure
from retrieval.imaging.scan import ScanEntry

__all__ = ["ReadFailure", "ReadLimits", "Source", "SourceReader", "Located"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 3
DEFAULT_MAX_BYTES = 256 * 1024**2  # no image file is this large; a mistaken video or archive is
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ReadLimits:
    """How a remote read is bounded. Picklable: decode workers get a copy."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    retries: int = DEFAULT_RETRIES
    max_bytes: int = DEFAULT_MAX_BYTES
    backoff_s: float = 0.5

    @classmethod
    def from_env(cls) -> "ReadLimits":
        """RETRIEVAL_READ_TIMEOUT, _RETRIES, _MAX_BYTES and _BACKOFF (seconds) override the defaults."""
        from retrieval.settings import parse_size

        env = os.environ
        try:
            return cls(timeout_s=float(env.get("RETRIEVAL_READ_TIMEOUT", DEFAULT_TIMEOUT_S)),
                       retries=int(env.get("RETRIEVAL_READ_RETRIES", DEFAULT_RETRIES)),
                       max_bytes=parse_size(env.get("RETRIEVAL_READ_MAX_BYTES", DEFAULT_MAX_BYTES)),
                       backoff_s=float(env.get("RETRIEVAL_READ_BACKOFF", 0.5)))
        except ValueError as exc:
            from retrieval.errors import RetrievalError

            raise RetrievalError(f"bad RETRIEVAL_READ_* setting: {exc}") from None


def _status_of(exc: BaseException) -> int | None:
    for attr in ("status", "status_code", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int):
            return value
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return getattr(response, "status_code", None)


def classify(exc: BaseException) -> tuple[str, str, bool]:
    """(failure kind, reason, transient?) for an error raised while reading remote bytes."""
    if isinstance(exc, ReadFailure):
        return exc.kind, exc.reason, False
    if isinstance(exc, FileNotFoundError):
        return "vanished", "the object does not exist (deleted since the listing?)", False
    if isinstance(exc, PermissionError):
        return "unreadable", f"access denied: {exc}", False
    status = _status_of(exc)
    if status in (404, 410):
        return "vanished", f"HTTP {status}: the object does not exist", False
    if status == 412:
        return "io_error", "HTTP 412: the object changed while it was read; the next run reads it again", False
    if status in (401, 403):
        return "unreadable", f"HTTP {status}: access denied (credentials come from the environment)", False
    if status is not None and 400 <= status < 500 and status not in (408, 429):
        return "io_error", f"HTTP {status}", False
    name = type(exc).__name__
    text = str(exc).splitlines()[0][:300] if str(exc) else name
    return "io_error", f"read failed after retries: {name}: {text}", True


def with_retries(fn: Callable[[], bytes], limits: ReadLimits, what: str) -> bytes:
    """fn() retried with exponential backoff while it fails transiently; ReadFailure in the end."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - every error is classified, none escapes unnamed
            kind, reason, transient = classify(exc)
            if not transient or attempt >= limits.retries:
                raise ReadFailure(kind, reason) from None
            delay = limits.backoff_s * (2**attempt)
            logger.info("retrying %s in %.1fs (%s)", what, delay, reason)
            time.sleep(delay)
            attempt += 1


def read_bounded(stream: Any, limit: int) -> bytes:
    """At most `limit` bytes from a file-like object, in chunks; more is a too_large failure."""
    parts: list[bytes] = []
    total = 0
    while True:
        chunk = stream.read(CHUNK)
        if not chunk:
            return b"".join(parts)
        total += len(chunk)
        if total > limit:
            raise ReadFailure("too_large", f"larger than the read limit of {limit} bytes")
        parts.append(chunk)


class SourceReader:
    """Reads the bytes of one work item. Picklable (decode workers get a copy), so no live clients."""

    limits: ReadLimits = ReadLimits()

    def read(self, path: str, size: int = -1) -> bytes:
        raise NotImplementedError

    def read_bytes(self, path: str) -> bytes:
        return self.read(path)

    def meta(self, path: str) -> dict[str, Any] | None:
        """Metadata kept with the image (list columns, shard sidecars); None when there is none."""
        return None


Batches = Iterator[Any]


class Source:
    """A corpus: what it holds (`scan`) and how to read it (`reader`)."""

    kind: str = "source"
    uri: str = ""  # the identity stored as corpus_root
    writable: bool = False  # can `dedup --apply` move files out of it?
    local_root: Path | None = None  # a local folder: paths are relative to it

    def scan(self, cache_dir: Path | None = None, exclude: tuple[Path, ...] = ()) -> Iterator[ScanEntry]:
        raise NotImplementedError

    def reader(self) -> SourceReader:
        raise NotImplementedError

    def to_meta(self) -> dict[str, Any]:
        return {"kind": self.kind, "uri": self.uri}

    def owns(self, path: str) -> bool:
        """Does this stored path belong to this source? (The API serves no other path.)"""
        return True

    def read_bytes(self, path: str) -> bytes:
        return self.reader().read(path)

    def decode_stream(self, items: Sequence[Any], run: Callable[[Any, Sequence[Any]], Batches]) -> Batches:
        """Decoded batches of `items`: run(reader, items). Shards override this to stage sequentially."""
        yield from run(self.reader(), items)

    def describe(self) -> str:
        return self.uri


class Located:
    """A stored image of any source, with the `read_bytes()` / `name` of a Path (for report thumbnails).

    `source` is anything with read_bytes(path): a Source or a SourceReader.
    """

    def __init__(self, source: Any, path: str):
        self.source, self.path = source, path
        self.name = path.rsplit("/", 1)[-1].split("#")[-1]

    def read_bytes(self) -> bytes:
        return self.source.read_bytes(self.path)

    def __str__(self) -> str:
        return self.path
