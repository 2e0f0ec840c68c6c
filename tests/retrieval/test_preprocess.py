"""Decoding and preprocessing: parity with the checkpoint's own processor, and refusal of bad input.

The reference is what a user of transformers would do: ``AutoImageProcessor.from_pretrained(dir)``
and ``AutoModel.from_pretrained(dir)`` fed ``ImageOps.exif_transpose(Image.open(file))``, the
pooler output L2-normalised. Ours is ``load_and_preprocess`` (draft JPEG decoding, resize-and-crop
in one call, uint8 out) followed by ``Embedder.embed``.

Every case checks two things: cosine >= 0.999 between the embeddings, and a bound on the difference
between our uint8 crop (normalised) and the processor's pixel_values. The tiny random model
(layerscale 1.0) separates different photos (test_tiny_model_discriminates) and colour mistakes
(alpha, palette transparency, 16-bit clipping), but it is nearly blind to geometry (a 90 degree turn
keeps cosine ~0.9998), so the pixel bound is what catches orientation, crop and resize mistakes.
"""

from __future__ import annotations

import functools
import io
import json
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
from PIL import Image, ImageOps

from retrieval.errors import ImageDecodeError, PreprocessConfigError, RetrievalError
from retrieval.imaging.preprocess import (
    PreprocessConfig,
    decode_image,
    load_and_preprocess,
)
from tests.images import (
    cmyk_jpeg_bytes,
    encode,
    exif_rotated_jpeg_bytes,
    palette_png,
    photo,
    rgba_png,
)

MAX_PIXELS = 89_478_485  # the application's default limit (Pillow's own)
COSINE_MIN = 0.999

# Bounds on |ours - reference| for the normalised pixel tensors (1 grey level ~ 0.0175 here).
# TIGHT: same decode, same resampling; only +-1 level rounding differences were measured.
# UPSCALE: when both axes are enlarged, Pillow's resize(box=...) runs the vertical pass first while
# a plain resize runs the horizontal pass first; the two uint8 intermediates round differently
# (measured up to 6 levels ~ 0.105, mean ~ 0.004).
# DRAFT: JPEG decoded at 1/4 DCT scale, then bicubic (measured max 0.14, mean 0.006 at 3000x2000).
TIGHT = (0.05, 0.002)
UPSCALE = (0.2, 0.01)
DRAFT = (0.25, 0.02)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


big_photo = functools.lru_cache(maxsize=2)(photo)  # multi-megapixel photos take ~1 s to generate


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    """A PNG from parts, for what Pillow cannot write (16-bit RGB) or must not (bombs, bad data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def rgb16_png(width: int = 200, height: int = 150, seed: int = 7) -> tuple[bytes, np.ndarray]:
    """A real 16-bit-per-channel RGB PNG (Pillow has no mode to write one) and its 16-bit pixels."""
    rng = np.random.default_rng(seed)
    eight = np.asarray(photo(width, height, seed), dtype=np.uint16)
    sixteen = (eight * 256 + rng.integers(0, 256, eight.shape, dtype=np.uint16)).astype(">u2")
    rows = b"".join(b"\x00" + sixteen[y].tobytes() for y in range(height))
    return raw_png(width, height, 16, 2, zlib.compress(rows)), sixteen.astype(np.uint16)


def grey16_png(width: int = 180, height: int = 140, seed: int = 3) -> bytes:
    """16-bit greyscale PNG (tests.images.grey16 passes a mode to fromarray, which Pillow 13 rejects)."""
    grey = np.asarray(photo(width, height, seed).convert("L"), dtype=np.uint16) * 257
    image = Image.fromarray(grey)
    assert image.mode == "I;16"
    return encode(image, "PNG")


def two_frame_gif() -> bytes:
    """An animated GIF whose second frame (the negative of another photo) looks nothing like the first."""
    first = photo(240, 180, seed=20)
    second = Image.fromarray(255 - np.asarray(photo(240, 180, seed=21)))
    return encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)


def gif_frame(data: bytes, index: int) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.seek(index)
    return image.convert("RGB")


def normalise(pixels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    mean = np.asarray(config.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(config.image_std, dtype=np.float32)[:, None, None]
    return (pixels.astype(np.float32) * np.float32(config.rescale_factor) - mean) / std


@dataclass
class Ours:
    embedding: np.ndarray
    pixels: np.ndarray  # uint8 (3, H, W)
    normalised: np.ndarray
    width: int
    height: int
    format: str


@pytest.fixture(scope="module")
def embedder(tiny_model_dir):
    from retrieval.model import load_embedder

    return load_embedder(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """transformers' own processor and model for the same checkpoint: the thing we must match."""
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(tiny_model_dir)
    model = AutoModel.from_pretrained(tiny_model_dir).eval()

    def run(image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        import torch

        pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            pooled = model(pixel_values=pixel_values).pooler_output
        return torch.nn.functional.normalize(pooled, dim=-1)[0].numpy(), pixel_values[0].numpy()

    return run


def ours(embedder, data: bytes, max_pixels: int = MAX_PIXELS) -> Ours:
    pixels, decoded = load_and_preprocess(data, embedder.preprocess, max_pixels)
    embedding = embedder.embed(pixels[None])[0]
    return Ours(embedding, pixels, normalise(pixels, embedder.preprocess), decoded.width, decoded.height,
                decoded.format)


def as_displayed(data: bytes) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data)))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# --------------------------------------------------------------------------------------------
# Parity on every format we claim to support
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    make: Callable[[], bytes]
    size: tuple[int, int]  # displayed (width, height)
    format: str
    bounds: tuple[float, float]  # (max, mean) of |ours - reference| on normalised pixels
    # What the reference is fed; default: exif_transpose(Image.open(data)).
    reference_image: Callable[[bytes], Image.Image] = as_displayed


def _high_byte_grey(data: bytes) -> Image.Image:
    """The correct 8-bit version of a 16-bit greyscale PNG (what Pillow's convert gets wrong)."""
    arr = np.asarray(Image.open(io.BytesIO(data)))
    assert arr.dtype == np.uint16
    return Image.fromarray((arr >> 8).astype(np.uint8))


def _high_byte_rgb(_data: bytes) -> Image.Image:
    """The correct 8-bit version of rgb16_png()'s pixels, from the 16-bit source values."""
    _, sixteen = rgb16_png()
    return Image.fromarray((sixteen >> 8).astype(np.uint8))


CASES = {
    "jpeg_3000x2000_draft": Case(lambda: encode(photo(3000, 2000, 11), "JPEG", quality=90), (3000, 2000), "JPEG", DRAFT),
    "jpeg_normal": Case(lambda: encode(photo(320, 240, 12), "JPEG", quality=90), (320, 240), "JPEG", TIGHT),
    "png_rgba": Case(lambda: encode(rgba_png(), "PNG"), (200, 150), "PNG", TIGHT),
    "png_palette_transparency": Case(lambda: encode(palette_png(), "PNG"), (200, 150), "PNG", TIGHT),
    "jpeg_grey_L": Case(lambda: encode(photo(300, 200, 13).convert("L"), "JPEG", quality=90), (300, 200), "JPEG", TIGHT),
    "png_grey_L": Case(lambda: encode(photo(300, 200, 14).convert("L"), "PNG"), (300, 200), "PNG", TIGHT),
    "jpeg_cmyk": Case(cmyk_jpeg_bytes, (200, 160), "JPEG", TIGHT),
    "png_grey_16bit": Case(grey16_png, (180, 140), "PNG", TIGHT, _high_byte_grey),
    "png_rgb_16bit": Case(lambda: rgb16_png()[0], (200, 150), "PNG", TIGHT, _high_byte_rgb),
    "webp": Case(lambda: encode(photo(300, 220, 15), "WEBP", quality=90), (300, 220), "WEBP", TIGHT),
    "gif_animated_first_frame": Case(two_frame_gif, (240, 180), "GIF", TIGHT, lambda d: gif_frame(d, 0)),
    "jpeg_exif_orientation_6": Case(lambda: exif_rotated_jpeg_bytes(orientation=6), (160, 240), "JPEG", UPSCALE),
    "jpeg_exif_orientation_8": Case(lambda: exif_rotated_jpeg_bytes(orientation=8), (160, 240), "JPEG", UPSCALE),
    "jpeg_exif_orientation_6_draft": Case(
        lambda: exif_rotated_jpeg_bytes(2400, 1600, seed=30, orientation=6), (1600, 2400), "JPEG", DRAFT),
    "png_tiny_10x10": Case(lambda: encode(photo(10, 10, 16), "PNG"), (10, 10), "PNG", UPSCALE),
    "png_wide_2000x40": Case(lambda: encode(photo(2000, 40, 17), "PNG"), (2000, 40), "PNG", UPSCALE),
    "png_tall_40x2000": Case(lambda: encode(photo(40, 2000, 18), "PNG"), (40, 2000), "PNG", UPSCALE),
    "jpeg_wide_2000x40": Case(lambda: encode(photo(2000, 40, 19), "JPEG", quality=90), (2000, 40), "JPEG", UPSCALE),
}


@pytest.mark.parametrize("name", list(CASES))
def test_embedding_parity_with_transformers(name, embedder, reference):
    case = CASES[name]
    data = case.make()
    got = ours(embedder, data)
    ref_embedding, ref_pixels = reference(case.reference_image(data))

    assert got.pixels.dtype == np.uint8 and got.pixels.shape == (3, 224, 224)
    assert (got.width, got.height) == case.size  # displayed size, after EXIF orientation
    assert got.format == case.format
    assert got.embedding.dtype == np.float32 and got.embedding.shape == (embedder.dim,)
    assert ref_pixels.shape == got.normalised.shape

    diff = np.abs(got.normalised - ref_pixels)
    max_bound, mean_bound = case.bounds
    assert diff.max() < max_bound, f"{name}: max pixel difference {diff.max():.4f}"
    assert diff.mean() < mean_bound, f"{name}: mean pixel difference {diff.mean():.5f}"
    assert cosine(got.embedding, ref_embedding) >= COSINE_MIN


def test_tiny_model_discriminates(embedder):
    """Two different photos must not look alike, or every parity assertion above would be vacuous."""
    a = ours(embedder, encode(photo(320, 240, 12), "JPEG", quality=90))
    b = ours(embedder, encode(photo(320, 240, 99), "JPEG", quality=90))
    assert cosine(a.embedding, b.embedding) < 0.99


def test_exif_orientation_matters(embedder, reference):
    """Ignoring EXIF orientation would fail the pixel parity bounds by a wide margin.

    The tiny random model is nearly blind to geometry (a 90 degree turn keeps cosine ~0.9998: its
    position embeddings are tiny next to the patch embeddings), which is why every parity case
    also bounds the pixel difference: that is what catches orientation, crop and resize mistakes.
    """
    data = exif_rotated_jpeg_bytes(orientation=6)
    got = ours(embedder, data)
    unrotated, unrotated_pixels = reference(Image.open(io.BytesIO(data)))
    rotated, rotated_pixels = reference(as_displayed(data))
    assert np.abs(got.normalised - rotated_pixels).max() < UPSCALE[0]
    wrong = np.abs(got.normalised - unrotated_pixels)
    assert wrong.max() > 1.0 and wrong.mean() > 50 * UPSCALE[1]
    assert cosine(got.embedding, rotated) >= COSINE_MIN
    assert cosine(got.embedding, rotated) > cosine(got.embedding, unrotated)


def test_alpha_is_composited_onto_white(embedder, reference):
    """Dropping alpha (or compositing onto black) instead of onto white would fail parity."""
    image = rgba_png()
    got = ours(embedder, encode(image, "PNG"))
    dropped, dropped_pixels = reference(image.convert("RGB"))
    assert np.abs(got.normalised - dropped_pixels).max() > 1.0
    assert cosine(got.embedding, dropped) < COSINE_MIN
    # Fully transparent column 0 (alpha ramps 0..255 left to right) comes out white.
    decoded = decode_image(encode(image, "PNG"), PreprocessConfig(), MAX_PIXELS)
    assert decoded.image.mode == "RGB"
    assert decoded.image.getpixel((0, 75)) == (255, 255, 255)


def test_palette_transparency_is_composited_onto_white(embedder, reference):
    """A transparent palette index covering a third of the image: white, as the reference does it."""
    base = photo(240, 180, seed=22).convert("P", palette=Image.Palette.ADAPTIVE, colors=63)
    palette = base.getpalette()[: 63 * 3] + [0, 0, 0]  # index 63: black, transparent
    base.putpalette(palette)
    base.paste(63, (0, 0, 80, 180))
    base.info["transparency"] = 63
    data = encode(base, "PNG")
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 63

    got = ours(embedder, data)
    ref, ref_pixels = reference(as_displayed(data))
    assert cosine(got.embedding, ref) >= COSINE_MIN
    assert np.abs(got.normalised - ref_pixels).max() < TIGHT[0]
    decoded = decode_image(data, PreprocessConfig(), MAX_PIXELS)
    assert decoded.image.getpixel((10, 10)) == (255, 255, 255)
    ignored = Image.open(io.BytesIO(data))
    ignored.info.pop("transparency")
    black, _ = reference(ignored.convert("RGB"))
    assert cosine(got.embedding, black) < COSINE_MIN


def test_grey16_is_scaled_not_clipped(embedder, reference):
    """Pillow's convert('RGB') clips I;16 to 255, so the naive reference is nearly white; ours is not.

    This documents a deliberate deviation from the reference: it is the reference that is wrong.
    """
    data = grey16_png()
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    got = ours(embedder, data)
    naive_image = Image.open(io.BytesIO(data))
    assert np.asarray(naive_image.convert("RGB")).mean() > 250  # the clipping we work around
    naive, naive_pixels = reference(naive_image)
    correct, _ = reference(_high_byte_grey(data))

    assert cosine(got.embedding, correct) >= COSINE_MIN
    assert cosine(got.embedding, naive) < 0.99
    assert np.abs(got.normalised - naive_pixels).max() > 1.0
    source_mean = np.asarray(photo(180, 140, 3).convert("L")).mean()
    assert abs(got.pixels.mean() - source_mean) < 10  # the crop keeps the photo's brightness


def test_gif_uses_first_frame(embedder, reference):
    data = two_frame_gif()
    assert Image.open(io.BytesIO(data)).n_frames == 2
    got = ours(embedder, data)
    first, first_pixels = reference(gif_frame(data, 0))
    second, second_pixels = reference(gif_frame(data, 1))
    assert np.abs(got.normalised - first_pixels).mean() < TIGHT[1]
    assert np.abs(got.normalised - second_pixels).mean() > 0.5
    assert cosine(got.embedding, first) >= COSINE_MIN
    assert cosine(got.embedding, second) < 0.99


@pytest.mark.parametrize("width,height,orientation", [(2049, 2049, 1), (3015, 2013, 3), (3015, 2013, 6)])
def test_draft_decoding_keeps_exact_grid_for_odd_sizes(width, height, orientation, embedder, reference):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(big_photo(width, height, seed=41), "JPEG", quality=90, exif=exif.tobytes())
    got = ours(embedder, data)
    ref, ref_pixels = reference(as_displayed(data))
    assert cosine(got.embedding, ref) >= COSINE_MIN  # holds even now: the error is in pixel space
    diff = np.abs(got.normalised - ref_pixels)
    # Exact mapping measures max <= 18 levels, mean <= 0.7 level; allow 24 / 1.0.
    assert diff.max() < 24 / 255 / min(PreprocessConfig().image_std)
    assert diff.mean() < 1.0 / 255 / min(PreprocessConfig().image_std)


# --------------------------------------------------------------------------------------------
# Bad input to decode_image
# --------------------------------------------------------------------------------------------


def _decode_error(data: bytes, max_pixels: int = MAX_PIXELS) -> str:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, PreprocessConfig(), max_pixels)
    message = str(info.value)
    assert isinstance(info.value, RetrievalError)
    # Human-readable: one short line, no traceback or exception repr.
    assert message and "\n" not in message and len(message) < 300
    assert "Traceback" not in message and "Error(" not in message
    return message


@pytest.fixture(scope="module")
def jpeg_bytes() -> bytes:
    return encode(photo(320, 240, seed=50), "JPEG", quality=90)


@pytest.fixture(scope="module")
def png_bytes() -> bytes:
    return encode(photo(100, 100, seed=51), "PNG")


def test_empty_file():
    assert _decode_error(b"").startswith("empty file")


def test_random_bytes_are_not_an_image():
    data = np.random.default_rng(0).bytes(5000)
    assert _decode_error(data).startswith("not an image")


@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_truncated_jpeg(jpeg_bytes, keep):
    assert _decode_error(jpeg_bytes[: int(len(jpeg_bytes) * keep)]).startswith("truncated image")


@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_truncated_png(png_bytes, keep):
    assert _decode_error(png_bytes[: int(len(png_bytes) * keep)]).startswith("truncated image")


def test_corrupt_png_data():
    """Valid chunks and CRCs, but the IDAT stream is not zlib: corrupt, not truncated."""
    rows = zlib.compress(b"".join(b"\x00" + bytes(100) for _ in range(100)))
    broken = rows[:2] + b"\xff" * 8 + rows[10:]
    message = _decode_error(raw_png(100, 100, 8, 0, broken))
    assert message.startswith("corrupt image data")


def test_intact_files_decode(jpeg_bytes, png_bytes):
    """The error tests above start from files that do decode."""
    assert decode_image(jpeg_bytes, PreprocessConfig(), MAX_PIXELS).format == "JPEG"
    assert decode_image(png_bytes, PreprocessConfig(), MAX_PIXELS).format == "PNG"


def test_too_many_pixels(png_bytes):
    message = _decode_error(png_bytes, max_pixels=1000)
    assert message.startswith("too many pixels")
    assert "100x100" in message and "--max-pixels" in message
    # The limit is inclusive: exactly max_pixels is fine.
    assert decode_image(png_bytes, PreprocessConfig(), 100 * 100).width == 100


def test_pixel_limit_is_checked_before_decoding(png_bytes):
    """A truncated file over the limit is refused for its size, so no decoding was attempted."""
    truncated = png_bytes[: len(png_bytes) // 2]
    assert _decode_error(truncated, max_pixels=1000).startswith("too many pixels")
    assert _decode_error(truncated, max_pixels=MAX_PIXELS).startswith("truncated image")


def test_decompression_bomb_header_is_refused_cheaply():
    """A 73-byte PNG claiming 100000 x 100000 pixels (10 GP): refused from its header alone."""
    bomb = raw_png(100_000, 100_000, 1, 0, zlib.compress(b"\x00" * 64))
    assert len(bomb) < 100
    assert _decode_error(bomb).startswith("too many pixels")


def test_decompression_bomb_reason_quotes_the_configured_limit():
    """Pillow's own guard fires inside open() for this one: the reason still quotes --max-pixels, not Pillow's."""
    bomb = raw_png(100_000, 100_000, 1, 0, zlib.compress(b"\x00" * 64))
    message = _decode_error(bomb, max_pixels=50_000_000)
    assert "the limit of 50.0 MP" in message and "10000.0 MP" in message and "--max-pixels" in message, message
    assert "178956970" not in message and "89478485" not in message


@pytest.mark.parametrize("side", [9500, 13500])  # 90 MP (Pillow warning range), 182 MP (Pillow error range)
def test_max_pixels_above_pillow_default_is_honoured(side, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored whatever a fix does
    header_only = raw_png(side, side, 1, 0, zlib.compress(b"\x00" * 64))
    with warnings.catch_warnings():
        # What retrieval.imaging.preprocess sets at import (pytest resets warning filters for each test).
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        message = _decode_error(header_only, max_pixels=200_000_000)
    # Allowed by our limit, so it gets as far as decoding, which fails on the missing data.
    assert not message.startswith("too many pixels"), message
    assert message.startswith("truncated image")


# --------------------------------------------------------------------------------------------
# PreprocessConfig.from_processor_dict
# --------------------------------------------------------------------------------------------

# facebook/dinov2-{small,base,large,giant}/preprocessor_config.json
OFFICIAL_DINOV2 = {
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "BitImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 256},
}


def test_official_dinov2_config_maps_to_defaults():
    config = PreprocessConfig.from_processor_dict(OFFICIAL_DINOV2)
    assert config == PreprocessConfig()
    assert config.output_size == (224, 224)
    assert config.min_source_edge == 256
    assert config.resample == Image.Resampling.BICUBIC


def test_model_dir_config(tiny_model_dir, tmp_path):
    assert PreprocessConfig.from_model_dir(tiny_model_dir) == PreprocessConfig()
    assert PreprocessConfig.from_model_dir(tmp_path) == PreprocessConfig()  # no file: DINOv2 defaults


def test_fixed_size_resize_without_crop():
    config = PreprocessConfig.from_processor_dict(
        {**OFFICIAL_DINOV2, "size": {"height": 196, "width": 196}, "do_center_crop": False})
    assert config.output_size == (196, 196)
    assert config.crop_height is None and config.resize_shortest_edge is None


def test_int_sizes_and_no_normalize():
    config = PreprocessConfig.from_processor_dict(
        {**OFFICIAL_DINOV2, "size": 256, "crop_size": 224, "do_normalize": False, "do_rescale": False})
    assert config.resize_shortest_edge == 256 and config.output_size == (224, 224)
    assert config.image_mean == (0.0, 0.0, 0.0) and config.image_std == (1.0, 1.0, 1.0)
    assert config.rescale_factor == 1.0


@pytest.mark.parametrize("change,fragment", [
    ({"do_resize": False}, "do_resize"),
    ({"do_center_crop": False}, "without a centre crop"),
    ({"crop_size": {"height": 300, "width": 300}}, "larger than"),
    ({"size": {"height": 200, "width": 200}, "crop_size": {"height": 224, "width": 224}}, "larger than"),
    ({"size": {"longest_edge": 512}}, "unsupported size"),
])
def test_unsupported_configs_are_refused(change, fragment):
    with pytest.raises(PreprocessConfigError, match=fragment):
        PreprocessConfig.from_processor_dict({**OFFICIAL_DINOV2, **change})


def test_missing_size_defaults_like_the_reference(tmp_path):
    from transformers import AutoImageProcessor

    cfg = {k: v for k, v in OFFICIAL_DINOV2.items() if k != "size"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    reference_shortest = AutoImageProcessor.from_pretrained(tmp_path).size["shortest_edge"]
    assert reference_shortest == 224
    assert PreprocessConfig.from_processor_dict(cfg).resize_shortest_edge == reference_shortest
