"""The read view the HTTP server is built on: Index.open(pinned=True) keeps one generation of FAISS
index, vectors and rows while `update(rebuild=True)` replaces them; version() says when to reopen."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import retrieval
from tests.conftest import make_corpus


@pytest.fixture
def built(tmp_path: Path, tiny_model_dir: Path) -> tuple[Path, Path]:
    corpus = tmp_path / "corpus"
    make_corpus(corpus, 8)
    with retrieval.Index.create(tmp_path / "idx", model=str(tiny_model_dir), workers=0, batch_size=16) as index:
        index.update(corpus, progress=False)
    return tmp_path / "idx", corpus


def test_a_pinned_handle_answers_from_its_generation_through_a_rebuild(built: tuple[Path, Path]) -> None:
    path, corpus = built
    pinned = retrieval.Index.open(path, pinned=True)
    try:
        ids = sorted(r.id for r in (pinned.image(p) for p in ("a/img0001.jpg", "b/img0002.jpg")) if r is not None)
        assert len(ids) == 2 and pinned.image(10**9) is None and pinned.image("no/such.jpg") is None
        before = pinned.search(ids[0], k=3, nprobe=1)
        vectors = pinned.embeddings(ids)
        assert vectors.shape == (2, pinned.dim) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-2)
        version = pinned.version()
        assert version == pinned.version(current=True) and version[0] is not None
        assert pinned.ann_count == len(pinned) == 8 and pinned.ann_spec is not None

        # a file that scans first: the rebuild (ids start over at 1) gives every image another id
        (corpus / "0").mkdir()
        shutil.copy(corpus / "b" / "img0004.jpg", corpus / "0" / "first.jpg")
        with retrieval.Index.open(path, workers=0) as writer:
            writer.update(corpus, rebuild=True, progress=False)

        assert pinned.version(current=True) != version, "the database moved on"
        assert pinned.version() == version, "the pinned handle did not"
        again = pinned.search(ids[0], k=3, nprobe=1)
        assert [(h.id, h.path, h.score) for h in again] == [(h.id, h.path, h.score) for h in before]
        assert np.array_equal(pinned.embeddings(ids), vectors)
        assert pinned.image(ids[0]).path == "a/img0001.jpg" and pinned.ann_count == 8
        assert len(pinned) == 8, "len() counts the pinned generation's rows, not the 9 now in the database"
        assert pinned.image(np.int64(ids[0])).path == "a/img0001.jpg"  # numpy integers are ids, not paths
        assert [h.id for h in pinned.search(np.int64(ids[0]), k=3, nprobe=1)] == [h.id for h in before]
    finally:
        pinned.close()
    fresh = retrieval.Index.open(path, pinned=True)
    try:
        assert fresh.version() == fresh.version(current=True) != version
        assert fresh.ann_count == 9 and fresh.image("a/img0001.jpg").id == ids[0] + 1
    finally:
        fresh.close()
