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
