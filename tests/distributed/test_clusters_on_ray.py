"""`cluster --ray` on a real two-node cluster gives the same assignments as a local run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from retrieval import distributed
from retrieval.curation import clusters
from retrieval.layout import IndexLayout
from retrieval.search import IndexReader
from retrieval.store import ClusterAssignment
from tests.distributed.conftest import LocalCluster
from tests.retrieval.curation.conftest import cli, curation_app, plant_corpus  # noqa: F401 - fixtures


@pytest.fixture
def indexed(tmp_path: Path, tiny_model_dir: Path, cli) -> Path:  # noqa: ANN001
    corpus = tmp_path / "corpus"
    plant_corpus(corpus)
    index_dir = tmp_path / "idx"
    cli("index", corpus, "--model", tiny_model_dir, "--index-dir", index_dir, "--no-progress", "-j", "0")
    return index_dir


def _assignments(index_dir: Path, run_id: int) -> list[tuple[int, int, float, int]]:
    reader = IndexReader(IndexLayout(index_dir), None)
    try:
        with reader.store.session() as s:
            rows = s.execute(select(ClusterAssignment.image_id, ClusterAssignment.cluster, ClusterAssignment.distance,
                                    ClusterAssignment.rank).where(ClusterAssignment.run_id == run_id)
                             .order_by(ClusterAssignment.image_id)).all()
    finally:
        reader.close()
    return [tuple(r) for r in rows]


def test_cluster_on_ray_equals_the_local_run(indexed: Path, ray_address: str, cli,  # noqa: ANN001
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clusters, "ASSIGN_BATCH", 3)  # 16 images -> 6 shards over both nodes
    monkeypatch.setattr(clusters, "RAY_SHARD_BATCHES", 1)
    _, out = cli("cluster", "-k", "3", "--index-dir", indexed, "--json", "--no-progress", "-o", indexed / "r1")
    local = json.loads(out)
    _, out = cli("cluster", "-k", "3", "--index-dir", indexed, "--json", "--no-progress", "--force",
                 "--ray", ray_address, "-o", indexed / "r2")
    remote = json.loads(out)
    assert remote["run_id"] != local["run_id"] and not remote["reused"]
    assert remote["sizes"] == local["sizes"]
    a, b = _assignments(indexed, local["run_id"]), _assignments(indexed, remote["run_id"])
    assert len(a) == 16
    assert [(i, c, r) for i, c, _, r in a] == [(i, c, r) for i, c, _, r in b]
    np.testing.assert_array_equal([d for *_, d, _ in a], [d for *_, d, _ in b])


def test_the_ray_address_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(distributed.ENV_ADDRESS, "10.0.0.1:6379")
    assert distributed.resolve_address(None) == "10.0.0.1:6379"
    assert distributed.resolve_address("auto") == "auto"
    monkeypatch.delenv(distributed.ENV_ADDRESS)
    assert distributed.resolve_address(None) is None


def test_shards_cover_every_position_once() -> None:
    assert distributed.shards(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert distributed.shards(0, 4) == []
    with pytest.raises(ValueError):
        distributed.shards(3, 0)


def test_losing_a_worker_node_mid_run_loses_no_shard(ray_cluster: LocalCluster) -> None:
    import threading

    pieces = [0.4] * 10
    killer = threading.Timer(1.0, lambda: ray_cluster.cluster.remove_node(ray_cluster.worker))
    killer.start()
    try:
        started = time.monotonic()
        results = distributed.map_shards(ray_cluster.address, time.sleep, pieces)
    finally:
        killer.join()
        ray_cluster.add_worker()  # later tests get their two nodes back
    assert results == [None] * len(pieces)
    assert time.monotonic() - started >= 2.0  # 10 x 0.4 s on at most two CPUs: it really ran
