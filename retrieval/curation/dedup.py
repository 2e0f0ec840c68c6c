"""`retrieval dedup`: exact, near-exact and copy duplicates, self or against a reference set.

Mirrors the DINOv2 pipeline: hash dedup, then copy detection on a k-NN graph (k = 64) whose edges
above a cosine threshold are joined with a disjoint-set; one image survives per component. With a
reference folder (relative dedup) every component that touches a reference file is removed whole.
Results are stored in SQLite; a rerun with the same parameters on an unchanged index reuses them.

The graph uses the index's copy role (a copy-detection model such as SSCD, `index --copy-model`)
when it has one, as the paper does; otherwise the search role (DINOv2), whose thresholds are
provisional. Stages: exact bytes / pixels, pHash, PDQ with flips and rotations, the embedding
k-NN graph, and on the copy role geometric verification (retrieval.curation.verify) of the pairs
between a loose floor and the threshold. Every member's reason is the stage of the edge that joined
it to its group.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select

from retrieval import ann, runs
from retrieval.curation import hashing
from retrieval.curation.graph import Edges, RayGraph, knn_edges, maybe_gpu, sampled_edge_recall, scores_are_exact
from retrieval.curation.hamming import range_pairs_dihedral
from retrieval.curation.groups import Group, Nodes, PathColumn, build_groups
from retrieval.curation.policy import DEFAULT_POLICY, check_policy
from retrieval.errors import RetrievalError
from retrieval.search import IndexReader
from retrieval.sources.open import source_id
from retrieval.vectors import BoundedReader, clip_cosine
from retrieval.store import (
    DedupRun,
    DuplicateGroup,
    DuplicateMember,
    Image,
    ReviewDecision,
)

logger = logging.getLogger(__name__)

# Provisional defaults for DINOv2 CLS cosine, to be replaced by what `retrieval calibrate` measures
# with a real checkpoint (the paper's 0.6 / 0.45 are for SSCD copy-detection descriptors). 0.95 is
# the API's duplicate threshold; the reference threshold is looser (the paper's relative step is
# stricter about contamination, i.e. it removes more).
DEFAULT_THRESHOLD = 0.95
DEFAULT_REFERENCE_THRESHOLD = 0.90
DEFAULT_K = 64
SCHEMA_VERSION = 1
RECALL_SAMPLE = 256
PARK_NODES_FROM = 1_000_000  # images from which the node table waits in files while the graph is built


def _memory_mb() -> dict[str, float]:
    """This process's memory from /proc/self/status (MiB): VmHWM, its peak resident set so far, and
    RssAnon / RssFile now. The split matters with memory-mapped vectors: pages of the vector file
    count as resident once read, but they are page cache the kernel can drop, not the process's own."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in ("VmHWM", "RssAnon", "RssFile"):
                    out[key] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return out


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory so far (VmHWM), for the run record; None off Linux."""
    return _memory_mb().get("VmHWM")

# Default cosine thresholds of the copy role, per copy model: (self-dedup, against a reference set).
# Measured for the two models installable here on real photographs with 19 kinds of planted edit
# (benchmarks/dedup_quality.py; benchmarks/README.md): the highest-recall threshold whose pair
# precision reaches 0.97 when the two halves of one photograph count as false pairs. Different
# photographs never scored above 0.43 with either model there, so 0.6 against a reference set
# (which removes whole groups) keeps a wide margin. The fp32 `sscd` TorchScript could not be
# measured here: its entry is SSCD's README value (cosine > 0.75 is a copy at about 90 % precision
# on DISC21 pairs) and stays provisional.
COPY_THRESHOLDS: dict[str, tuple[float, float]] = {
    "sscd": (0.75, 0.60),
    "sscd-int8": (0.81, 0.60),
    "sscd-distilled": (0.83, 0.60),
}
COPY_THRESHOLDS_MEASURED = {"sscd-int8", "sscd-distilled"}  # the others are provisional: said so once
DEFAULT_COPY_THRESHOLD = COPY_THRESHOLDS["sscd"]  # other SSCD-like files (.pt / .onnx): provisional

# PDQ: Meta's reference match radius is 31 of 256 bits, and hashes of quality < 50 are unreliable
# (flat or tiny images): those take no part in the PDQ stage.
DEFAULT_PDQ_DISTANCE = 31
PDQ_MIN_QUALITY = 50

# Stages by the strength of their evidence: a member joined by several edges is credited to the strongest.
STAGE_RANK = {"exact": 0, "phash": 1, "pdq": 2, "copy": 3, "embedding": 3, "verified": 4}

# Geometric verification (retrieval.curation.verify) on the copy role: pairs whose cosine is at
# least this floor but below the threshold become edges only when local features, RANSAC and the
# aligned images agree. Measured with benchmarks/dedup_quality.py like the thresholds: different
# photographs stay below the floor there, and with verification on, the self-dedup thresholds
# above still give the highest recall at the precision target (a lower one lets sibling halves in
# unverified, a higher one sends true pairs with too few keypoints to verification, which refuses them).
VERIFY_FLOORS: dict[str, float] = {"sscd": 0.5, "sscd-int8": 0.5, "sscd-distilled": 0.5}
DEFAULT_VERIFY_FLOOR = 0.5

# Safety of the result: say so when a group holds more than this share of the corpus (and at least
# GIANT_GROUP_MIN images), when a group's weakest pair is this far below the threshold, or when a
# run would remove more than this share of the corpus.
GIANT_GROUP_FRACTION = 0.02
GIANT_GROUP_MIN = 20
WEAK_PAIR_MARGIN = 0.15
MOST_REMOVED_FRACTION = 0.5


@dataclass
class DedupOptions:
    threshold: float | None = None  # None: the role's default (see default_threshold)
    k: int = DEFAULT_K
    phash_distance: int = hashing.DEFAULT_PHASH_DISTANCE  # -1 disables the pHash stage
    pdq_distance: int = DEFAULT_PDQ_DISTANCE  # -1 disables the PDQ stage
    role: str = "auto"  # auto (copy when the index has it), copy or search
    keep: str = DEFAULT_POLICY
    max_group_diameter: float | None = None  # cosine distance (1 - cos) to the representative
    against: Path | str | None = None  # a folder or any retrieval.sources source
    embeddings: bool = True
    pixels: bool = True
    batch: int = 2048
    use_gpu: bool = True
    progress: bool = False
    force: bool = False
    max_pixels: int = 89_478_485
    workers: int = 0
    batch_size: int = 32
    ray: str | None = None  # a Ray cluster address (retrieval.distributed): the k-NN graph runs there
    recall_sample: int = RECALL_SAMPLE  # nodes whose exact k-NN edges check the graph (0: not measured)
    verify: bool | None = None  # geometric verification: None = on for the copy role when OpenCV is installed
    verify_floor: float | None = None  # lowest cosine a verified pair may have (None: per copy model)
    verify_missing: bool = False  # set by run_dedup: verification was wanted by default but OpenCV is missing

    @property
    def effective_threshold(self) -> float:
        if self.threshold is not None:
            return self.threshold
        return DEFAULT_REFERENCE_THRESHOLD if self.against else DEFAULT_THRESHOLD

    def validate(self) -> None:
        t = self.effective_threshold
        if not 0.0 < t <= 1.0:
            raise RetrievalError(f"--threshold must be in (0, 1], got {t}")
        if self.k < 1:
            raise RetrievalError(f"-k must be at least 1, got {self.k}")
        if self.phash_distance > 64:
            raise RetrievalError(f"--phash-distance must be at most 64 (a 64-bit hash), got {self.phash_distance}")
        if self.pdq_distance > 256:
            raise RetrievalError(f"--pdq-distance must be at most 256 (a 256-bit hash), got {self.pdq_distance}")
        if self.role not in ("auto", "copy", "search"):
            raise RetrievalError(f"--role must be auto, copy or search, got {self.role!r}")
        if self.max_group_diameter is not None and not 0.0 <= self.max_group_diameter <= 2.0:
            raise RetrievalError(f"--max-group-diameter is a cosine distance in [0, 2], got {self.max_group_diameter}")
        if self.verify_floor is not None and not 0.0 < self.verify_floor <= 1.0:
            raise RetrievalError(f"--verify-floor must be in (0, 1], got {self.verify_floor}")
        check_policy(self.keep)

    def params(self) -> dict[str, Any]:
        return {"threshold": self.effective_threshold, "k": self.k, "phash_distance": self.phash_distance,
                "pdq_distance": self.pdq_distance, "role": self.role, "keep": self.keep, "max_group_diameter": self.max_group_diameter,
                "against": source_id(self.against) if self.against else None,
                "embeddings": self.embeddings, "pixels": self.pixels, "verify": self.verify,
                "verify_floor": self.verify_floor}


@dataclass
class DedupOutcome:
    run_id: int
    reused: bool
    counts: dict[str, Any] = field(default_factory=dict)


@dataclass
class RoleView:
    """The embedding the k-NN graph runs on: the copy role, or the search role as the fallback."""

    name: str  # copy or search
    stage: str  # the reason its edges give: copy or embedding
    model_ref: str
    dim: int
    load_index: Any  # () -> the FAISS index (loaded only by the paths that search it)
    vectors: Any  # the role's VectorStore
    provisional: bool  # thresholds not measured for this model

    @property
    def read(self) -> Any:
        return self.vectors.read

    @cached_property
    def index(self) -> Any:
        return self.load_index()


def choose_role(reader: IndexReader, wanted: str = "auto") -> str:
    if wanted == "copy" and not reader.has_copy_role:
        raise RetrievalError("this index has no copy role; add one with `retrieval index CORPUS --copy-model "
                             "sscd-distilled` (or sscd, sscd-int8, a .pt/.onnx file)")
    if wanted == "auto":
        return "copy" if reader.has_copy_role else "search"
    return wanted


def default_threshold(reader: IndexReader, role: str, against: bool) -> tuple[float, bool]:
    """(the role's default threshold, whether it is provisional) for self-dedup or `against`."""
    if role == "search":
        return (DEFAULT_REFERENCE_THRESHOLD if against else DEFAULT_THRESHOLD), True
    ref = str(reader.meta.get("copy_model_ref") or "")
    kind = (reader.meta.get("copy_preprocess") or {}).get("model_kind")
    if kind == "transformers":
        return (DEFAULT_REFERENCE_THRESHOLD if against else DEFAULT_THRESHOLD), True
    pair = COPY_THRESHOLDS.get(ref)
    measured = pair is not None and ref in COPY_THRESHOLDS_MEASURED
    pair = pair or DEFAULT_COPY_THRESHOLD
    return (pair[1] if against else pair[0]), not measured


def resolve_verify(reader: IndexReader, opts: DedupOptions) -> bool:
    """Whether this run verifies copy-role pairs geometrically; asked-for but impossible is an error."""
    from retrieval.curation import verify as vf

    if opts.verify is False:
        return False
    why = None
    if opts.role != "copy" or not opts.embeddings:
        why = ("geometric verification checks copy-role pairs and this run has none (add a copy model with "
               "`retrieval index CORPUS --copy-model sscd-distilled`)")
    elif opts.against is not None:
        why = "geometric verification is for self-dedup; with --against the threshold alone decides"
    elif not vf.available():
        why = "geometric verification needs OpenCV: pip install 'retrieval[verify]' (opencv-python-headless)"
    if why is not None and opts.verify:
        raise RetrievalError(why)
    return why is None


def _role_view(reader: IndexReader, role: str, use_gpu: bool) -> RoleView:
    if role == "copy":
        return RoleView("copy", "copy", str(reader.meta.get("copy_model_ref")), int(reader.copy_dim or 0),
                        lambda: maybe_gpu(reader.copy_index, use_gpu), reader.copy_vectors, False)
    return RoleView("search", "embedding", str(reader.meta.get("model_ref")), reader.dim,
                    lambda: maybe_gpu(reader.index, use_gpu), reader.vectors, True)


def graph_method(n: int, opts: DedupOptions, spec: Any = None) -> str:
    """How the k-NN graph is built on CPU: `exact` (partition.exact_edges: brute force as one cell of
    the join) for small corpora and where the index is flat (the user asked for exact search there)
    up to partition.EXACT_MAX; `partition` (partition.partition_edges: the vectors file only) from
    MIN_VECTORS up; `index` (graph.knn_edges through the FAISS index) for a flat index beyond
    EXACT_MAX, on a GPU and on a Ray cluster."""
    from retrieval.curation import partition

    flat = spec is not None and getattr(spec, "kind", None) == "flat"
    if opts.ray is not None or (opts.use_gpu and ann.gpu_count()):
        return "index"
    if n < partition.MIN_VECTORS or flat:
        return "exact" if n <= partition.EXACT_MAX else "index"
    return "partition"


# (Nodes field, column of load_nodes's select, dtype): width and height fit int32
_NODE_INTS = (("image_id", 0, np.int64), ("phash", 3, np.int64), ("width", 4, np.int32), ("height", 5, np.int32),
              ("size", 6, np.int64), ("mtime_ns", 7, np.int64))


def load_nodes(reader: IndexReader, chunk: int = 100_000) -> Nodes:
    """Every image row as compact node columns, read `chunk` rows at a time.

    The table stays resident for the whole run, so nothing in it is a Python object per image:
    paths go into one UTF-8 buffer (PathColumn), sha256 into 33-byte content keys
    (hashing.content_keys), numbers into numpy arrays; only the current chunk's rows exist as
    Python objects. The columns are sized from a count first and each chunk is written into
    place: per-chunk arrays kept for a final concatenate interleave on the heap with each chunk's
    freed rows and pin that heap.
    """
    stmt = select(Image.id, Image.path, Image.sha256, Image.phash, Image.width, Image.height, Image.size,
                  Image.mtime_ns).order_by(Image.id)
    with reader.store.session() as s:
        capacity = int(s.execute(select(func.count()).select_from(Image)).scalar_one())
        cols = {name: np.empty(capacity, dtype) for name, _, dtype in _NODE_INTS}
        cols["sha256"] = np.empty(capacity, f"S{hashing.KEY_BYTES}")
        ends = np.zeros(capacity + 1, np.int64)  # path i is path_bytes[ends[i]:ends[i + 1]]
        path_bytes = bytearray()  # grows in place (a large block is remapped, not copied)
        n = 0
        for part in s.execute(stmt, execution_options={"yield_per": chunk}).partitions():
            rows = list(zip(*part))
            del part
            m = len(rows[0])
            if n + m > capacity:  # rows added by another process between the count and this read
                capacity = max(2 * capacity, n + m)
                cols = {k: np.concatenate([v, np.empty(capacity - len(v), v.dtype)]) for k, v in cols.items()}
                ends = np.concatenate([ends, np.zeros(capacity + 1 - len(ends), np.int64)])
            for name, col, _ in _NODE_INTS:
                cols[name][n : n + m] = rows[col]
            cols["sha256"][n : n + m] = hashing.content_keys(rows[2], start=n)
            encoded = [p.encode("utf-8", "surrogatepass") for p in rows[1]]
            np.cumsum(np.fromiter(map(len, encoded), np.int64, m), out=ends[n + 1 : n + m + 1])
            ends[n + 1 : n + m + 1] += ends[n]
            path_bytes += b"".join(encoded)
            n += m
            del rows, encoded
    if not n:
        raise RetrievalError("the index holds no images; run `retrieval index CORPUS` first")
    if n < capacity:  # rows deleted since the count
        cols = {k: v[:n].copy() for k, v in cols.items()}
        ends = ends[: n + 1].copy()
    return Nodes(path=PathColumn(np.frombuffer(path_bytes, np.uint8), ends), is_ref=np.zeros(n, bool),
                 root=reader.source.local_root, **cols)


def _with_references(nodes: Nodes, ref: Any) -> Nodes:
    """The corpus nodes followed by the reference files (image id -1, sizes unknown: 0)."""
    from retrieval.store import to_signed64

    m = len(ref.paths)
    return Nodes(
        image_id=np.r_[nodes.image_id, np.full(m, -1, np.int64)],
        path=PathColumn.concat([nodes.path, [ref.full_path(p) for p in ref.paths]]),
        sha256=np.r_[nodes.sha256, hashing.content_keys(ref.sha256, start=len(nodes))],
        phash=np.r_[nodes.phash, np.array([to_signed64(h) for h in ref.phash], np.int64)],
        width=np.r_[nodes.width, np.zeros(m, nodes.width.dtype)],
        height=np.r_[nodes.height, np.zeros(m, nodes.height.dtype)],
        size=np.r_[nodes.size, np.zeros(m, np.int64)], mtime_ns=np.r_[nodes.mtime_ns, np.zeros(m, np.int64)],
        is_ref=np.r_[nodes.is_ref, np.ones(m, bool)], root=nodes.root)


def _folder_state(folder: Path | str) -> list[Any]:
    from retrieval.sources.open import open_aux_source

    return [(e.path, e.size, e.mtime_ns, e.etag) for e in open_aux_source(folder, "reference").scan()]


def run_dedup(reader: IndexReader, opts: DedupOptions) -> DedupOutcome:
    """Find duplicate groups, store them as a run, and return its id (reused when nothing changed)."""
    from dataclasses import replace

    role = choose_role(reader, opts.role)
    default, provisional = default_threshold(reader, role, opts.against is not None)
    opts = replace(opts, role=role, threshold=default if opts.threshold is None else opts.threshold)
    from retrieval.curation import verify as vf

    wanted_by_default = opts.verify is None and role == "copy" and opts.embeddings and opts.against is None
    opts = replace(opts, verify=resolve_verify(reader, opts))
    opts = replace(opts, verify_missing=wanted_by_default and not vf.available())
    if opts.verify and opts.verify_floor is None:
        opts = replace(opts, verify_floor=VERIFY_FLOORS.get(str(reader.meta.get("copy_model_ref") or ""),
                                                            DEFAULT_VERIFY_FLOOR))
    opts.validate()
    params = opts.params()
    params["model"] = reader.meta.get("copy_model_ref" if role == "copy" else "model_ref")
    params["threshold_provisional"] = provisional and opts.threshold == default
    ref_state = _folder_state(opts.against) if opts.against else None
    fp = runs.fingerprint(reader.store, reader.meta.get("model_fingerprint"), params,
                          [ref_state, reader.meta.get("copy_model_fingerprint")])
    if not opts.force:
        old = next(iter(runs.reusable(reader.store, DedupRun, fp)), None)
        if old is not None:
            logger.info("reusing dedup run %d: same parameters, index unchanged", old.id)
            return DedupOutcome(run_id=old.id, reused=True, counts=old.counts or {})
    run_id = runs.start(reader.store, DedupRun, mode="relative" if opts.against else "self", fingerprint=fp,
                        params=params)
    try:
        counts, groups, nodes, failures = _compute(reader, opts, params["threshold_provisional"])
        _store(reader, run_id, nodes, groups, counts, failures)
    except BaseException as exc:
        runs.fail(reader.store, DedupRun, run_id, exc)
        raise
    return DedupOutcome(run_id=run_id, reused=False, counts=counts)


def _compute(reader: IndexReader, opts: DedupOptions,
             provisional: bool = False) -> tuple[dict[str, Any], list[Group], Nodes, list[Any]]:
    timings: dict[str, float] = {}
    t = time.perf_counter()
    nodes = load_nodes(reader)
    ids = nodes.image_id
    n = len(ids)
    threshold = opts.effective_threshold
    role = _role_view(reader, choose_role(reader, opts.role), opts.use_gpu) if opts.embeddings else None
    if role is None:
        role_name = choose_role(reader, opts.role)
        read = reader.copy_vectors.read if role_name == "copy" else reader.vectors.read
        dim = int(reader.copy_dim or 0) if role_name == "copy" else reader.dim
        stage = "copy" if role_name == "copy" else "embedding"
    else:
        role_name, read, dim, stage = role.name, role.read, role.dim, role.stage
    # scans over the whole vector file keep only a bounded share of it resident in this process
    read = BoundedReader(reader.copy_vectors if role_name == "copy" else reader.vectors)
    warnings: list[dict[str, Any]] = []
    verifying = bool(opts.verify) and role is not None and role_name == "copy"
    band = Edges.empty()
    if opts.verify_missing:
        message = ("geometric verification is off: OpenCV is not installed (pip install 'retrieval[verify]'), so "
                   "copies the copy model scores below the threshold (heavy crops, rotations, padding) are missed")
        logger.warning("%s", message)
        warnings.append({"kind": "verification_off", "message": message})
    if role_name == "search" and provisional:
        message = ("the thresholds are provisional: this index has no copy-detection model, so dedup runs on "
                   "the search model's embeddings, whose thresholds nobody has measured; add one with "
                   "`retrieval index CORPUS --copy-model sscd-distilled` (or sscd) or measure yours with "
                   "`retrieval calibrate`")
        logger.warning("%s", message)
        warnings.append({"kind": "provisional_thresholds", "message": message})
    covered = _with_role_vector(reader, ids, role_name)
    if not covered.all():
        message = (f"{int((~covered).sum())} image(s) have no {role_name} vector yet (their decode failed when the "
                   f"copy role was added); only the hash stages can match them. Run `retrieval index` again.")
        logger.warning("%s", message)
        warnings.append({"kind": "missing_vectors", "message": message})
    ref = None
    failures: list[Any] = []
    if opts.against:
        from retrieval.curation.folders import embed_folder

        if role_name == "copy":
            ref = embed_folder(opts.against, None, opts.max_pixels, opts.batch_size, opts.workers,
                               opts.progress, what="reference", copy=reader.copy_embedder())
        else:
            ref = embed_folder(opts.against, reader.embedder(), opts.max_pixels, opts.batch_size, opts.workers,
                               opts.progress, what="reference")
        failures = ref.failures
        nodes = _with_references(nodes, ref)
        timings["embed_reference_s"] = time.perf_counter() - t

    def to_pos(edges: Edges) -> Edges:
        return Edges(np.searchsorted(ids, edges.src), np.searchsorted(ids, edges.dst), edges.sim)

    parts: list[tuple[str, Edges]] = []
    graph_stats: dict[str, Any] = {}
    exact_links: set[tuple[int, int]] = set()
    t = time.perf_counter()
    cpu0 = time.process_time()
    all_pos = np.arange(len(nodes))
    parts.append(("exact", hashing.sha256_edges(all_pos, nodes.sha256)))
    if opts.pixels:
        px = to_pos(hashing.pixel_edges(reader.locate, ids, nodes.path[:n], nodes.sha256[:n], nodes.phash[:n],
                                        nodes.width[:n], nodes.height[:n], opts.max_pixels))
        exact_links = {(int(a), int(b)) for a, b in zip(np.minimum(px.src, px.dst), np.maximum(px.src, px.dst))}
        parts.append(("exact", px))
    timings["exact_s"] = time.perf_counter() - t
    peaks = {"exact": _peak_rss_mb()}
    resident = {"exact": _memory_mb()}
    cpu = {"exact": time.process_time() - cpu0}
    t = time.perf_counter()
    if opts.phash_distance >= 0:
        parts.append(("phash", hashing.phash_edges(all_pos, nodes.phash, opts.phash_distance, progress=opts.progress)))
    timings["phash_s"] = time.perf_counter() - t
    peaks["phash"] = _peak_rss_mb()
    resident["phash"] = _memory_mb()
    cpu["phash"] = time.process_time() - cpu0 - sum(cpu.values())
    t = time.perf_counter()
    pdq_stats: dict[str, int] = {}
    if opts.pdq_distance >= 0:
        blobs = _load_pdq(reader, ids) + (list(ref.pdq) if ref is not None else [])
        quality = _load_pdq_quality(reader, ids, ref)
        parts.append(("pdq", pdq_edges(blobs, quality, opts.pdq_distance, pdq_stats)))
    timings["pdq_s"] = time.perf_counter() - t
    cpu["pdq"] = time.process_time() - cpu0 - sum(cpu.values())
    t = time.perf_counter()
    if role is not None and n >= PARK_NODES_FROM:
        nodes = nodes.parked()  # the graph needs none of the table but the ids: its pages wait in files
    if role is not None:
        import faiss

        query_ids = ids[covered]
        k = min(opts.k, max(1, len(query_ids) - 1))
        extra = None
        offset = int(ids.max()) + 1
        if ref is not None and len(ref.paths):
            flat = faiss.IndexFlatIP(role.dim)
            flat.add(np.ascontiguousarray(ref.vectors, dtype=np.float32))
            extra = (flat, offset)
        on_ray = None
        if opts.ray is not None:
            if role.name == "copy":
                copy_spec = (reader.meta.get("copy_index") or {}).get("params") or {}
                on_ray = RayGraph(opts.ray, str(reader.layout.faiss_for("copy").resolve()),
                                  int(copy_spec.get("nprobe") or 1), reader.copy_vectors)
            else:
                on_ray = RayGraph(opts.ray, str(reader.layout.faiss_path.resolve()), reader.nprobe, reader.vectors)
        low = min(threshold, opts.verify_floor) if verifying else threshold
        spec_data = reader.meta.get("copy_index" if role.name == "copy" else "index")
        method = graph_method(len(query_ids), opts, ann.IndexSpec.from_dict(spec_data) if spec_data else None)
        if method == "partition":
            from retrieval.curation.partition import partition_edges

            emb = partition_edges(query_ids, read, k, low, extra, stats=graph_stats, progress=opts.progress)
        elif method == "exact":
            from retrieval.curation.partition import exact_edges

            emb = exact_edges(query_ids, read, k, low, extra, stats=graph_stats, progress=opts.progress)
        else:
            emb = knn_edges(role.index, query_ids, read, k, low, opts.batch, opts.progress, extra,
                            stats=graph_stats, ray=on_ray) if len(query_ids) else Edges.empty()
        approximate = method == "partition" or (method == "index" and len(query_ids) > 0
                                                 and not scores_are_exact(role.index))
        if opts.recall_sample > 0 and len(query_ids) and approximate:
            t_recall = time.perf_counter()
            graph_stats["edge_recall_sample"] = sampled_edge_recall(emb, query_ids, read, k, low,
                                                                    sample=opts.recall_sample)
            timings["graph_recall_check_s"] = time.perf_counter() - t_recall
        # A FAISS id the database no longer holds (an index run killed before its sync) must not
        # become an edge: searchsorted below would map it onto an unrelated image.
        # (Edges are canonical, src < dst, so a stale id can sit on either end.)
        known = ((emb.dst >= offset) | np.isin(emb.dst, ids)) & np.isin(emb.src, ids)
        emb = Edges(emb.src[known], emb.dst[known], emb.sim[known])
        is_ref_dst = emb.dst >= offset
        dst = np.where(is_ref_dst, n + (emb.dst - offset), np.searchsorted(ids, np.minimum(emb.dst, offset - 1)))
        emb = Edges(np.searchsorted(ids, emb.src), dst, emb.sim)
        sure = emb.sim >= threshold
        parts.append((role.stage, Edges(emb.src[sure], emb.dst[sure], emb.sim[sure])))
        band = Edges(emb.src[~sure], emb.dst[~sure], emb.sim[~sure])
    timings["graph_s"] = time.perf_counter() - t - timings.get("graph_recall_check_s", 0.0)
    peaks["graph"] = _peak_rss_mb()
    resident["graph"] = _memory_mb()
    cpu["graph"] = time.process_time() - cpu0 - sum(cpu.values())
    verify_stats: dict[str, Any] = {}
    if verifying and len(band):
        t = time.perf_counter()
        parts.append(("verified", _verified_edges(reader, nodes, Edges.concat([e for _, e in parts]).canonical(),
                                                  band.canonical(), verify_stats)))
        verify_stats["floor"] = opts.verify_floor
        timings["verify_s"] = time.perf_counter() - t
        peaks["verify"] = _peak_rss_mb()
        cpu["verify"] = time.process_time() - cpu0 - sum(cpu.values())
    edges = Edges.concat([e for _, e in parts]).canonical()
    stages = edge_stages(edges, parts, len(nodes))

    def vectors_of(pos: np.ndarray) -> np.ndarray:
        pos = np.asarray(pos)
        out = np.zeros((len(pos), dim), np.float32)
        corpus = pos < n
        have = corpus & covered[np.minimum(pos, n - 1)] if n else corpus
        if have.any():
            out[have] = read(ids[pos[have]])
        if (~corpus).any():
            assert ref is not None
            out[~corpus] = ref.vectors[pos[~corpus] - n]
        return out

    edges = Edges(edges.src, edges.dst, edge_cosines(edges, vectors_of))
    t = time.perf_counter()
    groups = build_groups(nodes, edges, vectors_of, opts.keep, opts.phash_distance, opts.max_group_diameter,
                          exact_links)
    if ref is not None:
        # Relative mode: components that never touch a reference are not this run's business
        # (a plain `dedup` does self-deduplication).
        groups = [g for g in groups if g.touches_reference]
    assign_joining_stages(groups, edges, stages, stage)
    timings["groups_s"] = time.perf_counter() - t
    peaks["groups"] = _peak_rss_mb()
    resident["groups"] = _memory_mb()
    cpu["groups"] = time.process_time() - cpu0 - sum(cpu.values())
    counts = _counts(groups, nodes, n, threshold, ref, timings)
    counts["peak_rss_mb_after"] = peaks
    # resident memory after each stage, anonymous vs file-backed (memory-mapped vectors, index)
    counts["rss_anon_mb_after"] = {k: v.get("RssAnon") for k, v in resident.items()}
    counts["rss_file_mb_after"] = {k: v.get("RssFile") for k, v in resident.items()}
    counts["cpu_s"] = {k: round(v, 3) for k, v in cpu.items()}  # CPU time per stage (all threads)
    counts["role"] = role_name
    counts["model"] = reader.meta.get("copy_model_ref" if role_name == "copy" else "model_ref")
    if pdq_stats:
        counts["pdq"] = pdq_stats
    if graph_stats:
        counts["graph"] = graph_stats  # e.g. the measured ANN pre-filter margin, for the record
    if verify_stats:
        counts["verify"] = verify_stats
    floor = min(threshold, opts.verify_floor) if verifying and opts.verify_floor is not None else threshold
    counts["warnings"] = warnings + safety_warnings(groups, n, floor, counts, opts.max_group_diameter)
    return counts, groups, nodes, failures


def _verified_edges(reader: IndexReader, nodes: Nodes, confident: Edges, band: Edges,
                    stats: dict[str, Any]) -> Edges:
    """The band's pairs that verify geometrically and keep their groups chain-safe (verify.verified_merges)."""
    from retrieval.curation import verify as vf

    max_pixels = 89_478_485
    verifier = vf.Verifier(lambda p: vf.grey_thumbnail(reader.locate(nodes.path[p]), vf.MAX_SIDE, max_pixels))
    area = nodes.width.astype(np.float64) * nodes.height.astype(np.float64)
    st = vf.VerifyStats()
    accepted = vf.verified_merges(len(nodes), confident, band, verifier, area, stats=st)
    stats.update(st.as_dict())
    logger.info("geometric verification: %d of %d candidate pairs checked, %d accepted", st.checked, st.candidates,
                st.accepted)
    return accepted


def _with_role_vector(reader: IndexReader, ids: np.ndarray, role: str) -> np.ndarray:
    """Which images (in `ids` order) have a vector of the role: all for search, copy_state >= 1 for copy."""
    if role == "search":
        return np.ones(len(ids), bool)
    from retrieval.store import COPY_WRITTEN

    with reader.store.session() as s:
        have = np.fromiter(s.scalars(select(Image.id).where(Image.copy_state >= COPY_WRITTEN)), dtype=np.int64)
    return np.isin(ids, have)


def _load_pdq(reader: IndexReader, ids: np.ndarray) -> list[bytes | None]:
    with reader.store.session() as s:  # only the hashed rows: most corpora at scale have none yet
        rows = dict(s.execute(select(Image.id, Image.pdq).where(Image.pdq.is_not(None))).all())
    return [rows.get(int(i)) for i in ids] if rows else [None] * len(ids)


def _load_pdq_quality(reader: IndexReader, ids: np.ndarray, ref: Any) -> np.ndarray:
    with reader.store.session() as s:
        rows = dict(s.execute(select(Image.id, Image.pdq_quality).where(Image.pdq_quality.is_not(None))).all())
    q = [rows.get(int(i)) or 0 for i in ids] if rows else [0] * len(ids)
    if ref is not None:
        q += [100 if p is not None else 0 for p in ref.pdq]  # reference files are always matched
    return np.asarray(q, np.int64)


def pdq_edges(blobs: list[bytes | None], quality: np.ndarray, radius: int,
              stats: dict[str, int] | None = None) -> Edges:
    """Pairs of positions whose PDQ hashes are within `radius` bits under any flip or 90-degree rotation.

    Hashes below PDQ_MIN_QUALITY (flat, tiny images, where PDQ says it is unreliable) take no part.
    """
    from retrieval.imaging.hashes import pdq_variants

    usable = np.array([b is not None for b in blobs], bool) & (np.asarray(quality) >= PDQ_MIN_QUALITY)
    pos = np.flatnonzero(usable)
    if stats is not None:
        stats.update(hashed=int(sum(b is not None for b in blobs)), usable=int(len(pos)))
    if len(pos) < 2:
        return Edges.empty()
    variants = pdq_variants([blobs[p] for p in pos])  # type: ignore[misc]
    i, j, _ = range_pairs_dihedral(np.ascontiguousarray(variants[:, 0]), variants, radius)
    return Edges(pos[i], pos[j], np.ones(len(i), np.float32)).canonical()


def edge_stages(edges: Edges, parts: list[tuple[str, Edges]], n_nodes: int) -> np.ndarray:
    """For every canonical edge, the strongest stage (STAGE_RANK) among the stages that found it."""
    if not len(edges):
        return np.empty(0, dtype=object)
    keys, ranks = [], []
    for stage, e in parts:
        if not len(e):
            continue
        a, b = np.minimum(e.src, e.dst), np.maximum(e.src, e.dst)
        keys.append(a.astype(np.int64) * n_nodes + b)
        ranks.append(np.full(len(a), STAGE_RANK[stage], np.int64))
    key = np.concatenate(keys)
    rank = np.concatenate(ranks)
    order = np.lexsort((rank, key))
    key, rank = key[order], rank[order]
    first = np.r_[True, key[1:] != key[:-1]]
    key, rank = key[first], rank[first]
    at = np.searchsorted(key, edges.src.astype(np.int64) * n_nodes + edges.dst)
    names = {r: s for s, r in STAGE_RANK.items() if s != "embedding"}
    out = np.array([names[int(r)] for r in rank[at]], dtype=object)
    # the embedding stage shares the copy stage's rank: name it after the role that ran
    is_embed = np.zeros(len(edges), bool)
    for stage, e in parts:
        if stage == "embedding" and len(e):
            a, b = np.minimum(e.src, e.dst), np.maximum(e.src, e.dst)
            is_embed |= np.isin(edges.src.astype(np.int64) * n_nodes + edges.dst, a.astype(np.int64) * n_nodes + b)
    out[is_embed & (out == "copy")] = "embedding"
    return out


def assign_joining_stages(groups: list[Group], edges: Edges, stages: np.ndarray, role_stage: str) -> None:
    """Set each removed member's reason to the stage of the edge that joined it to its group.

    The group is grown from its representative (or its reference files) along the strongest
    evidence first (exact, then pHash, PDQ, the embedding; by similarity within a stage), so a
    byte-identical copy is "exact" even when an embedding edge also links it. Members held in the
    group only by their similarity to the representative take the embedding stage's name.
    """
    import heapq

    if not groups:
        return
    size = max(int(edges.src.max(initial=0)), int(edges.dst.max(initial=0)),
               max(m.pos for g in groups for m in g.members)) + 1
    where = np.full(size, -1, np.int64)
    for gi, g in enumerate(groups):
        where[[m.pos for m in g.members]] = gi
    ga, gb = where[edges.src], where[edges.dst]
    inside = np.flatnonzero((ga >= 0) & (ga == gb))
    inside = inside[np.argsort(ga[inside], kind="stable")]
    bounds = np.searchsorted(ga[inside], np.arange(len(groups) + 1))
    for gi, g in enumerate(groups):
        adj: dict[int, list[int]] = {}
        for e in inside[bounds[gi] : bounds[gi + 1]].tolist():
            adj.setdefault(int(edges.src[e]), []).append(e)
            adj.setdefault(int(edges.dst[e]), []).append(e)
        roots = [m.pos for m in g.members if m.reason in ("representative",)] or \
                [m.pos for m in g.members if m.action == "keep"]
        joined: dict[int, str] = {r: "" for r in roots}
        heap: list[tuple[int, float, int, int]] = []

        def push(p: int) -> None:
            for e in adj.get(p, []):
                other = int(edges.dst[e]) if int(edges.src[e]) == p else int(edges.src[e])
                if other not in joined:
                    heapq.heappush(heap, (STAGE_RANK[stages[e]], -float(edges.sim[e]), e, other))

        for r in roots:
            push(r)
        while heap:
            _, _, e, p = heapq.heappop(heap)
            if p in joined:
                continue
            joined[p] = str(stages[e])
            push(p)
        for m in g.members:
            if m.action == "remove" and m.reason != "reference":
                m.reason = joined.get(m.pos) or role_stage
        g.reasons = sorted({m.reason for m in g.members if m.action == "remove"})


def safety_warnings(groups: list[Group], n: int, threshold: float, counts: dict[str, Any],
                    max_group_diameter: float | None) -> list[dict[str, Any]]:
    """Words for a result a user should not act on blindly: giant groups, chains of dissimilar
    images, a run that would remove most of the corpus; each with what to try."""
    out: list[dict[str, Any]] = []
    if max_group_diameter is None:
        advice = ("Split chains with --max-group-diameter 0.3 (the largest cosine distance to the representative), "
                  "raise --threshold, or measure the threshold on this corpus with `retrieval calibrate`.")
    else:
        advice = ("Lower --max-group-diameter, raise --threshold, or measure the threshold on this corpus with "
                  "`retrieval calibrate`.")
    giant_at = max(GIANT_GROUP_MIN, GIANT_GROUP_FRACTION * n)
    giant = [(i + 1, len(g.members)) for i, g in enumerate(groups) if len(g.members) > giant_at]
    if giant:
        out.append({"kind": "giant_groups", "groups": [number for number, _ in giant],
                    "message": f"{len(giant)} group(s) hold more than {GIANT_GROUP_FRACTION:.0%} of the corpus "
                               f"(largest: group {giant[0][0]} with {giant[0][1]} of {n} images): a chain of near "
                               f"neighbours may join images that are not copies of each other. {advice}"})
    floor = threshold - WEAK_PAIR_MARGIN
    weak = [(i + 1, g.min_pairwise) for i, g in enumerate(groups) if g.min_pairwise < floor]
    if weak:
        worst = min(weak, key=lambda x: x[1])
        out.append({"kind": "weak_groups", "groups": [number for number, _ in weak],
                    "message": f"{len(weak)} group(s) contain two images with similarity below {floor:.2f} "
                               f"({WEAK_PAIR_MARGIN} under the threshold {threshold:.2f}; worst: group {worst[0]} "
                               f"at {worst[1]:.2f}): they are joined through a chain, not by being alike; review "
                               f"them in report.html. {advice}"})
    removing = counts.get("images_to_remove", 0)
    if n and removing > MOST_REMOVED_FRACTION * n:
        out.append({"kind": "most_removed",
                    "message": f"this run would remove {removing} of {n} images ({removing / n:.0%}); check the "
                               f"groups before --apply. {advice}"})
    for w in out:
        logger.warning("%s", w["message"])
    return out


def edge_cosines(edges: Edges, vectors_of: Any, chunk: int = 65_536) -> np.ndarray:
    """Exact cosine of every edge from the stored vectors (hash edges included), clipped to 1."""
    out = np.empty(len(edges), np.float32)
    for start in range(0, len(edges), chunk):
        a = vectors_of(edges.src[start : start + chunk])
        b = vectors_of(edges.dst[start : start + chunk])
        out[start : start + chunk] = np.minimum(np.einsum("ij,ij->i", a, b), 1.0)
    return out


def _counts(groups: list[Group], nodes: Nodes, n: int, threshold: float, ref: Any,
            timings: dict[str, float]) -> dict[str, Any]:
    removed = [m for g in groups for m in g.members if m.action == "remove"]
    by_reason: dict[str, int] = {}
    for m in removed:
        by_reason[m.reason] = by_reason.get(m.reason, 0) + 1
    return {
        "schema_version": SCHEMA_VERSION,
        "images": n,
        "groups": len(groups),
        "images_in_groups": sum(1 for g in groups for m in g.members if not nodes.is_ref[m.pos]),
        "images_to_remove": len(removed),
        "images_to_keep": n - len(removed),
        "removed_by_reason": by_reason,
        "chained_groups": sum(1 for g in groups if g.min_pairwise < threshold),
        "largest_group": max((len(g.members) for g in groups), default=0),
        "reference_files": len(ref.paths) if ref is not None else None,
        "reference_failed": len(ref.failures) if ref is not None else None,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def _store(reader: IndexReader, run_id: int, nodes: Nodes, groups: list[Group], counts: dict[str, Any],
           failures: list[Any]) -> None:
    with reader.store.session() as s, s.begin():
        for number, g in enumerate(groups, 1):
            row = DuplicateGroup(run_id=run_id, number=number, size=len(g.members),
                                 representative_id=None if g.representative is None else int(nodes.image_id[g.representative]),
                                 reasons=",".join(g.reasons)[:64], weakest_edge=clip_cosine(g.weakest_edge),
                                 min_pairwise=clip_cosine(g.min_pairwise), touches_reference=g.touches_reference)
            s.add(row)
            s.flush()
            s.add_all([DuplicateMember(group_id=row.id, run_id=run_id,
                                       image_id=None if nodes.is_ref[m.pos] else int(nodes.image_id[m.pos]),
                                       path=nodes.path[m.pos], is_reference=bool(nodes.is_ref[m.pos]),
                                       action=m.action, similarity=round(clip_cosine(m.similarity), 6), reason=m.reason)
                       for m in _ordered(g)])
        runs.complete(s, DedupRun, run_id, counts=counts, reference_failures=failures)


def _ordered(g: Group) -> list[Any]:
    """Kept members first, then by decreasing similarity to the representative."""
    return sorted(g.members, key=lambda m: (m.action != "keep", -m.similarity, m.pos))


def load_run(reader: IndexReader, run_id: int | None = None) -> dict[str, Any]:
    """A stored run as the versioned duplicates.json document (latest completed run by default)."""
    with reader.store.session() as s:
        run = runs.latest(s, DedupRun) if run_id is None else runs.completed(s, DedupRun, run_id)
        if run is None and run_id is not None:
            raise RetrievalError(f"no completed dedup run with id {run_id} in this index", "not_found")
        if run is None:
            raise RetrievalError("no completed dedup run in this index; run `retrieval dedup` first", "not_found")
        groups = s.scalars(select(DuplicateGroup).where(DuplicateGroup.run_id == run.id)
                           .order_by(DuplicateGroup.number)).all()
        # Review decisions (made in the web UI) override the computed actions.
        members = s.execute(select(DuplicateMember, ReviewDecision.action)
                            .outerjoin(ReviewDecision, ReviewDecision.member_id == DuplicateMember.id)
                            .where(DuplicateMember.run_id == run.id).order_by(DuplicateMember.id)).all()
    by_group: dict[int, list[dict[str, Any]]] = {}
    for m, decided in members:
        by_group.setdefault(m.group_id, []).append({
            "image_id": m.image_id, "path": m.path, "reference": m.is_reference, "action": decided or m.action,
            "similarity": m.similarity, "reason": m.reason, **({"reviewed": True} if decided else {})})
    return {
        "schema": "retrieval.duplicates", "schema_version": SCHEMA_VERSION,
        "run": {"id": run.id, "mode": run.mode, "params": run.params, "started_at": str(run.started_at),
                "finished_at": str(run.finished_at), "applied_at": str(run.applied_at) if run.applied_at else None},
        "corpus_root": reader.corpus_name,
        "source": reader.source.to_meta(),
        "summary": _reviewed_summary(run.counts or {}, by_group),
        "warnings": (run.counts or {}).get("warnings", []),
        "reference_failures": run.reference_failures or [],
        "groups": [{"group": g.number, "size": g.size, "representative_id": g.representative_id,
                    "reasons": [r for r in g.reasons.split(",") if r], "weakest_edge": round(g.weakest_edge, 6),
                    "min_pairwise_similarity": round(g.min_pairwise, 6), "touches_reference": g.touches_reference,
                    "members": by_group.get(g.id, [])} for g in groups],
    }


def _reviewed_summary(counts: dict[str, Any], by_group: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """The run's counts, with the removal count after review decisions when there are any."""
    members = [m for ms in by_group.values() for m in ms if not m["reference"]]
    reviewed = sum(1 for m in members if m.get("reviewed"))
    if not reviewed:
        return counts
    remove = sum(1 for m in members if m["action"] == "remove")
    return {**counts, "reviewed_decisions": reviewed, "images_to_remove": remove,
            "images_to_keep": (counts.get("images") or 0) - remove}
