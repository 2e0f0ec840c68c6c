"""Reading an index never writes it, and works from read-only media (issue 12 item 5, issue 10).

Before: every read command failed on a read-only index folder ("unable to open database file"),
`serve` exited at start, and every open ran Alembic's upgrade. The read-only folder is made with
chmod; as root (who may write anyway) the commands run without root's permission override, so
that the folder is read-only for them as a read-only mount is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from typer.testing import CliRunner

from retrieval.cli.app import app
from tests import db as testdb
from tests.conftest import make_corpus

runner = CliRunner()
# Read-only media is about the index folder's own SQLite file (and that no -wal/-shm appears beside it).
READ_ONLY_MEDIA = pytest.mark.sqlite_only("read-only media: the SQLite file in a read-only folder")


def _index(corpus: Path, index_dir: Path, model: Path) -> None:
    result = runner.invoke(app, ["index", str(corpus), "--index-dir", str(index_dir), "--model", str(model),
                                 "--no-progress", "-j", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def _make_readonly(folder: Path) -> None:
    for root, dirs, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), 0o444)
        os.chmod(root, 0o555)


def _run_as_reader(args: list[str], code: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI (or a Python snippet) as a user for whom the chmod-ed folder is read-only.

    Root ignores file modes through its DAC-override capabilities: those are dropped for the child.
    """
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "retrieval.cli", *args]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("as root, needs setpriv to drop the permission override")
        cmd = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search,-fowner", *cmd]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=os.getcwd())


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def readonly_index(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Path]:
    corpus = tmp_path / "corpus"
    make_corpus(corpus, 6)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    _index(corpus, tmp_path / "index", model)
    _make_readonly(tmp_path / "index")
    try:
        yield tmp_path / "index"
    finally:
        for root, _dirs, _files in os.walk(tmp_path / "index"):
            os.chmod(root, 0o755)


@READ_ONLY_MEDIA
def test_read_commands_work_on_a_read_only_index_and_change_nothing(readonly_index: Path) -> None:
    before = _digest(readonly_index)
    info = _run_as_reader(["info", "--index-dir", str(readonly_index), "--json"])
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["images"] == 6
    search = _run_as_reader(["search", "1", "-k", "3", "--index-dir", str(readonly_index), "--json"])
    assert search.returncode == 0, search.stderr
    assert len(json.loads(search.stdout)["results"]) == 3
    verify = _run_as_reader(["verify", "--index-dir", str(readonly_index)])
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert _digest(readonly_index) == before  # no file changed, none was added (no lock, no -wal/-shm)


@READ_ONLY_MEDIA
def test_serve_answers_from_a_read_only_index(readonly_index: Path) -> None:
    model = readonly_index.parent / "model"
    code = f"""
from fastapi.testclient import TestClient
from retrieval.api.app import create_app
from retrieval.api.settings import ApiSettings
s = ApiSettings(index_dir={str(readonly_index)!r}, device="cpu", upload_decode_workers=0, model={str(model)!r})
with TestClient(create_app(s)) as c:
    r = c.get("/search", params={{"image": "1", "k": 2}})
    assert r.status_code == 200, r.text
    assert len(r.json()["results"]) == 2
    print("served")
"""
    out = _run_as_reader([], code=code)
    assert out.returncode == 0 and "served" in out.stdout, out.stdout + out.stderr


@READ_ONLY_MEDIA
def test_writing_commands_say_in_one_line_that_the_folder_is_read_only(readonly_index: Path) -> None:
    corpus = readonly_index.parent / "corpus"
    out = _run_as_reader(["index", str(corpus), "--index-dir", str(readonly_index), "--no-progress"])
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "is read-only" in out.stderr, out.stderr
    out = _run_as_reader(["dedup", "--index-dir", str(readonly_index), "--no-progress",
                          "--report-dir", "/tmp/never-written"])
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0, out.stderr


def test_opening_for_reading_never_migrates(corpus: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    index_dir = tmp_path / "idx"
    _index(corpus, index_dir, tiny_model_dir)
    db = index_dir / "retrieval.db"
    with testdb.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0002'")  # as an older release left it
    result = runner.invoke(app, ["info", "--index-dir", str(index_dir)])
    assert result.exit_code == 1
    assert "schema 0002" in result.output and result.output.strip().count("\n") == 0, result.output
    with testdb.connect(db) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()[0] == "0002"
    from retrieval.errors import RetrievalError
    from retrieval.layout import IndexLayout
    from retrieval.search import IndexReader

    with pytest.raises(RetrievalError):
        IndexReader(IndexLayout(index_dir))


def test_a_read_handle_cannot_write(corpus: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    import sqlalchemy.exc
    from sqlalchemy import delete

    from retrieval.layout import IndexLayout
    from retrieval.search import IndexReader
    from retrieval.store import Image

    _index(corpus, tmp_path / "idx", tiny_model_dir)
    reader = IndexReader(IndexLayout(tmp_path / "idx"))
    try:
        with pytest.raises(sqlalchemy.exc.DBAPIError, match="readonly|read-only|query_only"):
            with reader.store.session() as s, s.begin():
                s.execute(delete(Image))
    finally:
        reader.close()
