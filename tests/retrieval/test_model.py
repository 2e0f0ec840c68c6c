"""Loading the embedder: local directories, the Hugging Face cache, and every way loading must fail.

Loading must never fall back to random weights, and every failure is a ModelLoadError whose
message tells the user what to do.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from retrieval.errors import ModelLoadError, RetrievalError
from retrieval.imaging.preprocess import PreprocessConfig, load_and_preprocess
from retrieval.model import (
    load_embedder,
    model_fingerprint,
    resolve_device,
    resolve_precision,
)
from tests.images import encode, photo


@pytest.fixture(scope="module")
def embedder(tiny_model_dir):
    return load_embedder(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def batch(embedder) -> np.ndarray:
    """Three preprocessed photos, uint8 (3, 3, 224, 224)."""
    crops = [load_and_preprocess(encode(photo(160, 120, seed=60 + i), "PNG"), embedder.preprocess, 10**8)[0]
             for i in range(3)]
    return np.stack(crops)


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, private Hugging Face cache, offline.

    huggingface_hub reads HF_HOME / HF_HUB_CACHE into huggingface_hub.constants when it is first
    imported, and snapshot_download(cache_dir=None) reads constants.HF_HUB_CACHE at call time, so
    both the environment (for anything imported later or in subprocesses) and the constant are set.
    """
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    hub = home / "hub"
    hub.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def cache_model(hub: Path, repo_id: str, source: Path) -> Path:
    """Lay out `source` as the cache does: blobs by hash, a snapshot of symlinks, refs/main."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def copy_model(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def edit_weights(model_dir: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------
# Loading that works
# --------------------------------------------------------------------------------------------


def test_load_from_local_directory(embedder, tiny_model_dir):
    assert embedder.dim == 32
    assert embedder.device == "cpu"
    assert embedder.precision == "fp32"
    assert embedder.model_dir == Path(tiny_model_dir)
    assert embedder.preprocess == PreprocessConfig()
    assert not embedder.model.training


def test_embed_returns_unit_float32_rows(embedder, batch):
    out = embedder.embed(batch)
    assert out.dtype == np.float32 and out.shape == (3, embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # Rows are the images' own embeddings, independent of their batch mates...
    for i in range(3):
        np.testing.assert_allclose(embedder.embed(batch[i : i + 1])[0], out[i], atol=1e-5)
    # ...and distinct images give distinct embeddings.
    assert np.abs(out[0] - out[1]).max() > 1e-3 and np.abs(out[1] - out[2]).max() > 1e-3


def test_embed_accepts_torch_and_rejects_bad_shapes(embedder, batch):
    import torch

    np.testing.assert_allclose(embedder.embed(torch.from_numpy(batch)), embedder.embed(batch), atol=1e-6)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        embedder.embed(batch[0])
    with pytest.raises(ValueError):
        embedder.embed(batch[:, :1])


def test_embed_matches_model_on_normalised_input(embedder, batch):
    """embed() normalises uint8 on the device exactly like (x / 255 - mean) / std, then pools CLS."""
    import torch

    config = embedder.preprocess
    mean = torch.tensor(config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std).view(1, 3, 1, 1)
    x = (torch.from_numpy(batch).float() * config.rescale_factor - mean) / std
    with torch.no_grad():
        expected = torch.nn.functional.normalize(embedder.model(pixel_values=x).pooler_output, dim=-1).numpy()
    np.testing.assert_allclose(embedder.embed(batch), expected, atol=1e-5)


def test_bf16_on_cpu_is_honoured_and_close(tiny_model_dir, embedder, batch):
    bf16 = load_embedder(str(tiny_model_dir), device="cpu", precision="bf16")
    assert bf16.precision == "bf16"
    out = bf16.embed(batch)
    assert out.dtype == np.float32
    cos = np.sum(out * embedder.embed(batch), axis=1)
    assert (cos > 0.99).all()


def test_load_from_hf_cache_offline(hf_cache, tiny_model_dir, embedder):
    snapshot = cache_model(hf_cache, "org/name", tiny_model_dir)
    cached = load_embedder("org/name", device="cpu")
    assert cached.model_ref == "org/name"
    assert cached.model_dir.resolve() == snapshot.resolve()
    assert cached.dim == embedder.dim
    # Same weights under another path: same fingerprint (the path is not part of it).
    assert cached.fingerprint == embedder.fingerprint


def test_hf_logging_is_restored(tiny_model_dir, tmp_path):
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    load_embedder(str(tiny_model_dir), device="cpu")
    assert hf_logging.get_verbosity() == before
    broken = tmp_path / "no-weights"
    broken.mkdir()
    shutil.copyfile(tiny_model_dir / "config.json", broken / "config.json")
    with pytest.raises(ModelLoadError):
        load_embedder(str(broken), device="cpu")
    assert hf_logging.get_verbosity() == before


# --------------------------------------------------------------------------------------------
# Loading that must fail, with a useful message
# --------------------------------------------------------------------------------------------


def test_unknown_hub_id_offline(hf_cache):
    with pytest.raises(ModelLoadError) as info:
        load_embedder("facebook/dinov2-nonexistent", device="cpu")
    message = str(info.value)
    assert isinstance(info.value, RetrievalError)
    assert "facebook/dinov2-nonexistent" in message
    assert "--model" in message  # how to pass a local copy instead
    assert "offline" in message.lower()


def test_missing_directory(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_embedder(str(missing), device="cpu")


def test_directory_without_config(tmp_path):
    (tmp_path / "empty-model").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_embedder(str(tmp_path / "empty-model"), device="cpu")


def test_config_without_weights_is_refused(tiny_model_dir, tmp_path):
    """Never random weights: a config alone is not a model."""
    model_dir = tmp_path / "config-only"
    model_dir.mkdir()
    shutil.copyfile(tiny_model_dir / "config.json", model_dir / "config.json")
    shutil.copyfile(tiny_model_dir / "preprocessor_config.json", model_dir / "preprocessor_config.json")
    with pytest.raises(ModelLoadError, match="no usable weights"):
        load_embedder(str(model_dir), device="cpu")


def test_non_dinov2_checkpoint_is_refused(tmp_path):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=16)
    ViTModel(config).save_pretrained(tmp_path / "vit")
    with pytest.raises(ModelLoadError) as info:
        load_embedder(str(tmp_path / "vit"), device="cpu")
    message = str(info.value)
    assert "dinov2" in message.lower()
    assert "'vit'" in message


def test_incomplete_weights_are_refused(tiny_model_dir, tmp_path):
    model_dir = copy_model(tiny_model_dir, tmp_path / "incomplete")

    def drop_query(tensors):
        key = next(k for k in sorted(tensors) if k.endswith("query.weight"))
        del tensors[key]

    edit_weights(model_dir, drop_query)
    with pytest.raises(ModelLoadError) as info:
        load_embedder(str(model_dir), device="cpu")
    message = str(info.value)
    assert "random" in message.lower()
    assert "1 tensors missing" in message


def test_missing_mask_token_is_tolerated(tiny_model_dir, tmp_path, embedder, batch):
    model_dir = copy_model(tiny_model_dir, tmp_path / "no-mask-token")
    edit_weights(model_dir, lambda tensors: tensors.pop("embeddings.mask_token"))
    loaded = load_embedder(str(model_dir), device="cpu")
    np.testing.assert_allclose(loaded.embed(batch), embedder.embed(batch), atol=1e-6)


def test_cuda_without_gpu(tiny_model_dir):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(ModelLoadError, match="--device"):
        resolve_device("cuda")
    with pytest.raises(ModelLoadError):
        resolve_device("cuda:0")
    with pytest.raises(ModelLoadError):
        load_embedder(str(tiny_model_dir), device="cuda")
    assert resolve_device("auto") == "cpu"


def test_resolve_precision():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"  # explicit choices are honoured


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------


def test_fingerprint_stable_across_loads(embedder, tiny_model_dir):
    again = load_embedder(str(tiny_model_dir), device="cpu")
    assert again.fingerprint == embedder.fingerprint
    assert model_fingerprint(embedder.model) == embedder.fingerprint
    assert len(embedder.fingerprint) == 64


def test_fingerprint_differs_between_checkpoints(embedder, other_model_dir, wide_model_dir):
    other = load_embedder(str(other_model_dir), device="cpu")
    wide = load_embedder(str(wide_model_dir), device="cpu")
    assert other.dim == embedder.dim == 32 and wide.dim == 48
    assert len({embedder.fingerprint, other.fingerprint, wide.fingerprint}) == 3


def test_fingerprint_sees_a_small_weight_change(embedder, tiny_model_dir, tmp_path):
    """A fine-tune of the same shape must not pass for the original."""
    model_dir = copy_model(tiny_model_dir, tmp_path / "tuned")

    def nudge(tensors):
        tensors["layernorm.weight"][0] += 1e-3

    edit_weights(model_dir, nudge)
    tuned = load_embedder(str(model_dir), device="cpu")
    assert tuned.fingerprint != embedder.fingerprint
