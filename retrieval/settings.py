"""One typed settings object. Every field can be set from the environment with the RETRIEVAL_ prefix.

CLI options override these values; the API reads them through dependency injection.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "facebook/dinov2-small"
DEFAULT_INDEX_DIR = Path("retrieval-index")

# Pillow's own default limit (Image.MAX_IMAGE_PIXELS), written out so that the value we apply
# is visible in --help and does not depend on the Pillow version.
DEFAULT_MAX_PIXELS = 89_478_485


def parse_size(text: str | int) -> int:
    """Parse a byte size such as '4GB', '512MiB', '1.5G' or a plain integer of bytes.

    Example: parse_size("2GB") == 2_000_000_000, parse_size("2GiB") == 2 * 1024**3
    """
    if isinstance(text, int):
        value = text
    else:
        s = text.strip().upper().replace(" ", "")
        units = {
            "TIB": 1024**4, "GIB": 1024**3, "MIB": 1024**2, "KIB": 1024,
            "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3,
            "T": 10**12, "G": 10**9, "M": 10**6, "K": 10**3, "B": 1,
        }
        for unit, factor in units.items():
            if s.endswith(unit):
                number = s[: -len(unit)]
                break
        else:
            number, factor = s, 1
        try:
            value = int(float(number) * factor)
        except ValueError:
            raise ValueError(f"not a size: {text!r} (examples: 4GB, 512MiB, 1000000)") from None
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


class Settings(BaseSettings):
    """Everything configurable, with defaults that work on a laptop."""

    model_config = SettingsConfigDict(env_prefix="RETRIEVAL_", extra="ignore")

    index_dir: Path = Field(DEFAULT_INDEX_DIR, description="Where the database, vectors and FAISS index live.")
    db_url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<index_dir>/retrieval.db")
    model: str = Field(DEFAULT_MODEL, description="Hub id, local save_pretrained directory, or cached hub id.")
    copy_model: str | None = Field(None, description="Copy-detection model of the `copy` role (dedup): sscd, "
                                   "sscd-int8, sscd-distilled, a .pt/.onnx file or a transformers model.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    precision: str = Field("auto", description="auto (fp16/bf16 on GPU, fp32 on CPU), fp32, fp16 or bf16.")
    batch_size: int = Field(32, ge=1, le=4096)
    workers: int | None = Field(None, ge=0, le=64, description="Decode worker processes; None picks from the CPU count.")
    overlap: bool | None = Field(None, description="Write each batch on a separate thread while the next one "
                                 "embeds; None: on a GPU only (on CPU the model already uses every core).")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="Images with more pixels are rejected (decompression bombs).")
    decode_timeout_s: float = Field(60.0, ge=0.0, description="A file that takes longer to decode is stopped and "
                                    "recorded as a \"timeout\" failure; 0 = no limit.")
    memory_budget: int = Field(parse_size("4GB"), ge=1, description="RAM the FAISS index may use, in bytes.")
    exact_threshold: int = Field(50_000, ge=1, description="Below this many vectors the index is exact (flat).")
    recall_target: float = Field(0.95, gt=0.0, le=1.0, description="recall@10 the ANN index must reach vs exact search.")

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _parse_budget(cls, value: str | int) -> int:
        return parse_size(value)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value not in ("auto", "cpu", "cuda", "mps") and not value.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {value!r}")
        return value

    @field_validator("precision")
    @classmethod
    def _check_precision(cls, value: str) -> str:
        if value not in ("auto", "fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be auto, fp32, fp16 or bf16, got {value!r}")
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
