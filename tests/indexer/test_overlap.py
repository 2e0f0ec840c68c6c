"""The writer thread (indexer.overlap): same rows and vectors as inline writing, in order, errors surface."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from retrieval.indexer.overlap import InlineWriter, ThreadedWriter
from retrieval.indexer.writer import BatchCounts

from retrieval.vectors import VectorStore
from tests.indexer.test_pipeline import _bad_files, failures, index, rows


def _recording_writer(cls: type, log: list, fail_at: int | None = None, slow: float = 0.0, **kw):
    def write(results: list, vecs: np.ndarray) -> BatchCounts:
        if fail_at is not None and results[0] == fail_at:
            raise RuntimeError(f"disk full at batch {fail_at}")
        time.sleep(slow)
        log.append((results[0], threading.current_thread().name, vecs.copy()))
        return BatchCounts(new=len(results))

    done: list[int] = []
    return cls(write, lambda v: np.asarray(v, np.float32), lambda counts, n: done.append(n), **kw), done


@pytest.mark.parametrize("cls", [InlineWriter, ThreadedWriter])
def test_batches_are_written_in_order_with_their_vectors(cls: type) -> None:
    log: list = []
    writer, done = _recording_writer(cls, log)
    with writer:
        for i in range(20):
            writer.put([i, i], np.full((2, 3), i))
    assert [b for b, _, _ in log] == list(range(20))
    assert all((v == b).all() for b, _, v in log)
    assert writer.total.new == 40 and done == [2] * 20
    assert {name for _, name, _ in log} == ({"index-writer"} if cls is ThreadedWriter else {"MainThread"})


def test_writer_error_is_raised_in_the_caller_and_nothing_after_it_is_written() -> None:
    log: list = []
    writer, _ = _recording_writer(ThreadedWriter, log, fail_at=3)
    with pytest.raises(RuntimeError, match="disk full at batch 3"), writer:
        for i in range(50):
            writer.put([i], np.zeros((1, 3)))
            time.sleep(0.002)
    assert [b for b, _, _ in log] == [0, 1, 2]
    assert not writer._thread.is_alive()


def test_caller_error_drops_queued_batches_and_stops_the_thread() -> None:
    log: list = []
    writer, _ = _recording_writer(ThreadedWriter, log, slow=0.05, depth=2)
    with pytest.raises(KeyboardInterrupt), writer:
        for i in range(4):
            writer.put([i], np.zeros((1, 3)))
        raise KeyboardInterrupt
    assert not writer._thread.is_alive()
    written = [b for b, _, _ in log]
    assert written == list(range(len(written))) and len(written) < 4  # a prefix; the rest is redone next run


def test_put_blocks_while_the_queue_is_full() -> None:
    log: list = []
    writer, _ = _recording_writer(ThreadedWriter, log, slow=0.05, depth=1)
    with writer:
        for i in range(4):
            writer.put([i], np.zeros((1, 3)))
    # 4 batches of 50 ms through a queue of one: the caller waited for at least two of them
    assert writer.backpressure_s >= 0.08
    assert len(log) == 4


def test_index_with_the_writer_thread_matches_inline(corpus: Path, tiny_model_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    expected_failures = _bad_files(corpus)
    limit = ("--max-pixels", "20000000")  # the bomb in _bad_files has 25 MP
    inline = index(corpus, tiny_model_dir, "--index-dir", tmp_path / "inline", *limit)
    monkeypatch.setenv("RETRIEVAL_OVERLAP", "1")
    threaded = index(corpus, tiny_model_dir, "--index-dir", tmp_path / "threaded", *limit)
    assert "writer_backpressure_s" in threaded["timings"] and "writer_backpressure_s" not in inline["timings"]
    for key in ("new", "failed", "total_images"):
        assert inline[key] == threaded[key]
    a, b = rows(tmp_path / "inline" / "retrieval.db"), rows(tmp_path / "threaded" / "retrieval.db")
    assert a.keys() == b.keys() and len(a) == inline["new"]
    for path in a:
        assert a[path][:-1] == b[path][:-1], path  # id, sha256, size, phash, ... (not the indexed flag's timing)
    assert failures(tmp_path / "threaded" / "retrieval.db").keys() == set(expected_failures)
    dim = 32
    va = VectorStore(tmp_path / "inline" / "vectors.npy", dim)
    vb = VectorStore(tmp_path / "threaded" / "vectors.npy", dim)
    ids = sorted(r[0] for r in a.values())
    np.testing.assert_allclose(vb.read(ids), va.read(ids), atol=1e-3)


def test_the_writer_thread_is_the_default_on_a_gpu_only() -> None:
    from retrieval.indexer.runners.local import overlap_writes

    assert overlap_writes("cuda", None) and overlap_writes("cuda:1", None)
    assert not overlap_writes("cpu", None)
    assert overlap_writes("cpu", True) and not overlap_writes("cuda", False)


def test_embed_async_gives_the_same_vectors_as_embed(tiny_model_dir: Path) -> None:
    from retrieval.model import load_embedder

    embedder = load_embedder(str(tiny_model_dir), device="cpu")
    batch = np.random.default_rng(0).integers(0, 255, (3, 3, 224, 224), dtype=np.uint8)
    np.testing.assert_array_equal(embedder.to_numpy(embedder.embed_async(batch)), embedder.embed(batch))
