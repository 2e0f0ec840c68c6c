"""Generated test images: photo-like content (smooth colour fields plus texture) in many formats.

Distinct seeds give visibly different images, so a random-weight model with layerscale 1.0
still separates them; nothing here depends on downloaded data.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB image with large-scale structure and fine texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for c in range(3):
        fx, fy, phase = rng.uniform(0.5, 6.0), rng.uniform(0.5, 6.0), rng.uniform(0, 2 * np.pi)
        base = np.sin(2 * np.pi * fx * x / max(width, 1) + phase) * np.cos(2 * np.pi * fy * y / max(height, 1))
        channels.append(base * 90 + rng.uniform(60, 190))
    img = np.stack(channels, axis=-1)
    # A few solid shapes at seed-dependent places make images differ in layout, not only colour.
    for _ in range(4):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.08, 0.3) * min(width, height) + 1
        mask = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        img[mask] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **params)
    return buf.getvalue()


def write(path: Path, image: Image.Image, fmt: str | None = None, **params) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **params)
    return path


def rgba_png(width: int = 200, height: int = 150, seed: int = 1) -> Image.Image:
    img = photo(width, height, seed).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))
    img.putalpha(Image.fromarray(alpha, "L"))
    return img


def palette_png(width: int = 200, height: int = 150, seed: int = 2, transparent: bool = True) -> Image.Image:
    img = photo(width, height, seed).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    if transparent:
        img.info["transparency"] = 0
    return img


def grey16(width: int = 180, height: int = 140, seed: int = 3) -> Image.Image:
    grey = np.asarray(photo(width, height, seed).convert("L"), dtype=np.uint16) * 257
    return Image.fromarray(grey)  # uint16 array -> mode I;16


def cmyk_jpeg_bytes(width: int = 200, height: int = 160, seed: int = 4) -> bytes:
    return encode(photo(width, height, seed).convert("CMYK"), "JPEG", quality=92)


def exif_rotated_jpeg_bytes(width: int = 240, height: int = 160, seed: int = 5, orientation: int = 6) -> bytes:
    img = photo(width, height, seed)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=92, exif=exif.tobytes())
