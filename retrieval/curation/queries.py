"""The reads and writes the web UI and the JSON routes need: runs, review pages, decisions, clusters.

Routes call these functions and turn the plain dataclasses they return into response schemas; no
SQL lives in a route. Every list is paged in SQL so a page costs the same on 100 or 10^6 images.
A review decision overrides the computed action of a dedup member everywhere the run is shown,
exported or applied (`effective_action`).
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Literal

from sqlalchemy import and_, case, delete, func, select

from retrieval import runs
from retrieval.errors import RetrievalError
from retrieval.store import (
    ClusterAssignment,
    ClusterRun,
    CurationItem,
    CurationRun,
    DedupRun,
    DuplicateGroup,
    DuplicateMember,
    Image,
    IndexRun,
    ReviewDecision,
    Store,
    chunked,
    utcnow,
)

logger = logging.getLogger(__name__)

Action = Literal["keep", "remove"]
GroupSort = Literal["size", "weakest"]
REASONS = ("exact", "phash", "pdq", "copy", "verified", "embedding", "reference")
# A group this large is rarely a set of copies: usually a chain of near-neighbours joined edge by edge.
GIANT_GROUP = 50


class NotFound(RetrievalError):
    """The run, group, cluster or member asked for does not exist."""

    kind = "not_found"


class InvalidRequest(RetrievalError):
    """A decision that cannot be stored (unknown member, a reference file, a bad action)."""

    kind = "unprocessable"


# --- runs --------------------------------------------------------------------------------------
@dataclass
class DedupRunInfo:
    id: int
    mode: str
    status: str
    params: dict[str, Any]
    counts: dict[str, Any]
    finished_at: datetime | None
    applied_at: datetime | None
    decisions: int = 0


def _run_info(run: DedupRun, decisions: int = 0) -> DedupRunInfo:
    return DedupRunInfo(run.id, run.mode, run.status, dict(run.params or {}), dict(run.counts or {}),
                        run.finished_at, run.applied_at, decisions)


def dedup_runs(store: Store, limit: int = 100) -> list[DedupRunInfo]:
    """Completed dedup runs, newest first, with how many review decisions each holds."""
    with store.session() as s:
        n = (select(ReviewDecision.run_id, func.count().label("n")).group_by(ReviewDecision.run_id).subquery())
        rows = s.execute(select(DedupRun, n.c.n).outerjoin(n, n.c.run_id == DedupRun.id)
                         .where(DedupRun.status == runs.COMPLETED).order_by(DedupRun.id.desc()).limit(limit)).all()
    return [_run_info(run, count or 0) for run, count in rows]


def dedup_run(store: Store, run_id: int | None = None, mode: str | None = None) -> DedupRunInfo:
    """One completed run (the latest, optionally of one mode, when `run_id` is None)."""
    with store.session() as s:
        if run_id is None:
            run = runs.latest(s, DedupRun, *([DedupRun.mode == mode] if mode is not None else []))
            if run is None:
                raise NotFound("no dedup run yet: run `retrieval dedup` on this index")
        else:
            run = runs.completed(s, DedupRun, run_id)
            if run is None:
                raise NotFound(f"no completed dedup run with id {run_id} in this index")
        decisions = s.scalar(select(func.count()).select_from(ReviewDecision)
                             .where(ReviewDecision.run_id == run.id)) or 0
    return _run_info(run, decisions)


def run_warnings(run: DedupRunInfo) -> list[str]:
    """What a reviewer should know before trusting a run: giant or chained groups, mass removal."""
    c = run.counts
    out: list[str] = []
    images, remove = c.get("images") or 0, c.get("images_to_remove") or 0
    if images and remove > images / 2:
        out.append(f"{remove} of {images} images ({remove / images:.0%}) are marked for removal: most of the "
                   f"corpus. The threshold ({run.params.get('threshold')}) may be too loose for this model; "
                   f"`retrieval calibrate` suggests one.")
    largest = c.get("largest_group") or 0
    if largest >= GIANT_GROUP:
        out.append(f"the largest group holds {largest} images: groups this big are usually chains of "
                   f"near-neighbours rather than copies (try --max-group-diameter or a higher threshold).")
    chained = c.get("chained_groups") or 0
    if chained:
        out.append(f"{chained} groups are chained: some of their members are less similar to each other than "
                   f"the threshold (sort by weakest similarity to review them first).")
    failed = c.get("reference_failed") or 0
    if failed:
        out.append(f"{failed} reference files could not be read; groups they would have joined are missing.")
    return out


# --- review pages ------------------------------------------------------------------------------
@dataclass
class ReviewMember:
    member_id: int
    image_id: int | None
    path: str
    is_reference: bool
    computed_action: str
    action: str  # the decision when there is one, else the computed action
    decided: bool
    similarity: float
    reason: str
    width: int | None = None
    height: int | None = None
    size: int | None = None
    format: str | None = None
    in_index: bool = False


@dataclass
class ReviewGroup:
    number: int
    size: int
    representative_id: int | None
    reasons: list[str]
    weakest_edge: float
    min_pairwise: float
    touches_reference: bool
    members: list[ReviewMember] = field(default_factory=list)

    @property
    def all_removed(self) -> bool:
        return all(m.action == "remove" for m in self.members if not m.is_reference)


@dataclass
class ReviewPage:
    run: DedupRunInfo
    page: int
    per_page: int
    total_groups: int
    groups: list[ReviewGroup]


def _like_prefix(folder: str) -> str:
    escaped = folder.strip("/").replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"{escaped}/%"


def _group_filter(run_id: int, reason: str | None, folder: str | None) -> list[Any]:
    where: list[Any] = [DuplicateGroup.run_id == run_id]
    if reason:
        if reason not in REASONS:
            raise InvalidRequest(f"unknown reason {reason!r}; one of {', '.join(REASONS)}")
        where.append(DuplicateGroup.id.in_(select(DuplicateMember.group_id).where(
            DuplicateMember.run_id == run_id, DuplicateMember.reason == reason)))
    if folder and folder.strip("/"):
        where.append(DuplicateGroup.id.in_(select(DuplicateMember.group_id).where(
            DuplicateMember.run_id == run_id, DuplicateMember.path.like(_like_prefix(folder), escape="\\"))))
    return where


def review_page(store: Store, run_id: int | None = None, sort: GroupSort = "size", reason: str | None = None,
                folder: str | None = None, page: int = 1, per_page: int = 20, mode: str | None = None,
                group: int | None = None) -> ReviewPage:
    """One page of a run's groups with every member's facts and its effective action."""
    run = dedup_run(store, run_id, mode)
    where = _group_filter(run.id, reason, folder)
    if group is not None:
        where.append(DuplicateGroup.number == group)
    order = ((DuplicateGroup.size.desc(), DuplicateGroup.number) if sort == "size"
             else (DuplicateGroup.weakest_edge.asc(), DuplicateGroup.number))
    with store.session() as s:
        total = s.scalar(select(func.count(DuplicateGroup.id)).where(*where)) or 0
        rows = list(s.scalars(select(DuplicateGroup).where(*where).order_by(*order)
                              .offset((page - 1) * per_page).limit(per_page)))
        groups = {g.id: ReviewGroup(g.number, g.size, g.representative_id, [r for r in g.reasons.split(",") if r],
                                    g.weakest_edge, g.min_pairwise, g.touches_reference) for g in rows}
        if groups:
            q = (select(DuplicateMember, ReviewDecision.action, Image)
                 .outerjoin(ReviewDecision, ReviewDecision.member_id == DuplicateMember.id)
                 .outerjoin(Image, and_(Image.id == DuplicateMember.image_id, DuplicateMember.is_reference.is_(False)))
                 .where(DuplicateMember.group_id.in_(list(groups)))
                 .order_by(DuplicateMember.group_id, DuplicateMember.id))
            for m, decided, img in s.execute(q):
                groups[m.group_id].members.append(ReviewMember(
                    member_id=m.id, image_id=m.image_id,
                    path=m.path if not m.is_reference else m.path.rsplit("/", 1)[-1],
                    is_reference=m.is_reference, computed_action=m.action, action=decided or m.action,
                    decided=decided is not None, similarity=m.similarity, reason=m.reason,
                    width=img.width if img else None, height=img.height if img else None,
                    size=img.size if img else None, format=img.format if img else None, in_index=img is not None))
    return ReviewPage(run, page, per_page, total, [groups[g.id] for g in rows])


def folders(store: Store, run_id: int, limit: int = 200) -> list[tuple[str, int]]:
    """Top-level folders of a run's members with how many members each holds (for the folder filter)."""
    position = func.strpos if store.engine.dialect.name == "postgresql" else func.instr  # SQLite has no strpos
    slash = position(DuplicateMember.path, "/")
    top = case((slash > 0, func.substr(DuplicateMember.path, 1, slash - 1)), else_="")
    with store.session() as s:
        rows = s.execute(select(top.label("f"), func.count()).where(
            DuplicateMember.run_id == run_id, DuplicateMember.is_reference.is_(False))
            .group_by("f").order_by(func.count().desc(), "f").limit(limit)).all()
    return [(f, n) for f, n in rows if f]


# --- decisions ---------------------------------------------------------------------------------
def set_decisions(store: Store, run_id: int, decisions: dict[int, str | None]) -> int:
    """Store keep/remove per member id (None: back to the computed action). Returns how many changed."""
    for member_id, action in decisions.items():
        if action not in ("keep", "remove", None):
            raise InvalidRequest(f"action must be keep or remove, got {action!r} for member {member_id}")
    dedup_run(store, run_id)
    with store.session() as s, s.begin():
        found: dict[int, DuplicateMember] = {}
        for part in chunked(decisions):
            found.update({m.id: m for m in s.scalars(select(DuplicateMember).where(
                DuplicateMember.id.in_(part), DuplicateMember.run_id == run_id))})
        missing = [i for i in decisions if i not in found]
        if missing:
            raise InvalidRequest(f"member {missing[0]} is not part of dedup run {run_id}")
        refs = [i for i, m in found.items() if m.is_reference]
        if refs:
            raise InvalidRequest(f"member {refs[0]} is a reference file: it is not part of the corpus")
        for part in chunked(decisions):
            s.execute(delete(ReviewDecision).where(ReviewDecision.member_id.in_(part)))
        now = utcnow()
        # A decision equal to the computed action is no decision: reset rather than store it.
        s.add_all([ReviewDecision(member_id=i, run_id=run_id, action=a, decided_at=now)
                   for i, a in decisions.items() if a is not None and a != found[i].action])
    return len(decisions)


def set_group_decision(store: Store, run_id: int, number: int, action: Literal["keep", "remove", "reset"]) -> int:
    """Keep every member, remove every member, or reset the whole group to the computed actions."""
    if action not in ("keep", "remove", "reset"):
        raise InvalidRequest(f"group action must be keep, remove or reset, got {action!r}")
    with store.session() as s:
        ids = list(s.scalars(select(DuplicateMember.id).join(DuplicateGroup, DuplicateGroup.id == DuplicateMember.group_id)
                             .where(DuplicateGroup.run_id == run_id, DuplicateGroup.number == number,
                                    DuplicateMember.is_reference.is_(False))))
    if not ids:
        raise NotFound(f"dedup run {run_id} has no group {number}")
    return set_decisions(store, run_id, {i: None if action == "reset" else action for i in ids})


def clear_decisions(store: Store, run_id: int) -> int:
    with store.session() as s, s.begin():
        return s.execute(delete(ReviewDecision).where(ReviewDecision.run_id == run_id)).rowcount or 0


def effective_members(store: Store, run_id: int) -> Iterable[tuple[int, int | None, str, bool, str, str, float, str, bool]]:
    """(group number, image id, path, is_reference, action, computed action, similarity, reason, decided) of
    every member, decisions applied, in group order."""
    with store.session() as s:
        q = (select(DuplicateGroup.number, DuplicateMember.image_id, DuplicateMember.path,
                    DuplicateMember.is_reference, func.coalesce(ReviewDecision.action, DuplicateMember.action),
                    DuplicateMember.action, DuplicateMember.similarity, DuplicateMember.reason,
                    ReviewDecision.action.is_not(None))
             .join(DuplicateGroup, DuplicateGroup.id == DuplicateMember.group_id)
             .outerjoin(ReviewDecision, ReviewDecision.member_id == DuplicateMember.id)
             .where(DuplicateMember.run_id == run_id).order_by(DuplicateGroup.number, DuplicateMember.id))
        yield from (tuple(r) for r in s.execute(q).yield_per(10_000))


def decisions_csv(store: Store, run_id: int) -> str:
    """The reviewed run as CSV: one row per member with its final and its computed action."""
    dedup_run(store, run_id)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["group", "path", "action", "computed_action", "reviewed", "similarity", "reason", "image_id",
                "reference"])
    for number, image_id, path, ref, action, computed, sim, reason, decided in effective_members(store, run_id):
        w.writerow([number, path, action, computed, int(bool(decided)), f"{sim:.6f}", reason,
                    "" if image_id is None else image_id, int(bool(ref))])
    return buf.getvalue()


# --- clusters ----------------------------------------------------------------------------------
@dataclass
class ClusterSummary:
    cluster: int
    size: int
    preview: list[tuple[int, str]]  # (image id, path) of the members nearest the centroid


@dataclass
class ClusterMember:
    image_id: int
    path: str
    distance: float
    rank: int


def cluster_run(store: Store, run_id: int | None = None) -> ClusterRun:
    with store.session() as s:
        run = runs.latest(s, ClusterRun) if run_id is None else runs.completed(s, ClusterRun, run_id)
    if run is None:
        raise NotFound("no clustering run yet: run `retrieval cluster` on this index" if run_id is None
                       else f"no completed clustering run with id {run_id}")
    return run


def cluster_page(store: Store, run: ClusterRun, page: int = 1, per_page: int = 24, preview: int = 4
                 ) -> tuple[int, list[ClusterSummary]]:
    """(number of clusters, one page of clusters largest first, each with its nearest members)."""
    sizes = sorted(enumerate(run.sizes or []), key=lambda cs: (-cs[1], cs[0]))
    chunk = sizes[(page - 1) * per_page: page * per_page]
    out = {c: ClusterSummary(c, n, []) for c, n in chunk}
    if out and preview:
        with store.session() as s:
            rows = s.execute(select(ClusterAssignment.cluster, ClusterAssignment.image_id, Image.path)
                             .join(Image, Image.id == ClusterAssignment.image_id)
                             .where(ClusterAssignment.run_id == run.id, ClusterAssignment.cluster.in_(list(out)),
                                    ClusterAssignment.rank < preview)
                             .order_by(ClusterAssignment.cluster, ClusterAssignment.rank)).all()
        for c, image_id, path in rows:
            out[c].preview.append((image_id, path))
    return len(sizes), [out[c] for c, _ in chunk]


def cluster_members(store: Store, run: ClusterRun, cluster: int, page: int = 1, per_page: int = 100
                    ) -> list[ClusterMember]:
    """Members of one cluster still in the index, nearest the centroid first."""
    if not 0 <= cluster < run.k:
        raise NotFound(f"no cluster {cluster} in clustering run {run.id}")
    with store.session() as s:
        rows = s.execute(
            select(ClusterAssignment.image_id, Image.path, ClusterAssignment.distance, ClusterAssignment.rank)
            .join(Image, Image.id == ClusterAssignment.image_id)
            .where(ClusterAssignment.run_id == run.id, ClusterAssignment.cluster == cluster)
            .order_by(ClusterAssignment.rank).offset((page - 1) * per_page).limit(per_page)).all()
    return [ClusterMember(i, p, d, r) for i, p, d, r in rows]


# --- curation runs -----------------------------------------------------------------------------
def index_run_finished(store: Store, run_id: int) -> datetime | None:
    """When completed index run `run_id` finished (None when it is not a completed run)."""
    with store.session() as s:
        run = runs.completed(s, IndexRun, run_id)
        return run.finished_at if run is not None else None


def curation_runs(store: Store, limit: int = 100) -> list[CurationRun]:
    with store.session() as s:
        return list(s.scalars(select(CurationRun).where(CurationRun.status == runs.COMPLETED)
                              .order_by(CurationRun.id.desc()).limit(limit)))


def curation_items(store: Store, run_id: int, page: int = 1, per_page: int = 100
                   ) -> tuple[CurationRun, int, list[CurationItem]]:
    """A curation run, its number of items, and one page of them (best score first)."""
    with store.session() as s:
        run = runs.completed(s, CurationRun, run_id)
        if run is None:
            raise NotFound(f"no completed curation run with id {run_id}")
        total = s.scalar(select(func.count()).select_from(CurationItem).where(CurationItem.run_id == run_id)) or 0
        items = list(s.scalars(select(CurationItem).where(CurationItem.run_id == run_id)
                               .order_by(CurationItem.score.desc().nulls_last(), CurationItem.image_id)
                               .offset((page - 1) * per_page).limit(per_page)))
    return run, total, items


# --- images ------------------------------------------------------------------------------------
def image_facts(store: Store, ids: Iterable[int]) -> dict[int, Image]:
    """Image rows by id (for sizes and formats next to search results)."""
    with store.session() as s:
        return {r.id: r for part in chunked(ids) for r in s.scalars(select(Image).where(Image.id.in_(part)))}


def sample_images(store: Store, n: int = 24) -> list[Image]:
    """A few images spread over the whole index (a starting point for "more like this")."""
    with store.session() as s:
        lo, hi, count = s.execute(select(func.min(Image.id), func.max(Image.id), func.count(Image.id))).one()
        if not count:
            return []
        step = max(1, (hi - lo + 1) // n)
        # Evenly spaced ids by index seek: cheap on any size (no ORDER BY RANDOM() over every row).
        rows: list[Image] = []
        for start in range(lo, hi + 1, step):
            row = s.scalar(select(Image).where(Image.id >= start).order_by(Image.id).limit(1))
            if row is not None and (not rows or row.id != rows[-1].id):
                rows.append(row)
            if len(rows) == n:
                break
    return rows


# --- the JSON API's GET /duplicates (a stricter view of the stored run) --------------------------
@dataclass
class StoredGroups:
    run: DedupRun
    total: int
    groups: list[DuplicateGroup]
    members: dict[int, list[DuplicateMember]]  # group row id -> members at or above the cut
    live: set[int]  # image ids still in the index


def stored_groups(store: Store, mode: str, min_size: int, threshold: float | None, page: int, per_page: int
                  ) -> StoredGroups:
    """Groups of the latest completed run of `mode`, keeping members at least `threshold` similar to
    their representative and groups where at least `min_size` members remain."""
    with store.session() as s:
        run = runs.latest(s, DedupRun, DedupRun.mode == mode)
        if run is None:
            raise NotFound("no dedup run yet: run `retrieval dedup` on this index")
        run_threshold = float(run.params.get("threshold", 0.0))
        if threshold is not None and threshold < run_threshold:
            raise InvalidRequest(f"the latest dedup run used threshold {run_threshold}; a lower threshold "
                                 f"needs a new run (`retrieval dedup -t {threshold}`)")
        cut = threshold if threshold is not None else -1.0
        passing = (select(DuplicateMember.group_id)
                   .where(DuplicateMember.run_id == run.id, DuplicateMember.similarity >= cut)
                   .group_by(DuplicateMember.group_id).having(func.count() >= min_size))
        where = (DuplicateGroup.run_id == run.id, DuplicateGroup.id.in_(passing))
        total = s.scalar(select(func.count(DuplicateGroup.id)).where(*where)) or 0
        groups = list(s.scalars(select(DuplicateGroup).where(*where).order_by(DuplicateGroup.number)
                                .offset((page - 1) * per_page).limit(per_page)))
        members: dict[int, list[DuplicateMember]] = {g.id: [] for g in groups}
        if groups:
            for m in s.scalars(select(DuplicateMember).where(DuplicateMember.group_id.in_(list(members)),
                                                             DuplicateMember.similarity >= cut)
                               .order_by(DuplicateMember.group_id, DuplicateMember.similarity.desc())):
                members[m.group_id].append(m)
        live = {i for part in chunked(m.image_id for ms in members.values() for m in ms if m.image_id is not None)
                for i in s.scalars(select(Image.id).where(Image.id.in_(part)))}
    return StoredGroups(run, total, groups, members, live)
