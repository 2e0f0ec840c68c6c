"""The edits a copied image meets in the wild, as plain PIL functions.

One list serves `retrieval calibrate` (copies of the user's own images) and the benchmarks' photo
corpus (planted copies with known labels), so a threshold measured in one is measured against the
same edits as the other. Every edit is deterministic: no randomness, so a corpus built twice is
the same. Edits that only exist at the file level (the same bytes, another container) are in
`FILE_EDITS`; they cannot change pixels, so calibrating an embedding on them teaches nothing.
"""

from __future__ import annotations

import io
from typing import Callable

from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

Edit = Callable[[Image.Image], Image.Image]


def jpeg(im: Image.Image, quality: int) -> Image.Image:
    """Re-encode as JPEG at `quality` and decode again (what a re-upload does)."""
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def scale(im: Image.Image, factor: float) -> Image.Image:
    size = (max(1, round(im.width * factor)), max(1, round(im.height * factor)))
    return im.resize(size, Image.Resampling.BICUBIC if factor > 1 else Image.Resampling.LANCZOS)


def crop(im: Image.Image, keep: float, centre: bool = True) -> Image.Image:
    """Keep `keep` of each side: centred, or anchored at the top-left third (a photographer's recrop)."""
    w, h = max(1, round(im.width * keep)), max(1, round(im.height * keep))
    x = (im.width - w) // 2 if centre else (im.width - w) // 3
    y = (im.height - h) // 2 if centre else (im.height - h) // 3
    return im.crop((x, y, x + w, y + h))


def rotate(im: Image.Image, degrees: float) -> Image.Image:
    """Rotate without growing the canvas; the corners fill with black, as most editors do."""
    return im.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=False, fillcolor=(0, 0, 0))


def color_jitter(im: Image.Image) -> Image.Image:
    im = ImageEnhance.Brightness(im).enhance(1.2)
    im = ImageEnhance.Contrast(im).enhance(0.8)
    return ImageEnhance.Color(im).enhance(1.3)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def text_overlay(im: Image.Image) -> Image.Image:
    """A caption bar across the bottom eighth and a watermark in the upper part (a meme / stock mark)."""
    out = im.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    bar = max(10, out.height // 8)
    draw.rectangle([0, out.height - bar, out.width, out.height], fill=(0, 0, 0))
    draw.text((bar // 4, out.height - bar + bar // 8), "when the copy is the original", fill=(255, 255, 255),
              font=_font(max(8, bar * 2 // 3)))
    draw.text((out.width // 10, out.height // 4), "(c) sample watermark", fill=(255, 255, 255),
              font=_font(max(8, out.height // 12)))
    return out


def pad(im: Image.Image, fraction: float = 0.1) -> Image.Image:
    return ImageOps.expand(im, border=max(1, round(min(im.size) * fraction)), fill=(255, 255, 255))


def squash(im: Image.Image) -> Image.Image:
    """Change the aspect ratio: 80 % of the width, full height."""
    return im.resize((max(1, round(im.width * 0.8)), im.height), Image.Resampling.LANCZOS)


def greyscale(im: Image.Image) -> Image.Image:
    return ImageOps.grayscale(im).convert("RGB")


# name -> edit; the order is the order of every table.
EDITS: dict[str, Edit] = {
    "resize-50%": lambda im: scale(im, 0.5),
    "resize-150%": lambda im: scale(im, 1.5),
    "jpeg-q70": lambda im: jpeg(im, 70),
    "jpeg-q30": lambda im: jpeg(im, 30),
    "crop-80%": lambda im: crop(im, 0.8),
    "crop-60%": lambda im: crop(im, 0.6, centre=False),
    "flip": ImageOps.mirror,
    "rotate-90": lambda im: im.transpose(Image.Transpose.ROTATE_90),
    "rotate-5": lambda im: rotate(im, 5),
    "rotate-25": lambda im: rotate(im, 25),
    "aspect-80%": squash,
    "color-jitter": color_jitter,
    "greyscale": greyscale,
    "text-overlay": text_overlay,
    "padding-10%": pad,
    # Combinations: a re-post (crop, shrink, recompress) and a remix (flip, recolour, caption).
    "crop+resize+jpeg": lambda im: jpeg(scale(crop(im, 0.8, centre=False), 0.6), 50),
    "flip+jitter+text": lambda im: text_overlay(color_jitter(ImageOps.mirror(im))),
}

# Copies made at the file level: identical pixels (and for exact-copy identical bytes).
FILE_EDITS = ("exact-copy", "format-png")
