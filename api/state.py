"""What the server holds: the current index handle, the embedder, the batcher, and re-index pickup.

The server reads the index through the same surface as the CLI and Python users: a read-only,
pinned `retrieval.Index` (one generation of FAISS index, vectors and rows, even during an
`index --rebuild`). A new completed index run (`retrieval index` finishing while the server runs)
is detected by a cheap query of the latest completed run id, at most every `reload_check_s`
seconds. The new handle is opened in a worker thread and swapped in atomically; a request keeps
the handle it started with (see `acquire`), and a retired one is closed when its last request finishes.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from retrieval.api.batcher import Batcher
from retrieval.api.decoding import UploadDecoder
from retrieval.api.settings import ApiSettings

from retrieval.errors import ModelLoadError, RetrievalError
from retrieval.index import Index
from retrieval.layout import IndexLayout

logger = logging.getLogger(__name__)


class ReaderHandle:
    """A read-only, pinned retrieval.Index with a count of requests using it, closed once retired and idle."""

    def __init__(self, index: Index, version: tuple[int | None, str | None], loaded_at: float):
        self.index = index
        self.version = version
        self.run_id = version[0]
        self.loaded_at = loaded_at
        self.users = 0
        self.retired = False
        self.lock = threading.Lock()

    def enter(self) -> bool:
        """Count one more user; False when the reader was retired (and maybe closed) already."""
        with self.lock:
            if self.retired:
                return False
            self.users += 1
            return True

    def leave(self) -> None:
        with self.lock:
            self.users -= 1
            close = self.retired and self.users == 0
        if close:
            self.index.close()

    def retire(self) -> None:
        with self.lock:
            self.retired = True
            close = self.users == 0
        if close:
            self.index.close()

    @property
    def store(self) -> Any:
        """The database as it is now (runs, curation): what retrieval.curation.queries reads."""
        return self.index.database


class AppState:
    def __init__(self, settings: ApiSettings):
        self.settings = settings
        self.layout = IndexLayout(settings.index_dir)
        self.handle: ReaderHandle | None = None
        self.embedder: Any = None
        self.embed_fn: Any = None
        self.model_error: str | None = None
        self.batcher = Batcher(settings.batch_max_size, settings.batch_max_wait_ms / 1000)
        self.decoder = UploadDecoder(settings.upload_decode_workers, settings.upload_decode_start_method,
                                     settings.decode_timeout_s)
        self.reloads = 0
        self._last_check = 0.0
        self._reload_lock = threading.Lock()
        self._writer: Any = None
        self._writer_lock = threading.Lock()

    def writer_store(self) -> Any:
        """The one writable database handle of the server, for review decisions (opened on first use).

        Readers never write (they work on read-only media); the review routes are the only writers.
        """
        with self._writer_lock:
            if self._writer is None:
                from retrieval.store import Store

                self._writer = Store(self.settings.db_url or self.layout.default_db_url())
            return self._writer

    # --- loading ------------------------------------------------------------------------------
    def _open(self) -> ReaderHandle:
        s = self.settings
        index = Index.open(self.layout.root, db=s.db_url, pinned=True, device=s.device, precision=s.precision,
                           max_pixels=s.max_pixels)
        try:
            version = index.version()  # of the generation the handle holds
        except BaseException:
            index.close()
            raise
        return ReaderHandle(index, version, time.time())

    def load(self) -> None:
        """Open the index and the model (startup; raises when there is no usable index)."""
        self.handle = self._open()
        self._ensure_embedder(self.handle.index)
        self._last_check = time.monotonic()

    def _ensure_embedder(self, index: Index) -> None:
        want = (index.model, index.model_fingerprint)
        if self.embedder is not None and (self.embedder.model_ref, self.embedder.fingerprint) == want:
            return
        from retrieval.model import load_embedder

        try:
            embedder = load_embedder(str(want[0]), self.settings.device, self.settings.precision)
        except (ModelLoadError, OSError) as exc:
            self.model_error = "the embedding model could not be loaded; uploads are unavailable"
            logger.error("cannot load model %s: %s", want[0], exc)
            return
        if embedder.dim != index.dim or (want[1] and embedder.fingerprint != want[1]):
            self.model_error = "the embedding model does not match the index; uploads are unavailable"
            logger.error("model %s does not match the index (dim %s vs %s)", want[0], embedder.dim, index.dim)
            return
        self.embedder, self.embed_fn, self.model_error = embedder, embedder.embed, None

    def close(self) -> None:
        self.decoder.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.handle is not None:
            self.handle.retire()
            self.handle = None

    # --- re-index pickup ----------------------------------------------------------------------
    def maybe_reload(self) -> bool:
        """Swap in a newer completed index run if there is one. Runs in a worker thread."""
        now = time.monotonic()
        if self.handle is None or now - self._last_check < self.settings.reload_check_s:
            return False
        if not self._reload_lock.acquire(blocking=False):
            return False  # another request is already reloading; keep serving the current reader
        try:
            self._last_check = now
            current = self.handle
            try:
                latest = current.index.version(current=True)
            except Exception:  # noqa: BLE001 - a busy or vanished DB must not fail the request
                logger.warning("could not check for a new index run", exc_info=True)
                return False
            if latest[0] is None or latest == current.version:
                return False
            try:
                fresh = self._open()
            except RetrievalError as exc:
                logger.warning("new index run %s found but it cannot be opened: %s", latest, exc)
                return False
            self._ensure_embedder(fresh.index)
            self.handle = fresh  # atomic swap: new requests see the new reader
            current.retire()  # closed when its in-flight requests finish
            self.reloads += 1
            logger.info("picked up index run %s (was %s)", fresh.run_id, current.run_id)
            return True
        finally:
            self._reload_lock.release()

    @contextmanager
    def acquire(self) -> Iterator[ReaderHandle]:
        while True:
            handle = self.handle
            if handle is None:
                raise RuntimeError("index not loaded")
            if handle.enter():
                break
        try:
            yield handle
        finally:
            handle.leave()
