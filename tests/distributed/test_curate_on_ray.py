"""`curate --ray` and `Index.build_index(ray=...)` on a real two-node cluster: the same curated lists as
local runs, on an IVF index whose training, shards and merge ran as Ray tasks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from retrieval import ann, ivf_build
from retrieval.curation import curate
from retrieval.index import Index
from tests.distributed.test_clusters_on_ray import indexed  # noqa: F401 - fixture
from tests.retrieval.curation.conftest import cli, curation_app, plant_corpus  # noqa: F401 - fixtures


def _items(run, index_dir: Path, out: Path, *args: str) -> tuple[dict, list]:  # noqa: ANN001
    _, text = run("curate", "--index-dir", index_dir, "--json", "--no-progress", "--force", "-o", out, *args)
    doc = json.loads((out / "manifest.json").read_text())
    return json.loads(text)["counts"], doc["items"]


def test_curate_on_ray_equals_the_local_run(indexed: Path, ray_address: str, cli, tmp_path: Path,  # noqa: ANN001, F811
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ivf_build, "ADD_SHARD", 5)  # 16 images: 4 add tasks over both nodes
    with Index.open(indexed) as index:
        built = index.build_index(index_factory="IVF4,Flat", ray=ray_address)["search"]
        assert built.rebuilt and built.spec.factory == "IVF4,Flat"
        assert len(ann.index_ids(ann.load_index(index.layout.faiss_path))) == len(index) == 16
        # Every image finds itself (or a byte-identical copy) first through the Ray-built lists.
        for image_id in (1, 8, 16):
            hits = index.reader.search_id(image_id, 2, exclude_self=False, nprobe=4)
            assert image_id in [h.id for h in hits] and hits[0].score > 0.999  # fp16 vectors

    monkeypatch.setattr(curate, "QUERY_BATCH", 2)  # 6 queries: 3 search tasks
    monkeypatch.setattr(curate, "RAY_SHARD_BATCHES", 1)
    queries = tmp_path / "queries"
    queries.mkdir()
    for name in ("a/img0001.jpg", "b/img0002.jpg", "a/img0005.jpg", "b/img0008.jpg", "b/img0010.jpg",
                 "flipped/img0007_flip.jpg"):
        shutil.copy(indexed.parent / "corpus" / name, queries / name.replace("/", "_"))
    sample = ["--queries", str(queries), "-k", "3"]
    local = _items(cli, indexed, tmp_path / "l1", *sample)
    remote = _items(cli, indexed, tmp_path / "r1", *sample, "--ray", ray_address)
    assert local[0]["retrieved"] == 18 and remote == local

    cli("cluster", "-k", "3", "--index-dir", indexed, "--no-progress", "-o", tmp_path / "clusters")
    by_cluster = ["--queries", str(queries), "--mode", "cluster", "--min-queries", "0", "--per-cluster", "3"]
    local = _items(cli, indexed, tmp_path / "l2", *by_cluster)
    remote = _items(cli, indexed, tmp_path / "r2", *by_cluster, "--ray", ray_address)
    assert local[1] and remote == local
    assert np.all([d["how"] == "cluster" for d in remote[1]])
