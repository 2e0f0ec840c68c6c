"""Stage 1b: compare a scan with the database and decide what this run has to do.

Unchanged means same size and mtime (as rsync decides), and for objects of a remote source the
same ETag; shard members carry their shard's tag (see retrieval.sources.shards). A changed file is re-read, and only
re-embedded when its bytes differ. Known failures are not retried until the file changes,
except unreadable ones (permissions get fixed without touching mtime) or with --retry-failed.
A file whose last decoding crashed is retried only in isolation (see retrieval.imaging.loader).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from sqlalchemy import select

from retrieval.imaging.decode import TIMEOUT_KIND, WorkItem
from retrieval.imaging.safe import CRASH_KIND
from retrieval.imaging.scan import ScanEntry, text_path
from retrieval.store import COPY_NONE, Failure, Image, Store, chunked

ALWAYS_RETRY = frozenset({"unreadable", "vanished", "io_error"})


@dataclass
class Plan:
    todo: list[WorkItem] = field(default_factory=list)
    unchanged: int = 0
    known_failures: int = 0
    removed_ids: list[int] = field(default_factory=list)
    removed_failure_paths: list[str] = field(default_factory=list)
    scanned: int = 0
    crashed: set[str] = field(default_factory=set)  # todo paths whose last decoding crashed: decode in isolation

    @property
    def new(self) -> int:
        return sum(1 for item in self.todo if item.image_id is None)

    @property
    def changed(self) -> int:
        return sum(1 for item in self.todo if item.image_id is not None)


def make_plan(store: Store, entries: Iterable[ScanEntry], retry_failed: bool = False) -> Plan:
    with store.session() as s:
        images = {
            path: (image_id, size, mtime, etag)
            for image_id, path, size, mtime, etag in s.execute(
                select(Image.id, Image.path, Image.size, Image.mtime_ns, Image.etag))
        }
        failures = {path: (size, mtime, kind, etag) for path, size, mtime, kind, etag in s.execute(
            select(Failure.path, Failure.size, Failure.mtime_ns, Failure.kind, Failure.etag))}
    plan = Plan()
    seen: set[str] = set()
    changed: list[WorkItem] = []
    for entry in entries:
        plan.scanned += 1
        seen.add(text_path(entry.path))
        known = images.get(entry.path)
        if known is not None:
            image_id, size, mtime, etag = known
            if size == entry.size and mtime == entry.mtime_ns and etag == entry.etag:
                plan.unchanged += 1
            else:
                changed.append(WorkItem(entry.path, entry.size, entry.mtime_ns, image_id, etag=entry.etag,
                                        meta=entry.meta))
            continue
        failed = failures.get(text_path(entry.path))
        if (failed is not None and not retry_failed and failed[2] not in ALWAYS_RETRY
                and failed[0] == entry.size and failed[1] == entry.mtime_ns and failed[3] == entry.etag):
            plan.known_failures += 1
            continue
        if failed is not None and failed[2] in (CRASH_KIND, TIMEOUT_KIND):
            plan.crashed.add(entry.path)
        plan.todo.append(WorkItem(entry.path, entry.size, entry.mtime_ns, etag=entry.etag, meta=entry.meta))
    plan.todo.extend(_with_known_hashes(store, changed))
    plan.removed_ids = sorted(known[0] for path, known in images.items() if path not in seen)
    plan.removed_failure_paths = sorted(path for path in failures if path not in seen)
    return plan


def _with_known_hashes(store: Store, items: list[WorkItem]) -> list[WorkItem]:
    """Attach the stored sha256 to changed files (only those: the corpus-wide map would cost RAM)."""
    out: list[WorkItem] = []
    with store.session() as s:
        for part in chunked(items):
            known = dict(s.execute(select(Image.id, Image.sha256).where(Image.id.in_([i.image_id for i in part]))).all())
            out.extend(WorkItem(i.path, i.size, i.mtime_ns, i.image_id, known.get(i.image_id), i.etag, i.meta)
                       for i in part)
    return out


def images_without_copy(store: Store) -> list[WorkItem]:
    """Indexed images with no copy vector yet (an index built before its copy model was added)."""
    with store.session() as s:
        rows = s.execute(select(Image.id, Image.path, Image.size, Image.mtime_ns)
                         .where(Image.copy_state == COPY_NONE).order_by(Image.id)).all()
    return [WorkItem(path=p, size=size, mtime_ns=mtime, image_id=i) for i, p, size, mtime in rows]
