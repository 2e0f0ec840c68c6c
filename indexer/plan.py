"""Stage 1b: compare a scan with the database and decide what this run has to do.

Unchanged means same size and mtime (as rsync decides); a changed file is re-read, and only
re-embedded when its bytes differ. Known failures are not retried until the file changes,
except unreadable ones (permissions get fixed without touching mtime) or with --retry-failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from sqlalchemy import select

from indexer.decode import WorkItem
from indexer.scan import ScanEntry
from retrieval.store import Failure, Image, Store

ALWAYS_RETRY = frozenset({"unreadable", "vanished", "io_error"})


@dataclass
class Plan:
    todo: list[WorkItem] = field(default_factory=list)
    unchanged: int = 0
    known_failures: int = 0
    removed_ids: list[int] = field(default_factory=list)
    removed_failure_paths: list[str] = field(default_factory=list)
    scanned: int = 0

    @property
    def new(self) -> int:
        return sum(1 for item in self.todo if item.image_id is None)

    @property
    def changed(self) -> int:
        return sum(1 for item in self.todo if item.image_id is not None)


def make_plan(store: Store, entries: Iterable[ScanEntry], retry_failed: bool = False) -> Plan:
    with store.session() as s:
        images = {
            path: (image_id, size, mtime, sha)
            for image_id, path, size, mtime, sha in s.execute(
                select(Image.id, Image.path, Image.size, Image.mtime_ns, Image.sha256)
            )
        }
        failures = {path: (size, mtime, kind) for path, size, mtime, kind in s.execute(
            select(Failure.path, Failure.size, Failure.mtime_ns, Failure.kind))}
    plan = Plan()
    seen: set[str] = set()
    for entry in entries:
        plan.scanned += 1
        seen.add(entry.path)
        known = images.get(entry.path)
        if known is not None:
            image_id, size, mtime, sha = known
            if size == entry.size and mtime == entry.mtime_ns:
                plan.unchanged += 1
            else:
                plan.todo.append(WorkItem(entry.path, entry.size, entry.mtime_ns, image_id, sha))
            continue
        failed = failures.get(entry.path)
        if (failed is not None and not retry_failed and failed[2] not in ALWAYS_RETRY
                and failed[0] == entry.size and failed[1] == entry.mtime_ns):
            plan.known_failures += 1
            continue
        plan.todo.append(WorkItem(entry.path, entry.size, entry.mtime_ns))
    plan.removed_ids = sorted(image_id for path, (image_id, *_rest) in images.items() if path not in seen)
    plan.removed_failure_paths = sorted(path for path in failures if path not in seen)
    return plan
