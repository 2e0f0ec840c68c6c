"""A local folder: today's corpus. Paths are relative to the folder; decoding reads the files directly."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from retrieval.imaging.scan import ScanEntry, scan_corpus
from retrieval.layout import is_within
from retrieval.sources.base import Batches, ReadFailure, Source, SourceReader


class LocalReader(SourceReader):
    def __init__(self, root: str):
        self.root = root

    def read(self, path: str, size: int = -1) -> bytes:
        full = os.path.join(self.root, path)
        if not is_within(full, self.root):
            raise ReadFailure("unreadable", "the path leaves the corpus folder")
        try:
            with open(full, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ReadFailure("vanished", "the file was deleted") from None
        except OSError as exc:
            raise ReadFailure("io_error", f"cannot read the file: {exc.strerror or exc}") from None


class FolderSource(Source):
    kind = "folder"
    writable = True

    def __init__(self, root: Path | str):
        self.local_root = Path(root)
        self.uri = str(self.local_root.resolve())

    def scan(self, cache_dir: Path | None = None, exclude: tuple[Path, ...] = ()) -> Iterator[ScanEntry]:
        return scan_corpus(self.local_root, exclude=exclude)

    def reader(self) -> LocalReader:
        return LocalReader(self.uri)

    def owns(self, path: str) -> bool:
        return is_within(os.path.join(self.uri, path), self.uri)

    def decode_stream(self, items: Sequence[Any], run: Callable[[Any, Sequence[Any]], Batches]) -> Batches:
        # The decoder's own local read path (a plain string root), exactly as before sources existed.
        yield from run(self.uri, items)
