"""The IVF index built on a real two-node Ray cluster (trained in a task, filled in shards, merged)
holds the same lists as a local build with the same trained index, and finds what brute force finds."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
from faiss.contrib.inspect_tools import get_invlist

from retrieval import ann, ivf_build
from tests.retrieval.test_sync import DIM, Env, brute_force, clustered

N = 3000


def _lists(index) -> list[tuple[np.ndarray, np.ndarray]]:  # noqa: ANN001
    ivf = faiss.extract_index_ivf(index)
    return [get_invlist(ivf.invlists, i) for i in range(ivf.nlist)]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Env:
    e = Env.open(tmp_path_factory.mktemp("ivf"))
    ids = np.arange(5, 5 + 2 * N, 2, dtype=np.int64)  # ids with gaps: positions are not ids
    e.add(ids, clustered(N, seed=3))
    return e


@pytest.mark.parametrize("factory", ["IVF32,PQ8", "IVF16,Flat"])
def test_shards_merged_on_ray_equal_the_local_build(env: Env, ray_address: str, factory: str, tmp_path: Path) -> None:
    ids = env.db_ids()
    spec = ann.choose_index_spec(len(ids), DIM, 10**9, 1000, factory)
    trained = ann.new_index(spec)
    trained.train(env.vectors.read(ids[::3]))
    local = ivf_build.deserialize(ivf_build.serialize(trained))
    for chunk_ids, chunk in env.vectors.iter_batches(ids, batch=500):
        ann.add(local, chunk_ids, chunk)
    remote = ivf_build.add_on_ray(ray_address, ivf_build.deserialize(ivf_build.serialize(trained)), ids,
                                  env.vectors, shard=700)  # 5 tasks over both nodes
    np.testing.assert_array_equal(ann.index_ids(remote), ids)
    for (li, lc), (ri, rc) in zip(_lists(local), _lists(remote), strict=True):
        np.testing.assert_array_equal(li, ri)  # same ids, in the same order, in every list
        np.testing.assert_array_equal(lc, rc)
    queries = clustered(50, seed=3, draw=1)
    nlist = faiss.extract_index_ivf(local).nlist
    for nprobe in (4, nlist):
        ann.set_nprobe(local, nprobe)
        ann.set_nprobe(remote, nprobe)
        d_local, i_local = local.search(queries, 10)
        d_remote, i_remote = remote.search(queries, 10)
        np.testing.assert_array_equal(i_local, i_remote)
        np.testing.assert_array_equal(d_local, d_remote)
    truth = brute_force(queries, env.vectors.read(ids), ids, 10)
    if factory.endswith("Flat"):  # every list probed, full vectors: brute force exactly
        assert (i_remote == truth).mean() > 0.99  # fp ties may swap neighbours of equal score
    else:
        _, found = ann.search_reranked(remote, queries, 10, env.vectors.read, nprobe=nlist)
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), truth.tolist())]) >= 0.95

    # Past the memory budget the same shards merge into on-disk lists, with the same contents.
    ivfdata = ivf_build.ivfdata_path(tmp_path / "index.faiss")
    on_disk = ivf_build.add_on_ray(ray_address, ivf_build.deserialize(ivf_build.serialize(trained)), ids,
                                   env.vectors, ivfdata=ivfdata, shard=700)
    ann.save_index(on_disk, tmp_path / "index.faiss")
    reloaded = ann.load_index(tmp_path / "index.faiss")
    assert isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(reloaded).invlists),
                      faiss.OnDiskInvertedLists)
    for (li, lc), (ri, rc) in zip(_lists(local), _lists(reloaded), strict=True):
        np.testing.assert_array_equal(li, ri)
        np.testing.assert_array_equal(lc, rc)


def test_sync_on_ray_builds_the_index_the_database_describes(env: Env, ray_address: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole path: training in a Ray task, shards, merge, nprobe tuned as for a local build."""
    monkeypatch.setattr(ivf_build, "ADD_SHARD", 700)
    built = env.sync(ray_address=ray_address, force_rebuild=True, exact_threshold=1000)
    assert built.rebuilt and built.spec.kind == "ivfpq" and built.spec.params["recall_at_10"] >= 0.95
    assert not built.spec.params["on_disk"]
    present = env.assert_consistent()
    local = env.sync(force_rebuild=True, exact_threshold=1000)
    assert local.spec.factory == built.spec.factory
    np.testing.assert_array_equal(ann.index_ids(env.index()), present)


def test_an_index_past_the_memory_budget_gets_on_disk_lists(tmp_path: Path, ray_address: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ivf_build, "ADD_SHARD", 700)
    e = Env.open(tmp_path / "idx")
    ids = np.arange(1, N + 1, dtype=np.int64)
    e.add(ids, clustered(N, seed=4))
    opts = dict(ray_address=ray_address, factory="IVF16,Flat", memory_budget=200_000, exact_threshold=1000)
    first = e.sync(**opts)  # 3000 x (128 B + 8 B) of lists > 200 kB
    data = Path(first.spec.params["on_disk"])
    assert data.is_file() and data.parent == e.layout.root
    e.assert_consistent()
    e.delete(ids[:10])
    second = e.sync(**opts)  # on-disk lists are rebuilt, not patched in place
    assert second.rebuilt
    present = e.assert_consistent()
    assert len(present) == N - 10
    assert not data.exists() and Path(second.spec.params["on_disk"]).is_file()
    queries = e.vectors.read(present[:20])
    _, found = ann.search_reranked(e.index(), queries, 1, e.vectors.read, nprobe=16)
    np.testing.assert_array_equal(found[:, 0], present[:20])  # each finds itself
    local = e.sync(factory="IVF16,Flat", memory_budget=200_000, exact_threshold=1000, force_rebuild=True)
    assert list(e.layout.root.glob("*.ivfdata")) == [Path(local.spec.params["on_disk"])]  # locally: on disk too
    e.sync(factory="IVF16,Flat", memory_budget=10**9, exact_threshold=1000, force_rebuild=True)  # in RAM
    assert not list(e.layout.root.glob("*.ivfdata"))


def test_a_second_cluster_address_in_the_same_process_is_refused(ray_address: str) -> None:
    from retrieval.distributed import connect
    from retrieval.errors import RetrievalError

    assert connect(ray_address) is connect(ray_address) is connect("auto")
    with pytest.raises(RetrievalError, match="already uses the Ray cluster at .* cannot also join '10.9.9.9:6379'"):
        connect("10.9.9.9:6379")
