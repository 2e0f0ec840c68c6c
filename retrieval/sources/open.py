"""What a corpus argument means: a folder, a list, shards or a URL prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retrieval.errors import CorpusError
from retrieval.sources.base import Source


def open_source(spec: str | Path) -> Source:
    """The source a corpus argument names.

    * `*.tar` / a glob or brace pattern of them (local or remote): WebDataset shards;
    * `*.txt`, `*.csv`, `*.tsv`, `*.parquet` (local or remote): a list of paths or URLs;
    * `s3://`, `gs://`, `az://`, `http(s)://`, `file://` and other fsspec URLs: every image under the prefix;
    * anything else: a local folder (today's behaviour and error messages).
    """
    from retrieval.sources.folder import FolderSource
    from retrieval.sources.lists import ListSource, is_list
    from retrieval.sources.remote import PrefixSource
    from retrieval.sources.shards import ShardSource, is_shard_pattern

    text = str(spec)
    if "://" not in text and Path(text).is_dir():
        return FolderSource(Path(text))  # a folder, whatever its name looks like
    if is_shard_pattern(text):
        return ShardSource(text)
    if is_list(text) and ("://" in text or Path(text).is_file()):
        return ListSource(text)
    if "://" in text:
        protocol = text.split("://", 1)[0].lower()
        if not protocol.isidentifier() and protocol not in ("s3a",):
            raise CorpusError(f"{text} is not a URL fsspec understands")
        return PrefixSource(text)
    folder = Path(text)
    if not folder.exists():
        raise CorpusError(f"corpus folder {folder} does not exist")
    if not folder.is_dir():
        raise CorpusError(f"corpus path {folder} is not a folder (nor a .txt/.csv/.parquet list or .tar shards)")
    return FolderSource(folder)


def source_from_meta(meta: dict[str, Any]) -> Source:
    """The source an index was built from (a folder when the index predates sources)."""
    from retrieval.sources.folder import FolderSource

    recorded = meta.get("source")
    if not recorded or recorded.get("kind") == "folder":
        return FolderSource(Path(meta.get("corpus_root") or "."))
    uri = recorded["uri"]
    kind = recorded["kind"]
    if kind == "shards":
        from retrieval.sources.shards import ShardSource

        return ShardSource(uri)
    if kind == "list":
        from retrieval.sources.lists import ListSource

        return _lazy_list(ListSource, uri)
    from retrieval.sources.remote import PrefixSource

    return PrefixSource(uri)


def _lazy_list(cls: Any, uri: str) -> Source:
    """A list source that still reads its images after the list file itself was moved away."""
    try:
        return cls(uri)
    except CorpusError:
        source = cls.__new__(cls)
        from retrieval.sources.base import ReadLimits

        source.limits, source.remote, source.uri = ReadLimits.from_env(), "://" in uri, uri
        source.base = uri.rsplit("/", 1)[0]
        return source


def source_id(spec: str | Path) -> str:
    """A stable name for a corpus argument: a local path resolved, a URL or pattern as written."""
    text = str(spec)
    return text if "://" in text else str(Path(text).resolve())


def open_aux_source(spec: str | Path, what: str) -> Source:
    """A reference or query set (`dedup --against`, `curate --queries`): any source, folders as before."""
    from retrieval.errors import RetrievalError

    text = str(spec)
    try:
        return open_source(text)
    except CorpusError as exc:
        if "://" not in text and not Path(text).is_file():
            raise RetrievalError(f"{what} folder {text} does not exist or is not a folder") from None
        raise RetrievalError(f"{what}: {exc}") from None
