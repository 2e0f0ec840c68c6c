"""The real-photo corpus: scikit-image's bundled photographs (no download), planted copies, labels."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks import photo_corpus as pc
from retrieval.curation.edits import EDITS, FILE_EDITS


def _photos() -> list[pc.Photo]:
    photos = pc.skimage_photos(["astronaut.png", "coffee.png", "rocket.jpg"])
    assert [p.name for p in photos] == ["skimage/astronaut.png", "skimage/coffee.png", "skimage/rocket.jpg"]
    # one wide photograph (two real photos side by side) so the halves are exercised too
    wide = pc.Photo("skimage/astronaut+coffee", lambda: Image.fromarray(np.hstack([
        np.asarray(photos[0].load().resize((400, 300))), np.asarray(photos[1].load().resize((400, 300)))])))
    return photos + [wide]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_build_plants_every_edit_with_labels_and_is_deterministic(tmp_path: Path) -> None:
    edits = ["flip", "crop-60%", "jpeg-q30"]
    truth = pc.build(tmp_path / "a", _photos(), planted=0.5, seed=7, max_side=256, edits=edits)
    assert pc.load_truth(tmp_path / "a") == truth
    originals = {n: t for n, t in truth.items() if t["kind"] == "original"}
    assert len(originals) == 6  # 4 photos + the two halves of the wide one
    planted = {t["family"] for t in truth.values() if t["kind"] != "original"}
    assert len(planted) == 3
    assert len(truth) == 6 + 3 * (len(FILE_EDITS) + len(edits))
    assert set(_digest(tmp_path / "a")) == set(truth)  # every file labelled, nothing else in the folder
    by_family = {t["family"]: n for n, t in originals.items()}
    for name, t in truth.items():
        src = tmp_path / "a" / by_family[t["family"]]
        if t["kind"] == "exact-copy":
            assert (tmp_path / "a" / name).read_bytes() == src.read_bytes()
        elif t["kind"] == "format-png":
            assert name.endswith(".png")
            assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / name)), np.asarray(Image.open(src)))
        elif t["kind"] == "flip":
            flipped = np.asarray(Image.open(tmp_path / "a" / name), np.int16)[:, ::-1]
            assert np.abs(flipped - np.asarray(Image.open(src), np.int16)).mean() < 6  # JPEG noise only
        with Image.open(tmp_path / "a" / name) as im:
            assert max(im.size) <= 256 or t["kind"] == "resize-150%"
    # same seed, same corpus, byte for byte; another seed plants other families
    again = pc.build(tmp_path / "b", _photos(), planted=0.5, seed=7, max_side=256, edits=edits)
    assert again == truth and _digest(tmp_path / "a") == _digest(tmp_path / "b")
    other = pc.build(tmp_path / "c", _photos(), planted=0.5, seed=8, max_side=256, edits=edits)
    assert other != truth


def test_halves_are_siblings_and_overlaps_are_not_scored(tmp_path: Path) -> None:
    truth = pc.build(tmp_path / "a", _photos(), planted=0.0, seed=0, max_side=256, edits=[])
    by_photo = {t["photo"]: t for t in truth.values()}
    full, left, right = (by_photo[f"skimage/astronaut+coffee{s}"] for s in ("", "#left", "#right"))
    assert pc.pair_label(left, right) == "sibling"
    assert pc.pair_label(full, left) == "scene"
    assert pc.pair_label(full, by_photo["skimage/rocket.jpg"]) == "false"
    assert pc.pair_label(full, full) == "true"


def test_all_edits_apply_to_a_real_photo(tmp_path: Path) -> None:
    truth = pc.build(tmp_path / "a", _photos()[:1], planted=1.0, seed=0, max_side=192)
    assert sorted({t["kind"] for t in truth.values()}) == sorted(["original", *FILE_EDITS, *EDITS])
