"""Shared fixtures: tiny DINOv2 checkpoints made on the fly, generated image corpora, isolation."""

from __future__ import annotations

import os
from pathlib import Path

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
