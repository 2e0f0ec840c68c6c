"""Spherical k-means: assignments equal NumPy nearest-centroid, ranks nearest first, bad k, CLI + mosaic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retrieval.curation.clusters import assign, default_k, spherical_kmeans
from tests.retrieval.curation.test_dedup_e2e import parse_report


def test_assignments_equal_numpy_nearest_centroid() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c = spherical_kmeans(x, 20, niter=5)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
    labels, dist = assign(x, c)
    sims = x @ c.T
    assert (labels == sims.argmax(axis=1)).mean() > 0.999  # ties at float precision aside
    np.testing.assert_allclose(dist, 1.0 - sims.max(axis=1), atol=1e-5)


def test_default_k_scales_with_n() -> None:
    assert [default_k(n) for n in (1, 100, 10_000, 10**12)] == [1, 10, 100, 100_000]


def test_cluster_command_stores_runs_and_writes_mosaics(planted, cli, tmp_path: Path) -> None:
    from sqlalchemy import select

    from retrieval.layout import IndexLayout
    from retrieval.search import IndexReader
    from retrieval.store import ClusterAssignment

    _, index_dir, _ = planted
    out = tmp_path / "clusters"
    _, text = cli("cluster", "-k", "3", "--index-dir", index_dir, "-o", out, "--no-progress", "--json")
    result = json.loads(text)
    assert result["k"] == 3 and sum(result["sizes"]) == 16 and not result["reused"]
    reader = IndexReader(IndexLayout(index_dir))
    with reader.store.session() as s:
        rows = s.scalars(select(ClusterAssignment).where(ClusterAssignment.run_id == result["run_id"])).all()
    assert len(rows) == 16
    centroids = np.load(Path(reader.layout.root / "clusters" / f"run{result['run_id']}_centroids.npy"))
    ids = np.array([r.image_id for r in rows])
    sims = reader.vectors.read(ids) @ centroids.T
    np.testing.assert_array_equal([r.cluster for r in rows], sims.argmax(axis=1))
    np.testing.assert_allclose([r.distance for r in rows], 1 - sims.max(axis=1), atol=1e-5)
    for c in range(3):
        ranked = sorted((r for r in rows if r.cluster == c), key=lambda r: r.rank)
        assert [r.rank for r in ranked] == list(range(len(ranked)))
        assert [r.distance for r in ranked] == sorted(r.distance for r in ranked)
    reader.close()
    data = parse_report(out / "clusters.html")
    assert sorted(i["id"] for i in data["items"]) == [0, 1, 2]
    assert all((out / c["src"]).is_file() for i in data["items"] for c in i["cells"])
    _, text = cli("cluster", "-k", "3", "--index-dir", index_dir, "-o", out, "--no-progress", "--json")
    assert json.loads(text)["reused"]


@pytest.mark.parametrize("k, message", [("17", "larger than the number of indexed images (16)"), ("0", "at least 1")])
def test_bad_k_is_a_one_line_error(planted, cli, k: str, message: str) -> None:
    _, index_dir, _ = planted
    code, out = cli("cluster", "-k", k, "--index-dir", index_dir, ok=False)
    assert code == 1 and message in out


def test_centroid_file_follows_from_the_run_id(planted, cli, tmp_path: Path) -> None:
    import shutil

    from retrieval.curation.clusters import centroids_path, load_centroids
    from retrieval.errors import RetrievalError
    from retrieval.layout import IndexLayout
    from retrieval.search import IndexReader
    from tests import db as testdb

    _, index_dir, _ = planted
    _, text = cli("cluster", "-k", "2", "--index-dir", index_dir, "-o", tmp_path / "c", "--no-progress", "--json")
    run_id = json.loads(text)["run_id"]
    db = index_dir / "retrieval.db"
    with testdb.connect(db) as conn:
        params = json.loads(conn.execute("SELECT params FROM cluster_runs WHERE id = ?", (run_id,)).fetchone()[0])
    assert "centroids" not in params
    derived = centroids_path(index_dir, run_id)
    expected = np.load(derived)

    # A run stored by an older release recorded the path in params; it keeps working.
    legacy = tmp_path / "elsewhere.npy"
    shutil.move(derived, legacy)
    with testdb.connect(db) as conn:
        conn.execute("UPDATE cluster_runs SET params = ? WHERE id = ?",
                     (json.dumps({**params, "centroids": str(legacy)}), run_id))
    reader = IndexReader(IndexLayout(index_dir))
    try:
        np.testing.assert_array_equal(load_centroids(reader, run_id), expected)
        _, text = cli("cluster", "-k", "2", "--index-dir", index_dir, "-o", tmp_path / "c", "--no-progress", "--json")
        assert json.loads(text)["run_id"] == run_id  # still reused

        legacy.unlink()  # centroids gone: a clear error, and the next identical run recomputes
        with pytest.raises(RetrievalError, match="centroids of clustering run .* are missing"):
            load_centroids(reader, run_id)
    finally:
        reader.close()
    _, text = cli("cluster", "-k", "2", "--index-dir", index_dir, "-o", tmp_path / "c", "--no-progress", "--json")
    again = json.loads(text)
    assert not again["reused"] and again["run_id"] != run_id and centroids_path(index_dir, again["run_id"]).is_file()
