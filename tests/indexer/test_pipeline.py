"""`retrieval index` end to end through the CLI: summary, incremental runs, bad input, errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from retrieval.cli.app import app
from retrieval.vectors import VectorStore
from tests import db as testdb
from tests.conftest import make_corpus
from tests.images import encode, photo, write

runner = CliRunner()


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def index(corpus: Path, model: Path, *extra: str) -> dict:
    code, out = cli("index", corpus, "--model", model, "--no-progress", "--json", "-j", "0", "-b", "8", *extra)
    assert code == 0, out
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        raise AssertionError(f"not JSON: {out!r}") from None


def rows(db: Path = Path("retrieval-index/retrieval.db")) -> dict[str, tuple]:
    with testdb.connect(db) as conn:
        return {r[0]: r[1:] for r in conn.execute(
            "SELECT path, id, sha256, width, height, format, phash, size, mtime_ns, indexed FROM images")}


def failures(db: Path = Path("retrieval-index/retrieval.db")) -> dict[str, tuple[str, str]]:
    with testdb.connect(db) as conn:
        return {r[0]: (r[1], r[2]) for r in conn.execute("SELECT path, kind, reason FROM failures")}


def verify_ok() -> str:
    code, out = cli("verify")
    assert code == 0, out
    return out


def test_index_end_to_end(corpus: Path, tiny_model_dir: Path) -> None:
    summary = index(corpus, tiny_model_dir)
    assert (summary["new"], summary["failed"], summary["total_images"]) == (24, 0, 24)
    assert summary["index_type"] == "flat" and summary["index_rebuilt"]
    got = rows()
    assert len(got) == 24
    for rel, (image_id, sha, width, height, fmt, phash, size, _mtime, indexed) in got.items():
        data = (corpus / rel).read_bytes()
        assert sha == hashlib.sha256(data).hexdigest()
        assert (width, height) == (96, 72) and size == len(data) and indexed == 1
        assert fmt == ("PNG" if rel.endswith(".png") else "JPEG")
    assert len({r[5] for r in got.values()}) > 20, "perceptual hashes should differ between distinct images"
    assert "ids match" in verify_ok()

    code, out = cli("info")
    assert code == 0 and "24" in out and "IDMap2,Flat" in out

    # search by a corpus path: answered from the stored vector, exact cosine, self excluded
    code, out = cli("search", corpus / "a" / "img0001.jpg", "-k", "5", "--json")
    assert code == 0, out
    result = json.loads(out)
    assert result["answered_from"].startswith("stored vector of a/img0001.jpg")
    hits = result["results"]
    assert len(hits) == 5 and "a/img0001.jpg" not in [h["path"] for h in hits]
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    store = VectorStore(Path("retrieval-index/vectors.npy"), 32)
    query = store.read([got["a/img0001.jpg"][0]])[0]
    all_ids = np.array(sorted(r[0] for r in got.values()))
    sims = store.read(all_ids) @ query
    order = [int(all_ids[i]) for i in np.argsort(-sims) if all_ids[i] != got["a/img0001.jpg"][0]][:5]
    assert [h["id"] for h in hits] == order
    np.testing.assert_allclose(scores, np.sort(sims)[::-1][1:6], atol=1e-5)


def test_second_run_embeds_nothing_and_skips_the_model(corpus: Path, tiny_model_dir: Path) -> None:
    index(corpus, tiny_model_dir)
    faiss_file = Path("retrieval-index/index.faiss")
    before = faiss_file.stat().st_mtime_ns
    code, out = cli("index", corpus, "--no-progress", "--json", "-j", "0")  # model found again from the index
    assert code == 0, out
    summary = json.loads(out)
    assert (summary["new"], summary["changed"], summary["unchanged"], summary["removed"]) == (0, 0, 24, 0)
    assert summary["device"] == "-", "no model should be loaded when nothing needs embedding"
    assert faiss_file.stat().st_mtime_ns == before


def test_incremental_add_change_touch_delete(corpus: Path, tiny_model_dir: Path) -> None:
    index(corpus, tiny_model_dir)
    before = rows()
    make_corpus(corpus, 3, start=500)  # new
    changed = corpus / "a" / "img0001.jpg"
    write(changed, photo(96, 72, seed=9999), "JPEG")  # new content, same name
    touched = corpus / "a" / "img0005.jpg"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))  # same bytes
    (corpus / "b" / "img0000.png").unlink()
    (corpus / "b" / "img0002.jpg").unlink()

    summary = index(corpus, tiny_model_dir)
    assert (summary["new"], summary["changed"], summary["touched"], summary["removed"]) == (3, 1, 1, 2)
    assert summary["total_images"] == 25
    after = rows()
    assert "b/img0000.png" not in after and "b/img0002.jpg" not in after
    assert after["a/img0001.jpg"][0] == before["a/img0001.jpg"][0], "a changed file keeps its id"
    assert after["a/img0001.jpg"][1] != before["a/img0001.jpg"][1]
    assert after["a/img0005.jpg"][7] == touched.stat().st_mtime_ns
    for path in set(before) & set(after):
        assert after[path][0] == before[path][0], "ids are stable"
    new_ids = [after[p][0] for p in after if p not in before]
    assert min(new_ids) > max(r[0] for r in before.values()), "ids of deleted images are never reused"
    verify_ok()
    # The changed image's stored vector is the embedding of its new content.
    from retrieval.imaging.preprocess import load_and_preprocess
    from retrieval.model import load_embedder

    embedder = load_embedder(str(tiny_model_dir), device="cpu")
    pixels, _ = load_and_preprocess(changed.read_bytes(), embedder.preprocess, 10**8)
    fresh = embedder.embed(pixels[None])[0]
    stored = VectorStore(Path("retrieval-index/vectors.npy"), 32).read([after["a/img0001.jpg"][0]])[0]
    assert float(fresh @ stored) > 0.999


def _bad_files(root: Path) -> dict[str, str]:
    """Every kind of bad input, with the failure kind we expect."""
    (root / "zero.jpg").write_bytes(b"")
    full = encode(photo(300, 200, seed=1), "JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    png = encode(photo(300, 200, seed=2), "PNG")
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (root / "text.jpg").write_text("this is not a picture, just text with an image extension")
    # Decompression bomb: a 1-bit image that compresses to a few KB but has 25 MP.
    Image.new("1", (5000, 5000)).save(root / "bomb.png")
    return {"zero.jpg": "empty", "truncated.jpg": "truncated", "truncated.png": "truncated",
            "corrupt.png": "corrupt", "text.jpg": "not_an_image", "bomb.png": "too_large"}


def test_bad_inputs_are_recorded_with_reasons_and_skipped(corpus: Path, tiny_model_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    expected = _bad_files(corpus)
    # A PNG named .jpg is not bad input: it is indexed by its content.
    (corpus / "actually_png.jpg").write_bytes(encode(photo(50, 40, seed=3), "PNG"))
    locked = corpus / "locked.jpg"
    write(locked, photo(50, 40, seed=4))
    if os.geteuid() == 0:  # root reads any file: simulate the EACCES that a normal user gets
        import retrieval.imaging.decode as decode

        real_read = decode._read

        def deny(root: str, item, *rest):  # noqa: ANN001, ANN002
            if item.path == "locked.jpg":
                raise PermissionError(13, "Permission denied")
            return real_read(root, item, *rest)

        monkeypatch.setattr(decode, "_read", deny)
    else:
        locked.chmod(0)
    expected["locked.jpg"] = "unreadable"

    summary = index(corpus, tiny_model_dir, "--max-pixels", "20000000")
    assert summary["failed"] == len(expected)
    assert summary["new"] == 25  # 24 good images + the PNG named .jpg
    got = failures()
    assert {p: k for p, (k, _r) in got.items()} == expected
    assert all(len(reason) > 10 for _k, reason in got.values())
    assert "permission denied" in got["locked.jpg"][1]
    assert "MP exceeds the limit" in got["bomb.png"][1] and "--max-pixels" in got["bomb.png"][1]
    assert rows()["actually_png.jpg"][4] == "PNG"
    assert not set(expected) & set(rows())
    verify_ok()

    # Known failures are not retried while unchanged, except unreadable ones.
    summary = index(corpus, tiny_model_dir, "--max-pixels", "20000000")
    assert summary["known_failures"] == len(expected) - 1 and summary["failed"] == 1
    # --retry-failed retries all of them; a raised pixel limit lets the bomb through.
    summary = index(corpus, tiny_model_dir, "--retry-failed", "--max-pixels", "30000000")
    assert summary["failed"] == len(expected) - 1 and summary["new"] == 1
    assert "bomb.png" in rows() and "bomb.png" not in failures()


def test_a_changed_file_that_breaks_leaves_the_index(corpus: Path, tiny_model_dir: Path) -> None:
    index(corpus, tiny_model_dir)
    target = corpus / "a" / "img0005.jpg"
    target.write_bytes(target.read_bytes()[:100])
    summary = index(corpus, tiny_model_dir)
    assert summary["failed"] == 1 and summary["total_images"] == 23
    assert "a/img0005.jpg" not in rows() and failures()["a/img0005.jpg"][0] == "truncated"
    verify_ok()


def test_decode_workers_give_the_same_vectors(corpus: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    index(corpus, tiny_model_dir, "--index-dir", "serial")
    index(corpus, tiny_model_dir, "--index-dir", "parallel", "-j", "2")
    a = rows(Path("serial/retrieval.db"))
    b = rows(Path("parallel/retrieval.db"))
    assert {p: r[:7] for p, r in a.items()} == {p: r[:7] for p, r in b.items()}
    assert Path("serial/vectors.npy").read_bytes() == Path("parallel/vectors.npy").read_bytes()


@pytest.mark.parametrize("setup, message", [
    ("missing", "corpus folder"),
    ("empty", "no images found"),
    ("file", "not a folder"),
])
def test_corpus_errors_are_one_line(tmp_path: Path, tiny_model_dir: Path, setup: str, message: str) -> None:
    path = tmp_path / "c"
    if setup == "empty":
        (path / "sub").mkdir(parents=True)
        (path / "readme.txt").write_text("no images")
    elif setup == "file":
        path.write_text("x")
    code, out = cli("index", path, "--model", tiny_model_dir, "--no-progress")
    assert code == 1
    assert out.startswith("Error: ") and message in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1


def test_model_mismatches_need_rebuild(corpus: Path, tiny_model_dir: Path, wide_model_dir: Path,
                                       other_model_dir: Path) -> None:
    index(corpus, tiny_model_dir)
    code, out = cli("index", corpus, "--model", wide_model_dir, "--no-progress", "-j", "0")
    assert code == 1 and "48-d" in out and "32-d" in out and "--rebuild" in out
    code, out = cli("index", corpus, "--model", other_model_dir, "--no-progress", "-j", "0")
    assert code == 1 and "not comparable" in out and "--rebuild" in out
    assert len(rows()) == 24, "a refused run changes nothing"

    summary = index(corpus, wide_model_dir, "--rebuild")
    assert summary["new"] == 24 and summary["index_rebuilt"]
    assert max(r[0] for r in rows().values()) == 24, "ids restart after --rebuild"
    code, out = cli("info", "--json")
    assert json.loads(out)["dim"] == 48
    verify_ok()


def test_other_corpus_in_same_index_dir_is_refused(corpus: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    index(corpus, tiny_model_dir)
    other = tmp_path / "other"
    make_corpus(other, 2)
    code, out = cli("index", other, "--model", tiny_model_dir, "--no-progress")
    assert code == 1 and "--index-dir" in out


def test_missing_model_is_a_clear_error(corpus: Path) -> None:
    code, out = cli("index", corpus, "--model", "facebook/dinov2-doesnotexist", "--no-progress")
    assert code == 1
    assert "facebook/dinov2-doesnotexist" in out and "--model /path/to/folder" in out
    assert not Path("retrieval-index/index.faiss").exists()


def test_search_with_an_outside_file_embeds_it(corpus: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    index(corpus, tiny_model_dir)
    copy = tmp_path / "query.jpg"
    shutil.copy(corpus / "b" / "img0004.jpg", copy)
    code, out = cli("search", copy, "-k", "3", "--json")
    assert code == 0, out
    result = json.loads(out)
    assert result["answered_from"] == "embedded file"
    assert result["results"][0]["path"] == "b/img0004.jpg" and result["results"][0]["score"] > 0.999


def test_search_errors(corpus: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    code, out = cli("search", corpus / "a" / "img0001.jpg")
    assert code == 1 and "no index" in out
    index(corpus, tiny_model_dir)
    code, out = cli("search", "999999")
    assert code == 1 and "no indexed image with id 999999" in out
    code, out = cli("search", tmp_path / "nothing.jpg")
    assert code == 1 and "neither a file nor an indexed image id" in out
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    code, out = cli("search", bad)
    assert code == 1 and "not an image" in out


def test_verify_reports_a_broken_index(corpus: Path, tiny_model_dir: Path) -> None:
    index(corpus, tiny_model_dir)
    with testdb.connect("retrieval-index/retrieval.db") as conn:
        conn.execute("DELETE FROM images WHERE id = 3")
    code, out = cli("verify")
    assert code == 1 and "PROBLEM" in out and "not images" in out and "3" in out
    Path("retrieval-index/index.faiss").unlink()
    code, out = cli("verify")
    assert code == 1 and "missing" in out
    index(corpus, tiny_model_dir)  # the next run heals both
    verify_ok()


def test_custom_index_dir_and_db_url(corpus: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "elsewhere.db"
    summary = index(corpus, tiny_model_dir, "--index-dir", tmp_path / "idx", "--db", f"sqlite:///{db}")
    assert summary["total_images"] == 24 and db.exists()
    assert not (tmp_path / "idx" / "retrieval.db").exists()
    code, out = cli("verify", "--index-dir", tmp_path / "idx", "--db", f"sqlite:///{db}")
    assert code == 0, out


def test_env_settings_are_used(corpus: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETRIEVAL_INDEX_DIR", "from-env")
    monkeypatch.setenv("RETRIEVAL_MODEL", str(tiny_model_dir))
    code, out = cli("index", corpus, "--no-progress", "-j", "0")
    assert code == 0, out
    assert Path("from-env/index.faiss").exists()
    code, out = cli("index", corpus, "--no-progress", "--memory-budget", "lots")
    assert code == 1 and "memory-budget" in out


def test_bad_index_factory_is_refused_before_embedding(corpus: Path, tiny_model_dir: Path) -> None:
    code, out = cli("index", corpus, "--model", tiny_model_dir, "--no-progress", "-j", "0",
                    "--index-factory", "IVF7,Bogus")
    assert code == 1 and out.startswith("Error: invalid index factory 'IVF7,Bogus'") and "Traceback" not in out
    assert "could not parse" in out and "faiss::" not in out
    assert not Path("retrieval-index/vectors.npy").exists(), "nothing was embedded"


def test_custom_factory_sticks_until_auto(corpus: Path, tiny_model_dir: Path) -> None:
    summary = index(corpus, tiny_model_dir, "--index-factory", "IDMap2,HNSW16")
    assert (summary["index_type"], summary["index_factory"]) == ("custom", "IDMap2,HNSW16")
    (corpus / "a" / "img0001.jpg").unlink()
    summary = index(corpus, tiny_model_dir)  # no flag: the custom index is kept (HNSW: rebuilt to delete)
    assert (summary["index_type"], summary["index_factory"]) == ("custom", "IDMap2,HNSW16")
    verify_ok()
    summary = index(corpus, tiny_model_dir, "--index-factory", "auto", "--exact-threshold", "10")
    assert summary["index_type"] == "flat"
