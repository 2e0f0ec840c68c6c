"""One run lifecycle for index, dedup, cluster and curation runs: start, complete, fail, reuse, latest.

Every run table (IndexRun, DedupRun, ClusterRun, CurationRun) has an id, a `status` and a
`finished_at`; this module is the only code that moves a run between statuses, so "completed"
means the same everywhere. A run is written "running" first and "completed" in the transaction
that stores its results, so a killed process leaves a run that is never reused or served.
Reuse is by fingerprint: a hash of the parameters and of the index state (see `fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from retrieval.store import Image, IndexRun, Store, utcnow

logger = logging.getLogger(__name__)

RUNNING, COMPLETED, FAILED, INTERRUPTED = "running", "completed", "failed", "interrupted"
ERROR_CHARS = 2000

R = TypeVar("R")


def start(store: Store, table: type[R], **fields: Any) -> int:
    """Record a new run as running; its id."""
    with store.session() as s, s.begin():
        run = table(status=RUNNING, **fields)
        s.add(run)
        s.flush()
        return run.id  # type: ignore[attr-defined]


def complete(session: Session, table: type[R], run_id: int, **fields: Any) -> R:
    """Mark a run completed inside `session`'s transaction (the one that stores its results)."""
    run = session.get(table, run_id)
    if run is None:
        raise LookupError(f"{table.__name__} {run_id} vanished while it ran")
    for name, value in fields.items():
        setattr(run, name, value)
    run.status, run.finished_at = COMPLETED, utcnow()  # type: ignore[attr-defined]
    return run


def add_completed(session: Session, table: type[R], **fields: Any) -> R:
    """Insert a run that is complete on arrival (its results are written in the same transaction)."""
    run = table(status=COMPLETED, finished_at=utcnow(), **fields)
    session.add(run)
    session.flush()
    return run


def _error_fields(table: type, exc: BaseException | None) -> dict[str, Any]:
    status = INTERRUPTED if isinstance(exc, KeyboardInterrupt) else FAILED
    fields: dict[str, Any] = {"status": status, "finished_at": utcnow()}
    if exc is not None and hasattr(table, "error"):
        fields["error"] = (str(exc) or type(exc).__name__)[:ERROR_CHARS]  # MemoryError() has no message
    return fields


def fail(store: Store, table: type[R], run_id: int | None, exc: BaseException | None) -> None:
    """Mark a run failed (interrupted for Ctrl-C), with the error where the table keeps one.

    Called while an exception propagates: a failure to record it is logged, never raised over it.
    """
    if run_id is None:
        return
    try:
        with store.session() as s, s.begin():
            run = s.get(table, run_id)
            if run is not None and run.status == RUNNING:  # type: ignore[attr-defined]
                for name, value in _error_fields(table, exc).items():
                    setattr(run, name, value)
    except Exception:  # noqa: BLE001 - never mask the original error
        logger.exception("could not record the failed %s %s", table.__name__, run_id)


def close_abandoned(store: Store, table: type[R], reason: str) -> int:
    """Runs still 'running' while the caller holds the index lock were killed: mark them interrupted."""
    with store.session() as s, s.begin():
        runs = s.scalars(select(table).where(table.status == RUNNING)).all()  # type: ignore[attr-defined]
        for run in runs:
            run.status = INTERRUPTED  # type: ignore[attr-defined]
            if hasattr(table, "error"):
                run.error = reason  # type: ignore[attr-defined]
    return len(runs)


def latest(session: Session, table: type[R], *where: Any, any_status: bool = False) -> R | None:
    """The newest completed run of `table` (optionally filtered; of any status with `any_status`), or None."""
    if not any_status:
        where = (table.status == COMPLETED, *where)  # type: ignore[attr-defined]
    return session.scalar(select(table).where(*where).order_by(table.id.desc()).limit(1))  # type: ignore[attr-defined]


def latest_id(store: Store, table: type, *where: Any) -> int | None:
    with store.session() as s:
        return s.scalar(select(func.max(table.id)).where(table.status == COMPLETED, *where))


def completed(session: Session, table: type[R], run_id: int) -> R | None:
    """Run `run_id` if it exists and completed, else None."""
    run = session.get(table, run_id)
    return run if run is not None and run.status == COMPLETED else None  # type: ignore[attr-defined]


def reusable(store: Store, table: type[R], fp: str) -> list[R]:
    """Completed runs with this fingerprint, newest first (a caller may still reject one, e.g. files gone)."""
    with store.session() as s:
        return list(s.scalars(select(table).where(table.fingerprint == fp,  # type: ignore[attr-defined]
                                                  table.status == COMPLETED)  # type: ignore[attr-defined]
                              .order_by(table.id.desc())))  # type: ignore[attr-defined]


def fingerprint(store: Store, model_fingerprint: str | None, params: dict[str, Any], extra: Any = None) -> str:
    """Changes whenever the parameters, the indexed images, the model or `extra` (a folder's state) change."""
    with store.session() as s:
        state = s.execute(select(func.count(Image.id), func.max(Image.id), func.max(Image.updated_at))).one()
        last_run = s.scalar(select(func.max(IndexRun.id)))
    h = hashlib.sha256(json.dumps([params, [str(x) for x in state], last_run, model_fingerprint, extra],
                                  sort_keys=True, default=str).encode())
    return h.hexdigest()
