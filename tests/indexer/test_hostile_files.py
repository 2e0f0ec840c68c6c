"""Single hostile files and names must not block, hang, crash or stop a run (issue 12, items 1, 4 and 6).

Each test reproduces a way the indexer failed before: a name that is not UTF-8 (the whole run
failed), a path swapped for a FIFO (hung forever), a folder chain deeper than Python's recursion
limit (RecursionError), a huge sparse file (read whole: MemoryError), a decoder that never returns
(hung forever), a temporary FAISS file left by an interrupted save (never removed). The hang tests
run under pytest-timeout's thread method: a hang fails the test run instead of blocking it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
from typer.testing import CliRunner

from retrieval.cli.app import app
from retrieval.imaging.decode import WorkItem, decode_one
from retrieval.imaging.preprocess import PreprocessConfig
from retrieval.imaging.safe import decode_isolated
from retrieval.imaging.scan import scan_corpus
from tests import db as testdb
from tests.conftest import make_corpus
from tests.indexer.crash_codec import register as register_hang
from tests.indexer.crash_codec import write_hanger

runner = CliRunner()


def _index(corpus: Path, index_dir: Path, model: Path, *extra: str) -> tuple[int, str, dict]:
    result = runner.invoke(app, ["index", str(corpus), "--index-dir", str(index_dir), "--model", str(model),
                                 "--no-progress", "--json", "-b", "8", *extra])
    data = json.loads(result.stdout) if result.exit_code == 0 else {}
    return result.exit_code, result.output + repr(result.exception), data


def _failures(index_dir: Path) -> dict[str, tuple[str, str]]:
    with testdb.connect(index_dir / "retrieval.db") as conn:
        return {r[0]: (r[1], r[2]) for r in conn.execute("SELECT path, kind, reason FROM failures")}


def _paths(index_dir: Path) -> set[str]:
    with testdb.connect(index_dir / "retrieval.db") as conn:
        return {r[0] for r in conn.execute("SELECT path FROM images")}


def test_a_name_that_is_not_utf8_is_a_failure_and_the_rest_is_indexed(corpus: Path, tiny_model_dir: Path,
                                                                       tmp_path: Path) -> None:
    good = corpus / "a" / "img0001.jpg"
    bad = os.path.join(os.fsencode(corpus / "a"), b"bad\xffname.jpg")
    with open(bad, "wb") as f:
        f.write(good.read_bytes())
    code, out, summary = _index(corpus, tmp_path / "idx", tiny_model_dir, "-j", "0")
    assert code == 0, out
    assert summary["new"] == 24 and summary["failed"] == 1
    failures = _failures(tmp_path / "idx")
    assert failures == {"a/bad\\xffname.jpg": ("bad_name", failures["a/bad\\xffname.jpg"][1])}
    assert "UTF-8" in failures["a/bad\\xffname.jpg"][1]
    # a known failure: the next run does not try it again, and does not forget it either
    code, out, summary = _index(corpus, tmp_path / "idx", tiny_model_dir, "-j", "0")
    assert code == 0 and summary["known_failures"] == 1 and summary["failed"] == 0, out
    assert "a/bad\\xffname.jpg" in _failures(tmp_path / "idx")


@pytest.mark.timeout(120, method="thread")
@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_fifo_swapped_in_after_the_scan_is_a_failure_not_a_hang(corpus: Path, tiny_model_dir: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch, workers: str) -> None:
    import retrieval.sources.folder as folder  # a local corpus is scanned through its FolderSource

    victim = corpus / "b" / "img0000.png"
    real_scan = folder.scan_corpus

    def scan_then_swap(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        entries = list(real_scan(*args, **kwargs))
        victim.unlink()
        os.mkfifo(victim)  # nobody ever writes to it: a blocking open() would wait forever
        return entries

    monkeypatch.setattr(folder, "scan_corpus", scan_then_swap)
    code, out, summary = _index(corpus, tmp_path / "idx", tiny_model_dir, "-j", workers)
    assert code == 0, out
    assert summary["new"] == 23 and summary["failed"] == 1
    assert _failures(tmp_path / "idx")["b/img0000.png"][0] == "not_a_file"


@pytest.mark.timeout(60, method="thread")
def test_the_scanner_never_opens_a_fifo_to_sniff_it(tmp_path: Path) -> None:
    make_corpus(tmp_path, 2)
    os.mkfifo(tmp_path / "a" / "noext")  # no extension: a file like it would be sniffed
    os.symlink("noext", tmp_path / "a" / "link_to_fifo")  # a link inside the corpus to a FIFO
    assert sorted(e.path for e in scan_corpus(tmp_path)) == ["a/img0001.jpg", "b/img0000.png"]


def _remove_chain(top: str) -> None:
    """Remove a chain of "d" folders bottom up (shutil.rmtree, and so pytest's cleanup, recurse)."""
    folders = [top]
    while os.path.isdir(os.path.join(folders[-1], "d")):
        folders.append(os.path.join(folders[-1], "d"))
    for folder in reversed(folders):
        for name in os.listdir(folder):
            if name != "d":
                os.unlink(os.path.join(folder, name))
        os.rmdir(folder)


@pytest.fixture
def deep_chain() -> Iterator[Path]:
    """Outside pytest's numbered folders: their cleanup (shutil.rmtree) would crash on the chain."""
    top = Path(tempfile.mkdtemp(prefix="retrieval-deep-"))
    try:
        yield top / "deep"
    finally:
        if (top / "deep" / "d").exists():
            _remove_chain(str(top / "deep" / "d"))
        shutil.rmtree(top)


def test_a_folder_chain_deeper_than_the_recursion_limit_is_scanned(tmp_path: Path, tiny_model_dir: Path,
                                                                   deep_chain: Path) -> None:
    corpus = deep_chain
    make_corpus(corpus, 3)
    depth = sys.getrecursionlimit() + 200
    folder = str(corpus)
    for _ in range(depth):  # os.makedirs recurses: it cannot make this chain either
        folder = os.path.join(folder, "d")
        os.mkdir(folder)
    with open(os.path.join(folder, "deep.jpg"), "wb") as f:
        f.write((corpus / "a" / "img0001.jpg").read_bytes())
    entries = list(scan_corpus(corpus))
    assert len(entries) == 4 and entries[-1].path == "d/" * depth + "deep.jpg"
    code, out, summary = _index(corpus, tmp_path / "idx", tiny_model_dir, "-j", "0")
    assert code == 0, out
    assert summary["new"] == 4 and summary["failed"] == 0


def test_a_huge_sparse_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    make_corpus(tmp_path, 1)
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as f:
        f.write((tmp_path / "b" / "img0000.png").read_bytes())
        f.truncate(64 << 30)  # 64 GB, sparse: reading it whole is what used to happen
    st = huge.stat()
    result = decode_one(str(tmp_path), WorkItem("huge.jpg", st.st_size, st.st_mtime_ns), PreprocessConfig(), 10**8)
    assert result.failure_kind == "too_large"
    assert "68,719,476,736 bytes" in (result.failure_reason or "") and "--max-pixels" in (result.failure_reason or "")


def _item(root: Path, rel: str) -> WorkItem:
    st = (root / rel).stat()
    return WorkItem(rel, st.st_size, st.st_mtime_ns)


@pytest.mark.timeout(60, method="thread")
def test_isolated_decoding_stops_a_hanging_decoder_and_goes_on(tmp_path: Path) -> None:
    register_hang()
    make_corpus(tmp_path, 2)
    write_hanger(tmp_path / "a" / "stuck.png")
    rels = ["a/img0001.jpg", "a/stuck.png", "b/img0000.png"]
    results = decode_isolated(str(tmp_path), [_item(tmp_path, r) for r in rels], PreprocessConfig(), 10**8,
                              timeout_s=1.0)
    assert [r.item.path for r in results] == rels
    assert results[1].failure_kind == "timeout" and "longer than 1 s" in (results[1].failure_reason or "")
    assert results[0].embeddable and results[2].embeddable


@pytest.mark.timeout(180, method="thread")
@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_hanging_decoder_does_not_hang_the_run(corpus: Path, tiny_model_dir: Path, tmp_path: Path,
                                                 workers: str) -> None:
    register_hang()  # forked workers and isolated decoders inherit it
    write_hanger(corpus / "a" / "stuck.png")
    code, out, summary = _index(corpus, tmp_path / "idx", tiny_model_dir, "-j", workers, "--decode-timeout", "1")
    assert code == 0, out
    assert summary["new"] == 24 and summary["failed"] == 1
    kind, reason = _failures(tmp_path / "idx")["a/stuck.png"]
    assert kind == "timeout" and "--decode-timeout" in reason
    assert not [m for m in os.listdir(tmp_path / "idx" / "decoding")
                if (tmp_path / "idx" / "decoding" / m).read_bytes().strip(b"\0")]


def test_temporaries_left_by_an_interrupted_save_are_removed_by_the_next_run(corpus: Path, tiny_model_dir: Path,
                                                                             tmp_path: Path) -> None:
    index_dir = tmp_path / "idx"
    code, out, _ = _index(corpus, index_dir, tiny_model_dir, "-j", "0")
    assert code == 0, out
    stale = index_dir / ".index.faiss.tmp-999999"
    stale.write_bytes(b"\0" * 4096)  # what a SIGKILL or a full disk during save_index leaves
    code, out, _ = _index(corpus, index_dir, tiny_model_dir, "-j", "0")
    assert code == 0, out
    assert not stale.exists()
    assert (index_dir / "index.faiss").exists()


def test_a_failed_faiss_save_leaves_no_temporary_and_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import faiss
    import numpy as np

    from retrieval import ann
    from retrieval.errors import RetrievalError

    index = faiss.IndexIDMap2(faiss.IndexFlatIP(4))
    index.add_with_ids(np.eye(4, dtype=np.float32), np.arange(4))
    real_write = faiss.write_index

    def full_disk(idx, path):  # noqa: ANN001, ANN202
        with open(path, "wb") as f:
            f.write(b"\0" * 100)  # part of it got out, then the disk was full
        raise RuntimeError("Error in void faiss::write_index(...) at faiss/impl/index_write.cpp:1:\n"
                           "Error: 'ret == (n)' failed: write error in /x: 0 != 1 (No space left on device)")

    monkeypatch.setattr(faiss, "write_index", full_disk)
    with pytest.raises(RetrievalError) as err:
        ann.save_index(index, tmp_path / "index.faiss")
    assert "\n" not in str(err.value) and "No space left on device" in str(err.value)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(faiss, "write_index", real_write)
