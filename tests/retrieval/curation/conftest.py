"""Curation fixtures: a CLI app with the curation commands, and a small indexed corpus with planted copies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image as PILImage
from typer.testing import CliRunner

from tests.conftest import make_corpus
from tests.images import write


@pytest.fixture(scope="session")
def curation_app() -> typer.Typer:
    from retrieval.cli.app import _Group, main
    from retrieval.cli.curation import register

    app = typer.Typer(cls=_Group, no_args_is_help=True, add_completion=False, rich_markup_mode=None,
                      pretty_exceptions_enable=False)
    app.callback()(main)
    from retrieval.cli.app import index

    app.command()(index)
    register(app)
    return app


@pytest.fixture
def cli(curation_app: typer.Typer):
    runner = CliRunner()

    def run(*args: object, ok: bool = True) -> tuple[int, str]:
        result = runner.invoke(curation_app, [str(a) for a in args], catch_exceptions=False)
        if ok:
            assert result.exit_code == 0, result.output
        return result.exit_code, result.output

    return run


def plant_corpus(root: Path) -> dict[str, str]:
    """12 distinct images plus copies; returns copy path -> original path."""
    make_corpus(root, 12, size=(160, 120))
    orig = root / "a" / "img0001.jpg"
    planted = {}
    shutil.copy(orig, root / "b" / "copy_of_1.jpg")  # identical bytes
    planted["b/copy_of_1.jpg"] = "a/img0001.jpg"
    src = PILImage.open(root / "a" / "img0003.png")  # re-encode the PNG as a JPEG
    write(root / "reencoded" / "img0003_q60.jpg", src, "JPEG", quality=60)
    planted["reencoded/img0003_q60.jpg"] = "a/img0003.png"
    small = PILImage.open(root / "a" / "img0005.jpg").resize((120, 90), PILImage.Resampling.LANCZOS)
    write(root / "resized" / "img0005_small.jpg", small, "JPEG", quality=90)
    planted["resized/img0005_small.jpg"] = "a/img0005.jpg"
    flipped = PILImage.open(root / "a" / "img0007.jpg").transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)
    write(root / "flipped" / "img0007_flip.jpg", flipped, "JPEG", quality=50)  # smaller file: loses ties
    planted["flipped/img0007_flip.jpg"] = "a/img0007.jpg"
    return planted


def plant_vector(index_dir: Path, path: str, like: str, noise: float = 0.001, seed: int = 0) -> None:
    """Give `path` the stored vector of `like` plus a little noise, and re-sync the FAISS index.

    The tiny random-weight model has no semantics, so a flipped copy is not close to its original
    by itself; this plants the closeness the embedding stage must find.
    """
    from sqlalchemy import select, update

    from retrieval.layout import IndexLayout
    from retrieval.store import Image, Store
    from retrieval.sync import SyncOptions, sync_index
    from retrieval.vectors import VectorStore

    layout = IndexLayout(index_dir)
    store = Store(layout.default_db_url())
    dim = store.get_meta("dim")
    vectors = VectorStore(layout.vectors_path, dim)
    with store.session() as s, s.begin():
        target = s.scalar(select(Image.id).where(Image.path == path))
        source = s.scalar(select(Image.id).where(Image.path == like))
        v = vectors.read([source])[0] + np.random.default_rng(seed).normal(0, noise, dim).astype(np.float32)
        vectors.write(np.array([target]), (v / np.linalg.norm(v))[None])
        s.execute(update(Image).where(Image.id == target).values(indexed=False))
    sync_index(store, vectors, layout, SyncOptions(memory_budget=10**9, exact_threshold=50_000, recall_target=0.95))
    store.close()


@pytest.fixture
def planted(tmp_path: Path, tiny_model_dir: Path, cli) -> tuple[Path, Path, dict[str, str]]:
    corpus = tmp_path / "corpus"
    copies = plant_corpus(corpus)
    index_dir = tmp_path / "idx"
    _, out = cli("index", corpus, "--model", tiny_model_dir, "--index-dir", index_dir, "--no-progress", "--json",
                 "-j", "0", "-b", "16")
    assert json.loads(out)["new"] == 16
    plant_vector(index_dir, "flipped/img0007_flip.jpg", "a/img0007.jpg")
    return corpus, index_dir, copies
