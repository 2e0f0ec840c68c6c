"""One indexed corpus (tiny random DINOv2) shared by the API tests, and app/client factories."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from retrieval.api.app import create_app
from retrieval.api.settings import ApiSettings
from typer.testing import CliRunner

from retrieval.cli.app import app as cli_app
from tests.conftest import make_corpus, save_tiny_dinov2
from tests.images import photo, write

runner = CliRunner()


def run_index(corpus: Path, index_dir: Path, model: Path) -> dict[str, Any]:
    result = runner.invoke(cli_app, ["index", str(corpus), "--index-dir", str(index_dir), "--model", str(model),
                                     "--no-progress", "--json", "-j", "0", "-b", "16"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@dataclass
class Indexed:
    corpus: Path
    index_dir: Path
    model: Path
    ids: dict[str, int]  # corpus-relative path -> id

    def settings(self, **overrides: Any) -> ApiSettings:
        values: dict[str, Any] = {"index_dir": self.index_dir, "device": "cpu", "reload_check_s": 3600.0}
        values.update(overrides)
        return ApiSettings(**values)

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float32 vectors) of every indexed image, read straight from the vector file."""
        from retrieval.vectors import VectorStore

        ids = np.array(sorted(self.ids.values()))
        store = VectorStore(self.index_dir / "vectors.npy", 32)
        return ids, store.read(ids)


def _ids(index_dir: Path) -> dict[str, int]:
    from tests import db as testdb

    with testdb.connect(index_dir / "retrieval.db") as conn:
        return dict(conn.execute("SELECT path, id FROM images"))


def build_indexed(root: Path, model: Path, n: int = 12) -> Indexed:
    corpus = root / "corpus"
    make_corpus(corpus, n)
    # a near-duplicate pair: the same picture saved twice at different JPEG qualities
    write(corpus / "dup" / "orig.jpg", photo(120, 90, seed=777), "JPEG", quality=95)
    write(corpus / "dup" / "copy.jpg", photo(120, 90, seed=777), "JPEG", quality=80)
    index_dir = root / "index"
    run_index(corpus, index_dir, model)
    return Indexed(corpus, index_dir, model, _ids(index_dir))


@pytest.fixture(scope="session")
def api_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_dinov2(tmp_path_factory.mktemp("api-models") / "tiny-dinov2")


@pytest.fixture(scope="session")
def indexed(tmp_path_factory: pytest.TempPathFactory, api_model_dir: Path) -> Indexed:
    return build_indexed(tmp_path_factory.mktemp("api-index"), api_model_dir)


@pytest.fixture
def private_index(tmp_path: Path, api_model_dir: Path) -> Indexed:
    """An index this test may change (re-index, symlinks)."""
    return build_indexed(tmp_path / "private", api_model_dir, n=6)


@pytest.fixture(scope="module")
def client(indexed: Indexed) -> Iterator[TestClient]:
    with TestClient(create_app(indexed.settings())) as c:
        yield c


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
