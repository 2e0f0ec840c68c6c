"""SIGKILL at arbitrary points of `retrieval index`, then rerun: nothing lost twice, nothing duplicated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from retrieval.cli.app import app
from tests import db as testdb
from tests.conftest import make_corpus

N_IMAGES = 120


def _count(db: Path) -> int:
    rows = testdb.peek(db, "SELECT count(*) FROM images")
    return rows[0][0] if rows else 0  # not created or not migrated yet


def _start(corpus: Path, model: Path, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), **testdb.env(cwd / "retrieval-index"))
    return subprocess.Popen(
        [sys.executable, "-m", "retrieval.cli", "index", str(corpus), "--model", str(model),
         "--no-progress", "-b", "4", "-j", "1"],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )


def _kill_when(proc: subprocess.Popen, db: Path, at_least: int, timeout: float = 120) -> bool:
    """SIGKILL once `at_least` images are committed; False if the run finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            assert proc.returncode == 0, out
            return False
        if _count(db) >= at_least:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("indexing made no progress")


def test_sigkill_mid_run_then_resume(tmp_path: Path, tiny_model_dir: Path) -> None:
    corpus = tmp_path / "corpus"
    make_corpus(corpus, N_IMAGES, size=(160, 120))
    db = tmp_path / "retrieval-index" / "retrieval.db"

    kills = 0
    for target in (1, 30, 70):
        proc = _start(corpus, tiny_model_dir, tmp_path)
        if _kill_when(proc, db, target):
            kills += 1
            assert _count(db) < N_IMAGES or target == 70
    assert kills >= 2, "the runs finished before they could be killed; the test proves nothing"
    done_before_resume = _count(db)
    assert 0 < done_before_resume

    proc = _start(corpus, tiny_model_dir, tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()
    text = out.decode()
    assert f"new {N_IMAGES - done_before_resume}," in text, text

    with testdb.connect(db) as conn:
        paths = [r[0] for r in conn.execute("SELECT path FROM images")]
        ids = [r[0] for r in conn.execute("SELECT id FROM images ORDER BY id")]
        statuses = [r[0] for r in conn.execute("SELECT status FROM index_runs ORDER BY id")]
    assert len(paths) == len(set(paths)) == N_IMAGES
    assert statuses[-1] == "completed" and statuses.count("interrupted") == kills, statuses

    result = CliRunner().invoke(app, ["verify", "--index-dir", str(tmp_path / "retrieval-index")])
    assert result.exit_code == 0, result.output  # index ids == DB ids, no duplicates, unit vectors

    # Every stored vector belongs to its own file: no row was misaligned by a kill.
    from retrieval.imaging.preprocess import load_and_preprocess
    from retrieval.model import load_embedder
    from retrieval.vectors import VectorStore

    embedder = load_embedder(str(tiny_model_dir), device="cpu")
    with testdb.connect(db) as conn:
        pairs = list(conn.execute("SELECT id, path FROM images ORDER BY id"))
    fresh = np.stack([
        embedder.embed(load_and_preprocess((corpus / p).read_bytes(), embedder.preprocess, 10**8)[0][None])[0]
        for _, p in pairs
    ])
    stored = VectorStore(tmp_path / "retrieval-index" / "vectors.npy", embedder.dim).read(np.array(ids))
    assert np.min(np.sum(fresh * stored, axis=1)) > 0.999
