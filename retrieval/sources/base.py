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
        return exc.failure_kind, exc.reason, False
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
        """Decoded batches of `items`: run(reader, items).

        Remote reads are staged: a background thread fetches the next group of items with
        PREFETCH_THREADS concurrent reads into a temporary folder while the current group decodes,
        so network latency overlaps itself and the decoders (which then read local files).
        Shards override this to stream each shard once.
        """
        reader = self.reader()
        groups = [list(items[i : i + PREFETCH_GROUP]) for i in range(0, len(items), PREFETCH_GROUP)]
        yield from staged_stream(groups, lambda group, folder: prefetch(reader, group, folder), run)

    def describe(self) -> str:
        return self.uri


PREFETCH_GROUP = 256  # items fetched ahead of the decoder (on disk, in a temporary folder)
PREFETCH_THREADS = 16  # concurrent remote reads while fetching a group


class StagedReader(SourceReader):
    """Reads items that a staging pass (prefetch, or a shard's sequential stream) wrote to local files."""

    def __init__(self, files: dict[str, str], errors: dict[str, tuple[str, str]],
                 metas: dict[str, dict[str, Any]] | None = None):
        self.files, self.errors, self.metas = files, errors, metas or {}

    def read(self, path: str, size: int = -1) -> bytes:
        if path in self.errors:
            raise ReadFailure(*self.errors[path])
        staged = self.files.get(path)
        if staged is None:
            raise ReadFailure("vanished", "the item is no longer in its source")
        with open(staged, "rb") as f:
            return f.read()

    def meta(self, path: str) -> dict[str, Any] | None:
        return self.metas.get(path)


def prefetch(reader: SourceReader, items: Sequence[Any], folder: Path) -> StagedReader:
    """Fetch `items` concurrently into `folder`; a failed read becomes that item's recorded failure."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    files: dict[str, str] = {}
    errors: dict[str, tuple[str, str]] = {}

    def one(item: Any) -> None:
        if item.size < 0:
            return  # the decoder records it from the listing
        try:
            data = reader.read(item.path, item.size)
        except ReadFailure as exc:
            errors[item.path] = (exc.failure_kind, exc.reason)
            return
        target = folder / hashlib.sha1(item.path.encode()).hexdigest()
        target.write_bytes(data)
        files[item.path] = str(target)

    with ThreadPoolExecutor(PREFETCH_THREADS, thread_name_prefix="prefetch") as pool:
        list(pool.map(one, items))
    return StagedReader(files, errors)


def staged_stream(groups: Sequence[Any], stage: Callable[[Any, Path], SourceReader],
                  run: Callable[[Any, Sequence[Any]], Batches], items_of: Callable[[Any], Sequence[Any]] = lambda g: g,
                  ) -> Batches:
    """run(staged reader, items) group by group, each group staged by a background thread one group ahead.

    At most two groups are on disk at a time; a staging error is raised where the group is decoded.
    """
    import shutil
    import tempfile
    import threading

    with tempfile.TemporaryDirectory(prefix="retrieval-staging-") as tmp:
        staged: dict[int, Any] = {}

        def prepare(i: int) -> threading.Thread:
            folder = Path(tmp) / str(i)
            folder.mkdir()

            def work() -> None:
                try:
                    staged[i] = stage(groups[i], folder)
                except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                    staged[i] = exc

            t = threading.Thread(target=work, name=f"stage-{i}", daemon=True)
            t.start()
            return t

        ahead = prepare(0) if groups else None
        for i in range(len(groups)):
            assert ahead is not None
            ahead.join()
            ahead = prepare(i + 1) if i + 1 < len(groups) else None
            reader = staged.pop(i)
            try:
                if isinstance(reader, BaseException):
                    raise reader
                yield from run(reader, items_of(groups[i]))
            finally:
                shutil.rmtree(Path(tmp) / str(i), ignore_errors=True)
        if ahead is not None:
            ahead.join()


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
