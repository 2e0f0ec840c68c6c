"""A list of images: a .txt file (one path or URL a line), a CSV/TSV or a Parquet file.

img2dataset's columns are understood: `url` holds the image (else `path`, `image`, `filepath`,
`image_path`, or the first column), `key` its name; every other column (caption, license, ...) is
kept as the image's metadata. Local paths in a list are resolved against the list's folder and
stored absolute; URLs are stored as they are. A URL is taken to be immutable: an incremental run
does not fetch it again while it stays in the list (local paths are compared by size and mtime).
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from retrieval.errors import CorpusError
from retrieval.imaging.scan import ScanEntry
from retrieval.sources.base import ReadLimits, Source, SourceReader
from retrieval.sources.remote import read_url

LIST_SUFFIXES = (".txt", ".lst", ".csv", ".tsv", ".parquet")
PATH_COLUMNS = ("url", "path", "image", "filepath", "image_path", "file")
PARQUET_BATCH = 65_536


def is_list(spec: str) -> bool:
    return spec.lower().endswith(LIST_SUFFIXES)


class ListReader(SourceReader):
    def __init__(self, limits: ReadLimits):
        self.limits = limits

    def read(self, path: str, size: int = -1) -> bytes:
        if "://" in path:
            return read_url(path, self.limits, size)
        return read_url("file://" + path, self.limits, size)


class ListSource(Source):
    """The images a list names, in list order; duplicates of a path are listed once."""

    kind = "list"

    def __init__(self, spec: str, limits: ReadLimits | None = None):
        self.limits = limits or ReadLimits.from_env()
        self.remote = "://" in spec and not spec.startswith("file://")
        if self.remote:
            self.uri = spec
            self.base = spec.rsplit("/", 1)[0]
        else:
            local = Path(spec[len("file://"):] if spec.startswith("file://") else spec)
            if not local.is_file():
                raise CorpusError(f"list file {local} does not exist")
            self.uri = str(local.resolve())
            self.base = str(local.resolve().parent)

    def _open(self, mode: str = "rb") -> Any:
        if self.remote:
            from retrieval.sources.remote import filesystem, split_protocol

            protocol, rest = split_protocol(self.uri)
            fs = filesystem(protocol, self.limits)
            try:
                return fs.open(self.uri if protocol in ("http", "https") else rest, mode)
            except FileNotFoundError:
                raise CorpusError(f"list {self.uri} does not exist") from None
        return open(self.uri, mode)

    def rows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(path or URL as written, metadata columns) for each row."""
        lower = self.uri.lower()
        if lower.endswith(".parquet"):
            yield from self._parquet_rows()
        elif lower.endswith((".csv", ".tsv")):
            yield from self._csv_rows("\t" if lower.endswith(".tsv") else ",")
        else:
            with self._open() as f:
                for raw in f:
                    line = raw.decode("utf-8", "replace").strip()
                    if line and not line.startswith("#"):
                        yield line, {}

    def _csv_rows(self, delimiter: str) -> Iterator[tuple[str, dict[str, Any]]]:
        import io

        with self._open() as raw:
            reader = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline=""), delimiter=delimiter)
            column = _path_column(reader.fieldnames or [], self.uri)
            for row in reader:
                value = (row.pop(column) or "").strip()
                if value:
                    yield value, {k: v for k, v in row.items() if k is not None}

    def _parquet_rows(self) -> Iterator[tuple[str, dict[str, Any]]]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise CorpusError("reading Parquet lists needs pyarrow: pip install 'retrieval[sources]'") from None
        with self._open() as f:
            try:
                table = pq.ParquetFile(f)
            except Exception as exc:  # noqa: BLE001 - a broken list is one line for the user
                raise CorpusError(f"{self.uri} is not a readable Parquet file: {exc}") from None
            column = _path_column(table.schema_arrow.names, self.uri)
            for batch in table.iter_batches(batch_size=PARQUET_BATCH):
                data = batch.to_pydict()
                paths = data.pop(column)
                for i, value in enumerate(paths):
                    if value:
                        yield str(value).strip(), {k: _plain(v[i]) for k, v in data.items()}

    def _resolve(self, value: str) -> str:
        if "://" in value:
            return value[len("file://"):] if value.startswith("file://") else value
        if self.remote:
            return f"{self.base}/{value}"
        return os.path.normpath(os.path.join(self.base, os.path.expanduser(value)))

    def scan(self, cache_dir: Path | None = None, exclude: tuple[Path, ...] = ()) -> Iterator[ScanEntry]:
        seen: set[str] = set()
        for value, meta in self.rows():
            path = self._resolve(value)
            if path in seen:
                continue
            seen.add(path)
            meta = {k: v for k, v in meta.items() if v not in (None, "")} or None
            if "://" in path:
                yield ScanEntry(path, 0, 0, meta=meta)
                continue
            try:
                st = os.stat(path)
                yield ScanEntry(path, st.st_size, st.st_mtime_ns, meta=meta)
            except OSError:
                yield ScanEntry(path, -1, 0, meta=meta)

    def reader(self) -> ListReader:
        return ListReader(self.limits)

    def owns(self, path: str) -> bool:
        """Only what the list names is served (the set is read once per source object)."""
        members = getattr(self, "_members", None)
        if members is None:
            try:
                members = {self._resolve(value) for value, _ in self.rows()}
            except (CorpusError, OSError):
                members = set()  # the list is gone: nothing can be checked, nothing is served
            self._members = members
        return path in members

    def content_digest(self) -> str:
        h = hashlib.sha256()
        with self._open() as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()


def _path_column(names: list[str], where: str) -> str:
    if not names:
        raise CorpusError(f"{where} has no columns")
    lowered = {n.lower(): n for n in names}
    for candidate in PATH_COLUMNS:
        if candidate in lowered:
            return lowered[candidate]
    return names[0]


def _plain(value: Any) -> Any:
    """JSON-safe metadata values."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)
