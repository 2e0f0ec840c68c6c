"""Any fsspec URL prefix (s3://, gs://, az://, file://, http(s):// with an index page).

Objects are listed once per run with their size and ETag / modification time (one paged LIST on
object stores), so an unchanged bucket costs a listing and a database comparison, no reads.
Credentials come from each backend's standard environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS,
AZURE_STORAGE_*), never from the command line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from retrieval.errors import CorpusError
from retrieval.imaging.scan import IMAGE_EXTENSIONS, ScanEntry
from retrieval.sources.base import ReadFailure, ReadLimits, Source, SourceReader, read_bounded, with_retries

logger = logging.getLogger(__name__)

_FILESYSTEMS: dict[tuple[int, str], Any] = {}


def split_protocol(url: str) -> tuple[str, str]:
    protocol, _, rest = url.partition("://")
    return protocol.lower(), rest


def storage_options(protocol: str, limits: ReadLimits) -> dict[str, Any]:
    """Timeouts for the backends that take them; everything else from the backend's environment."""
    if protocol in ("s3", "s3a"):
        # No listings cache: a run must see the bucket as it is now (a cached ETag makes s3fs send
        # If-Match with a stale tag and the read fails with 412).
        return {"config_kwargs": {"connect_timeout": limits.timeout_s, "read_timeout": limits.timeout_s,
                                  "retries": {"max_attempts": 1}}, "use_listings_cache": False}
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=limits.timeout_s)}}
    return {"use_listings_cache": False} if protocol in ("gs", "gcs", "az", "abfs") else {}


def filesystem(protocol: str, limits: ReadLimits) -> Any:
    """One fsspec filesystem per process and protocol (forked decode workers make their own)."""
    key = (os.getpid(), protocol)
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        try:
            import fsspec
        except ImportError:
            raise CorpusError("reading URLs needs fsspec: pip install 'retrieval[sources]'") from None
        try:
            fs = fsspec.filesystem(protocol, skip_instance_cache=True, **storage_options(protocol, limits))
        except (ImportError, ValueError) as exc:
            raise CorpusError(f"no fsspec backend for {protocol}:// ({exc}); e.g. pip install s3fs / gcsfs / adlfs") from None
        _FILESYSTEMS[key] = fs
    return fs


def read_http(url: str, limits: ReadLimits) -> bytes:
    """GET `url` with a timeout, streamed, bounded; retried on transient errors."""
    import httpx

    def once() -> bytes:
        with httpx.stream("GET", url, timeout=limits.timeout_s, follow_redirects=True) as response:
            if response.status_code >= 400:
                raise httpx.HTTPStatusError(f"HTTP {response.status_code}", request=response.request,
                                            response=response)
            declared = response.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > limits.max_bytes:
                raise ReadFailure("too_large", f"larger than the read limit of {limits.max_bytes} bytes")
            return read_bounded(_Chunks(response.iter_bytes()), limits.max_bytes)

    return with_retries(once, limits, url)


class _Chunks:
    """A file-like .read() over an iterator of byte chunks."""

    def __init__(self, chunks: Iterator[bytes]):
        self.chunks = chunks

    def read(self, _n: int = -1) -> bytes:
        return next(self.chunks, b"")


def read_url(url: str, limits: ReadLimits, size: int = -1) -> bytes:
    """The bytes of any URL (http(s) through httpx, anything else through fsspec), bounded and retried."""
    if size > limits.max_bytes:
        raise ReadFailure("too_large", f"{size} bytes: larger than the read limit of {limits.max_bytes} bytes")
    protocol, rest = split_protocol(url)
    if protocol in ("http", "https"):
        return read_http(url, limits)
    if protocol == "file":
        protocol, rest = "file", "/" + rest.lstrip("/")
    fs = filesystem(protocol, limits)

    def once() -> bytes:
        with fs.open(rest, "rb", block_size=min(max(size, 0), limits.max_bytes) or None) as f:
            return read_bounded(f, limits.max_bytes)

    return with_retries(once, limits, url)


class UrlReader(SourceReader):
    def __init__(self, limits: ReadLimits):
        self.limits = limits

    def read(self, path: str, size: int = -1) -> bytes:
        return read_url(path, self.limits, size)


def _mtime_ns(info: dict[str, Any]) -> int:
    for key in ("LastModified", "last_modified", "updated", "mtime", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, datetime):
            return int(value.timestamp() * 1e9)
        if isinstance(value, (int, float)):
            return int(value * 1e9)
        try:
            return int(datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp() * 1e9)
        except ValueError:
            continue
    return 0


def _etag(info: dict[str, Any]) -> str | None:
    for key in ("ETag", "etag", "md5Hash", "content_md5"):
        value = info.get(key)
        if value:
            return str(value).strip('"')[:128]
    return None


def is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


class PrefixSource(Source):
    """Every image object under a URL prefix; each image's path is its full URI."""

    kind = "prefix"

    def __init__(self, url: str, limits: ReadLimits | None = None):
        self.limits = limits or ReadLimits.from_env()
        self.uri = url.rstrip("/")
        self.protocol, self.root = split_protocol(self.uri)
        if self.protocol == "file":
            self.root = "/" + self.root.lstrip("/")

    def _full(self, path: str) -> str:
        if self.protocol in ("http", "https"):
            return path if "://" in path else f"{self.protocol}://{path}"
        return f"{self.protocol}://{path.lstrip('/') if self.protocol != 'file' else path}"

    def _listing(self) -> dict[str, dict[str, Any]]:
        fs = filesystem(self.protocol, self.limits)
        target = self.uri if self.protocol in ("http", "https") else self.root
        try:
            found = fs.find(target + "/", detail=True)
        except FileNotFoundError:
            raise CorpusError(f"{self.uri} does not exist or cannot be listed") from None
        except Exception as exc:  # noqa: BLE001 - one line for the user, whatever the backend says
            raise CorpusError(f"cannot list {self.uri}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        return found

    def scan(self, cache_dir: Path | None = None, exclude: tuple[Path, ...] = ()) -> Iterator[ScanEntry]:
        found = self._listing()
        for path in sorted(found):
            info = found[path]
            if info.get("type") == "directory" or not is_image_name(path):
                continue
            uri = self._full(path)
            size = info.get("size")
            if size is None and self.protocol in ("http", "https"):
                info = self._head(uri)
                size = info.get("size")
            yield ScanEntry(uri, int(size) if size is not None else 0, _mtime_ns(info), etag=_etag(info))

    def _head(self, uri: str) -> dict[str, Any]:
        import httpx

        try:
            r = httpx.head(uri, timeout=self.limits.timeout_s, follow_redirects=True)
        except httpx.HTTPError:
            return {}
        length = r.headers.get("content-length")
        return {"size": int(length) if length and length.isdigit() else None, "ETag": r.headers.get("etag"),
                "last_modified": _http_date(r.headers.get("last-modified"))}

    def reader(self) -> UrlReader:
        return UrlReader(self.limits)

    def owns(self, path: str) -> bool:
        return path.startswith(self.uri + "/") and "/../" not in path[len(self.uri):]


def _http_date(value: str | None) -> float | None:
    if not value:
        return None
    from email.utils import parsedate_to_datetime

    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
