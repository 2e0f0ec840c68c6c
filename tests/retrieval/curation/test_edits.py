"""The edits behind calibration and the photo corpus: what each does to the pixels, deterministically."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageOps

from retrieval.curation.edits import EDITS, FILE_EDITS, crop, jpeg
from tests.images import photo


def test_at_least_fifteen_kinds_including_the_issue_list() -> None:
    names = set(EDITS) | set(FILE_EDITS)
    assert len(names) >= 15
    for required in ("resize-50%", "resize-150%", "jpeg-q30", "jpeg-q70", "crop-80%", "crop-60%", "flip", "rotate-5",
                     "rotate-25", "color-jitter", "greyscale", "text-overlay", "padding-10%", "format-png",
                     "exact-copy"):
        assert required in names
    assert any("+" in n for n in EDITS)  # combinations


@pytest.mark.parametrize("name", list(EDITS))
def test_each_edit_is_deterministic_and_changes_the_pixels(name: str) -> None:
    im = photo(200, 150, seed=3)
    a, b = EDITS[name](im), EDITS[name](im.copy())
    assert a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))
    assert a.size != im.size or not np.array_equal(np.asarray(a), np.asarray(im))


def test_geometry_of_the_edits() -> None:
    im = photo(200, 150, seed=4)
    assert EDITS["resize-50%"](im).size == (100, 75) and EDITS["resize-150%"](im).size == (300, 225)
    assert EDITS["crop-80%"](im).size == (160, 120) and EDITS["crop-60%"](im).size == (120, 90)
    assert EDITS["padding-10%"](im).size == (230, 180) and EDITS["aspect-80%"](im).size == (160, 150)
    assert EDITS["rotate-90"](im).size == (150, 200) and EDITS["rotate-25"](im).size == im.size
    assert np.array_equal(np.asarray(EDITS["flip"](im)), np.asarray(ImageOps.mirror(im)))
    grey = np.asarray(EDITS["greyscale"](im)).astype(int)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    # the off-centre crop keeps a different region than the centred one
    assert not np.array_equal(np.asarray(crop(im, 0.6)), np.asarray(EDITS["crop-60%"](im)))


def test_jpeg_quality_orders_the_error() -> None:
    im = photo(160, 120, seed=5)
    ref = np.asarray(im, np.float64)

    def err(q: int) -> float:
        return float(np.abs(np.asarray(jpeg(im, q), np.float64) - ref).mean())

    assert err(30) > err(70) > 0


def test_text_overlay_writes_in_the_image() -> None:
    im = Image.new("RGB", (320, 240), (90, 120, 150))
    out = np.asarray(EDITS["text-overlay"](im))
    assert (out[-10:, :, :] == 0).mean() > 0.5  # the caption bar
    assert (out[: 200] == 255).all(axis=2).sum() > 50  # white watermark letters above it
