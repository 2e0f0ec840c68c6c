"""Where things live inside an index directory.

One index directory holds everything derived from one corpus: the SQLite database, the fp16
vector file and the FAISS index. It never lives inside a read-only corpus: the default is
./retrieval-index in the current directory, so `index`, `search`, `info` and `serve` run from the
same place find it again without flags.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from retrieval.errors import RetrievalError


@dataclass(frozen=True)
class IndexLayout:
    root: Path

    @property
    def db_path(self) -> Path:
        return self.root / "retrieval.db"

    @property
    def vectors_path(self) -> Path:
        return self.vectors_for("search")

    @property
    def legacy_vectors_path(self) -> Path:
        """The headerless fp16 file of index folders from before the `.npy` format (retrieval.vectors)."""
        return self.root / "vectors.f16"

    @property
    def faiss_path(self) -> Path:
        return self.faiss_for("search")

    def vectors_for(self, role: str) -> Path:
        """The fp16 `.npy` vector file of an embedder role: vectors.npy (search), vectors-copy.npy (copy)."""
        return self.root / ("vectors.npy" if role == "search" else f"vectors-{role}.npy")

    def faiss_for(self, role: str) -> Path:
        """The FAISS file of an embedder role: index.faiss (search), index-copy.faiss (copy)."""
        return self.root / ("index.faiss" if role == "search" else f"index-{role}.faiss")

    @property
    def decoding_dir(self) -> Path:
        """In-flight markers of the decode processes (retrieval.imaging.inflight): what a crash was decoding."""
        return self.root / "decoding"

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    def default_db_url(self) -> str:
        return f"sqlite:///{self.db_path.resolve()}"

    def exists(self) -> bool:
        return self.db_path.exists()


class ReadOnlyIndexError(RetrievalError):
    """A writing command on an index folder it cannot write (read-only media, permissions)."""

    def __init__(self, folder: Path, exc: OSError):
        super().__init__(f"the index folder {folder} is read-only ({exc.strerror or exc}); this command writes "
                         f"to the index: run it on a writable copy (search, info, verify and serve only read)")


class IndexLock:
    """An exclusive advisory lock on the index directory for writers.

    POSIX record locks (lockf) vanish with the process, so a SIGKILLed run never leaves a stale
    lock behind, and unlike flock they are not inherited by forked decode workers, which may
    outlive a killed parent by a few seconds.
    """

    def __init__(self, layout: IndexLayout):
        self._path = layout.lock_path
        self._fd: int | None = None

    def __enter__(self) -> "IndexLock":
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self._path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as exc:
            raise ReadOnlyIndexError(self._path.parent, exc) from None
        try:
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            os.close(self._fd)
            self._fd = None
            raise RetrievalError(
                f"another `retrieval` process is writing to {self._path.parent}; wait for it to finish", "conflict"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.lockf(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def remove_stale_temporaries(root: Path) -> list[str]:
    """Delete what an interrupted or failed write left in the index folder: temporary files
    (`.<name>.tmp-<pid>`), the shard work folders of an on-disk merge (`.<lists>.shards-*`), and the
    on-disk lists files (`<faiss>.<ns>.ivfdata`) that the current FAISS file does not use: those of
    earlier builds and of a build that failed. Call only while holding the IndexLock: no other
    writer can be saving or building then."""
    import shutil

    removed: list[str] = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return removed
    for entry in entries:
        name = entry.name
        stem, sep, pid = name.rpartition(".tmp-")
        if name.startswith(".") and sep and stem and pid.isdigit() and entry.is_file(follow_symlinks=False):
            stale = True
        elif name.startswith(".") and ".ivfdata.shards-" in name and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(name)
            continue
        elif name.endswith(".ivfdata") and entry.is_file(follow_symlinks=False):
            faiss_name, dot, ns = name[: -len(".ivfdata")].rpartition(".")
            stale = bool(dot and ns.isdigit() and faiss_name) and not _references(Path(root) / faiss_name, name)
        else:
            stale = False
        if stale:
            try:
                os.unlink(entry.path)
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


def _references(faiss_file: Path, name: str) -> bool:
    """True when the FAISS file records the lists file `name` (its path ends with that name)."""
    import mmap

    try:
        with open(faiss_file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return m.find(name.encode()) != -1
    except (FileNotFoundError, ValueError):  # ValueError: an empty file cannot be mapped
        return False


def is_within(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """True when `path`, with symlinks resolved, lies inside `root` (also resolved)."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, base]) == base


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old or the new content, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
