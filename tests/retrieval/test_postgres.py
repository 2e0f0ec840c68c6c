"""The same index, curation and API paths on SQLite and on a real PostgreSQL server (`--db URL`).

PostgreSQL is where several processes write and read at once: readers see committed batches
while an index run writes (MVCC), ids of deleted images are never reused, --rebuild restarts them.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from sqlalchemy import create_engine, select, text
from typer.testing import CliRunner

from retrieval.cli.app import app
from retrieval.store import Image, Store, to_signed64
from tests.conftest import make_corpus

runner = CliRunner()


def cli(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def index(corpus: Path, model: Path, db: str, *extra: str) -> dict:
    code, out = cli("index", corpus, "--model", model, "--db", db, "--no-progress", "--json", "-j", "0", "-b", "8",
                    *extra)
    assert code == 0, out
    return json.loads(out)


def paths_and_ids(db: str) -> dict[str, int]:
    engine = create_engine(db)
    with engine.connect() as conn:
        out = dict(conn.execute(text("SELECT path, id FROM images")).all())
    engine.dispose()
    return out


def test_index_incremental_rebuild_and_search(db_url: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    corpus = tmp_path / "corpus"
    make_corpus(corpus, 12)
    first = index(corpus, tiny_model_dir, db_url)
    assert (first["new"], first["total_images"]) == (12, 12)
    before = paths_and_ids(db_url)
    (corpus / "a" / "img0001.jpg").unlink()
    make_corpus(corpus, 2, start=100)
    second = index(corpus, tiny_model_dir, db_url)
    assert (second["new"], second["removed"], second["unchanged"]) == (2, 1, 11)
    after = paths_and_ids(db_url)
    assert min(after[p] for p in after if p not in before) > max(before.values()), "deleted ids are never reused"
    assert cli("verify", "--db", db_url)[0] == 0
    code, out = cli("search", corpus / "b" / "img0000.png", "--db", db_url, "-k", "3", "--json")
    assert code == 0 and json.loads(out)["answered_from"].startswith("stored vector of b/img0000.png")
    index(corpus, tiny_model_dir, db_url, "--rebuild")
    assert sorted(paths_and_ids(db_url).values()) == list(range(1, 14)), "--rebuild restarts ids at 1"


def test_store_holds_extreme_hashes_and_json(db_url: str) -> None:
    store = Store(db_url)
    with store.session() as s, s.begin():
        for i, value in enumerate([0, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]):
            s.add(Image(path=f"p{i}", size=1, mtime_ns=2**62, sha256="0" * 64, width=1, height=1, format="JPEG",
                        phash=to_signed64(value), extra={"caption": "ü", "n": [1, 2]}, etag='"abc"'))
    with store.session() as s:
        got = s.execute(select(Image.phash, Image.extra, Image.mtime_ns).order_by(Image.id)).all()
    assert [g[0] for g in got] == [to_signed64(v) for v in [0, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]]
    assert got[0][1] == {"caption": "ü", "n": [1, 2]} and got[0][2] == 2**62
    store.close()


def test_dedup_and_apply_on_the_database(db_url: str, tmp_path: Path, tiny_model_dir: Path) -> None:
    import shutil

    corpus = tmp_path / "corpus"
    make_corpus(corpus, 8)
    shutil.copy(corpus / "a" / "img0001.jpg", corpus / "copy.jpg")
    index(corpus, tiny_model_dir, db_url)
    exact = ("--no-embeddings", "--phash-distance", "-1")  # random weights: only byte copies are copies
    code, out = cli("dedup", "--db", db_url, *exact, "--report-dir", tmp_path / "r1", "--no-progress", "--json")
    assert code == 0, out
    first = json.loads(out)
    assert first["summary"]["images_to_remove"] == 1
    code, out = cli("dedup", "--db", db_url, *exact, "--report-dir", tmp_path / "r2", "--no-progress", "--json")
    assert json.loads(out)["reused"] is True
    code, out = cli("dedup", "--db", db_url, "--apply", "--run", first["run_id"], "--move-to", tmp_path / "removed",
                    "--report-dir", tmp_path / "r3", "--no-progress")
    assert code == 0, out
    assert len(paths_and_ids(db_url)) == 8
    code, out = cli("cluster", "--db", db_url, "-k", "2", "--report-dir", tmp_path / "c", "--no-progress")
    assert code == 0, out


def test_readers_see_committed_batches_while_an_index_run_writes(postgres_url: str, tmp_path: Path,
                                                                  tiny_model_dir: Path) -> None:
    corpus = tmp_path / "corpus"
    make_corpus(corpus, 48)
    engine = create_engine(postgres_url)
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    errors: list[BaseException] = []
    stop = threading.Event()

    def read(me: int) -> None:
        while not stop.is_set():
            try:
                with engine.connect() as conn:
                    if conn.execute(text("SELECT to_regclass('images')")).scalar() is None:
                        continue
                    ids = conn.execute(select(Image.id)).scalars().all()
                    assert len(ids) == len(set(ids)), "a reader never sees a row twice"
                    seen[me].append(len(ids))
            except AssertionError as exc:
                errors.append(exc)
            except Exception:  # noqa: BLE001 - the schema may be mid-migration on the first reads
                pass
            time.sleep(0.005)

    readers = [threading.Thread(target=read, args=(i,)) for i in range(3)]
    for t in readers:
        t.start()
    try:
        summary = index(corpus, tiny_model_dir, postgres_url, "-b", "4")
    finally:
        stop.set()
        for t in readers:
            t.join()
    engine.dispose()
    assert not errors and summary["new"] == 48
    for counts in seen.values():
        assert counts, "every reader got answers while the run wrote"
        assert counts == sorted(counts), "committed rows never disappear"
        assert all(n % 4 == 0 for n in counts), "readers only ever see whole committed batches"


def test_a_failed_query_does_not_break_a_snapshot_reader(postgres_url: str) -> None:
    """A statement that fails inside the held snapshot (a bad cast, a cancelled query) must not leave
    the reader answering "current transaction is aborted" for the rest of its life."""
    import pytest
    from sqlalchemy.exc import DBAPIError

    Store(postgres_url).close()  # migrated
    reader = Store(postgres_url, readonly=True, snapshot=True)
    try:
        with pytest.raises(DBAPIError):
            with reader.session() as s:
                s.execute(text("SELECT 1 / 0")).all()
        with reader.session() as s:
            assert s.execute(text("SELECT count(*) FROM images")).scalar_one() >= 0
    finally:
        reader.close()
