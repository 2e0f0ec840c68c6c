"""retrieval.imaging.loader.regroup: small decode chunks become model batches, results and pixels aligned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval.imaging.decode import DecodeResult, WorkItem
from retrieval.imaging.loader import regroup
from retrieval.vectors import VectorStore
from tests.conftest import make_corpus
from tests.indexer.test_pipeline import index, rows


def _chunk(start: int, n: int, failed: set[int]) -> tuple[list[DecodeResult], torch.Tensor | None]:
    results, pixels = [], []
    for i in range(start, start + n):
        r = DecodeResult(item=WorkItem(path=f"f{i}", size=1, mtime_ns=0))
        if i not in failed:
            r.sha256 = str(i)
            pixels.append(np.full((3, 2, 2), i % 251, np.uint8))
        results.append(r)
    return results, (torch.from_numpy(np.stack(pixels)) if pixels else None)


def _embeddable(r: DecodeResult) -> bool:
    return r.sha256 is not None


@pytest.mark.parametrize(("chunk", "batch"), [(3, 8), (5, 5), (7, 4), (32, 256)])
def test_batches_keep_order_and_alignment(chunk: int, batch: int) -> None:
    n, failed = 50, {0, 6, 7, 8, 9, 10, 11, 49}  # 6..11: a whole chunk with nothing to embed when chunk <= 6
    source = (_chunk(s, min(chunk, n - s), failed) for s in range(0, n, chunk))
    out = list(regroup(source, batch))
    paths = [r.item.path for results, _ in out for r in results]
    assert paths == [f"f{i}" for i in range(n)]
    for results, pixels in out[:-1]:
        assert len(results) >= batch
    for results, pixels in out:
        values = [int(r.sha256) % 251 for r in results if _embeddable(r)]
        got = [] if pixels is None else [int(p[0, 0, 0]) for p in pixels]
        assert got == values


def test_closing_the_regrouped_batches_closes_the_source() -> None:
    closed = []

    def source():
        try:
            for s in range(0, 100, 4):
                yield _chunk(s, 4, set())
        finally:
            closed.append(True)

    gen = regroup(source(), 8)
    next(gen)
    gen.close()
    assert closed == [True]


def test_index_with_worker_chunks_matches_one_process(corpus: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    # -b 40 with a worker: the worker hands over chunks of 32 that are regrouped into batches of 40
    make_corpus(corpus, 20, start=24)
    one = index(corpus, tiny_model_dir, "--index-dir", tmp_path / "one", "-b", "40")
    workers = index(corpus, tiny_model_dir, "--index-dir", tmp_path / "two", "-b", "40", "-j", "1")
    assert one["new"] == workers["new"] == 44
    a, b = rows(tmp_path / "one" / "retrieval.db"), rows(tmp_path / "two" / "retrieval.db")
    assert a == b
    ids = sorted(r[0] for r in a.values())
    np.testing.assert_allclose(VectorStore(tmp_path / "two" / "vectors.npy", 32).read(ids),
                               VectorStore(tmp_path / "one" / "vectors.npy", 32).read(ids), atol=1e-3)


def test_worker_chunk_gives_each_worker_several_chunks_within_bounds() -> None:
    from retrieval.indexer.runners.local import worker_chunk

    assert worker_chunk(4096, 16, 256) == 32  # 8 chunks per worker
    assert worker_chunk(16384, 16, 256) == 128
    assert worker_chunk(1_000_000, 16, 256) == 256  # never more than a model batch
    assert worker_chunk(10, 16, 256) == 32  # never fewer than 32 images
    assert worker_chunk(1000, 4, 8) == 8  # small model batches stay whole
    assert worker_chunk(1000, 0, 256) == 256  # no workers: decoding in the main process, whole batches
