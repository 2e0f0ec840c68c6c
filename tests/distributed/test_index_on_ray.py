"""`index --ray` on a real two-node cluster: the same ids, rows, vectors (bitwise) and FAISS contents as
the local runner; a worker node lost mid-run and a driver killed mid-run both end in a correct index
with no duplicate ids."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

import retrieval
from retrieval.indexer import stages
from retrieval.indexer.runners import ray as ray_runner
from tests.conftest import make_corpus
from tests.indexer.test_copy_role import copy_model  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def small_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray_runner, "SHARD_IMAGES", 8)  # batches of 4: two per shard, several shards per run


def _corpus(root: Path, n: int) -> Path:
    make_corpus(root, n)
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # a failure, recorded as data
    return root


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
                                           ray_address: str, small_shards: None) -> None:
    corpus = _corpus(tmp_path / "corpus", 20)
    local = _index(tmp_path / "local", tiny_model_dir, corpus, copy_model=str(copy_model))
    remote = _index(tmp_path / "remote", tiny_model_dir, corpus, ray=ray_address, copy_model=str(copy_model))
    assert (remote.new, remote.failed, remote.total_images) == (local.new, local.failed, local.total_images) == (20, 1, 20)
    assert remote.copy_embedded == 20
    a, b = _contents(tmp_path / "local"), _contents(tmp_path / "remote")
    assert a.keys() == b.keys() and {"search_vectors", "copy_vectors", "search_faiss"} <= a.keys()
    for key in a:
        assert a[key] == b[key], key  # ids, paths, hashes, failures; vectors and FAISS bitwise

    # An incremental run on Ray does only the change, and still matches the local runner.
    make_corpus(corpus, 3, start=100)
    local = _index(tmp_path / "local", tiny_model_dir, corpus)
    remote = _index(tmp_path / "remote", tiny_model_dir, corpus, ray=ray_address)
    assert (remote.new, remote.unchanged) == (local.new, local.unchanged) == (3, 20)
    assert _contents(tmp_path / "local") == _contents(tmp_path / "remote")


def test_the_cli_option_and_a_killed_driver_resume(tmp_path: Path, tiny_model_dir: Path, ray_address: str,
                                                    small_shards: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from retrieval.cli import app

    corpus = _corpus(tmp_path / "corpus", 24)
    args = ["index", str(corpus), "--model", str(tiny_model_dir), "--device", "cpu", "-j", "0", "-b", "4",
            "--no-progress", "--index-dir", str(tmp_path / "remote"), "--ray", ray_address]
    real, commits = stages.write_batch, []

    def killed_after_two_batches(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if len(commits) == 2:
            raise SystemExit(137)  # the driver dies with two batches committed
        commits.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "write_batch", killed_after_two_batches)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 137, result.output
    assert 0 < _no_duplicates(tmp_path / "remote") < 24  # two batches of 4 files, one of them the broken one
    monkeypatch.setattr(stages, "write_batch", real)
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert _no_duplicates(tmp_path / "remote") == 24
    _index(tmp_path / "local", tiny_model_dir, corpus)
    assert _contents(tmp_path / "local") == _contents(tmp_path / "remote")


def test_a_worker_node_lost_mid_run(tmp_path: Path, tiny_model_dir: Path, ray_cluster, small_shards: None,  # noqa: ANN001
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = _corpus(tmp_path / "corpus", 32)
    real, committed = stages.write_batch, threading.Event()

    def slow_commit(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        committed.set()
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "write_batch", slow_commit)

    def remove_worker() -> None:
        committed.wait(240)
        ray_cluster.cluster.remove_node(ray_cluster.worker, allow_graceful=False)

    killer = threading.Thread(target=remove_worker, daemon=True)
    killer.start()
    try:
        summary = _index(tmp_path / "remote", tiny_model_dir, corpus, ray=ray_cluster.address)
    finally:
        killer.join(60)
        ray_cluster.add_worker()  # the next tests get two nodes again
    assert (summary.new, summary.failed) == (32, 1)
    assert _no_duplicates(tmp_path / "remote") == 32
    _index(tmp_path / "local", tiny_model_dir, corpus)
    assert _contents(tmp_path / "local") == _contents(tmp_path / "remote")
    assert np.load(tmp_path / "remote" / "vectors.npy").shape[0] >= 32
