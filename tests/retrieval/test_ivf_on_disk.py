"""An IVF index whose inverted lists exceed the memory budget, built without Ray: added in shards in
this process and merged into on-disk lists (retrieval.ivf_build), then patched, moved and read."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from retrieval import ann
from tests.retrieval.test_sync import DIM, Env, clustered

N = 3000
OPTS = dict(factory="IVF16,Flat", memory_budget=200_000, exact_threshold=1000)  # 3000 x (128 B + 8 B) > 200 kB


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    from retrieval import ivf_build

    monkeypatch.setattr(ivf_build, "ADD_SHARD", 700)  # 5 shards
    e = Env.open(tmp_path / "idx")
    e.add(np.arange(1, N + 1, dtype=np.int64), clustered(N, seed=4))
    return e


def _deleted_maps() -> list[str]:
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if "(deleted)" in line]


def _finds_itself(e: Env, ids: np.ndarray) -> None:
    _, found = ann.search_reranked(e.index(), e.vectors.read(ids), 1, e.vectors.read, nprobe=16)
    np.testing.assert_array_equal(found[:, 0], ids)


def test_a_local_build_past_the_budget_merges_on_disk_and_unmaps_its_shards(env: Env) -> None:
    first = env.sync(**OPTS)
    data = Path(first.spec.params["on_disk"])
    assert data.is_file() and data.parent == env.layout.root
    assert isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(env.index()).invlists),
                      faiss.OnDiskInvertedLists)
    assert not [m for m in _deleted_maps() if ".shards-" in m]  # the shard files are gone, and unmapped
    assert not list(env.layout.root.glob(".*.shards-*"))
    present = env.assert_consistent()
    _finds_itself(env, present[:20])

    env.delete(present[:10])  # `retrieval index` or `dedup --apply` without Ray: rebuilt on disk again
    second = env.sync(**OPTS)
    assert second.rebuilt and not data.exists()
    assert Path(second.spec.params["on_disk"]).is_file()
    present = env.assert_consistent()
    assert len(present) == N - 10
    _finds_itself(env, present[:20])


def test_a_failed_build_leaves_no_lists_file(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    from retrieval import sync
    from retrieval.errors import RetrievalError

    first = env.sync(**OPTS)

    def full_disk(*_a, **_k) -> None:
        raise RetrievalError("cannot write the FAISS index: no space left on device")

    monkeypatch.setattr(sync.ann, "save_index", full_disk)
    with pytest.raises(RetrievalError):
        env.sync(**OPTS, force_rebuild=True)  # merged on disk, then the save fails
    assert list(env.layout.root.glob("*.ivfdata")) == [Path(first.spec.params["on_disk"])]
    env.assert_consistent()


def test_leftovers_of_a_killed_build_are_removed_and_the_lists_in_use_kept(env: Env) -> None:
    from retrieval.layout import remove_stale_temporaries

    root = env.layout.root
    built = env.sync(**OPTS)
    in_use = Path(built.spec.params["on_disk"])
    older = root / "index.faiss.1.ivfdata"  # an earlier build's, killed before it was deleted
    older.write_bytes(b"x" * 100)
    newer = root / f"index.faiss.{10**19}.ivfdata"  # a later build's, killed after its merge
    newer.write_bytes(b"x" * 100)
    work = root / f".{newer.name}.shards-abc123"  # killed mid-merge
    work.mkdir()
    (work / "shard-00000.faiss").write_bytes(b"x" * 100)
    other = root / "notes.ivfdata"  # not ours: left alone
    other.write_bytes(b"")

    assert sorted(remove_stale_temporaries(root)) == sorted([older.name, newer.name, work.name])
    assert not newer.exists() and not work.exists() and not older.exists() and in_use.is_file() and other.exists()
    _finds_itself(env, env.db_ids()[:20])


def _reader(e: Env):  # noqa: ANN202
    from retrieval.search import IndexReader

    with e.store.session() as s, s.begin():
        e.store.set_meta(s, corpus_root=str(e.layout.root))
    return IndexReader(e.layout)


def _invlists(index):  # noqa: ANN001, ANN202
    return faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)


def test_readers_map_the_lists_read_only(env: Env) -> None:
    import os
    import subprocess
    import sys

    data = Path(env.sync(**OPTS).spec.params["on_disk"])
    reader = _reader(env)
    try:
        assert _invlists(reader.index).read_only  # mapped PROT_READ, opened "r": read-only media work
        _, found = ann.search_reranked(reader.index, env.vectors.read(env.db_ids()[:5]), 1, env.vectors.read,
                                       nprobe=16)
        np.testing.assert_array_equal(found[:, 0], env.db_ids()[:5])
    finally:
        reader.close()
    assert not _invlists(env.index()).read_only  # the writer's load (sync) is unchanged
    if os.getuid() == 0:
        return  # root opens a 0444 file for writing anyway; the flag above is the check
    data.chmod(0o444)
    code = ("import sys; from pathlib import Path; from retrieval import ann; "
            "ann.load_index(Path(sys.argv[1]), read_only=True)")
    subprocess.run([sys.executable, "-c", code, str(env.layout.faiss_path)], check=True)


def test_a_moved_index_folder_still_loads_its_lists(env: Env, tmp_path: Path) -> None:
    import shutil

    env.sync(**OPTS)
    env.store.close()
    moved = tmp_path / "elsewhere"
    shutil.move(env.layout.root, moved)
    e = Env.open(moved)
    reader = _reader(e)
    try:
        assert Path(_invlists(reader.index).filename).parent == moved.resolve()
        ids = e.db_ids()[:20]
        _, found = ann.search_reranked(reader.index, e.vectors.read(ids), 1, e.vectors.read, nprobe=16)
        np.testing.assert_array_equal(found[:, 0], ids)
    finally:
        reader.close()
    e.delete(e.db_ids()[:3])  # a writer on the moved folder: rebuilt, lists beside the new FAISS file
    again = e.sync(**OPTS)
    assert Path(again.spec.params["on_disk"]).parent == moved.resolve()
    assert len(list(moved.glob("*.ivfdata"))) == 1
    e.assert_consistent()


def test_shards_are_written_as_they_arrive_and_merged_in_order(env: Env, tmp_path: Path) -> None:
    """The driver holds one shard at a time: each is on disk before the next is asked for."""
    from faiss.contrib.inspect_tools import get_invlist

    from retrieval import ivf_build

    ids = env.db_ids()
    trained = ann.new_index(ann.choose_index_spec(len(ids), DIM, 10**9, 1000, "IVF16,Flat"))
    trained.train(env.vectors.read(ids[::3]))
    blob = ivf_build.serialize(trained)
    pieces = np.array_split(ids, 5)
    in_ram = ivf_build.merge(ivf_build.deserialize(blob),
                             [ivf_build.add_task(p, blob, env.vectors) for p in pieces])
    ivfdata = ivf_build.ivfdata_path(tmp_path / "index.faiss")

    def finished_in_reverse():  # noqa: ANN202
        for n, i in enumerate(reversed(range(len(pieces)))):
            (work,) = tmp_path.glob(".*.shards-*")
            assert len(list(work.iterdir())) == n  # every shard handed out so far is already a file
            yield i, ivf_build.add_task(pieces[i], blob, env.vectors)

    on_disk = ivf_build.merge_on_disk(ivf_build.deserialize(blob), finished_in_reverse(), ivfdata)
    assert on_disk.ntotal == len(ids) and not list(tmp_path.glob(".*.shards-*"))
    a, b = faiss.extract_index_ivf(in_ram).invlists, faiss.extract_index_ivf(on_disk).invlists
    for list_no in range(16):
        for x, y in zip(get_invlist(a, list_no), get_invlist(b, list_no), strict=True):
            np.testing.assert_array_equal(x, y)  # same entries, in shard order
