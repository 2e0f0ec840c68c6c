"""The DINOv2 embedder: load a checkpoint, pick device and precision, embed batches.

The embedding is the CLS token after the final layer norm (Dinov2Model's pooler_output),
L2-normalised, returned as float32 numpy. Loading never falls back to random weights: a model
that cannot be found, or whose weights do not cover the architecture, is a ModelLoadError.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.errors import ModelLoadError
from retrieval.imaging.preprocess import PreprocessConfig

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("dinov2", "dinov2_with_registers")


def resolve_device(device: str = "auto") -> str:
    """auto -> cuda when available, else cpu. Explicit cuda without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device} asked for, but PyTorch sees no CUDA GPU here; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("--device mps asked for, but MPS is not available; use --device cpu")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """auto -> bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU."""
    import torch

    if precision != "auto":
        if precision in ("fp16", "bf16") and device == "cpu":
            logger.warning("%s on CPU is slower than fp32 on most CPUs; using it as asked", precision)
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _local_snapshot(model_ref: str) -> Path | None:
    """The directory holding `model_ref`: itself if it is a directory, else its HF cache snapshot."""
    path = Path(model_ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is a directory but holds no config.json; pass a save_pretrained directory")
        return path
    if model_ref.startswith(("/", ".", "~")) or model_ref.count("/") > 1:
        raise ModelLoadError(f"model directory {model_ref} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_ref, local_files_only=True))
    except Exception:  # noqa: BLE001 - any cache miss means "not available offline"
        return None


def _download(model_ref: str) -> Path:
    from huggingface_hub import snapshot_download

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelLoadError(_missing_model_message(model_ref, "HF_HUB_OFFLINE is set"))
    try:
        return Path(
            snapshot_download(model_ref, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"], etag_timeout=10)
        )
    except Exception as exc:  # noqa: BLE001 - network, auth, 404: all mean "cannot get it"
        raise ModelLoadError(_missing_model_message(model_ref, f"{type(exc).__name__}: {exc}".splitlines()[0])) from None


def _missing_model_message(model_ref: str, why: str) -> str:
    return (
        f"cannot load model '{model_ref}': it is not in the local Hugging Face cache and could not be "
        f"downloaded ({why}). On a machine with internet run `huggingface-cli download {model_ref}`, copy the "
        f"folder here and pass it with --model /path/to/folder (or set RETRIEVAL_MODEL)"
    )


def model_fingerprint(model: Any) -> str:
    """A cheap identity of architecture and weights: config plus a sample of every tensor.

    Two different checkpoints of the same shape (e.g. a fine-tune) get different fingerprints,
    so an index is never extended with vectors from an incompatible model.
    """
    h = hashlib.sha256()
    cfg = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "_attn_implementation_autoset", "torch_dtype", "dtype",
                     "_attn_implementation", "attn_implementation"):
        cfg.pop(volatile, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)[:4096].float().cpu().numpy()
        h.update(name.encode())
        h.update(np.ascontiguousarray(flat).tobytes())
    return h.hexdigest()


@dataclass
class Embedder:
    """A loaded model with its preprocessing; `embed` maps uint8 crops to unit vectors."""

    model: Any
    model_ref: str
    model_dir: Path
    preprocess: PreprocessConfig
    device: str
    precision: str
    dim: int
    fingerprint: str

    def _normalizer(self) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        mean = torch.tensor(self.preprocess.image_mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess.image_std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        scale = self.preprocess.rescale_factor / std
        shift = -mean / std
        return scale, shift

    def embed(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        """uint8 (B, 3, H, W) crops -> float32 (B, dim) L2-normalised CLS embeddings."""
        return self.to_numpy(self.embed_async(pixels))

    def embed_async(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Like `embed`, but returns the vectors as a tensor on the model's device without waiting.

        On a GPU the work is only queued: the caller can fetch the next batch while it runs and
        collect the vectors later with `to_numpy` (indexer.overlap does this from a writer thread).
        Pinned input memory makes the host-to-device copy asynchronous too.
        """
        import torch

        if isinstance(pixels, np.ndarray):
            pixels = torch.from_numpy(pixels)
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, H, W) batch, got {tuple(pixels.shape)}")
        if not hasattr(self, "_scale"):
            self._scale, self._shift = self._normalizer()
        with torch.inference_mode():
            x = pixels.to(self.device, non_blocking=True).float()
            x = x * self._scale + self._shift
            if self.precision in ("fp16", "bf16"):
                dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
                device_type = "cuda" if self.device.startswith("cuda") else self.device
                with torch.autocast(device_type=device_type, dtype=dtype):
                    cls = self.model(pixel_values=x).pooler_output
            else:
                cls = self.model(pixel_values=x).pooler_output
            return torch.nn.functional.normalize(cls.float(), dim=-1)

    @staticmethod
    def to_numpy(vectors: torch.Tensor | np.ndarray) -> np.ndarray:
        """Wait for `embed_async`'s vectors and copy them to host memory (arrays pass through)."""
        return vectors if isinstance(vectors, np.ndarray) else vectors.cpu().numpy()


def load_embedder(model_ref: str, device: str = "auto", precision: str = "auto") -> Embedder:
    """Load a DINOv2 checkpoint from a local directory, the HF cache, or the hub (in that order)."""
    import torch
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    model_dir = _local_snapshot(model_ref) or _download(model_ref)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model '{model_ref}' is a {config.model_type!r} checkpoint; only DINOv2 ({', '.join(SUPPORTED_MODEL_TYPES)}) is supported"
        )
    resolved = resolve_device(device)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # keep "Loading weights" bars out of our progress output
    try:
        model, info = AutoModel.from_pretrained(
            model_dir, local_files_only=True, attn_implementation="sdpa", output_loading_info=True
        )
    except OSError as exc:
        raise ModelLoadError(f"model '{model_ref}' at {model_dir} has no usable weights: {exc}".splitlines()[0]) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    # mask_token is only used for masked-image pre-training, never for inference.
    missing = sorted(k for k in info.get("missing_keys", ()) if k.rsplit(".", 1)[-1] != "mask_token")
    if missing:
        raise ModelLoadError(
            f"model '{model_ref}' weights do not cover the architecture ({len(missing)} tensors missing, e.g. "
            f"{missing[0]}); refusing to run with randomly initialised weights"
        )
    model.eval().to(resolved)
    prec = resolve_precision(precision, resolved)
    fingerprint = model_fingerprint(model)
    if resolved.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    logger.info("loaded %s (%s) on %s/%s", model_ref, model_dir, resolved, prec)
    return Embedder(
        model=model,
        model_ref=model_ref,
        model_dir=Path(model_dir),
        preprocess=PreprocessConfig.from_model_dir(Path(model_dir)),
        device=resolved,
        precision=prec,
        dim=int(config.hidden_size),
        fingerprint=fingerprint,
    )
