"""One run lifecycle for every run table: start, complete, fail, reuse by fingerprint, latest."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from retrieval import runs
from retrieval.store import ClusterRun, CurationRun, DedupRun, Image, IndexRun, Store, utcnow


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'runs.db'}")
    yield s
    s.close()


def _dedup(store: Store, fp: str = "f") -> int:
    return runs.start(store, DedupRun, mode="self", fingerprint=fp, params={"threshold": 0.9})


def _cluster(store: Store, fp: str = "f") -> int:
    return runs.start(store, ClusterRun, k=2, n_images=4, fingerprint=fp, params={"k": 2})


def _get(store: Store, table: type, run_id: int):  # noqa: ANN202
    with store.session() as s:
        return s.get(table, run_id)


def test_a_run_is_running_until_completed_with_its_results(store: Store) -> None:
    run_id = _dedup(store)
    assert _get(store, DedupRun, run_id).status == "running"
    with store.session() as s:
        assert runs.latest(s, DedupRun) is None  # a running run is never served
    assert runs.reusable(store, DedupRun, "f") == []
    with store.session() as s, s.begin():
        runs.complete(s, DedupRun, run_id, counts={"groups": 3})
    row = _get(store, DedupRun, run_id)
    assert (row.status, row.counts) == ("completed", {"groups": 3}) and row.finished_at is not None
    with store.session() as s:
        assert runs.latest(s, DedupRun).id == run_id


def test_completion_rolls_back_with_the_results_transaction(store: Store) -> None:
    run_id = _cluster(store)
    with pytest.raises(RuntimeError), store.session() as s, s.begin():
        runs.complete(s, ClusterRun, run_id, sizes=[2, 2])
        raise RuntimeError("writing the assignments failed")
    assert _get(store, ClusterRun, run_id).status == "running"


@pytest.mark.parametrize("table, start", [(DedupRun, _dedup), (ClusterRun, _cluster)])
def test_a_failed_run_records_why_where_its_table_can(store: Store, table: type, start) -> None:  # noqa: ANN001
    run_id = start(store)
    runs.fail(store, table, run_id, ValueError("disk full " + "x" * 5000))
    row = _get(store, table, run_id)
    assert row.status == "failed" and row.finished_at is not None
    if hasattr(table, "error"):
        assert row.error.startswith("disk full") and len(row.error) == runs.ERROR_CHARS
    interrupted = start(store)
    runs.fail(store, table, interrupted, KeyboardInterrupt())
    assert _get(store, table, interrupted).status == "interrupted"
    runs.fail(store, table, None, ValueError("before the run started"))  # nothing to record


def test_fail_never_turns_a_completed_run_into_a_failed_one(store: Store) -> None:
    run_id = _dedup(store)
    with store.session() as s, s.begin():
        runs.complete(s, DedupRun, run_id)
    runs.fail(store, DedupRun, run_id, ValueError("late"))
    assert _get(store, DedupRun, run_id).status == "completed"


def test_reuse_is_by_fingerprint_newest_completed_first(store: Store) -> None:
    ids = [_dedup(store, fp) for fp in ("a", "a", "b", "a")]
    with store.session() as s, s.begin():
        for run_id in ids[:3]:
            runs.complete(s, DedupRun, run_id)
    runs.fail(store, DedupRun, ids[3], ValueError("x"))
    assert [r.id for r in runs.reusable(store, DedupRun, "a")] == [ids[1], ids[0]]
    assert [r.id for r in runs.reusable(store, DedupRun, "b")] == [ids[2]]
    assert runs.reusable(store, DedupRun, "c") == []


def test_latest_filters_and_any_status(store: Store) -> None:
    self_run = _dedup(store)
    relative = runs.start(store, DedupRun, mode="relative", fingerprint="r", params={})
    with store.session() as s, s.begin():
        runs.complete(s, DedupRun, self_run)
        runs.complete(s, DedupRun, relative)
    newest = _dedup(store)
    with store.session() as s:
        assert runs.latest(s, DedupRun, DedupRun.mode == "self").id == self_run
        assert runs.latest(s, DedupRun).id == relative
        assert runs.latest(s, DedupRun, any_status=True).id == newest
        assert runs.completed(s, DedupRun, newest) is None
        assert runs.completed(s, DedupRun, self_run).id == self_run
        assert runs.completed(s, DedupRun, 999) is None
    assert runs.latest_id(store, DedupRun) == relative
    assert runs.latest_id(store, ClusterRun) is None


def test_add_completed_and_close_abandoned(store: Store) -> None:
    with store.session() as s, s.begin():
        run = runs.add_completed(s, CurationRun, mode="sample", fingerprint="q", params={})
    assert runs.reusable(store, CurationRun, "q")[0].id == run.id
    killed = runs.start(store, IndexRun, corpus_root="/c", model_ref="m", model_fingerprint="", dim=0,
                        preprocess={}, device="-")
    assert runs.close_abandoned(store, IndexRun, "killed") == 1
    row = _get(store, IndexRun, killed)
    assert (row.status, row.error) == ("interrupted", "killed")


def test_the_fingerprint_changes_with_params_images_runs_model_and_extra(store: Store) -> None:
    base = runs.fingerprint(store, "m", {"k": 1})
    assert runs.fingerprint(store, "m", {"k": 1}) == base
    assert runs.fingerprint(store, "m", {"k": 2}) != base
    assert runs.fingerprint(store, "other", {"k": 1}) != base
    assert runs.fingerprint(store, "m", {"k": 1}, extra=[("q.jpg", 10, 1)]) != base
    with store.session() as s, s.begin():
        s.add(Image(path="a.jpg", size=1, mtime_ns=1, sha256="0" * 64, width=1, height=1, format="JPEG", phash=0,
                    updated_at=utcnow()))
    after_image = runs.fingerprint(store, "m", {"k": 1})
    assert after_image != base
    runs.start(store, IndexRun, corpus_root="/c", model_ref="m", model_fingerprint="", dim=0, preprocess={}, device="-")
    assert runs.fingerprint(store, "m", {"k": 1}) != after_image


def test_no_other_module_moves_a_run_between_statuses() -> None:
    """The lifecycle lives in retrieval/runs.py only: no status literal or status assignment elsewhere."""
    import re

    root = Path(__file__).resolve().parents[2]
    pattern = re.compile(r"""status\s*(==|!=|=)\s*["'](running|completed|failed|interrupted)["']|\.status\s*=[^=]""")
    offenders = [f"{path.relative_to(root)}:{n}" for folder in ("retrieval", "indexer", "api")
                 for path in sorted((root / folder).rglob("*.py")) if path.name != "runs.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
