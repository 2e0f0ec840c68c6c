"""A decoder that crashes its process (a segfault in a C codec on a hostile file) costs that file only.

The crashes are real: tests.indexer.crash_codec registers a Pillow plugin that sends SIGSEGV to
the process decoding its files. Worker crashes are tested in this process (the workers are forked
from it); a crash of the main process (`-j 0`) in a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from retrieval.cli.app import app
from retrieval.imaging.decode import WorkItem
from retrieval.imaging.inflight import InflightMarkers
from retrieval.imaging.preprocess import PreprocessConfig
from retrieval.imaging.safe import decode_isolated
from tests import db as testdb
from tests.conftest import make_corpus
from tests.indexer.crash_codec import register, write_crasher

REPO = Path(__file__).resolve().parents[2]


def _failures(db: Path) -> dict[str, tuple[str, str]]:
    with testdb.connect(db) as conn:
        return {r[0]: (r[1], r[2]) for r in conn.execute("SELECT path, kind, reason FROM failures")}


def _item(root: Path, rel: str) -> WorkItem:
    st = (root / rel).stat()
    return WorkItem(rel, st.st_size, st.st_mtime_ns)


def test_isolated_decoding_names_the_file_that_crashes(tmp_path: Path) -> None:
    register()
    make_corpus(tmp_path, 4)
    write_crasher(tmp_path / "a" / "evil.png")
    rels = ["a/img0001.jpg", "a/evil.png", "b/img0000.png", "b/img0002.jpg"]
    results = decode_isolated(str(tmp_path), [_item(tmp_path, r) for r in rels], PreprocessConfig(), 10**8)
    assert [r.item.path for r in results] == rels
    crashed = results[1]
    assert crashed.failure_kind == "crash" and "signal 11, SIGSEGV" in (crashed.failure_reason or "")
    assert all(r.embeddable and r.pixels is not None for i, r in enumerate(results) if i != 1)


def test_inflight_markers_name_only_unfinished_files(tmp_path: Path) -> None:
    markers = InflightMarkers(tmp_path / "decoding")
    with markers.decoding("a/b.jpg"):
        assert markers.snapshot() == {str(os.getpid()): "a/b.jpg"}
    assert markers.snapshot() == {}
    with pytest.raises(KeyboardInterrupt), markers.decoding("a/c.jpg"):
        raise KeyboardInterrupt  # an exception is not a crash: the file is not to blame
    assert markers.snapshot() == {}
    (tmp_path / "decoding" / "999999").write_text("x/dead.png")  # what a crashed process leaves
    assert markers.snapshot() == {"999999": "x/dead.png"}
    markers.clean()
    assert os.listdir(tmp_path / "decoding") == ["999999"]
    markers.discard(["999999"])
    assert markers.snapshot() == {} and os.listdir(tmp_path / "decoding") == []


def test_a_worker_crash_costs_one_file_and_the_run_goes_on(corpus: Path, tiny_model_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import retrieval.indexer.stages

    register()
    write_crasher(corpus / "b" / "zz_evil.png")  # last: decoded ahead while earlier batches are written
    real_write = retrieval.indexer.stages.write_batch

    def slow_write(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        # Keep the main thread busy while the workers decode ahead, so the worker dies while the
        # previous batch is being written (where torch's SIGCHLD handler would raise).
        time.sleep(0.2)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(retrieval.indexer.stages, "write_batch", slow_write)
    result = CliRunner().invoke(app, ["index", str(corpus), "--model", str(tiny_model_dir), "--no-progress",
                                      "--json", "-j", "2", "-b", "4"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert (summary["new"], summary["failed"], summary["total_images"]) == (24, 1, 24)
    assert summary["failure_kinds"] == {"crash": 1}
    kind, reason = _failures(Path("retrieval-index/retrieval.db"))["b/zz_evil.png"]
    assert kind == "crash" and reason == "decoder crashed (signal 11, SIGSEGV) while decoding this file"
    assert os.listdir("retrieval-index/decoding") == []  # no marker left behind
    verify = CliRunner().invoke(app, ["verify"])
    assert verify.exit_code == 0, verify.output

    again = CliRunner().invoke(app, ["index", str(corpus), "--no-progress", "--json", "-j", "2", "-b", "4"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["known_failures"] == 1  # not retried until it changes


def _index_in_subprocess(corpus: Path, model: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    code = ("import sys; from tests.indexer.crash_codec import register; register(); "
            "from retrieval.cli.app import app; app()")
    env = dict(os.environ, PYTHONPATH=str(REPO), **testdb.env(cwd / "retrieval-index"))
    return subprocess.run([sys.executable, "-c", code, "index", str(corpus), "--model", str(model), "--no-progress",
                           "--json", "-j", "0", "-b", "4", *extra],
                          check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_a_crash_of_the_main_process_is_survived_by_the_next_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    corpus = tmp_path / "corpus"
    make_corpus(corpus, 10)
    write_crasher(corpus / "b" / "evil.png")  # sixth in scan order: the second batch of 4
    first = _index_in_subprocess(corpus, tiny_model_dir, tmp_path)
    assert first.returncode == -signal.SIGSEGV, first.stderr  # nothing survives a segfault in-process
    db = tmp_path / "retrieval-index" / "retrieval.db"
    assert list((tmp_path / "retrieval-index" / "decoding").iterdir())  # but it left its marker

    second = _index_in_subprocess(corpus, tiny_model_dir, tmp_path)
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout)
    assert (summary["failed"], summary["total_images"]) == (1, 10)
    assert _failures(db)["b/evil.png"] == ("crash", "decoder crashed (signal 11, SIGSEGV) while decoding this file")

    # --retry-failed retries it, in isolation again: the main process never decodes it.
    third = _index_in_subprocess(corpus, tiny_model_dir, tmp_path, "--retry-failed")
    assert third.returncode == 0, third.stderr
    assert json.loads(third.stdout)["failed"] == 1 and _failures(db)["b/evil.png"][0] == "crash"
    assert list((tmp_path / "retrieval-index" / "decoding").iterdir()) == []


def test_a_worker_crash_while_embedding_a_query_folder_is_a_failure(tmp_path: Path, tiny_model_dir: Path) -> None:
    from retrieval.curation.folders import embed_folder
    from retrieval.model import load_embedder

    register()
    make_corpus(tmp_path / "queries", 6)
    write_crasher(tmp_path / "queries" / "b" / "evil.png")
    out = embed_folder(tmp_path / "queries", load_embedder(str(tiny_model_dir), device="cpu"), 10**8,
                       batch_size=2, workers=1)
    assert len(out.paths) == 6 and out.vectors.shape[0] == 6
    assert out.failures == [{"path": "b/evil.png", "kind": "crash",
                             "reason": "decoder crashed (signal 11, SIGSEGV) while decoding this file"}]


def test_worker_death_is_recognised_however_torch_reports_it() -> None:
    from retrieval.imaging.loader import _worker_died

    assert _worker_died(RuntimeError("DataLoader worker (pid 123) is killed by signal: Segmentation fault"), 1)
    assert _worker_died(RuntimeError("DataLoader worker (pid(s) 123) exited unexpectedly"), 1)
    assert not _worker_died(RuntimeError("Caught ValueError in DataLoader worker process 0"), 1)
    # the worker died while the main process fetched a batch's shared memory from it
    assert _worker_died(EOFError(), 1) and _worker_died(ConnectionResetError(), 2)
    assert not _worker_died(EOFError(), 0)  # no workers: an EOFError is some other failure
