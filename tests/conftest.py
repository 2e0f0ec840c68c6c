"""Shared fixtures: tiny DINOv2 checkpoints made on the fly, generated image corpora, isolation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from tests.images import photo, write

# Never reach for the network from tests, and never read the developer's own HF cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def save_tiny_dinov2(path: Path, hidden: int = 32, layers: int = 1, seed: int = 0, layerscale: float = 1.0,
                     with_processor: bool = True) -> Path:
    """A random-weight DINOv2 with real architecture and a real preprocessor_config.json.

    layerscale 1.0 (not the checkpoint default 1e-5) makes embeddings depend on the image, so
    parity tests can fail; random weights carry no semantics and no test relies on any.
    """
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                          intermediate_size=hidden * 2, layerscale_value=layerscale)
    Dinov2Model(config).eval().save_pretrained(path)
    if with_processor:
        BitImageProcessor(
            size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_center_crop=True,
        ).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_dinov2(tmp_path_factory.mktemp("models") / "tiny-dinov2")


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same shape as tiny_model_dir, other weights: must not be mixed into the same index."""
    return save_tiny_dinov2(tmp_path_factory.mktemp("models") / "tiny-dinov2-other", seed=1)


@pytest.fixture(scope="session")
def wide_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another embedding dimension (48 instead of 32)."""
    return save_tiny_dinov2(tmp_path_factory.mktemp("models") / "tiny-dinov2-wide", hidden=48)


def make_corpus(root: Path, n: int, start: int = 0, size: tuple[int, int] = (96, 72)) -> list[Path]:
    """n distinct JPEG/PNG images in two sub-folders."""
    paths = []
    for i in range(start, start + n):
        sub = "a" if i % 2 else "b"
        ext, fmt = (".jpg", "JPEG") if i % 3 else (".png", "PNG")
        paths.append(write(root / sub / f"img{i:04d}{ext}", photo(*size, seed=1000 + i), fmt))
    return paths


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    make_corpus(root, 24)
    return root


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each test gets its own cwd (so ./retrieval-index never leaks) and no RETRIEVAL_* settings."""
    for key in list(os.environ):
        if key.startswith("RETRIEVAL_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    from retrieval.settings import get_settings

    get_settings.cache_clear()


pytest_plugins = ["tests.servers"]  # S3 (moto), HTTP and PostgreSQL servers on loopback


# --- the database backend of the whole suite (tests/db.py) ------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--test-db", choices=["sqlite", "postgresql"], default=None,
                     help="database behind every index folder in the tests (default: RETRIEVAL_TEST_DB or sqlite)")


def pytest_configure(config: pytest.Config) -> None:
    from tests import db

    db.BACKEND = config.getoption("--test-db") or db.BACKEND
    config.addinivalue_line("markers", "sqlite_only(reason): a test about SQLite itself; skipped on PostgreSQL")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from tests import db

    if not db.postgres():
        return
    for item in items:
        marker = item.get_closest_marker("sqlite_only")
        if marker is not None:
            reason = marker.args[0] if marker.args else marker.kwargs.get("reason", "about SQLite itself")
            item.add_marker(pytest.mark.skip(reason=f"SQLite only: {reason}"))


@pytest.fixture(scope="session", autouse=True)
def _postgres_databases(request: pytest.FixtureRequest) -> Iterator[None]:
    """On PostgreSQL: every index folder's default database is a fresh PostgreSQL database."""
    from tests import db

    if not db.postgres():
        yield
        return
    from retrieval.layout import IndexLayout

    databases = db.Databases(request.getfixturevalue("postgres_server"))
    saved = IndexLayout.default_db_url, IndexLayout.exists
    IndexLayout.default_db_url = lambda self: databases.url(self.root)  # type: ignore[method-assign]
    IndexLayout.exists = lambda self: databases.exists(self.root)  # type: ignore[method-assign]
    db.DATABASES = databases
    try:
        yield
    finally:
        IndexLayout.default_db_url, IndexLayout.exists = saved  # type: ignore[method-assign]
        db.DATABASES = None
        databases.close()


@pytest.fixture(autouse=True)
def _drop_test_databases(tmp_path: Path) -> Iterator[None]:
    """The PostgreSQL databases of index folders inside this test's tmp_path go with the test."""
    yield
    from tests import db

    if db.DATABASES is not None:
        db.DATABASES.drop_under(tmp_path)
