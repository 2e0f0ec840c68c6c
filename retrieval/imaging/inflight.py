"""On disk, which file each decoding process is working on, so that a crash names its culprit.

A decoder that crashes on a hostile file (a segfault in a C codec, an out-of-memory kill) takes
its whole process with it: no exception, no `finally`. So before decoding a file, the decoding
process writes the file's corpus-relative path to `<folder>/<pid>`, and empties it afterwards. A
marker left non-empty names the file that was being decoded when its process died:

* a DataLoader worker: the pipeline notices at once (retrieval.imaging.loader) and decodes the files named
  by markers in isolation (retrieval.imaging.isolate), so the crash costs that file only;
* the main process (`--workers 0`, the default on small machines): the run dies, and the next run
  finds the marker and decodes that file in isolation before anything else.

A process killed for another reason (Ctrl-C is cleaned up; SIGKILL is not) leaves a marker naming
an innocent file; decoding it in isolation then simply succeeds. The writes are not fsynced: the
page cache survives a process crash, which is all this protects against. Each process keeps its
marker open and overwrites it in place (path, then a NUL; clearing writes a NUL first): two
pwrite() calls per file, ~10 us. Truncating instead costs milliseconds on ext4, which flushes a
file truncated to zero when it is closed.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

logger = logging.getLogger(__name__)

_EMPTY = b"\0"


class InflightMarkers:
    """One small file per decoding process, named by its pid. Picklable, so DataLoader workers can use it."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._fds: dict[int, int] = {}  # pid -> open marker; a forked child opens its own

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "_fds": {}}

    def _fd(self) -> int:
        pid = os.getpid()
        fd = self._fds.get(pid)
        if fd is None:
            fd = self._fds[pid] = os.open(self.folder / str(pid), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        return fd

    @contextmanager
    def decoding(self, path: str) -> Iterator[None]:
        """Mark `path` as being decoded by this process for the duration of the block."""
        fd = self._fd()
        os.pwrite(fd, os.fsencode(path) + _EMPTY, 0)
        try:
            yield
        finally:  # an exception (Ctrl-C included) is not a crash: the file is not to blame
            os.pwrite(fd, _EMPTY, 0)

    def snapshot(self) -> dict[str, str]:
        """{marker name: path} of every marker that names a file: decodings that never finished."""
        out: dict[str, str] = {}
        for name, content in self._read_all():
            path = content.split(_EMPTY, 1)[0]
            if path:
                out[name] = os.fsdecode(path)
        return out

    def discard(self, names: Iterable[str]) -> None:
        self.close()  # our own marker may be among them; the next decoding() recreates it
        for name in names:
            try:
                os.unlink(self.folder / name)
            except FileNotFoundError:
                pass

    def clean(self) -> None:
        """Remove the markers that name no file (processes that finished theirs); the others stay."""
        self.discard(name for name, content in self._read_all() if not content.split(_EMPTY, 1)[0])

    def __enter__(self) -> "InflightMarkers":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close this process's open markers (they stay on disk)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _read_all(self) -> list[tuple[str, bytes]]:
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return []
        out = []
        for entry in entries:
            try:
                with open(entry.path, "rb") as f:
                    out.append((entry.name, f.read(65_536)))
            except OSError:
                continue
        return out
