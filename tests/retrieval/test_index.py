"""The Python API end to end: retrieval.Index on a tiny model, typed results, DataFrames, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

import retrieval
from retrieval.errors import IndexNotFoundError, QueryError, RetrievalError
from tests.retrieval.curation.conftest import plant_corpus, plant_vector

# The tiny random-weight model puts distinct images up to ~0.998 apart; planted copies are >= 0.9999.
T = 0.9995


@pytest.fixture
def built(tmp_path: Path, tiny_model_dir: Path) -> tuple[retrieval.Index, Path, dict[str, str]]:
    corpus = tmp_path / "corpus"
    copies = plant_corpus(corpus)
    index = retrieval.Index.create(tmp_path / "idx", model=str(tiny_model_dir), workers=0, batch_size=16)
    summary = index.update(corpus, progress=False)
    assert (summary.new, summary.failed, summary.total_images) == (16, 0, 16)
    plant_vector(tmp_path / "idx", "flipped/img0007_flip.jpg", "a/img0007.jpg")
    yield index, corpus, copies
    index.close()


def test_import_is_cheap_and_lazy() -> None:
    code = ("import sys, retrieval; before = sorted(m for m in ('numpy', 'sqlalchemy', 'torch', 'faiss', 'pydantic') "
            "if m in sys.modules); retrieval.Index; print(before, 'retrieval.index' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "True"]
    with pytest.raises(AttributeError):
        retrieval.no_such_name  # noqa: B018
    assert "Index" in dir(retrieval) and set(retrieval.__all__) == {"__version__", *retrieval._EXPORTS}


def test_open_refuses_a_missing_index_and_create_an_existing_one(built, tmp_path: Path) -> None:
    with pytest.raises(IndexNotFoundError, match="no index in"):
        retrieval.Index.open(tmp_path / "nothing")
    with pytest.raises(RetrievalError, match="already holds an index"):
        retrieval.Index.create(tmp_path / "idx")
    with pytest.raises(RetrievalError, match="invalid batch_size"):
        retrieval.Index.open(tmp_path / "idx", batch_size=0)
    reopened = retrieval.Index.open(tmp_path / "idx")
    assert len(reopened) == 16 and reopened.dim == 32 and reopened.corpus_root == (tmp_path / "corpus").resolve()
    reopened.close()


def test_search_by_id_path_vector_bytes_and_pil(built) -> None:
    index, corpus, _ = built
    png = corpus / "a" / "img0003.png"
    by_path = index.search(png, k=3)
    assert by_path.answered_from.startswith("stored vector of a/img0003.png")
    own_id = index.reader.image_by_path("a/img0003.png").id
    assert own_id not in [h.id for h in by_path] and len(by_path) == 3
    assert index.search(png, k=3, include_self=True)[0].id == own_id
    by_id = index.search(own_id, k=3)
    assert [h.id for h in by_id] == [h.id for h in by_path]
    assert index.search(str(own_id), k=3).answered_from == f"stored vector of id {own_id}"

    vector = index.reader.vectors.read([own_id])[0] * 3.0  # any length: normalised here
    top = index.search(vector, k=1)[0]
    assert top.id == own_id and top.score == pytest.approx(1.0, abs=1e-3)
    assert index.search(png.read_bytes(), k=1)[0].id == own_id
    assert index.search(PILImage.open(png), k=1)[0].id == own_id
    assert np.allclose(index.embed(png), index.embed(PILImage.open(png)), atol=1e-5)

    for result in (by_path, index.search(vector, k=16)):
        assert all(-1.0 <= h.score <= 1.0 for h in result), "scores are clipped to [-1, 1]"
    frame = by_path.to_pandas()
    assert list(frame.columns) == ["rank", "id", "path", "score", "width", "height", "format"]
    assert frame["rank"].tolist() == [1, 2, 3] and frame["id"].tolist() == [h.id for h in by_path]


def test_nprobe_reaches_the_index_for_every_kind_of_query(built, monkeypatch: pytest.MonkeyPatch) -> None:
    index, corpus, _ = built
    reader = index.reader
    seen: list[int | None] = []
    search_vector = reader.search_vector

    def spy(vector, k, exclude_id=None, nprobe=None):  # noqa: ANN001, ANN202
        seen.append(nprobe)
        return search_vector(vector, k, exclude_id=exclude_id, nprobe=nprobe)

    monkeypatch.setattr(reader, "search_vector", spy)
    png = corpus / "a" / "img0003.png"
    own_id = reader.image_by_path("a/img0003.png").id
    unindexed = corpus.parent / "outside.png"
    unindexed.write_bytes(png.read_bytes())
    for query in (own_id, png, str(png), str(own_id), unindexed, png.read_bytes(), PILImage.open(png),
                  reader.vectors.read([own_id])[0]):
        index.search(query, k=2, nprobe=7)
    assert seen == [7] * 8


def test_search_rejects_bad_queries(built, tmp_path: Path) -> None:
    index, _, _ = built
    with pytest.raises(QueryError, match="is not a file"):
        index.search(tmp_path / "missing.jpg")
    with pytest.raises(QueryError, match="32-d vectors"):
        index.search(np.ones(5, np.float32))
    with pytest.raises(QueryError, match="zero or not finite"):
        index.search(np.zeros(32, np.float32))
    with pytest.raises(QueryError, match="cannot be used"):
        index.search(b"not an image")
    with pytest.raises(QueryError, match="no indexed image with id"):
        index.search(10_000)
    with pytest.raises(QueryError, match="not a bool"):
        index.search(True)


def test_dedup_cluster_curate_and_reports(built, tmp_path: Path) -> None:
    index, corpus, copies = built
    result = index.dedup(threshold=T, progress=False)
    assert not result.reused and result.run_id == 1
    found = {frozenset(m.path for m in g.members) for g in result.groups}
    assert found == {frozenset(pair) for pair in copies.items()}
    assert len(result.to_remove) == 4 and all(m.similarity <= 1.0 for g in result.groups for m in g.members)
    frame = result.to_pandas()
    assert len(frame) == 8 and set(frame["action"]) == {"keep", "remove"}
    again = index.dedup(threshold=T)
    assert again.reused and again.run_id == result.run_id and index.dedup_run().run_id == result.run_id
    files = index.write_report(result, tmp_path / "dedup-report", progress=False)
    assert {"report.html", "duplicates.json"} <= {p.name for p in files.values()}

    clusters = index.cluster(k=3, progress=False)
    assert clusters.k == 3 and sum(clusters.sizes) == 16
    assert clusters.to_pandas()["size"].sum() == 16
    assert (tmp_path / "clusters" / "clusters.html") == index.write_report(clusters, tmp_path / "clusters")["clusters.html"]

    queries = tmp_path / "queries"
    queries.mkdir()
    (queries / "q.png").write_bytes((corpus / "a" / "img0003.png").read_bytes())
    curated = index.curate(queries, k=2, progress=False)
    assert len(curated.items) == 2 and "a/img0003.png" in curated.paths
    assert list(curated.to_pandas()["path"]) == curated.paths
    assert (index.write_report(curated, tmp_path / "cur")["curated.txt"]).read_text().split() == curated.paths
    with pytest.raises(RetrievalError, match="no report for a str"):
        index.write_report("nothing", tmp_path / "x")

    moved = index.apply_dedup(result, tmp_path / "removed")
    assert sorted(moved.moved) == sorted(result.to_remove) and len(index) == 12
    assert index.verify().ok


def test_update_reaches_the_indexer_through_its_entry_point() -> None:
    from retrieval.index import load_updater
    from retrieval.indexer.updater import update

    assert load_updater() is update
    with pytest.raises(RetrievalError, match="no index updater 'nope'"):
        load_updater("nope")


def test_to_pandas_without_pandas_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)
    result = retrieval.ClusterResult(run_id=1, k=1, n_images=1, reused=False, sizes=[1])
    with pytest.raises(RetrievalError, match="pip install pandas"):
        result.to_pandas()
