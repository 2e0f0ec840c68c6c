"""`index --ray` on a real two-node cluster: the same ids, rows, vectors (bitwise) and FAISS contents as
the local runner; a worker node lost mid-run and a driver killed mid-run both end in a correct index
with no duplicate ids."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import retrieval
from retrieval.indexer import stages
from tests.conftest import make_corpus
from tests.indexer.test_copy_role import copy_model  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(300)


def _corpus(root: Path, n: int) -> Path:
    make_corpus(root, n)
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # a failure, recorded as data
    return root


N_IMAGES = 32


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, dict[str, object]]:
    """A corpus (with one broken file) and the contents of its index made by the local runner."""
    root = tmp_path_factory.mktemp("ray-index")
    corpus = _corpus(root / "corpus", N_IMAGES)
    summary = _index(root / "local", tiny_model_dir, corpus)
    assert (summary.new, summary.failed) == (N_IMAGES, 1)
    return corpus, _contents(root / "local")


def _index(index_dir: Path, model: Path, corpus: Path, ray: str | None = None, **settings: object) -> object:
    from retrieval.index import make_settings

    index = retrieval.Index(make_settings(index_dir=index_dir, model=str(model), device="cpu", workers=0,
                                          batch_size=4, **settings))
    return index.update(corpus, progress=False, ray=ray)


def _contents(index_dir: Path) -> dict[str, object]:
    import faiss

    with sqlite3.connect(index_dir / "retrieval.db") as conn:
        rows = conn.execute("SELECT id, path, sha256, width, height, phash, pdq, copy_state FROM images "
                            "ORDER BY id").fetchall()
        failures = conn.execute("SELECT path, kind FROM failures ORDER BY path").fetchall()
    out: dict[str, object] = {"rows": rows, "failures": failures}
    for role, vectors, faiss_file in (("search", "vectors.npy", "index.faiss"),
                                      ("copy", "vectors-copy.npy", "index-copy.faiss")):
        if (index_dir / vectors).exists():
            out[f"{role}_vectors"] = (index_dir / vectors).read_bytes()
            out[f"{role}_faiss"] = faiss.serialize_index(faiss.read_index(str(index_dir / faiss_file))).tobytes()
    return out


def _no_duplicates(index_dir: Path) -> int:
    """How many images the index holds, each path once under one id."""
    with sqlite3.connect(index_dir / "retrieval.db") as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM images")]
        paths = [r[0] for r in conn.execute("SELECT path FROM images")]
    assert len(ids) == len(set(ids)) == len(set(paths))
    return len(ids)


def test_index_on_ray_equals_the_local_run(tmp_path: Path, tiny_model_dir: Path, copy_model: Path,  # noqa: F811
                                           ray_address: str) -> None:
    corpus = _corpus(tmp_path / "corpus", 12)
    local = _index(tmp_path / "local", tiny_model_dir, corpus, copy_model=str(copy_model))
    remote = _index(tmp_path / "remote", tiny_model_dir, corpus, ray=ray_address, copy_model=str(copy_model))
    assert (remote.new, remote.failed, remote.total_images) == (local.new, local.failed, local.total_images) == (12, 1, 12)
    assert remote.copy_embedded == 12
    a, b = _contents(tmp_path / "local"), _contents(tmp_path / "remote")
    assert a.keys() == b.keys() and {"search_vectors", "copy_vectors", "search_faiss", "copy_faiss"} <= a.keys()
    for key in a:
        assert a[key] == b[key], key  # ids, paths, hashes, failures; vectors and FAISS bitwise, both roles


def test_the_cli_option_and_a_killed_driver_resume(tmp_path: Path, tiny_model_dir: Path, ray_address: str,
                                                    reference: tuple[Path, dict[str, object]],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from retrieval.cli import app

    corpus, expected = reference
    args = ["index", str(corpus), "--model", str(tiny_model_dir), "--device", "cpu", "-j", "0", "-b", "4",
            "--no-progress", "--index-dir", str(tmp_path / "remote"), "--ray", ray_address]
    real, commits = stages.write_batch, []

    def killed_after_two_batches(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if len(commits) == 2:
            raise SystemExit(137)  # the driver dies with two batches committed, more in flight
        commits.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "write_batch", killed_after_two_batches)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 137, result.output
    assert 0 < _no_duplicates(tmp_path / "remote") < N_IMAGES  # two batches of 4 files (one may be the broken one)
    monkeypatch.setattr(stages, "write_batch", real)
    result = CliRunner().invoke(app, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert _no_duplicates(tmp_path / "remote") == N_IMAGES
    assert _contents(tmp_path / "remote") == expected  # the resumed index is the one a local run makes


def test_a_worker_node_lost_mid_run(tmp_path: Path, tiny_model_dir: Path, ray_cluster,  # noqa: ANN001
                                    reference: tuple[Path, dict[str, object]], monkeypatch: pytest.MonkeyPatch) -> None:
    corpus, expected = reference
    real, removed = stages.write_batch, []

    def lose_the_worker_at_the_first_commit(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if not removed:  # the other batches are being decoded and embedded on both nodes now
            ray_cluster.cluster.remove_node(ray_cluster.worker, allow_graceful=False)
            removed.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "write_batch", lose_the_worker_at_the_first_commit)
    try:
        summary = _index(tmp_path / "remote", tiny_model_dir, corpus, ray=ray_cluster.address)
    finally:
        if removed:
            ray_cluster.add_worker()  # the next tests get two nodes again
    assert removed and (summary.new, summary.failed) == (N_IMAGES, 1)
    assert _no_duplicates(tmp_path / "remote") == N_IMAGES
    assert _contents(tmp_path / "remote") == expected
