"""Query an index: by image id, by corpus path (stored vector, no re-embedding), or by image bytes.

Every result score is the exact cosine from the stored fp16 vectors, whatever the ANN index type.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from retrieval import ann
from retrieval.errors import IndexNotFoundError, QueryError, RetrievalError
from retrieval.layout import IndexLayout, is_within
from retrieval.store import Image, Store
from retrieval.vectors import VectorStore, role_vectors

logger = logging.getLogger(__name__)

MAX_K = 1000


class IndexChangedError(RetrievalError):
    """The index files were replaced while a pinned reader was opening; opening again succeeds."""


@dataclass
class Hit:
    id: int
    path: str
    score: float
    width: int
    height: int
    format: str


class IndexReader:
    """A view of one index directory, for the CLI, the API and curation.

    Read-only unless `writable`: it then neither migrates nor writes, and works on read-only media.
    Curation commands that record their runs open it `writable` (they are writers).

    `pin` (the server): FAISS index, vectors and image rows are one generation, fixed when the
    reader opens: the FAISS and vector files it opened stay mapped, and `rows` reads the database
    through one read transaction (a WAL snapshot). An `index --rebuild` meanwhile deletes and
    rewrites all three; a pinned reader keeps answering from the old generation, never from a mix,
    until the server opens the new one. `store` always reads the current database (runs, curation).
    """

    def __init__(self, layout: IndexLayout, db_url: str | None = None, mmap: bool = False, writable: bool = False,
                 pin: bool = False, settings: Any = None):
        if db_url is None and not layout.exists():
            raise IndexNotFoundError(
                f"no index in {layout.root.resolve()}; run `retrieval index CORPUS` here first or pass --index-dir"
            )
        self.layout = layout
        self._source: Any = None  # the corpus's source (retrieval.sources), opened on first use
        self._mmap = mmap
        self._settings = settings  # device and precision of the query embedder; None: the environment's
        self._index: Any = None
        self._embedder: Any = None
        self._copy_vectors: VectorStore | None = None
        self._copy_index: Any = None
        self._copy_embedder: Any = None
        url = db_url or layout.default_db_url()
        self.store = Store(url, readonly=not writable)
        self.rows = self.store  # where image rows are read: a snapshot when pinned
        files: dict[Path, int] = {}
        try:
            if pin:
                files = self._open_files()
                self._index = ann.load_index(layout.faiss_path, mmap=mmap, read_only=True)
                self.rows = Store(url, snapshot=True)
            self.meta = self.rows.all_meta()
            if not self.meta.get("dim"):
                raise IndexNotFoundError(f"the index in {layout.root} holds no embeddings yet; run `retrieval index` first")
            self.dim: int = self.meta["dim"]
            self.corpus_root = Path(self.meta["corpus_root"])
            self.vectors = role_vectors(layout, "search", self.dim)
            if pin:
                self.vectors.pin(files[self._vectors_file])
                self._check_unchanged(files)
                if self.spec is None:
                    raise IndexNotFoundError("the index is empty: no image could be embedded")
                ann.set_nprobe(self._index, self.spec.params.get("nprobe") or 1)
        except BaseException:
            self.close()
            raise
        finally:
            for fd in files.values():
                os.close(fd)

    def _open_files(self) -> dict[Path, int]:
        """Hold the FAISS and vector files open, so that their identity can be checked after the snapshot."""
        files: dict[Path, int] = {}
        vectors = self.layout.vectors_path
        if not vectors.exists() and self.layout.legacy_vectors_path.exists():
            vectors = self.layout.legacy_vectors_path  # an old folder, converted by the next writing command
        self._vectors_file = vectors
        for path in (self.layout.faiss_path, vectors):
            try:
                files[path] = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                for fd in files.values():
                    os.close(fd)
                raise IndexNotFoundError(f"{path} is missing: the index is being rebuilt or was never built") from None
        return files

    def _check_unchanged(self, files: dict[Path, int]) -> None:
        """The files loaded are still the current ones after the snapshot began: they belong to it.

        Files are only replaced (FAISS: rename) or deleted (--rebuild) after the database commit that
        makes them current, so a file current both before and after the snapshot began matches it.
        """
        for path, fd in files.items():
            held = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
                raise IndexChangedError(f"{path.name} changed while the index was being opened; try again")

    # --- the copy role (a copy-detection model beside the search model) ------------------------
    @property
    def has_copy_role(self) -> bool:
        """True when `index --copy-model` embedded a copy role and its FAISS index exists."""
        return bool(self.meta.get("copy_dim") and self.meta.get("copy_index"))

    @property
    def copy_dim(self) -> int | None:
        return self.meta.get("copy_dim")

    @property
    def copy_vectors(self) -> VectorStore:
        if self._copy_vectors is None:
            if not self.copy_dim:
                raise IndexNotFoundError("this index has no copy role; run `retrieval index --copy-model ...`")
            self._copy_vectors = role_vectors(self.layout, "copy", self.copy_dim)
        return self._copy_vectors

    @property
    def copy_index(self) -> Any:
        if self._copy_index is None:
            data = self.meta.get("copy_index")
            if not data:
                raise IndexNotFoundError("this index has no copy role; run `retrieval index --copy-model ...`")
            self._copy_index = ann.load_index(self.layout.faiss_for("copy"), mmap=self._mmap, read_only=True)
            ann.set_nprobe(self._copy_index, ann.IndexSpec.from_dict(data).params.get("nprobe") or 1)
        return self._copy_index

    def copy_embedder(self) -> Any:
        """The copy model that embedded this index's copy role (same weights, or an error)."""
        if self._copy_embedder is None:
            from retrieval.embedding.copy import load_copy_embedder
            from retrieval.settings import get_settings

            settings = get_settings()
            embedder = load_copy_embedder(self.meta["copy_model_ref"], settings.device, settings.precision)
            if embedder.fingerprint != self.meta.get("copy_model_fingerprint"):
                raise QueryError(f"copy model {self.meta['copy_model_ref']} has other weights than the ones that "
                                 "embedded this index's copy role; run `retrieval index` to embed it again")
            self._copy_embedder = embedder
        return self._copy_embedder

    @property
    def spec(self) -> ann.IndexSpec | None:
        data = self.meta.get("index")
        return ann.IndexSpec.from_dict(data) if data else None

    @property
    def nprobe(self) -> int:
        """The nprobe tuned for this index at build time (1 where the index has no lists)."""
        return int((self.spec.params.get("nprobe") if self.spec else None) or 1)

    @property
    def index(self) -> Any:
        if self._index is None:
            if self.spec is None:
                raise IndexNotFoundError("the index is empty: no image could be embedded")
            self._index = ann.load_index(self.layout.faiss_path, mmap=self._mmap, read_only=True)
            ann.set_nprobe(self._index, self.nprobe)
        return self._index

    def close(self) -> None:
        if getattr(self, "rows", None) is not None and self.rows is not self.store:
            self.rows.close()
        self.store.close()

    @property
    def source(self) -> Any:
        """The retrieval.sources.Source the index was built from (a folder for older indexes)."""
        if self._source is None:
            from retrieval.sources import source_from_meta

            self._source = source_from_meta(self.meta)
        return self._source

    @property
    def corpus_name(self) -> str:
        """The corpus as a person wrote it: a folder's path or the source's URI."""
        return str(self.meta.get("corpus_root") or self.corpus_root)

    def locate(self, path: str) -> Any:
        """Something with read_bytes() for a stored path: the file of a folder, a Located image otherwise."""
        if self.source.local_root is not None:
            return self.corpus_root / path
        from retrieval.sources.base import Located

        return Located(self.source, path)

    # --- resolving references -----------------------------------------------------------------
    def image(self, image_id: int) -> Image:
        with self.rows.session() as s:
            row = s.get(Image, image_id)
        if row is None:
            raise QueryError(f"no indexed image with id {image_id}", "not_found")
        return row

    def image_by_path(self, rel_path: str) -> Image | None:
        with self.rows.session() as s:
            return s.scalar(select(Image).where(Image.path == rel_path))

    def relative_path(self, path: Path) -> str | None:
        """`path` relative to the corpus root (POSIX), or None when it lies outside the corpus."""
        if not is_within(path, self.corpus_root):
            return None
        return Path(os.path.relpath(os.path.realpath(path), os.path.realpath(self.corpus_root))).as_posix()

    # --- searching ----------------------------------------------------------------------------
    def embedder(self) -> Any:
        if self._embedder is None:
            from retrieval.model import load_embedder
            from retrieval.settings import get_settings

            settings = self._settings or get_settings()
            self._embedder = load_embedder(self.meta["model_ref"], settings.device, settings.precision)
            if self._embedder.dim != self.dim:
                raise QueryError(f"model {self.meta['model_ref']} no longer gives {self.dim}-d vectors", "conflict")
        return self._embedder

    def embed_bytes(self, data: bytes, max_pixels: int) -> np.ndarray:
        from retrieval.imaging.preprocess import load_and_preprocess

        embedder = self.embedder()
        pixels, _ = load_and_preprocess(data, embedder.preprocess, max_pixels)
        return embedder.embed(pixels[None])[0]

    def search_vector(self, vector: np.ndarray, k: int, exclude_id: int | None = None,
                      nprobe: int | None = None) -> list[Hit]:
        if not 1 <= k <= MAX_K:
            raise QueryError(f"k must be between 1 and {MAX_K}, got {k}")
        query = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        exclude = np.array([exclude_id if exclude_id is not None else -1], dtype=np.int64)
        scores, ids = ann.search_reranked(self.index, query, k, self.vectors.read, nprobe=nprobe, exclude=exclude)
        return self._hits(ids[0], scores[0])

    def search_id(self, image_id: int, k: int, exclude_self: bool = True, nprobe: int | None = None) -> list[Hit]:
        self.image(image_id)  # raises for unknown ids
        vector = self.vectors.read([image_id])[0]
        return self.search_vector(vector, k, exclude_id=image_id if exclude_self else None, nprobe=nprobe)

    def _hits(self, ids: np.ndarray, scores: np.ndarray) -> list[Hit]:
        valid = [(int(i), float(sc)) for i, sc in zip(ids, scores) if i >= 0]
        if not valid:
            return []
        with self.rows.session() as s:
            rows = {row.id: row for row in s.scalars(select(Image).where(Image.id.in_([i for i, _ in valid])))}
        return [
            Hit(id=i, path=rows[i].path, score=sc, width=rows[i].width, height=rows[i].height, format=rows[i].format)
            for i, sc in valid if i in rows  # an id deleted since the index was built is dropped
        ]


def search_file(reader: IndexReader, image: str, k: int, exclude_self: bool, max_pixels: int,
                nprobe: int | None = None) -> tuple[str, list[Hit]]:
    """What `retrieval search IMAGE` does: indexed path or id -> stored vector; any other file -> embed.

    Returns how the query was answered ("stored vector of id N" / "embedded file") and the hits.
    `nprobe`: IVF lists to visit (None: the tuned value).
    """
    if "://" in image or "#" in image:
        return _search_uri(reader, image, k, exclude_self, max_pixels, nprobe)
    path = Path(image)
    if not path.exists() and image.isdigit():
        image_id = int(image)
        return f"stored vector of id {image_id}", reader.search_id(image_id, k, exclude_self, nprobe)
    if not path.is_file():
        raise QueryError(f"{image} is neither a file nor an indexed image id", "not_found")
    rel = reader.relative_path(path)
    if rel is not None:
        row = reader.image_by_path(rel)
        st = path.stat()
        if row is not None and (row.size, row.mtime_ns) == (st.st_size, st.st_mtime_ns):
            return f"stored vector of {rel} (id {row.id})", reader.search_id(row.id, k, exclude_self, nprobe)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise QueryError(f"cannot read {image}: {exc.strerror or exc}") from None
    return "embedded file", _search_bytes(reader, data, image, k, max_pixels, nprobe)


def _search_bytes(reader: IndexReader, data: bytes, name: str, k: int, max_pixels: int,
                  nprobe: int | None = None) -> list[Hit]:
    from retrieval.errors import ImageDecodeError

    try:
        vector = reader.embed_bytes(data, max_pixels)
    except ImageDecodeError as exc:
        raise QueryError(f"{name}: {exc}") from None
    return reader.search_vector(vector, k, nprobe=nprobe)


def _search_uri(reader: IndexReader, uri: str, k: int, exclude_self: bool, max_pixels: int,
                nprobe: int | None = None) -> tuple[str, list[Hit]]:
    """A URI (or `shard.tar#member`): the stored vector when indexed, else its bytes fetched and embedded."""
    from retrieval.errors import ReadFailure

    row = reader.image_by_path(uri)
    if row is not None:
        return f"stored vector of {uri} (id {row.id})", reader.search_id(row.id, k, exclude_self, nprobe)
    if "://" not in uri:
        raise QueryError(f"{uri} is not an indexed image (shard members are named <shard>#<member>)")
    from retrieval.sources.base import ReadLimits
    from retrieval.sources.remote import read_url

    try:
        data = read_url(uri, ReadLimits.from_env())
    except ReadFailure as exc:
        raise QueryError(f"cannot read {uri}: {exc.reason}") from None
    return "embedded URL", _search_bytes(reader, data, uri, k, max_pixels, nprobe)
