"""Decode and preprocess images with parity to the checkpoint's own image processor.

The reference (transformers' BitImageProcessor for DINOv2) does: convert to RGB (alpha composited
onto white), resize the shortest edge to 256 with bicubic, centre-crop 224, rescale by 1/255 and
normalise with the ImageNet mean/std. We produce the same pixels faster:

* JPEGs are decoded at a reduced DCT scale (Pillow's draft mode) when they are much larger than
  needed, which skips most of the decoding work for multi-megapixel photos;
* the resize and the crop are one `Image.resize(box=...)` call that resamples only the pixels the
  crop keeps, with the same filter and the same output grid as resize-then-crop;
* workers return uint8 crops (4x less inter-process traffic than float32); the rescale and
  normalisation happen batched, on the model's device (see retrieval.model).

tests/retrieval/test_preprocess.py checks the embeddings against the reference on every format
we claim to support.
"""

from __future__ import annotations

import io
import json
import logging
import math
import re
import struct
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from retrieval.errors import ImageDecodeError, PreprocessConfigError
from retrieval.imaging.signatures import sniff_format

logger = logging.getLogger(__name__)

# Truncated files are failures, never silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# We enforce our own (configurable) pixel limit before decoding; Pillow's check stays as a backstop.
warnings.simplefilter("error", Image.DecompressionBombWarning)

# Draft decoding keeps at least this many times the target shortest edge. 1.0 (DCT scaling down to
# >= 256 px, then bicubic) measured cos >= 0.99998 to the full-resolution reference on 12 MP JPEGs
# at a third less decode time than 2.0; the parity tests guard it.
DRAFT_OVERSAMPLE = 1.0

EXIF_ORIENTATION = 0x0112

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessConfig:
    """The subset of a BitImageProcessor config that DINOv2 checkpoints use."""

    resize_shortest_edge: int | None = 256
    resize_height: int | None = None
    resize_width: int | None = None
    crop_height: int | None = 224
    crop_width: int | None = 224
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD
    source: str = field(default="dinov2-default", compare=False)

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of every preprocessed image."""
        if self.crop_height and self.crop_width:
            return self.crop_height, self.crop_width
        assert self.resize_height and self.resize_width
        return self.resize_height, self.resize_width

    @property
    def min_source_edge(self) -> int:
        """The shortest edge the decoded image should keep before the final resize."""
        if self.resize_shortest_edge:
            return self.resize_shortest_edge
        return max(self.resize_height or 0, self.resize_width or 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_processor_dict(cls, cfg: dict[str, Any], source: str = "preprocessor_config.json") -> "PreprocessConfig":
        """Build from the JSON of a Hugging Face image processor, refusing what we would get wrong."""
        if not cfg.get("do_resize", True):
            raise PreprocessConfigError(f"{source}: do_resize=false is not supported (images would vary in size)")
        size = cfg.get("size") or {"shortest_edge": 224}  # BitImageProcessor's own default
        if isinstance(size, int):
            size = {"shortest_edge": size}
        shortest = size.get("shortest_edge")
        height, width = size.get("height"), size.get("width")
        if not shortest and not (height and width):
            raise PreprocessConfigError(f"{source}: unsupported size {size}; expected shortest_edge or height/width")
        crop = cfg.get("crop_size") or {}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        do_crop = cfg.get("do_center_crop", True)
        crop_h, crop_w = (crop.get("height"), crop.get("width")) if do_crop else (None, None)
        if shortest and not (crop_h and crop_w):
            raise PreprocessConfigError(f"{source}: shortest_edge resize without a centre crop gives variable sizes")
        if crop_h and shortest and (crop_h > shortest or crop_w > shortest):
            raise PreprocessConfigError(f"{source}: crop {crop_h}x{crop_w} larger than the resized edge {shortest}")
        if crop_h and height and (crop_h > height or crop_w > width):
            raise PreprocessConfigError(f"{source}: crop {crop_h}x{crop_w} larger than the resize {height}x{width}")
        mean = cfg.get("image_mean", IMAGENET_MEAN) if cfg.get("do_normalize", True) else (0.0, 0.0, 0.0)
        std = cfg.get("image_std", IMAGENET_STD) if cfg.get("do_normalize", True) else (1.0, 1.0, 1.0)
        if isinstance(mean, (int, float)):
            mean = (float(mean),) * 3
        if isinstance(std, (int, float)):
            std = (float(std),) * 3
        return cls(
            resize_shortest_edge=shortest,
            resize_height=None if shortest else height,
            resize_width=None if shortest else width,
            crop_height=crop_h,
            crop_width=crop_w,
            resample=int(cfg.get("resample", 3)),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0,
            image_mean=tuple(float(m) for m in mean),  # type: ignore[arg-type]
            image_std=tuple(float(s) for s in std),  # type: ignore[arg-type]
            source=source,
        )

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> "PreprocessConfig":
        path = Path(model_dir) / "preprocessor_config.json"
        if not path.exists():
            logger.info("%s has no preprocessor_config.json; using the DINOv2 defaults", model_dir)
            return cls()
        return cls.from_processor_dict(json.loads(path.read_text()), source=str(path))


@dataclass
class DecodedImage:
    """An RGB image ready for preprocessing, and facts about the original."""

    image: Image.Image  # RGB, EXIF orientation applied, possibly reduced by draft decoding
    width: int  # of the original, after EXIF orientation
    height: int
    format: str
    # Where `image` was decoded at a reduced DCT scale: reduced pixels per original pixel, and the
    # shift (in reduced pixels, displayed axes) that an EXIF flip of a partial edge pixel causes.
    scale: float = 1.0
    offset: tuple[float, float] = (0.0, 0.0)


def bomb_error(exc: Exception, max_pixels: int) -> ImageDecodeError:
    """Pillow's decompression-bomb guard fired: the reason quotes the configured limit, not Pillow's."""
    size = re.search(r"Image size \((\d+) pixels\)", str(exc))
    found = f"the image has {int(size.group(1)) / 1e6:.1f} MP, " if size else ""
    return ImageDecodeError(f"too many pixels: {found}over the limit of {max_pixels / 1e6:.1f} MP "
                            f"(raise it with --max-pixels if this image is legitimate)", "too_large")


def classify_decode_error(exc: Exception, head: bytes, max_pixels: int) -> ImageDecodeError:
    """The ImageDecodeError for a decoder exception: one classification for indexing, uploads and thumbnails."""
    if isinstance(exc, UnidentifiedImageError):
        fmt = sniff_format(head)
        if fmt is not None:
            return ImageDecodeError(f"corrupt image data: the file starts like a {fmt} but its header cannot be parsed",
                                    "corrupt")
        return ImageDecodeError("not an image: Pillow recognises no image format in the content", "not_an_image")
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return bomb_error(exc, max_pixels)
    text = str(exc) or type(exc).__name__
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return ImageDecodeError(f"truncated image: the file ends before the image data does ({text})", "truncated")
    return ImageDecodeError(f"corrupt image data: {text}", "corrupt")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB conversion as the reference processor does it, except for >8-bit greyscale.

    Alpha (and palette transparency) is composited onto white, like transformers' convert_to_rgb.
    16/32-bit greyscale is scaled to 8 bits first: Pillow's convert() clips those values, which
    turns most 16-bit greyscale images white.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image)
        if image.mode == "I":
            top = 65535 if arr.max(initial=0) > 255 else 255
        else:
            top = 65535
        scaled = np.clip(arr.astype(np.float64) * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, config: PreprocessConfig, max_pixels: int) -> DecodedImage:
    """Decode image bytes to RGB with EXIF orientation applied, refusing bombs before decoding.

    Raises ImageDecodeError with a human reason for every way a file can be unusable.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)", "empty")
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        # Pillow's own guard fires inside open(); ours (right after open, before decoding) is the
        # real limit, so a user-raised --max-pixels must lift Pillow's too.
        Image.MAX_IMAGE_PIXELS = max_pixels
    scale, pad = 1.0, (0.0, 0.0)
    try:
        image = Image.open(io.BytesIO(data))
        fmt = image.format or "unknown"
        w, h = image.size
        if w <= 0 or h <= 0:
            raise ImageDecodeError(f"invalid image size {w}x{h}", "corrupt")
        if w * h > max_pixels:
            raise ImageDecodeError(
                f"too many pixels: {w}x{h} = {w * h / 1e6:.1f} MP exceeds the limit of "
                f"{max_pixels / 1e6:.1f} MP (raise it with --max-pixels if this image is legitimate)",
                "too_large",
            )
        if fmt == "JPEG":
            need = config.min_source_edge * DRAFT_OVERSAMPLE
            scale = need / min(w, h)
            if scale < 1:
                drafted = image.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))
                scale = 1.0 if drafted is None else drafted[1][2] / w
            scale = min(scale, 1.0)
            # The reduced image is ceil(w / factor) wide: its last column covers a partial block.
            pad = (image.width - w * scale, image.height - h * scale)
        image.load()
        # Multi-frame files (GIF, APNG, TIFF) use their first frame, which open() selects.
        # Orientations 5-8 are transposes: the displayed image is h x w.
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        swap = orientation in (5, 6, 7, 8)
        width, height = (h, w) if swap else (w, h)
        px, py = pad
        offset = {2: (px, 0.0), 3: (px, py), 4: (0.0, py), 6: (py, 0.0), 7: (py, px), 8: (0.0, px)}.get(
            orientation, (0.0, 0.0))
        rgb = to_rgb(ImageOps.exif_transpose(image))
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, TypeError,
            Image.DecompressionBombError, Image.DecompressionBombWarning, struct.error) as exc:
        raise classify_decode_error(exc, data[:16], max_pixels) from None
    return DecodedImage(image=rgb, width=width, height=height, format=fmt, scale=scale, offset=offset)


def _resized_size(width: int, height: int, config: PreprocessConfig) -> tuple[int, int]:
    """(width, height) the reference resize produces, with the same integer rounding."""
    if config.resize_shortest_edge:
        short, long = (width, height) if width <= height else (height, width)
        new_short = config.resize_shortest_edge
        new_long = int(new_short * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)
    assert config.resize_height and config.resize_width
    return config.resize_width, config.resize_height


def preprocess(decoded: DecodedImage, config: PreprocessConfig) -> np.ndarray:
    """The model input of one image as uint8, shape (3, H, W); normalisation happens batched later."""
    image = decoded.image
    # The output grid is defined on the original (oriented) size, exactly like the reference;
    # the draft-reduced image is only a cheaper source for the same grid.
    new_w, new_h = _resized_size(decoded.width, decoded.height, config)
    out_h, out_w = config.output_size
    left = (new_w - out_w) // 2 if config.crop_width else 0
    top = (new_h - out_h) // 2 if config.crop_height else 0
    sx, sy = decoded.width / new_w * decoded.scale, decoded.height / new_h * decoded.scale
    ox, oy = decoded.offset
    box = (left * sx + ox, top * sy + oy, (left + out_w) * sx + ox, (top + out_h) * sy + oy)
    crop = image.resize((out_w, out_h), resample=config.resample, box=box)
    return np.ascontiguousarray(np.asarray(crop, dtype=np.uint8).transpose(2, 0, 1))


def load_and_preprocess(data: bytes, config: PreprocessConfig, max_pixels: int) -> tuple[np.ndarray, DecodedImage]:
    """Bytes to model input, for query images (API uploads, `retrieval search` on outside files)."""
    decoded = decode_image(data, config, max_pixels)
    return preprocess(decoded, config), decoded
