"""`retrieval.Index`: the one handle the Python API and the command line share.

Example::

    import retrieval

    index = retrieval.Index.create("my-index", model="facebook/dinov2-small")
    summary = index.update("photos/")              # embed new and changed files, drop deleted ones
    print(summary.total_images, "images")

    result = index.search("photos/cat.jpg", k=5)   # a file, an image id, a vector, bytes or a PIL image
    for hit in result:
        print(f"{hit.score:.3f} {hit.path}")

    groups = index.dedup(threshold=0.95)           # stored as a run; an identical rerun is reused
    index.write_report(groups, "dedup-report")     # report.html, duplicates.json/csv, remove.txt
    clusters = index.cluster(k=10)
    index.export("dataset/")                       # images.parquet + embeddings_search.npy

Each method is what one `retrieval` command does; the command only parses options, calls the method
and prints. Results are dataclasses (retrieval.results) with `to_pandas()`.

The core never imports the indexer (tests/test_layers.py). `update` reaches it through the package
metadata instead: the indexer registers its update function under the entry-point group
`retrieval.updaters` (pyproject.toml), and `update` loads the one named "local". The arrow stays
one way (indexer -> core), and another runner (a distributed one) can register under its own name.
"""

from __future__ import annotations

import io
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from retrieval.errors import IndexNotFoundError, QueryError, RetrievalError
from retrieval.layout import IndexLayout
from retrieval.settings import DEFAULT_INDEX_DIR, Settings

if TYPE_CHECKING:
    from retrieval.results import ClusterResult, CurationResult, DedupResult, ExportResult, SearchResult

logger = logging.getLogger(__name__)

UPDATERS_GROUP = "retrieval.updaters"
LOCAL_UPDATER = "local"


def make_settings(**overrides: Any) -> Settings:
    """Settings from the environment with `overrides` on top (None means "not given")."""
    from pydantic import ValidationError

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise RetrievalError(f"invalid {first['loc'][0]}: {first['msg']}") from None


def show_progress(progress: bool | None) -> bool:
    """None means automatic: progress bars only when stderr is a terminal (not in logs or pipes)."""
    if progress is not None:
        return progress
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def load_updater(name: str = LOCAL_UPDATER) -> Callable[..., Any]:
    """The update function a runner registered under `retrieval.updaters` (see the module docstring)."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=UPDATERS_GROUP):
        if ep.name == name:
            return ep.load()  # type: ignore[no-any-return]
    raise RetrievalError(f"no index updater {name!r} is installed (entry point group {UPDATERS_GROUP}); "
                         "reinstall the package, e.g. pip install -e .")


class Index:
    """One index folder (database, vectors, FAISS index): search it, curate it, export it.

    Open an existing index with `Index.open(path)`, start a new one with `Index.create(path, model=...)`.
    Reading opens the database lazily on first use; `close()` (or a `with` block) releases it.
    Settings not given here come from RETRIEVAL_* environment variables (retrieval.settings).
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.layout = IndexLayout(Path(settings.index_dir))
        self._reader: Any = None
        self._writer: Any = None
        self._pinned = False

    # --- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str] = DEFAULT_INDEX_DIR, *, db: str | None = None,
             pinned: bool = False, **settings: Any) -> "Index":
        """Open an existing index; raises IndexNotFoundError when none is there.

        `settings` are Settings fields (device="cpu", batch_size=64, max_pixels=...); the model is
        the one the index was built with. `pinned` (a long-running reader such as the HTTP server):
        the FAISS index, vectors and image rows stay the generation that was current when the
        handle opened, even while `update(..., rebuild=True)` replaces them; `version()` tells when
        a newer one exists, and a new handle serves it.

        Example: ``retrieval.Index.open("retrieval-index").search(42, k=5)``
        """
        index = cls(make_settings(index_dir=Path(path), db_url=db, **settings))
        index._pinned = pinned
        index.reader  # noqa: B018 - fail now, not on first use
        return index

    @classmethod
    def create(cls, path: str | os.PathLike[str] = DEFAULT_INDEX_DIR, *, model: str | None = None,
               db: str | None = None, **settings: Any) -> "Index":
        """A handle for a new index in `path`, built by `update(corpus)` with `model`.

        `model` is a hub id, a local save_pretrained folder or a cached hub id (default
        facebook/dinov2-small). Refuses a folder that already holds an index: use `Index.open`.

        Example: ``retrieval.Index.create("my-index", model="./models/dinov2-small").update("photos/")``
        """
        index = cls(make_settings(index_dir=Path(path), db_url=db, model=model, **settings))
        if index._holds_index():
            index.close()
            raise RetrievalError(f"{index.layout.root} already holds an index; open it with Index.open")
        index.layout.root.mkdir(parents=True, exist_ok=True)
        return index

    def _holds_index(self) -> bool:
        if self.settings.db_url is None and not self.layout.exists():
            return False
        try:
            self.reader  # noqa: B018
        except IndexNotFoundError:
            return False
        return True

    @property
    def writer(self) -> Any:
        """A view that may record runs (dedup, cluster, curate), opened on first use.

        `reader` never writes nor migrates (it works on read-only media); the curation methods are
        writers and go through this one.
        """
        if self._writer is None:
            from retrieval.search import IndexReader

            self._writer = IndexReader(self.layout, self.settings.db_url, settings=self.settings, writable=True)
        return self._writer

    @property
    def reader(self) -> Any:
        """The underlying read view (retrieval.search.IndexReader), opened on first use."""
        if self._reader is None:
            from retrieval.search import IndexReader

            if self._pinned:
                self._reader = self._open_pinned()
            else:
                self._reader = IndexReader(self.layout, self.settings.db_url, settings=self.settings)
        return self._reader

    def _open_pinned(self) -> Any:
        """A reader fixed to one generation (memory-mapped); retried while an update swaps files."""
        import time

        from retrieval.search import IndexChangedError, IndexReader

        for attempt in range(5):
            try:
                return IndexReader(self.layout, self.settings.db_url, mmap=True, pin=True, settings=self.settings)
            except IndexChangedError:  # an update replaced a file just then: open the new one
                if attempt == 4:
                    raise
                time.sleep(0.2)
        raise AssertionError("unreachable")

    def close(self) -> None:
        for view in (self._reader, self._writer):
            if view is not None:
                view.close()
        self._reader = self._writer = None

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Index({str(self.layout.root)!r})"

    @property
    def path(self) -> Path:
        return self.layout.root

    @property
    def corpus_root(self) -> Path:
        return self.reader.corpus_root  # type: ignore[no-any-return]

    @property
    def model(self) -> str:
        return self.reader.meta["model_ref"]  # type: ignore[no-any-return]

    @property
    def dim(self) -> int:
        return self.reader.dim  # type: ignore[no-any-return]

    @property
    def model_fingerprint(self) -> str | None:
        """The fingerprint of the weights that embedded the index (a query model must match it)."""
        return self.reader.meta.get("model_fingerprint")  # type: ignore[no-any-return]

    @property
    def source(self) -> Any:
        """The retrieval.sources.Source the index was built from (its `local_root` is None when remote)."""
        return self.reader.source

    @property
    def database(self) -> Any:
        """The index's database (retrieval.store.Store), read-only, as it is now: the runs and
        curation tables that retrieval.curation.queries reads."""
        return self.reader.store

    @property
    def ann_spec(self) -> Any:
        """The FAISS index's description (retrieval.ann.IndexSpec: kind, factory, params), None when empty."""
        return self.reader.spec

    @property
    def ann_count(self) -> int:
        """How many vectors the FAISS index holds (0 when there is none)."""
        return int(self.reader.index.ntotal) if self.reader.spec is not None else 0

    def image(self, ref: int | str) -> Any:
        """The stored row (retrieval.store.Image) of an image id (any integer, numpy's included) or a
        corpus-relative path, None when the index holds no such image; a pinned handle answers from
        its generation."""
        import numbers

        from retrieval.store import Image

        if isinstance(ref, numbers.Integral) and not isinstance(ref, bool):
            with self.reader.rows.session() as s:
                return s.get(Image, int(ref))
        return self.reader.image_by_path(ref)

    def embeddings(self, ids: Any) -> Any:
        """The stored search embeddings (float32, unit length) of image ids, one row each, in order.

        Example: ``index.embeddings([3, 7]) @ index.embed("query.jpg")``
        """
        return self.reader.vectors.read(list(ids))

    def version(self, current: bool = False) -> tuple[int | None, str | None]:
        """(latest completed index run, when the FAISS file was last written) of what this handle
        reads, or with `current` of the database now: a long-running reader compares the two and
        opens a new handle when they differ (the second part changes when an applied dedup drops
        images without an index run)."""
        import json

        from retrieval import runs
        from retrieval.store import IndexRun, Meta

        reader = self.reader
        with (reader.store if current or not self._pinned else reader.rows).session() as s:
            run = runs.latest(s, IndexRun)
            meta = s.get(Meta, "index")
        spec = json.loads(meta.value) if meta is not None else None
        return (run.id if run is not None else None), (spec or {}).get("params", {}).get("built_at")

    def __len__(self) -> int:
        """How many images the index holds (a pinned handle: in its generation)."""
        return self.reader.rows.count_images()  # type: ignore[no-any-return]

    def __bool__(self) -> bool:  # a handle is true even when empty (and truth needs no database query)
        return True

    # --- building -----------------------------------------------------------------------------
    def update(self, corpus: str | os.PathLike[str], *, rebuild: bool = False, retry_failed: bool = False,
               index_factory: str | None = None, progress: bool | None = None, ray: str | None = None) -> Any:
        """Index `corpus`: embed new and changed files, forget deleted ones, bring FAISS up to date.

        Cheap to rerun (only changes are processed); an interrupted update resumes where it stopped.
        Returns the run's summary (a dataclass: new, changed, removed, failed, total_images, ...).
        `ray` decodes and embeds on a Ray cluster ("auto", "local" or an address; by default
        RETRIEVAL_RAY_ADDRESS, else this process); the index stays on this machine.

        Example: ``index.update("photos/").total_images``
        """
        from retrieval.distributed import resolve_address

        self.close()  # the run changes what a reader holds (meta, FAISS file)
        address = resolve_address(ray)
        extra = {"address": address} if address else {}
        return load_updater("ray" if address else LOCAL_UPDATER)(
            os.fspath(corpus), self.settings, rebuild=rebuild, retry_failed=retry_failed,
            index_factory=index_factory, progress=show_progress(progress), **extra)

    def build_index(self, *, rebuild: bool = True, index_factory: str | None = None, ray: str | None = None,
                    progress: bool | None = None) -> dict[str, Any]:
        """(Re)build the FAISS index of every role from the stored vectors, without embedding anything.

        `ray` ("auto", "local" or an address; by default RETRIEVAL_RAY_ADDRESS, else no Ray) trains an
        IVF index in one Ray task, adds the vectors in shards as Ray tasks and merges them here; the
        nodes read the vector files from the index folder on shared storage. Returns each role's
        sync result (retrieval.sync.SyncResult) by role.

        Example: ``index.build_index(ray="auto")["search"].spec.factory``
        """
        from retrieval.distributed import resolve_address
        from retrieval.layout import IndexLock, remove_stale_temporaries
        from retrieval.store import Store
        from retrieval.sync import SyncOptions, sync_index
        from retrieval.vectors import role_vectors

        s, address = self.settings, resolve_address(ray)
        self.reader  # noqa: B018 - IndexNotFoundError now rather than a new empty database
        self.close()  # the build replaces the FAISS files a reader holds
        results: dict[str, Any] = {}
        with IndexLock(self.layout):
            remove_stale_temporaries(self.layout.root)
            store = Store(s.db_url or self.layout.default_db_url())
            try:
                for role, key in (("search", "dim"), ("copy", "copy_dim")):
                    dim = store.get_meta(key)
                    if dim is None:
                        continue
                    opts = SyncOptions(memory_budget=s.memory_budget, exact_threshold=s.exact_threshold,
                                       recall_target=s.recall_target, force_rebuild=rebuild,
                                       factory=index_factory if role == "search" else None, ray_address=address,
                                       progress=show_progress(progress))
                    results[role] = sync_index(store, role_vectors(self.layout, role, dim), self.layout, opts, role)
            finally:
                store.close()
        if not results:
            raise RetrievalError("the index holds no embeddings; run `retrieval index CORPUS` first")
        return results

    # --- searching ----------------------------------------------------------------------------
    def search(self, query: Any, k: int = 10, *, include_self: bool = False, nprobe: int | None = None
               ) -> "SearchResult":
        """The `k` nearest indexed images of `query`, best first, with exact cosine scores.

        `query` is an image id (int), a file path (str or Path; an indexed, unchanged file is
        answered from its stored vector), a vector (numpy, normalised here), image bytes or a PIL
        image. A str of digits that is not a file is an image id, as on the command line.
        `include_self` keeps an indexed query image in its own results. `nprobe`: IVF lists to visit
        for this call (default: the value tuned at build time; exact indexes ignore it).

        Example: ``index.search("photos/cat.jpg", k=5).to_pandas()``
        """
        import numbers

        from retrieval.results import SearchResult
        from retrieval.search import search_file

        reader = self.reader
        if isinstance(query, bool):
            raise QueryError("a query is an image id, a path, a vector, image bytes or a PIL image, not a bool")
        if isinstance(query, numbers.Integral):  # numpy integers too: an id, not a vector
            query = int(query)
            return SearchResult(str(query), f"stored vector of id {query}",
                                reader.search_id(query, k, exclude_self=not include_self, nprobe=nprobe))
        if isinstance(query, (str, os.PathLike)):
            if not isinstance(query, str) and not Path(query).is_file():
                raise QueryError(f"{query} is not a file")
            how, hits = search_file(reader, os.fspath(query), k, exclude_self=not include_self,
                                    max_pixels=self.settings.max_pixels, nprobe=nprobe)
            return SearchResult(os.fspath(query), how, hits)
        if isinstance(query, (bytes, bytearray, memoryview)) or _is_pil_image(query):
            data = _pil_to_png(query) if _is_pil_image(query) else bytes(query)
            vector = self._embed_bytes(data)
            return SearchResult(f"<{type(query).__name__}>", "embedded image", reader.search_vector(vector, k, nprobe=nprobe))
        if hasattr(query, "__array__"):
            return SearchResult("<vector>", "vector", reader.search_vector(self._unit_vector(query), k, nprobe=nprobe))
        raise QueryError(f"cannot search with a {type(query).__name__}: pass an image id, a path, a vector, "
                         "image bytes or a PIL image")

    def embed(self, image: Any) -> Any:
        """The embedding (float32, unit length) of an image file, image bytes or a PIL image.

        Example: ``index.search(index.embed("a.jpg") + index.embed("b.jpg"))`` searches their blend.
        """
        if _is_pil_image(image):
            return self._embed_bytes(_pil_to_png(image))
        if isinstance(image, (bytes, bytearray, memoryview)):
            return self._embed_bytes(bytes(image))
        try:
            data = Path(image).read_bytes()
        except OSError as exc:
            raise QueryError(f"cannot read {image}: {exc.strerror or exc}") from None
        return self._embed_bytes(data)

    def _embed_bytes(self, data: bytes) -> Any:
        from retrieval.errors import ImageDecodeError

        try:
            return self.reader.embed_bytes(data, self.settings.max_pixels)
        except ImageDecodeError as exc:
            raise QueryError(f"the query image cannot be used: {exc}") from None

    def _unit_vector(self, query: Any) -> Any:
        import numpy as np

        v = np.asarray(query, dtype=np.float32).reshape(-1)
        if v.shape[0] != self.dim:
            raise QueryError(f"the index holds {self.dim}-d vectors, the query has {v.shape[0]} values")
        norm = float(np.linalg.norm(v))
        if not np.isfinite(norm) or norm == 0.0:
            raise QueryError("the query vector is zero or not finite")
        return v / norm

    # --- curation -----------------------------------------------------------------------------
    def dedup(self, *, threshold: float | None = None, k: int = 64, phash_distance: int = 8, pdq_distance: int = 31,
              role: str = "auto", keep: str = "highest-resolution", max_group_diameter: float | None = None,
              against: str | os.PathLike[str] | None = None, embeddings: bool = True, force: bool = False,
              progress: bool | None = None, ray: str | None = None, verify: bool | None = None,
              verify_floor: float | None = None) -> "DedupResult":
        """Find exact, near-exact (pHash, PDQ with flips/rotations) and embedding duplicates; store them as a run.

        The k-NN graph runs on the copy role (`role="auto"`) when the index has one (`update` with
        the `copy_model` setting), else on the search role. `threshold`: cosine at or above which two
        images are copies (default: per copy model, retrieval.curation.dedup.COPY_THRESHOLDS; without
        one 0.95, 0.90 with `against`, a reference folder whose near copies are removed whole). `keep` picks the copy
        that survives (retrieval.curation.policy.POLICIES). An identical rerun on an unchanged
        index returns the stored run (`reused`), unless `force`. Nothing moves: see `apply_dedup`.
        `ray` builds the k-NN graph on a Ray cluster ("auto", "local" or an address; by default
        RETRIEVAL_RAY_ADDRESS, else no Ray) with the same groups as a local run. `verify`: check the
        copy role's pairs between `verify_floor` (default per copy model, VERIFY_FLOORS) and the
        threshold geometrically (retrieval.curation.verify); None = on for the copy role when OpenCV
        is installed, False = off, True = on or an error saying why not.

        Example: ``[g.members for g in index.dedup(threshold=0.9).groups]``
        """
        from retrieval.curation.dedup import DedupOptions, load_run, run_dedup
        from retrieval.distributed import resolve_address
        from retrieval.results import DedupResult

        s = self.settings
        outcome = run_dedup(self.writer, DedupOptions(
            threshold=threshold, k=k, phash_distance=phash_distance, pdq_distance=pdq_distance, role=role, keep=keep,
            max_group_diameter=max_group_diameter, against=os.fspath(against) if against is not None else None, embeddings=embeddings,
            progress=show_progress(progress), force=force, max_pixels=s.max_pixels, batch_size=s.batch_size,
            workers=s.workers or 0, ray=resolve_address(ray), verify=verify, verify_floor=verify_floor))
        return DedupResult.from_document(load_run(self.writer, outcome.run_id), reused=outcome.reused)

    def dedup_run(self, run_id: int | None = None) -> "DedupResult":
        """A stored dedup run (the latest completed one by default)."""
        from retrieval.curation.dedup import load_run
        from retrieval.results import DedupResult

        return DedupResult.from_document(load_run(self.reader, run_id), reused=True)

    def apply_dedup(self, run: "int | DedupResult", move_to: str | os.PathLike[str]) -> Any:
        """Move the files a dedup run marks `remove` to `move_to` (outside the corpus, keeping their
        relative paths) and drop them from the index. Nothing is deleted; changed files are skipped.

        Example: ``index.apply_dedup(index.dedup(), "../removed").moved``
        """
        from retrieval.curation.apply import apply_run

        run_id = run if isinstance(run, int) else run.run_id
        return apply_run(self.reader, run_id, Path(move_to), self.settings)

    def write_dedup_manifest(self, run: "int | DedupResult", folder: str | os.PathLike[str]) -> Any:
        """Apply a dedup run to a source that is never changed in place (a bucket, a list, shards):
        write manifest.csv (every member's action, review decisions included) and kept.parquet, the
        filtered list to train on (shards also get kept-shards.txt). Nothing moves; the run is marked applied.

        Example: ``index.write_dedup_manifest(index.dedup_run(), "dedup-report").kept_list``
        """
        from retrieval.curation.apply import write_manifest

        run_id = run if isinstance(run, int) else run.run_id
        return write_manifest(self.reader, run_id, Path(folder))

    def apply_remove_list(self, remove_list: str | os.PathLike[str], move_to: str | os.PathLike[str]) -> Any:
        """Move the files a hand-edited list names (corpus-relative paths, e.g. an edited remove.txt)
        to `move_to` and drop them from the index, with the same safety rules as apply_dedup.

        Example: ``index.apply_remove_list("dedup-report/remove.txt", "../removed").moved``
        """
        from retrieval.curation.apply import apply_list, read_remove_list

        paths = read_remove_list(Path(remove_list))
        return apply_list(self.reader, paths, Path(move_to), self.settings)

    def cluster(self, k: int | None = None, *, niter: int = 20, seed: int = 0, force: bool = False,
                progress: bool | None = None, ray: str | None = None) -> "ClusterResult":
        """Spherical k-means over every embedding (k defaults to sqrt(N)); stored as a run.

        `ray` assigns the images on a Ray cluster ("auto", "local" or an address; by default
        RETRIEVAL_RAY_ADDRESS, else no Ray) with the same result as a local run.

        Example: ``index.cluster(k=100).sizes``
        """
        from retrieval.curation.clusters import run_clustering
        from retrieval.distributed import resolve_address
        from retrieval.results import ClusterResult

        o = run_clustering(self.writer, k, niter, seed, force, show_progress(progress), ray=resolve_address(ray))
        return ClusterResult(run_id=o.run_id, k=o.k, n_images=o.n_images, reused=o.reused, sizes=list(o.sizes))

    def curate(self, queries: str | os.PathLike[str], *, mode: str = "sample", k: int = 4, per_cluster: int = 10_000,
               min_queries: int = 3, max_images: int = 1_000_000, cluster_run: int | None = None, seed: int = 0,
               force: bool = False, progress: bool | None = None, ray: str | None = None) -> "CurationResult":
        """Curate the corpus from a folder of query images (embedded, not indexed).

        mode "sample": the `k` nearest images of every query; mode "cluster": up to `per_cluster`
        images from every cluster (of `cluster_run`, default the latest) holding more than
        `min_queries` queries. `ray` ("auto", "local" or an address; by default
        RETRIEVAL_RAY_ADDRESS, else no Ray) runs the query searches or assignments as Ray tasks,
        with the same result as a local run.

        Example: ``index.curate("imagenet-val/", k=4).paths``
        """
        from retrieval.curation.curate import CurateOptions, run_curation
        from retrieval.distributed import resolve_address
        from retrieval.results import CuratedImage, CurationResult

        s = self.settings
        o = run_curation(self.writer, CurateOptions(
            queries=os.fspath(queries), mode=mode, k=k, per_cluster=per_cluster, min_queries=min_queries,
            max_images=max_images, cluster_run=cluster_run, seed=seed, progress=show_progress(progress),
            max_pixels=s.max_pixels, batch_size=s.batch_size, workers=s.workers or 0, force=force,
            ray=resolve_address(ray)))
        items = [CuratedImage(image_id=d["image_id"], path=d["path"], how=d["how"], query=d["query"], score=d["score"],
                              times_retrieved=d["times_retrieved"], cluster=d.get("cluster")) for d in o.items]
        return CurationResult(run_id=o.run_id, reused=o.reused, counts=dict(o.counts), items=items,
                              failures=list(o.failures), _outcome=o)

    def calibrate(self, sample: int = 100, target_precision: float = 0.95, seed: int = 0,
                  transforms: list[str] | None = None, progress: bool | None = None, role: str = "search") -> Any:
        """Precision/recall of duplicate detection per transform on this corpus; a suggested threshold.

        `role`: "search" (the retrieval model) or "copy" (the copy-detection model, when indexed).

        Example: ``index.calibrate(sample=50, role="copy").advice``
        """
        from retrieval.curation.calibrate import role_view, run_calibration

        return run_calibration(self.reader, sample, target_precision, seed, transforms, show_progress(progress),
                               role_view(self.reader, role))

    def write_report(self, result: Any, folder: str | os.PathLike[str], progress: bool | None = None) -> dict[str, Path]:
        """Write the HTML/JSON/CSV report of a dedup, cluster or curation result into `folder`.

        Returns the files written, by name. Example: ``index.write_report(index.cluster(), "clusters/")``
        """
        from retrieval.results import ClusterResult, CurationResult, DedupResult

        out, bar, max_pixels = Path(folder), show_progress(progress), self.settings.max_pixels
        if isinstance(result, DedupResult):
            from retrieval.curation.report import write_dedup_reports

            return write_dedup_reports(result.document, out, max_pixels, bar)  # type: ignore[no-any-return]
        if isinstance(result, ClusterResult):
            from retrieval.curation.clusters import write_cluster_report

            page = write_cluster_report(self.reader, result, out, max_pixels, progress=bar)
            return {"clusters.html": page, "clusters.json": out / "clusters.json"}
        if isinstance(result, CurationResult) and result._outcome is not None:
            from retrieval.curation.curate import write_curation_report

            return write_curation_report(self.reader, result._outcome, out, max_pixels, bar)  # type: ignore[no-any-return]
        raise RetrievalError(f"no report for a {type(result).__name__}: pass what dedup, cluster or curate returned")

    # --- export and inspection ----------------------------------------------------------------
    def export(self, folder: str | os.PathLike[str], *, parquet: bool = True, npy: bool = True,
               batch_size: int = 10_000, progress: bool | None = None) -> "ExportResult":
        """Write the dataset into `folder`: images.parquet (one row per image: file facts, hashes,
        embeddings as fixed-size lists, latest dedup group and action, cluster) and one
        embeddings_<role>.npy per embedding role, rows in the Parquet's order (ascending id).

        Streamed `batch_size` images at a time; each file appears atomically. Needs pyarrow for Parquet.

        Example: ``pandas.read_parquet(index.export("dataset/").parquet)``
        """
        from retrieval.export import export_index

        return export_index(self.reader, Path(folder), parquet=parquet, npy=npy, batch_size=batch_size,
                            progress=show_progress(progress))

    def info(self, failures: bool = False) -> dict[str, Any]:
        """What the index holds (corpus, model, counts, FAISS index, last run) as `retrieval info --json`."""
        from retrieval.report_text import collect_info

        return collect_info(self.layout, self.settings.db_url, list_failures=failures)

    def verify(self) -> Any:
        """Check that database, vector file and FAISS index agree; a report with `ok` and `problems`."""
        from retrieval.verify import verify_index

        if self.settings.db_url is None and not self.layout.exists():
            raise IndexNotFoundError(f"no index in {self.layout.root.resolve()}; run `retrieval index CORPUS` first")
        return verify_index(self.layout, self.settings.db_url)


def _is_pil_image(obj: Any) -> bool:
    return any(c.__module__.startswith("PIL.") and c.__name__ == "Image" for c in type(obj).__mro__)


def _pil_to_png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
