"""`retrieval export` of an index with a copy role: embedding_copy beside embedding_search, and
embeddings_copy.npy, in the Parquet's row order; an image without a copy embedding is null there."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

import retrieval
from retrieval.store import COPY_NONE
from tests.retrieval.curation.conftest import plant_corpus
from tests.retrieval.embedding.test_copy import tiny_copy_model
from tests.retrieval.test_export import check_optional_readers

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pd = pytest.importorskip("pandas")


@pytest.fixture(scope="module")
def copy_index(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> retrieval.Index:
    import torch

    root = tmp_path_factory.mktemp("export-copy")
    model = root / "tiny-sscd.pt"
    torch.jit.script(tiny_copy_model()).save(str(model))
    plant_corpus(root / "corpus")
    idx = retrieval.Index.create(root / "idx", model=str(tiny_model_dir), copy_model=str(model), workers=0,
                                 batch_size=16)
    idx.update(root / "corpus", progress=False)
    yield idx
    idx.close()


def stored(index: retrieval.Index) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.array(sorted(index.reader.store.image_ids()), np.int64)
    return ids, index.reader.vectors.read(ids), index.reader.copy_vectors.read(ids)


def test_export_writes_the_copy_role_as_its_own_column_and_npy(copy_index: retrieval.Index, tmp_path: Path) -> None:
    out = copy_index.export(tmp_path / "ds", batch_size=5, progress=False)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [
        "embeddings_copy.npy", "embeddings_search.npy", "ids.npy", "images.parquet"]
    assert set(out.npy) == {"search", "copy"}

    table = pq.read_table(out.parquet)
    field = table.schema.field("embedding_copy")
    assert pa.types.is_fixed_size_list(field.type) and field.type.list_size == 16
    assert field.type.value_type == pa.float32() and table.column("embedding_copy").null_count == 0
    meta = json.loads(table.schema.metadata[b"retrieval"])
    assert meta["roles"]["copy"] == {"dim": 16, "column": "embedding_copy", "npy": "embeddings_copy.npy",
                                     "model": copy_index.reader.meta["copy_model_ref"]}
    assert meta["roles"]["search"]["dim"] == 32

    ids, search, copy = stored(copy_index)
    assert not np.array_equal(copy[:, :16], search[:, :16]), "two different models"
    frame = pd.read_parquet(out.parquet)
    assert frame["id"].tolist() == ids.tolist()
    assert np.array_equal(np.stack(frame["embedding_copy"].to_numpy()), copy)
    assert np.array_equal(np.stack(frame["embedding_search"].to_numpy()), search)
    npy = np.load(out.npy["copy"], mmap_mode="r")
    assert npy.dtype == np.float16 and npy.shape == (len(ids), 16)
    assert np.array_equal(npy.astype(np.float32), copy)
    assert np.array_equal(np.load(out.ids), ids)


def test_an_image_without_a_copy_embedding_is_null_in_parquet_and_zero_in_npy(
        copy_index: retrieval.Index, tmp_path: Path) -> None:
    ids, _, copy = stored(copy_index)
    gone = int(ids[3])
    db = copy_index.path / "retrieval.db"
    with sqlite3.connect(db) as conn:  # as while a copy role is still being added to an index
        before = conn.execute("SELECT copy_state FROM images WHERE id = ?", (gone,)).fetchone()[0]
        conn.execute("UPDATE images SET copy_state = ? WHERE id = ?", (COPY_NONE, gone))
    try:
        out = copy_index.export(tmp_path / "ds", batch_size=2, progress=False)
    finally:
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE images SET copy_state = ? WHERE id = ?", (before, gone))
    column = pq.read_table(out.parquet).column("embedding_copy")
    assert column.null_count == 1
    frame = pd.read_parquet(out.parquet)
    missing = frame["embedding_copy"].isna()
    assert frame.loc[missing, "id"].tolist() == [gone]
    assert np.array_equal(np.stack(frame.loc[~missing, "embedding_copy"].to_numpy()), np.delete(copy, 3, axis=0))
    npy = np.load(out.npy["copy"]).astype(np.float32)
    assert not npy[3].any() and np.array_equal(np.delete(npy, 3, axis=0), np.delete(copy, 3, axis=0))


def test_copy_role_loads_in_polars_datasets_and_lancedb_when_installed(copy_index: retrieval.Index,
                                                                      tmp_path: Path) -> None:
    """Optional readers: skipped unless polars, `datasets` or `lancedb` is installed (not test deps)."""
    out = copy_index.export(tmp_path / "ds", npy=False, progress=False)
    ids, _, copy = stored(copy_index)
    check_optional_readers(out.parquet, "embedding_copy", ids, copy, tmp_path)
