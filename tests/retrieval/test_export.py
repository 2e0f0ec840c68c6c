"""`retrieval export`: Parquet + .npy that load with pyarrow, pandas and numpy; batched; atomic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import retrieval
from retrieval.cli.app import app
from retrieval.errors import RetrievalError
from tests.retrieval.curation.conftest import plant_corpus

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pd = pytest.importorskip("pandas")

T = 0.9995


@pytest.fixture
def index(tmp_path: Path, tiny_model_dir: Path) -> retrieval.Index:
    corpus = tmp_path / "corpus"
    plant_corpus(corpus)
    idx = retrieval.Index.create(tmp_path / "idx", model=str(tiny_model_dir), workers=0, batch_size=16)
    idx.update(corpus, progress=False)
    yield idx
    idx.close()


def stored(index: retrieval.Index) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array(sorted(index.reader.store.image_ids()), np.int64)
    return ids, index.reader.vectors.read(ids)


def test_export_round_trips_through_pyarrow_pandas_and_numpy(index: retrieval.Index, tmp_path: Path) -> None:
    dedup = index.dedup(threshold=T, progress=False)
    clusters = index.cluster(k=4, progress=False)
    out = index.export(tmp_path / "ds", batch_size=5, progress=False)
    assert (out.rows, out.dedup_run, out.cluster_run) == (16, dedup.run_id, clusters.run_id)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["embeddings_search.npy", "ids.npy", "images.parquet"]

    table = pq.read_table(out.parquet)
    field = table.schema.field("embedding_search")
    assert pa.types.is_fixed_size_list(field.type) and field.type.list_size == 32
    assert field.type.value_type == pa.float32()
    assert pq.ParquetFile(out.parquet).metadata.num_row_groups == 4  # 16 rows in batches of 5
    meta = json.loads(table.schema.metadata[b"retrieval"])
    assert meta["schema"] == "retrieval.export" and meta["roles"]["search"]["dim"] == 32
    assert meta["corpus_root"] == str(index.corpus_root)

    ids, vectors = stored(index)
    frame = pd.read_parquet(out.parquet)
    assert frame["id"].tolist() == ids.tolist()
    assert np.array_equal(np.stack(frame["embedding_search"].to_numpy()), vectors)
    with index.reader.store.session() as s:
        from retrieval.store import Image

        row = s.get(Image, int(ids[3]))
    got = frame.iloc[3]
    assert (got["path"], got["sha256"], got["size"], got["width"], got["height"], got["format"]) == (
        row.path, row.sha256, row.size, row.width, row.height, row.format)
    assert int(got["phash"], 16) == row.phash % (1 << 64)

    # dedup and cluster columns: the latest runs, null where an image is in no group
    members = {m.image_id: (g.group, m.action) for g in dedup.groups for m in g.members}
    in_group = frame["dedup_group"].notna()
    assert set(frame.loc[in_group, "id"]) == set(members)
    for _, r in frame[in_group].iterrows():
        assert (r["dedup_group"], r["dedup_action"]) == members[r["id"]]
    assert frame.loc[~in_group, "dedup_action"].isna().all()
    assert frame["cluster"].notna().all() and frame["cluster"].value_counts().sum() == 16
    assert sorted(frame["cluster"].value_counts().tolist()) == sorted(s for s in clusters.sizes if s)
    assert ((frame["cluster_distance"] >= 0) & (frame["cluster_distance"] <= 2)).all()

    npy = np.load(out.npy["search"], mmap_mode="r")
    assert npy.dtype == np.float16 and npy.shape == (16, 32)
    assert np.array_equal(npy.astype(np.float32), vectors)
    assert np.array_equal(np.load(out.ids), ids)


def test_export_without_runs_has_null_run_columns_and_batches_do_not_change_the_content(
        index: retrieval.Index, tmp_path: Path) -> None:
    one = index.export(tmp_path / "one", batch_size=1, npy=False, progress=False)
    many = index.export(tmp_path / "many", batch_size=1000, npy=False, progress=False)
    assert (one.dedup_run, one.cluster_run, one.npy, one.ids) == (None, None, {}, None)
    a, b = pq.read_table(one.parquet), pq.read_table(many.parquet)
    assert a.drop_columns([]).equals(b) and a.num_rows == 16
    assert a.column("dedup_group").null_count == 16 and a.column("cluster").null_count == 16


def test_export_is_atomic_when_it_fails_midway(index: retrieval.Index, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    first = index.export(tmp_path / "ds", progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()}
    calls = {"n": 0}
    real_read = index.reader.vectors.read

    def failing_read(ids):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk went away")
        return real_read(ids)

    monkeypatch.setattr(index.reader.vectors, "read", failing_read)
    with pytest.raises(OSError, match="disk went away"):
        index.export(tmp_path / "ds", batch_size=4, progress=False)
    after = {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()}
    assert after == before, "a failed export leaves the previous files untouched and no temporary files"
    assert first.rows == 16


def test_export_refuses_nothing_to_do_and_explains_missing_pyarrow(index: retrieval.Index, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RetrievalError, match="nothing to export"):
        index.export(tmp_path / "x", parquet=False, npy=False)
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(RetrievalError, match=r"pip install 'retrieval\[export\]'"):
        index.export(tmp_path / "x")
    only_npy = index.export(tmp_path / "x", parquet=False, progress=False)
    assert only_npy.parquet is None and only_npy.npy["search"].exists()


def test_export_cli(index: retrieval.Index, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["export", "--index-dir", str(index.path), "-o", str(tmp_path / "cli"),
                                      "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["rows"] == 16 and len(data["files"]) == 3
    text = CliRunner().invoke(app, ["export", "--index-dir", str(index.path), "-o", str(tmp_path / "cli")])
    assert "exported 16 images:" in text.output


def check_optional_readers(parquet: Path, column: str, ids: np.ndarray, vectors: np.ndarray, tmp_path: Path) -> None:
    """polars, Hugging Face `datasets` and LanceDB read `column` of the export as it is, each when
    installed (they are not test dependencies); skips when none is."""
    checked = 0
    try:
        import polars
    except ImportError:
        pass
    else:
        frame = polars.read_parquet(parquet)
        assert frame["id"].to_list() == ids.tolist()
        assert np.array_equal(frame[column].to_numpy(), vectors)
        checked += 1
    try:
        import datasets
    except ImportError:
        pass
    else:
        ds = datasets.Dataset.from_parquet(str(parquet), cache_dir=str(tmp_path / "hf"))
        assert ds.num_rows == len(ids) and np.allclose(np.array(ds[5][column]), vectors[5])
        checked += 1
    try:
        import lancedb
    except ImportError:
        pass
    else:
        db = lancedb.connect(tmp_path / "lance")
        table = db.create_table("images", data=pq.read_table(parquet))
        hit = table.search(vectors[2], vector_column_name=column).limit(1).to_list()[0]
        assert hit["id"] == ids[2]
        checked += 1
    if not checked:
        pytest.skip("none of polars, datasets, lancedb is installed")


def test_export_loads_in_datasets_and_lancedb_when_installed(index: retrieval.Index, tmp_path: Path) -> None:
    """Optional readers: skipped unless polars, `datasets` or `lancedb` is installed (not test deps)."""
    out = index.export(tmp_path / "ds", npy=False, progress=False)
    ids, vectors = stored(index)
    check_optional_readers(out.parquet, "embedding_search", ids, vectors, tmp_path)
