"""WebDataset tar shards, local or remote, named by a glob or a brace pattern.

A member is an image when its extension is an image extension; its `.json` / `.txt` / `.cls`
sidecars (same key, WebDataset's naming: key = the name up to the first dot) are kept as its
metadata. An image's path is `<shard>#<member>`, the shard relative to the pattern's folder for
local shards, its full URI for remote ones.

Listing a shard reads its tar headers once; the listing is cached in the index folder under the
shard's size and ETag/mtime, so an unchanged shard is never read again by an incremental run.
Decoding streams each shard that has work sequentially once (no random access), one shard ahead
of the decoder, into a small staging folder that is emptied shard by shard.

A new remote shard is fetched once, not twice: listing it streams the whole shard in one
sequential read (one GET) and keeps the bytes in a local spool file, which the decoder then
streams instead of the network. The spool is bounded (RETRIEVAL_SHARD_SPOOL_BYTES, default 4GiB,
0 turns it off); shards past the bound are listed by the same one-pass stream and fetched again
when decoded.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from retrieval.errors import CorpusError, ReadFailure
from retrieval.imaging.scan import IMAGE_EXTENSIONS, ScanEntry
from retrieval.layout import atomic_write_bytes, is_within
from retrieval.sources.base import (
    Batches,
    ReadLimits,
    Source,
    SourceReader,
    StagedReader,
    classify,
    staged_stream,
)
from retrieval.sources.remote import _etag, _mtime_ns, filesystem, split_protocol

logger = logging.getLogger(__name__)

SIDECARS = (".json", ".txt", ".cls", ".caption")
MAX_SIDECAR_BYTES = 1 << 20
LISTING_CACHE = "shard-listings"
DEFAULT_SPOOL_BYTES = 4 << 30


def spool_budget() -> int:
    """RETRIEVAL_SHARD_SPOOL_BYTES: local disk that listed remote shards may occupy until decoded."""
    from retrieval.settings import parse_size

    value = os.environ.get("RETRIEVAL_SHARD_SPOOL_BYTES")
    if value is not None and value.strip() == "0":
        return 0
    try:
        return DEFAULT_SPOOL_BYTES if value is None else parse_size(value)
    except ValueError as exc:
        raise CorpusError(f"bad RETRIEVAL_SHARD_SPOOL_BYTES: {exc}") from None


class _Tee:
    """A file-like .read() that also writes what it returns to `sink` (until `sink` is dropped)."""

    def __init__(self, source: Any, sink: Any):
        self.source, self.sink = source, sink

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n)
        if self.sink is not None and data:
            self.sink.write(data)
        return data


def is_shard_pattern(spec: str) -> bool:
    return bool(re.search(r"\.tar(\.gz)?$|\.tar\}?$", spec.lower())) or (".tar" in spec.lower() and "{" in spec)


def braceexpand(pattern: str) -> list[str]:
    """`a{000..002}b` -> a000b a001b a002b (zero padding kept); `{x,y}` alternatives; nested braces."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        a, b = rng.groups()
        width = len(a) if a.startswith("0") or len(a) == len(b) else 0
        options = [str(i).zfill(width) for i in range(int(a), int(b) + 1)]
    else:
        options = body.split(",")
    return [x for o in options for x in braceexpand(head + o + tail)]


def split_member(name: str) -> tuple[str, str]:
    """WebDataset key and extension: `dir/000123_0042.jpg` -> (`dir/000123_0042`, `.jpg`)."""
    folder, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), (dot + ext).lower()


def _is_image_ext(ext: str) -> bool:
    return os.path.splitext("x" + ext)[1].lower() in IMAGE_EXTENSIONS


class ShardSource(Source):
    kind = "shards"

    def __init__(self, pattern: str, limits: ReadLimits | None = None):
        self.limits = limits or ReadLimits.from_env()
        self.pattern = pattern
        self.remote = "://" in pattern and not pattern.startswith("file://")
        if self.remote:
            self.protocol, _ = split_protocol(pattern)
            self.uri = pattern
            self.base = ""
        else:
            self.protocol = "file"
            local = pattern[len("file://"):] if pattern.startswith("file://") else pattern
            literal = re.split(r"[\[*?{]", local, maxsplit=1)[0]
            base = Path(literal if literal.endswith("/") else os.path.dirname(literal) or ".").resolve()
            self.base = str(base)
            self.uri = os.path.join(self.base, os.path.relpath(os.path.abspath(local), self.base)) \
                if not os.path.isabs(local) else local
        self._spooled: dict[str, str] = {}  # shard id -> local copy made while listing it
        self._spool_dir: str | None = None
        self._spool_left = 0

    # --- naming -------------------------------------------------------------------------------
    def shard_id(self, location: str) -> str:
        """How a shard appears in image paths: relative to the pattern's folder, or its URI."""
        if self.remote:
            return location if "://" in location else f"{self.protocol}://{location}"
        return os.path.relpath(location, self.base).replace(os.sep, "/")

    def location(self, shard_id: str) -> str:
        if self.remote:
            return shard_id
        return os.path.join(self.base, shard_id)

    def owns(self, path: str) -> bool:
        shard, sep, _ = path.partition("#")
        if not sep or not shard.lower().endswith((".tar", ".tar.gz")) or "/../" in f"/{shard}/":
            return False
        return shard.startswith(self.uri.split("{")[0].split("*")[0].rsplit("/", 1)[0]) if self.remote \
            else is_within(self.location(shard), self.base)

    # --- listing ------------------------------------------------------------------------------
    def shards(self) -> list[tuple[str, dict[str, Any]]]:
        """(location, info with size / ETag / mtime) of every shard, sorted; a missing shard is an error."""
        out: dict[str, dict[str, Any]] = {}
        for pattern in braceexpand(self.pattern if self.remote else self.uri):
            if self.remote:
                fs = filesystem(self.protocol, self.limits)
                _, rest = split_protocol(pattern)
                target = pattern if self.protocol in ("http", "https") else rest
                try:
                    if globlib.has_magic(rest):
                        for path, info in fs.glob(target, detail=True).items():
                            out[self.shard_id(path)] = info
                    else:
                        out[pattern] = fs.info(target)
                except FileNotFoundError:
                    raise CorpusError(f"shard {pattern} does not exist") from None
                except Exception as exc:  # noqa: BLE001
                    raise CorpusError(f"cannot list {pattern}: {type(exc).__name__}: {exc}") from None
            else:
                matches = sorted(globlib.glob(pattern)) if globlib.has_magic(pattern) else [pattern]
                for path in matches:
                    try:
                        st = os.stat(path)
                    except OSError:
                        raise CorpusError(f"shard {path} does not exist") from None
                    out[path] = {"size": st.st_size, "mtime": st.st_mtime}
        if not out:
            raise CorpusError(f"no shard matches {self.pattern}")
        return sorted(out.items())

    def _open(self, location: str, block_size: int | None = None) -> Any:
        if not self.remote:
            return open(location, "rb")
        fs = filesystem(self.protocol, self.limits)
        _, rest = split_protocol(location)
        target = location if self.protocol in ("http", "https") else rest
        return fs.open(target, "rb", block_size=block_size) if block_size else fs.open(target, "rb")

    def list_members(self, location: str, size: int = -1) -> list[tuple[str, int, int, int]]:
        """(member name, size, mtime_ns, data offset) of every regular member, from the tar headers.

        A remote shard is read as one sequential stream; while the spool budget lasts its bytes are
        kept, so that decoding it later reads the local copy instead of fetching it again.
        """
        if not self.remote:
            with self._open(location, block_size=1 << 16) as f, tarfile.open(fileobj=f, mode="r:*") as tar:
                return [(m.name, m.size, int(m.mtime * 1e9), m.offset_data) for m in tar if m.isreg()]
        sid = self.shard_id(location)
        self._drop_spool(sid)
        keep = 0 < size <= self._spool_left  # an unknown size (0) is never spooled: the budget holds
        spool = self._spool_path(sid) if keep else None
        sink = open(spool, "wb") if spool else None
        try:
            with self._open(location, block_size=8 << 20) as f:
                tee = _Tee(f, sink)
                with tarfile.open(fileobj=tee, mode="r|*") as tar:
                    members = [(m.name, m.size, int(m.mtime * 1e9), m.offset_data) for m in tar if m.isreg()]
                if sink is not None:
                    while tee.read(1 << 20):  # the end-of-archive blocks: the copy is the whole shard
                        pass
        except BaseException:
            if sink is not None:
                sink.close()
                os.unlink(spool)  # type: ignore[arg-type]
            raise
        if sink is not None:
            sink.close()
            self._spooled[sid] = spool  # type: ignore[assignment]
            self._spool_left -= os.path.getsize(spool)  # type: ignore[arg-type]
        return members

    def _spool_path(self, sid: str) -> str:
        if self._spool_dir is None:
            self._spool_dir = tempfile.mkdtemp(prefix="retrieval-shard-spool-")
            weakref.finalize(self, shutil.rmtree, self._spool_dir, True)  # whatever happens to the run
        return os.path.join(self._spool_dir, hashlib.sha1(sid.encode()).hexdigest() + ".tar")

    def _drop_spool(self, sid: str) -> None:
        path = self._spooled.pop(sid, None)
        if path is not None:
            try:
                self._spool_left += os.path.getsize(path)
                os.unlink(path)
            except OSError:
                pass

    def scan(self, cache_dir: Path | None = None, exclude: tuple[Path, ...] = ()) -> Iterator[ScanEntry]:
        cache = _ListingCache(cache_dir / LISTING_CACHE if cache_dir is not None else None)
        for sid in list(self._spooled):
            self._drop_spool(sid)
        self._spool_left = spool_budget() if self.remote else 0
        for location, info in self.shards():
            sid = self.shard_id(location)
            size = int(info.get("size") or 0)
            etag = _etag(info) or f"{size}-{_mtime_ns(info)}"
            members = cache.get(sid, size, etag)
            if members is None:
                try:
                    members = self.list_members(location, size)
                except Exception as exc:  # noqa: BLE001 - an unreadable shard is one recorded failure
                    kind, reason, _ = classify(exc)
                    if isinstance(exc, tarfile.TarError):
                        kind, reason = "corrupt", f"not a readable tar shard: {exc}"
                    logger.warning("shard %s skipped: %s", sid, reason)
                    yield ScanEntry(f"{sid}#", -1, 0, etag=etag, meta={"read_error": reason, "kind": kind})
                    continue
                cache.put(sid, size, etag, members)
            for name, msize, mtime, offset in members:
                key, ext = split_member(name)
                if _is_image_ext(ext) and not os.path.basename(key).startswith("."):
                    yield ScanEntry(f"{sid}#{name}", msize, mtime, etag=etag, meta={"tar_offset": offset})

    # --- reading ------------------------------------------------------------------------------
    def reader(self) -> SourceReader:
        return _RandomAccessReader(self)

    def read_bytes(self, path: str) -> bytes:
        return self.reader().read(path)

    def stage(self, shard_id: str, wanted: set[str], folder: Path) -> StagedReader:
        """One sequential pass over a shard: the wanted members to `folder`, their sidecars as metadata."""
        files: dict[str, str] = {}
        metas: dict[str, dict[str, Any]] = {}
        wanted_keys = {split_member(p.partition("#")[2])[0] for p in wanted}
        attempt = 0
        while True:
            try:
                self._stream(shard_id, wanted, wanted_keys, folder, files, metas)
                break
            except Exception as exc:  # noqa: BLE001 - a shard that cannot be read fails its members, not the run
                kind, reason, transient = classify(exc)
                if isinstance(exc, tarfile.TarError):
                    kind, reason, transient = "corrupt", f"the shard is not a readable tar: {exc}", False
                if transient and attempt < self.limits.retries:
                    import time

                    time.sleep(self.limits.backoff_s * 2**attempt)
                    attempt += 1
                    continue
                errors = {p: (kind, f"shard {shard_id}: {reason}") for p in wanted if p not in files}
                self._drop_spool(shard_id)
                return StagedReader(files, errors, _attach(metas, wanted))
        errors = {p: ("vanished", f"not in shard {shard_id} any more") for p in wanted if p not in files}
        self._drop_spool(shard_id)
        return StagedReader(files, errors, _attach(metas, wanted))

    def _stream(self, shard_id: str, wanted: set[str], wanted_keys: set[str], folder: Path,
                files: dict[str, str], metas: dict[str, dict[str, Any]]) -> None:
        spooled = self._spooled.get(shard_id)
        opened = open(spooled, "rb") if spooled else self._open(self.location(shard_id), block_size=8 << 20)
        with opened as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                path = f"{shard_id}#{member.name}"
                key, ext = split_member(member.name)
                if key not in wanted_keys and len(files) >= len(wanted) and wanted.issubset(files):
                    break  # every wanted member and the sidecars of its sample are behind us: stop reading
                if path in wanted and path not in files:
                    if member.size > self.limits.max_bytes:
                        continue  # read() reports it; the stream skips its bytes
                    target = folder / hashlib.sha1(path.encode()).hexdigest()
                    with tar.extractfile(member) as src, open(target, "wb") as dst:  # type: ignore[union-attr]
                        shutil.copyfileobj(src, dst)
                    files[path] = str(target)
                elif ext in SIDECARS and key in wanted_keys and member.size <= MAX_SIDECAR_BYTES:
                    with tar.extractfile(member) as src:  # type: ignore[union-attr]
                        text = src.read().decode("utf-8", "replace")
                    value: Any = text
                    if ext == ".json":
                        try:
                            value = json.loads(text)
                        except ValueError:
                            pass
                    metas.setdefault(key, {})[ext.lstrip(".")] = value

    def decode_stream(self, items: Sequence[Any], run: Callable[[Any, Sequence[Any]], Batches]) -> Batches:
        """Each shard with work is streamed once by a background thread, one shard ahead, then decoded."""
        groups: dict[str, list[Any]] = {}
        for item in items:
            groups.setdefault(item.path.partition("#")[0], []).append(item)
        yield from staged_stream(list(groups.items()),
                                 lambda group, folder: self.stage(group[0], {it.path for it in group[1]}, folder),
                                 run, items_of=lambda group: group[1])


def _attach(metas: dict[str, dict[str, Any]], wanted: set[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for p in wanted:
        key = split_member(p.partition("#")[2])[0]
        if key in metas:
            out[p] = metas[key]
    return out


class _RandomAccessReader(SourceReader):
    """One member by its path, for the API and reports (never the indexer: it stages shards)."""

    def __init__(self, source: ShardSource):
        self.source = source
        self.limits = source.limits

    def read(self, path: str, size: int = -1) -> bytes:
        shard, _, name = path.partition("#")
        try:
            with self.source._open(self.source.location(shard), block_size=1 << 16) as f, \
                    tarfile.open(fileobj=f, mode="r:*") as tar:
                member = tar.getmember(name)
                if member.size > self.limits.max_bytes:
                    raise ReadFailure("too_large", f"larger than the read limit of {self.limits.max_bytes} bytes")
                data = tar.extractfile(member)
                if data is None:
                    raise ReadFailure("unreadable", "not a regular file in the shard")
                return data.read()
        except KeyError:
            raise ReadFailure("vanished", f"not in shard {shard} any more") from None
        except ReadFailure:
            raise
        except Exception as exc:  # noqa: BLE001
            kind, reason, _ = classify(exc)
            raise ReadFailure(kind, reason) from None


class _ListingCache:
    """Shard listings by (shard, size, etag), one small JSON file per shard."""

    def __init__(self, folder: Path | None):
        self.folder = folder

    def _file(self, sid: str) -> Path | None:
        return None if self.folder is None else self.folder / (hashlib.sha1(sid.encode()).hexdigest() + ".json")

    def get(self, sid: str, size: int, etag: str) -> list[tuple[str, int, int, int]] | None:
        f = self._file(sid)
        if f is None:
            return None
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            return None
        if data.get("size") != size or data.get("etag") != etag:
            return None
        return [tuple(m) for m in data["members"]]  # type: ignore[misc]

    def put(self, sid: str, size: int, etag: str, members: list[tuple[str, int, int, int]]) -> None:
        f = self._file(sid)
        if f is None:
            return
        data = json.dumps({"shard": sid, "size": size, "etag": etag, "members": members}).encode()
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(f, data)
        except OSError as exc:
            logger.warning("cannot cache the listing of %s: %s", sid, exc)
