"""The copy role in `retrieval index`: embedded beside the search role from one decode, added later
to an existing index (only that role), crash-safe, and old `vectors.f16` index folders upgraded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from retrieval.cli.app import app
from retrieval.vectors import DTYPE, VectorStore
from tests import db as testdb
from tests.retrieval.embedding.test_copy import tiny_copy_model

runner = CliRunner()
INDEX = Path("retrieval-index")


def index(corpus: Path, model: Path, *extra: object) -> dict:
    result = runner.invoke(app, [str(a) for a in ("index", corpus, "--model", model, "--no-progress", "--json",
                                                  "-j", "0", "-b", "8", *extra)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.fixture(scope="module")
def copy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    path = tmp_path_factory.mktemp("copymodel") / "tiny-sscd.pt"
    torch.jit.script(tiny_copy_model()).save(str(path))
    return path


def copy_rows(db: Path = INDEX / "retrieval.db") -> dict[str, tuple]:
    with testdb.connect(db) as conn:
        return {r[0]: r[1:] for r in conn.execute("SELECT path, id, copy_state, pdq, pdq_quality FROM images")}


def direct_copy_vectors(corpus: Path, paths: list[str], model: Path) -> np.ndarray:
    from retrieval.embedding.copy import load_copy_embedder
    from retrieval.imaging.preprocess import PreprocessConfig, decode_image

    emb = load_copy_embedder(str(model), device="cpu")
    inputs = [emb.prepare(decode_image((corpus / p).read_bytes(), PreprocessConfig(), 10**8)) for p in paths]
    return emb.embed_many(inputs)


def test_both_roles_from_one_index_run(corpus: Path, tiny_model_dir: Path, copy_model: Path) -> None:
    summary = index(corpus, tiny_model_dir, "--copy-model", copy_model)
    assert summary["new"] == 24 and summary["copy_embedded"] == 24 and summary["copy_index_type"] == "flat"
    rows = copy_rows()
    assert all(state == 2 and len(pdq) == 256 and 0 <= quality <= 100 for _, state, pdq, quality in rows.values())
    copy_vectors = np.load(INDEX / "vectors-copy.npy", mmap_mode="r")  # no dimension needed
    assert copy_vectors.shape[1] == 16 and (INDEX / "index-copy.faiss").exists()
    paths = sorted(rows)
    ids = [rows[p][0] for p in paths]
    np.testing.assert_allclose(np.asarray(copy_vectors[ids], np.float32),
                               direct_copy_vectors(corpus, paths, copy_model), atol=2e-3)
    # the search role is untouched by the copy role: same vectors as an index without it
    search = VectorStore(INDEX / "vectors.npy").read(ids)
    index(corpus, tiny_model_dir, "--index-dir", "plain")
    plain = copy_rows(Path("plain/retrieval.db"))
    np.testing.assert_array_equal(VectorStore(Path("plain/vectors.npy")).read([plain[p][0] for p in paths]), search)
    # a second run has nothing to do, and does not load the copy model
    again = index(corpus, tiny_model_dir)
    assert again["new"] == 0 and again["copy_embedded"] == 0 and again["copy_model"] == str(copy_model)


def test_adding_a_copy_model_embeds_only_the_copy_role(corpus: Path, tiny_model_dir: Path, copy_model: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    index(corpus, tiny_model_dir)
    assert all(state == 0 and len(pdq) == 256 for _, state, pdq, _ in copy_rows().values())  # PDQ always
    before = (INDEX / "vectors.npy").read_bytes()

    import retrieval.indexer.stages as stages

    calls = []
    real = stages.write_copy_batch

    def killed_after_first_batch(*args, **kwargs):  # noqa: ANN002, ANN003
        if calls:
            raise SystemExit(137)  # the run dies after one committed batch
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "write_copy_batch", killed_after_first_batch)
    result = runner.invoke(app, ["index", str(corpus), "--model", str(tiny_model_dir), "--copy-model",
                                 str(copy_model), "--no-progress", "-j", "0", "-b", "8"])
    assert result.exit_code == 137, result.output
    states = [state for _, state, _, _ in copy_rows().values()]
    assert states.count(1) == 8 and states.count(0) == 16  # one batch written, nothing half-done
    monkeypatch.setattr(stages, "write_copy_batch", real)

    summary = index(corpus, tiny_model_dir, "--copy-model", copy_model)
    assert summary["new"] == 0 and summary["changed"] == 0 and summary["copy_embedded"] == 16
    assert (INDEX / "vectors.npy").read_bytes() == before, "the search role was not re-embedded"
    rows = copy_rows()
    assert all(state == 2 and pdq is not None for _, state, pdq, _ in rows.values())
    paths = sorted(rows)
    got = VectorStore(INDEX / "vectors-copy.npy").read([rows[p][0] for p in paths])
    np.testing.assert_allclose(got, direct_copy_vectors(corpus, paths, copy_model), atol=2e-3)
    result = runner.invoke(app, ["verify"], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def test_an_old_vectors_f16_index_keeps_working_and_gains_the_copy_role(corpus: Path, tiny_model_dir: Path,
                                                                       copy_model: Path) -> None:
    """An index folder as the previous release wrote it: headerless vectors.f16, schema at 0003."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import inspect

    from retrieval.store import make_engine, migrations_dir

    index(corpus, tiny_model_dir)
    result = runner.invoke(app, ["search", str(corpus / "a" / "img0001.jpg"), "-k", "3", "--json"],
                           catch_exceptions=False)
    before = json.loads(result.output)["results"]
    data = np.load(INDEX / "vectors.npy")
    (INDEX / "vectors.f16").write_bytes(data.astype(DTYPE).tobytes())
    (INDEX / "vectors.npy").unlink()
    url = testdb.url(INDEX)
    engine = make_engine(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url)
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "0003")
        assert "copy_state" not in {c["name"] for c in inspect(connection).get_columns("images")}
    engine.dispose()

    result = runner.invoke(app, ["search", str(corpus / "a" / "img0001.jpg"), "-k", "3", "--json"],
                           catch_exceptions=False)
    # Reading never upgrades an index: one line says which command does, and nothing changed.
    assert result.exit_code == 1 and "run `retrieval index CORPUS` once to upgrade it" in result.output
    assert (INDEX / "vectors.f16").exists()

    summary = index(corpus, tiny_model_dir, "--copy-model", copy_model)
    assert summary["new"] == 0 and summary["copy_embedded"] == 24
    assert not (INDEX / "vectors.f16").exists()
    np.testing.assert_array_equal(np.load(INDEX / "vectors.npy"), data)
    result = runner.invoke(app, ["search", str(corpus / "a" / "img0001.jpg"), "-k", "3", "--json"],
                           catch_exceptions=False)
    assert json.loads(result.output)["results"] == before


def test_another_copy_model_replaces_only_the_copy_role(corpus: Path, tiny_model_dir: Path, copy_model: Path,
                                                        tmp_path: Path) -> None:
    import torch

    index(corpus, tiny_model_dir, "--copy-model", copy_model)
    other = tmp_path / "other.pt"
    model = tiny_copy_model()
    with torch.no_grad():
        model.proj.weight.mul_(-1.5)
    torch.jit.script(model).save(str(other))
    before = (INDEX / "vectors.npy").read_bytes()
    summary = index(corpus, tiny_model_dir, "--copy-model", other)
    assert summary["new"] == 0 and summary["copy_embedded"] == 24 and summary["copy_model"] == str(other)
    assert (INDEX / "vectors.npy").read_bytes() == before
    rows = copy_rows()
    paths = sorted(rows)
    np.testing.assert_allclose(VectorStore(INDEX / "vectors-copy.npy").read([rows[p][0] for p in paths]),
                               direct_copy_vectors(corpus, paths, other), atol=2e-3)


def test_copy_model_from_the_environment(corpus: Path, tiny_model_dir: Path, copy_model: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETRIEVAL_COPY_MODEL", str(copy_model))
    from retrieval.settings import get_settings

    get_settings.cache_clear()
    summary = index(corpus, tiny_model_dir)
    assert summary["copy_embedded"] == 24 and summary["copy_model"] == str(copy_model)


def test_a_missing_copy_model_is_one_clear_error(corpus: Path, tiny_model_dir: Path) -> None:
    result = runner.invoke(app, ["index", str(corpus), "--model", str(tiny_model_dir), "--copy-model",
                                 "/nowhere/sscd.pt", "--no-progress"])
    assert result.exit_code != 0
    assert "copy model file /nowhere/sscd.pt does not exist" in result.output


def test_a_transformers_checkpoint_as_the_copy_model(corpus: Path, tiny_model_dir: Path, other_model_dir: Path) -> None:
    """DINOv2 itself as the copy model: its copy vectors are what it gives as a search model."""
    summary = index(corpus, tiny_model_dir, "--copy-model", other_model_dir)
    assert summary["copy_embedded"] == 24
    rows = copy_rows()
    index(corpus, other_model_dir, "--index-dir", "as-search")
    other = copy_rows(Path("as-search/retrieval.db"))
    paths = sorted(rows)
    np.testing.assert_allclose(VectorStore(INDEX / "vectors-copy.npy").read([rows[p][0] for p in paths]),
                               VectorStore(Path("as-search/vectors.npy")).read([other[p][0] for p in paths]),
                               atol=2e-3)
