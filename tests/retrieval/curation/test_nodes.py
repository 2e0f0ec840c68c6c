"""The compact node table: PathColumn, sha256 content keys, load_nodes and _with_references.

load_nodes must give the same facts the list-of-str / object-array version gave (it is what the
10M-image memory budget rests on), and a missing sha256 must never make two images exact copies.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from retrieval.curation.groups import Nodes, PathColumn
from retrieval.curation.hashing import (
    KEY_BYTES,
    content_keys,
    group_edges,
    sha256_edges,
)

STRINGS = ["a/b.jpg", "", "ünïcödé/画像.png", "with\nnewline", "bad-\udcff-bytes.jpg", "x" * 300]


def _hex(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def test_path_column_round_trips_every_string() -> None:
    col = PathColumn.from_strings(STRINGS)
    assert len(col) == len(STRINGS) and list(col) == STRINGS and col == STRINGS
    assert col[-1] == STRINGS[-1] and col[np.int64(2)] == STRINGS[2]
    with pytest.raises(IndexError):
        col[len(STRINGS)]
    with pytest.raises(IndexError):
        col[-len(STRINGS) - 1]
    assert col[1:4] == STRINGS[1:4] and col[4:2] == [] and col[::2] == STRINGS[::2] and col[-2:] == STRINGS[-2:]
    assert col[1:4]._buf is col._buf  # a contiguous slice is a view
    assert PathColumn.from_strings([]) == [] and len(PathColumn.from_strings([])) == 0


def test_path_column_concatenates_columns_slices_and_lists() -> None:
    col = PathColumn.from_strings(STRINGS)
    assert col + ["r/1.jpg", "r/2.jpg"] == STRINGS + ["r/1.jpg", "r/2.jpg"]
    assert PathColumn.concat([col[2:5], col[:2], [], ["z"]]) == STRINGS[2:5] + STRINGS[:2] + ["z"]
    assert col + [] == STRINGS


def test_content_keys_equal_exactly_for_identical_digests() -> None:
    digests = [_hex(i % 5) for i in range(20)]
    keys = content_keys(digests)
    assert keys.dtype == np.dtype(f"S{KEY_BYTES}") and keys.shape == (20,)
    for i in range(20):
        for j in range(20):
            assert (keys[i] == keys[j]) == (digests[i] == digests[j])
    # the per-row path (taken when any row is not a digest) gives the same keys
    slow = content_keys(digests + [None])
    assert (slow[:20] == keys).all()
    # upper-case hex is the same digest; an all-zero digest is a digest like any other
    assert content_keys([digests[0].upper()])[0] == keys[0]
    zero = content_keys(["00" * 32, "00" * 32, None, ""])
    assert zero[0] == zero[1] and zero[0] != zero[2] and zero[0] != zero[3]


def test_missing_digests_equal_nothing_and_text_compares_as_text() -> None:
    keys = content_keys([None, "", None, "", "abc", "abc", "ab c", _hex(1), "  " + _hex(1)[2:]], start=7)
    assert len(set(keys[:4].tolist())) == 4  # unknown bytes: never the same as anything
    assert all(k not in keys[4:].tolist() for k in keys[:4].tolist())
    assert keys[4] == keys[5] and keys[4] != keys[6]
    assert keys[7] != keys[8]  # a 64-character string that is not a digest is text
    # unknown keys come from positions: another start gives other keys, so appended rows stay distinct
    assert not set(content_keys([None, ""], start=100).tolist()) & set(keys.tolist())


def test_sha256_edges_on_keys_match_text_and_skip_missing() -> None:
    digests = [_hex(i % 7) for i in range(30)]
    ids = np.arange(30) + 10
    from_keys = sha256_edges(ids, content_keys(digests))
    _, codes = np.unique(np.array(digests), return_inverse=True)
    a, b = group_edges(codes.astype(np.int64), ids)
    assert from_keys.src.tolist() == a.tolist() and from_keys.dst.tolist() == b.tolist()
    from_text = sha256_edges(ids, np.array(digests, dtype=object))
    assert from_text.src.tolist() == a.tolist() and from_text.dst.tolist() == b.tolist()
    for missing in (np.array([None, None, "", "", _hex(1), _hex(1)], dtype=object),
                    content_keys([None, None, "", "", _hex(1), _hex(1)])):
        e = sha256_edges(np.arange(6), missing)
        assert set(zip(e.src.tolist(), e.dst.tolist())) == {(4, 5)}


def _index(tmp_path: Path, rows: list[dict]) -> SimpleNamespace:
    from sqlalchemy import insert

    from retrieval.store import Image, Store, utcnow

    store = Store(f"sqlite:///{tmp_path / 'index.db'}")
    now = utcnow()
    if rows:
        with store.session() as s, s.begin():
            s.execute(insert(Image), [{"format": "JPEG", "indexed": True, "added_at": now, "updated_at": now, **r}
                                      for r in rows])
    return SimpleNamespace(store=store, source=SimpleNamespace(local_root=tmp_path))


def test_load_nodes_reads_every_row_in_chunks(tmp_path: Path) -> None:
    from retrieval.curation.dedup import load_nodes

    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(10_000, 23, replace=False)) + 1
    stored = [t for t in STRINGS if "\udcff" not in t]  # (SQLite text cannot hold a lone surrogate)
    paths = [f"{i % 3}/{t}{i}.jpg" for i, t in zip(range(23), stored * 5)]
    sha = [_hex(i % 4) if i != 5 else "" for i in range(23)]
    phash = rng.integers(-(2**63), 2**63 - 1, 23, dtype=np.int64)
    rows = [{"id": int(ids[i]), "path": paths[i], "sha256": sha[i], "phash": int(phash[i]), "width": 100 + i,
             "height": 2**31 - 1 - i, "size": 2**40 + i, "mtime_ns": 1_700_000_000_000_000_000 + i} for i in range(23)]
    reader = _index(tmp_path, rows[::-1])  # inserted out of order: nodes are by id
    for chunk in (1, 5, 23, 100):
        nodes = load_nodes(reader, chunk=chunk)
        assert len(nodes) == 23 and nodes.path == paths and isinstance(nodes.path, PathColumn)
        assert nodes.image_id.tolist() == ids.tolist() and nodes.phash.tolist() == phash.tolist()
        assert nodes.width.tolist() == [100 + i for i in range(23)] and nodes.width.dtype == np.int32
        assert nodes.height.tolist() == [2**31 - 1 - i for i in range(23)]
        assert nodes.size.tolist() == [2**40 + i for i in range(23)]
        assert nodes.mtime_ns[-1] == 1_700_000_000_000_000_022 and not nodes.is_ref.any()
        assert (nodes.sha256 == content_keys(sha)).all() and nodes.root == tmp_path
        c = nodes.candidate(3)
        assert (c.path, c.size, c.width, c.height) == (paths[3], 2**40 + 3, 103, 2**31 - 4)
        e = sha256_edges(np.arange(23), nodes.sha256)
        want = {(i, j) for i in range(23) for j in range(i + 1, 23) if sha[i] and sha[i] == sha[j]}
        got = set(zip(e.src.tolist(), e.dst.tolist()))
        assert got <= want and len(got) == 23 - 4 - 1  # a star per digest; row 5 (no digest) in none


def test_load_nodes_of_an_empty_index_says_so(tmp_path: Path) -> None:
    from retrieval.curation.dedup import load_nodes
    from retrieval.errors import RetrievalError

    with pytest.raises(RetrievalError, match="holds no images"):
        load_nodes(_index(tmp_path, []))


def test_references_are_appended_with_their_own_keys(tmp_path: Path) -> None:
    from retrieval.curation.dedup import _with_references, load_nodes

    rows = [{"id": i + 1, "path": f"c{i}.jpg", "sha256": _hex(i), "phash": i, "width": 10, "height": 20, "size": 5,
             "mtime_ns": 0} for i in range(4)]
    nodes = load_nodes(_index(tmp_path, rows))
    ref = SimpleNamespace(paths=["r0.jpg", "r1.jpg", "r2.jpg"], sha256=[_hex(2), "", ""], phash=[2**64 - 1, 0, 1],
                          full_path=lambda p: f"/refs/{p}")
    both = _with_references(nodes, ref)
    assert isinstance(both, Nodes) and len(both) == 7
    assert both.path == [f"c{i}.jpg" for i in range(4)] + ["/refs/r0.jpg", "/refs/r1.jpg", "/refs/r2.jpg"]
    assert both.image_id.tolist() == [1, 2, 3, 4, -1, -1, -1] and both.is_ref.tolist() == [False] * 4 + [True] * 3
    assert both.phash.tolist() == [0, 1, 2, 3, -1, 0, 1] and both.width.dtype == np.int32
    assert both.width.tolist() == [10] * 4 + [0] * 3
    e = sha256_edges(np.arange(7), both.sha256)
    assert set(zip(e.src.tolist(), e.dst.tolist())) == {(2, 4)}  # the two references without a digest: no edge


@pytest.mark.parametrize("counted", [0, 2, 9, 50])
def test_load_nodes_copes_with_rows_added_or_removed_after_the_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      counted: int) -> None:
    """Without snapshot reads (PostgreSQL's default) the count can be off: the columns grow or are cut."""
    import sqlalchemy

    from retrieval.curation import dedup

    rows = [{"id": i + 1, "path": f"c{i}.jpg", "sha256": _hex(i % 3), "phash": i, "width": i, "height": 1, "size": 5,
             "mtime_ns": i} for i in range(9)]
    reader = _index(tmp_path, rows)
    want = dedup.load_nodes(reader)
    monkeypatch.setattr(dedup, "func", SimpleNamespace(count=lambda: sqlalchemy.func.max(sqlalchemy.literal(counted))))
    got = dedup.load_nodes(reader, chunk=4)
    assert got.path == want.path and (got.sha256 == want.sha256).all() and len(got.sha256) == 9
    for name in ("image_id", "phash", "width", "height", "size", "mtime_ns"):
        assert getattr(got, name).tolist() == getattr(want, name).tolist()


def test_a_parked_table_reads_the_same_from_unlinked_files(tmp_path: Path) -> None:
    """Nodes.parked: every column equal, read-only memory maps of files that are already gone from disk
    (nothing to clean up after a kill), the ids still in memory; a reference table parks too."""
    import os
    import tempfile

    from retrieval.curation.dedup import _with_references, load_nodes

    rows = [{"id": i + 1, "path": f"{i % 2}/ü{i}.jpg", "sha256": _hex(i % 3), "phash": -i, "width": i, "height": 7,
             "size": 2**40 + i, "mtime_ns": i} for i in range(6)]
    nodes = load_nodes(_index(tmp_path, rows))
    ref = SimpleNamespace(paths=["r0.jpg"], sha256=[_hex(1)], phash=[5], full_path=lambda p: f"/refs/{p}")
    before = set(os.listdir(tempfile.gettempdir()))
    for table in (nodes, _with_references(nodes, ref)):
        parked = table.parked()
        assert parked.path == list(table.path) and parked.root == table.root
        assert parked.image_id is table.image_id
        for name in ("sha256", "phash", "width", "height", "size", "mtime_ns", "is_ref"):
            got, want = getattr(parked, name), getattr(table, name)
            assert isinstance(got, np.memmap) and not got.flags.writeable, name
            assert got.dtype == want.dtype and (got == want).all(), name
        assert parked.candidate(4) == table.candidate(4)
        assert isinstance(parked.path._buf, np.memmap) and isinstance(parked.path._offsets, np.memmap)
    assert not {f for f in set(os.listdir(tempfile.gettempdir())) - before if f.startswith("retrieval-nodes-")}


def test_a_table_that_cannot_be_parked_stays_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full or read-only temporary folder: parking keeps the table as it is (and says so), it does
    not fail the run."""
    import tempfile

    from retrieval.curation.dedup import load_nodes

    rows = [{"id": i + 1, "path": f"p{i}.jpg", "sha256": _hex(i), "phash": i, "width": 1, "height": 1, "size": 1,
             "mtime_ns": 0} for i in range(3)]
    nodes = load_nodes(_index(tmp_path, rows))

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", full)
    assert nodes.parked() is nodes
