"""`retrieval export`: the dataset as files that load anywhere, without this package.

* images.parquet: one row per image (ascending id): file facts, hashes, each embedding role as a
  fixed-size list of float32 (pandas, polars, Hugging Face `datasets` and LanceDB read it as-is;
  float32 because polars and some Arrow readers have no float16), the image's group and action in
  the latest completed dedup run and its cluster in the latest completed clustering run.
* embeddings_<role>.npy: the fp16 vectors as stored, row i = Parquet row i; ids.npy: their image
  ids. `numpy.load(..., mmap_mode="r")` opens them without knowing the dimension.

Roles: `search` (the retrieval model) always; `copy` (the copy-detection model) when the index has
one (`index --copy-model`), as the column embedding_copy and embeddings_copy.npy. An image whose
copy embedding is missing (not embedded yet) is null in embedding_copy and a zero row in the .npy.

Streamed a batch of images at a time, so memory stays bounded for any corpus size. Every file is
written under a temporary name and renamed into place when complete, and the index's writer lock
is held meanwhile, so a concurrent `retrieval index` cannot mix two states of the index into one
export.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from sqlalchemy import func, select

from retrieval.errors import RetrievalError
from retrieval.layout import IndexLock, fsync_dir
from retrieval.results import ExportResult
from retrieval.search import IndexReader
from retrieval.store import (
    ClusterAssignment,
    ClusterRun,
    DedupRun,
    DuplicateGroup,
    DuplicateMember,
    COPY_NONE,
    Image,
    to_unsigned64,
    utcnow,
)
from retrieval.vectors import DTYPE, VectorStore

logger = logging.getLogger(__name__)

PARQUET_NAME = "images.parquet"
IDS_NAME = "ids.npy"
SCHEMA = "retrieval.export"
SCHEMA_VERSION = 1


def npy_name(role: str) -> str:
    return f"embeddings_{role}.npy"


def embedding_column(role: str) -> str:
    return f"embedding_{role}"


def roles(reader: IndexReader) -> dict[str, VectorStore]:
    """Every embedding role of the index and its vector store: search, and copy when embedded."""
    stores = {"search": reader.vectors}
    if reader.copy_dim:
        stores["copy"] = reader.copy_vectors
    return stores


def role_models(reader: IndexReader) -> dict[str, Any]:
    return {"search": reader.meta.get("model_ref"), "copy": reader.meta.get("copy_model_ref")}


def read_role(role: str, store: VectorStore, ids: np.ndarray, copy_states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float32 vectors, missing mask) of `ids` in one role; a missing copy embedding is a zero row."""
    if role != "copy":
        return store.read(ids), np.zeros(len(ids), bool)
    missing = copy_states == COPY_NONE
    vectors = np.zeros((len(ids), store.dim), np.float32)
    if not missing.all():
        vectors[~missing] = store.read(ids[~missing])
    return vectors, missing


def arrow_schema(dims: dict[str, int], metadata: dict[str, Any]) -> Any:
    import pyarrow as pa

    fields = [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("path", pa.string(), nullable=False),  # relative to the corpus root (schema metadata)
        pa.field("sha256", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("mtime_ns", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("format", pa.string()),
        pa.field("phash", pa.string()),  # 64-bit pHash, 16 hex digits (imagehash's str())
        # search is never null; copy is null for an image without a copy embedding
        *[pa.field(embedding_column(role), pa.list_(pa.float32(), dim), nullable=role != "search")
          for role, dim in dims.items()],
        pa.field("dedup_group", pa.int32()),  # group number in the latest dedup run; null: no duplicate
        pa.field("dedup_action", pa.string()),  # keep or remove
        pa.field("dedup_reason", pa.string()),
        pa.field("dedup_similarity", pa.float32()),  # cosine to the group's representative
        pa.field("cluster", pa.int32()),
        pa.field("cluster_distance", pa.float32()),  # 1 - cosine to the centroid
    ]
    return pa.schema(fields, metadata={"retrieval": json.dumps(metadata)})


def _latest(reader: IndexReader, model: Any) -> int | None:
    from retrieval import runs

    return runs.latest_id(reader.store, model)


def _batches(reader: IndexReader, batch_size: int) -> Iterator[list[Any]]:
    """Image rows in ascending id order, `batch_size` at a time (keyset pagination: no OFFSET scans)."""
    last = -1
    while True:
        with reader.store.session() as s:
            rows = s.execute(select(Image.id, Image.path, Image.sha256, Image.size, Image.mtime_ns, Image.width,
                                    Image.height, Image.format, Image.phash, Image.copy_state)
                             .where(Image.id > last).order_by(Image.id).limit(batch_size)).all()
        if not rows:
            return
        yield rows
        last = rows[-1][0]


def _run_columns(reader: IndexReader, ids: np.ndarray, dedup_run: int | None,
                 cluster_run: int | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(values, missing mask) of the dedup and cluster columns for `ids` (sorted)."""
    lo, hi = int(ids[0]), int(ids[-1])
    pos = {int(i): p for p, i in enumerate(ids)}
    n = len(ids)
    cols = {"dedup_group": np.zeros(n, np.int32), "dedup_action": np.full(n, None, object),
            "dedup_reason": np.full(n, None, object), "dedup_similarity": np.zeros(n, np.float32),
            "cluster": np.zeros(n, np.int32), "cluster_distance": np.zeros(n, np.float32)}
    has_dedup, has_cluster = np.zeros(n, bool), np.zeros(n, bool)
    with reader.store.session() as s:
        if dedup_run is not None:
            for image_id, number, action, reason, sim in s.execute(
                    select(DuplicateMember.image_id, DuplicateGroup.number, DuplicateMember.action,
                           DuplicateMember.reason, DuplicateMember.similarity)
                    .join(DuplicateGroup, DuplicateGroup.id == DuplicateMember.group_id)
                    .where(DuplicateMember.run_id == dedup_run, DuplicateMember.image_id.between(lo, hi))):
                p = pos.get(image_id)
                if p is not None:
                    has_dedup[p] = True
                    cols["dedup_group"][p], cols["dedup_action"][p] = number, action
                    cols["dedup_reason"][p], cols["dedup_similarity"][p] = reason, sim
        if cluster_run is not None:
            for image_id, cluster, distance in s.execute(
                    select(ClusterAssignment.image_id, ClusterAssignment.cluster, ClusterAssignment.distance)
                    .where(ClusterAssignment.run_id == cluster_run, ClusterAssignment.image_id.between(lo, hi))):
                p = pos.get(image_id)
                if p is not None:
                    has_cluster[p] = True
                    cols["cluster"][p], cols["cluster_distance"][p] = cluster, distance
    missing = {name: ~(has_dedup if name.startswith("dedup") else has_cluster) for name in cols}
    return {name: (values, missing[name]) for name, values in cols.items()}


def _record_batch(schema: Any, rows: list[Any], vectors: dict[str, tuple[np.ndarray, np.ndarray]],
                  runs: dict[str, tuple[np.ndarray, np.ndarray]]) -> Any:
    import pyarrow as pa

    cols = list(zip(*rows))
    arrays = [
        pa.array(cols[0], pa.int64()), pa.array(cols[1], pa.string()), pa.array(cols[2], pa.string()),
        pa.array(cols[3], pa.int64()), pa.array(cols[4], pa.int64()), pa.array(cols[5], pa.int32()),
        pa.array(cols[6], pa.int32()), pa.array(cols[7], pa.string()),
        pa.array([f"{to_unsigned64(h):016x}" for h in cols[8]], pa.string()),
    ]
    for role, (vecs, missing) in vectors.items():
        flat = pa.array(np.ascontiguousarray(vecs, dtype=np.float32).reshape(-1), pa.float32())
        if not missing.any():
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, vecs.shape[1]))
            continue
        validity = pa.array(~missing, pa.bool_()).buffers()[1]  # a boolean array's values are a bitmap
        arrays.append(pa.Array.from_buffers(pa.list_(pa.float32(), vecs.shape[1]), len(missing), [validity],
                                            null_count=int(missing.sum()), children=[flat]))
    for name in ("dedup_group", "dedup_action", "dedup_reason", "dedup_similarity", "cluster", "cluster_distance"):
        values, missing = runs[name]
        arrays.append(pa.array(values, schema.field(name).type, mask=missing))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _publish(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def export_index(reader: IndexReader, folder: Path, parquet: bool = True, npy: bool = True,
                 batch_size: int = 10_000, progress: bool = False) -> ExportResult:
    """Write images.parquet and/or the .npy files into `folder` (see the module docstring)."""
    from tqdm import tqdm

    if not parquet and not npy:
        raise RetrievalError("nothing to export: both Parquet and .npy are switched off")
    if batch_size < 1:
        raise RetrievalError(f"--batch-size must be at least 1, got {batch_size}")
    if parquet:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise RetrievalError("Parquet export needs pyarrow: pip install 'retrieval[export]' "
                                 "(or export only .npy files with --no-parquet)") from None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stores = roles(reader)
    temps: list[Path] = []
    with IndexLock(reader.layout), ExitStack() as stack:
        with reader.store.session() as s:
            n = s.scalar(select(func.count(Image.id))) or 0
        dedup_run, cluster_run = _latest(reader, DedupRun), _latest(reader, ClusterRun)
        meta = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "corpus_root": str(reader.corpus_root),
                "model": reader.meta.get("model_ref"), "exported_at": utcnow().isoformat(),
                "dedup_run": dedup_run, "cluster_run": cluster_run, "images": n,
                "roles": {role: {"dim": v.dim, "column": embedding_column(role), "npy": npy_name(role),
                                 "model": role_models(reader)[role]} for role, v in stores.items()}}
        targets: dict[str, Path] = {}
        try:
            writer = matrices = ids_out = None
            if parquet:
                schema = arrow_schema({role: v.dim for role, v in stores.items()}, meta)
                targets[PARQUET_NAME] = folder / PARQUET_NAME
                temps.append(_temporary(targets[PARQUET_NAME]))
                writer = stack.enter_context(pq.ParquetWriter(temps[-1], schema))
            if npy:
                matrices = {}
                for role, v in stores.items():
                    targets[npy_name(role)] = folder / npy_name(role)
                    temps.append(_temporary(targets[npy_name(role)]))
                    matrices[role] = np.lib.format.open_memmap(temps[-1], mode="w+", dtype=DTYPE, shape=(n, v.dim))
                targets[IDS_NAME] = folder / IDS_NAME
                temps.append(_temporary(targets[IDS_NAME]))
                ids_out = np.lib.format.open_memmap(temps[-1], mode="w+", dtype=np.int64, shape=(n,))
            done = 0
            with tqdm(total=n, unit="img", desc="exporting", disable=not progress) as bar:
                for rows in _batches(reader, batch_size):
                    ids = np.array([r[0] for r in rows], np.int64)
                    if done + len(ids) > n:
                        raise RetrievalError("the index changed during the export; run it again")
                    copy_states = np.array([r[9] for r in rows], np.int64)
                    vectors = {role: read_role(role, v, ids, copy_states) for role, v in stores.items()}
                    if writer is not None:
                        writer.write_batch(_record_batch(writer.schema, rows, vectors,
                                                         _run_columns(reader, ids, dedup_run, cluster_run)))
                    if matrices is not None and ids_out is not None:
                        for role, (vecs, _) in vectors.items():
                            matrices[role][done : done + len(ids)] = vecs.astype(DTYPE)
                        ids_out[done : done + len(ids)] = ids
                    done += len(ids)
                    bar.update(len(ids))
            if done != n:
                raise RetrievalError("the index changed during the export; run it again")
            stack.close()  # the Parquet footer is written here
            for m in [*(matrices or {}).values(), *([ids_out] if ids_out is not None else [])]:
                m.flush()
            del matrices, ids_out
            for tmp, final in zip(temps, targets.values()):
                _publish(tmp, final)
            fsync_dir(folder)
        finally:
            for tmp in temps:
                tmp.unlink(missing_ok=True)
    logger.info("exported %d images to %s", n, folder)
    return ExportResult(parquet=targets.get(PARQUET_NAME),
                        npy={role: targets[npy_name(role)] for role in stores if npy_name(role) in targets},
                        ids=targets.get(IDS_NAME), rows=n, dedup_run=dedup_run, cluster_run=cluster_run)
