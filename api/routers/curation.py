"""Duplicate groups and clusters, served from what `retrieval dedup` and `retrieval cluster` stored.

GET /duplicates and GET /clusters answer from the latest completed run; no run yet is a 404 that
says which command makes one. Pages are bounded; members come nearest-the-centroid first.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from retrieval.api.deps import Authorized, ReaderDep
from retrieval.api.schemas import (
    ClusterMemberOut,
    ClusterOut,
    ClustersOut,
    ClusterSummaryOut,
    DuplicateGroupOut,
    DuplicateGroupsOut,
    ErrorOut,
    GroupMemberOut,
)
from sqlalchemy import func, select

from retrieval import runs
from retrieval.errors import RetrievalError
from retrieval.store import (
    ClusterAssignment,
    ClusterRun,
    DedupRun,
    DuplicateGroup,
    DuplicateMember,
    Image,
    chunked,
)

router = APIRouter(tags=["curation"], dependencies=Authorized)

ERRORS = {401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 503: {"model": ErrorOut}}
NO_DEDUP_RUN = "no dedup run yet: run `retrieval dedup` on this index"
NO_CLUSTER_RUN = "no clustering run yet: run `retrieval cluster` on this index"
Page = Annotated[int, Query(ge=1, le=1_000_000, description="1-based page number.")]
PerPage = Annotated[int, Query(ge=1, le=500, description="Items per page.")]


def _public_params(params: dict) -> dict:
    """Run parameters without server paths (the reference folder is shown by its name only)."""
    out = dict(params)
    if out.get("against"):
        out["against"] = str(out["against"]).rstrip("/").rsplit("/", 1)[-1]
    return out


def _latest_run(session, model: type, detail: str, *where: Any) -> Any:  # noqa: ANN001
    """The newest completed run of `model` (DedupRun, ClusterRun), or not_found naming the command."""
    run = runs.latest(session, model, *where)
    if run is None:
        raise RetrievalError(detail, "not_found")
    return run


@router.get("/duplicates", response_model=DuplicateGroupsOut, responses=ERRORS,
            summary="Duplicate groups of the latest `retrieval dedup` run, largest first")
def duplicate_groups(
    handle: ReaderDep,
    page: Page = 1,
    per_page: PerPage = 50,
    mode: Annotated[str, Query(pattern="^(self|relative)$", description="self (within the corpus) or relative (against a reference set).")] = "self",
    min_size: Annotated[int, Query(ge=2, le=1_000_000, description="Only groups with at least this many members.")] = 2,
    threshold: Annotated[float | None, Query(gt=0.0, le=1.0, description=(
        "Stricter view of the stored run: keep only members at least this similar to their group's "
        "representative, and groups where at least min_size members remain. Must be >= the run's threshold."))] = None,
) -> DuplicateGroupsOut:
    with handle.reader.store.session() as s:
        run = _latest_run(s, DedupRun, NO_DEDUP_RUN, DedupRun.mode == mode)
        run_threshold = float(run.params.get("threshold", 0.0))
        if threshold is not None and threshold < run_threshold:
            raise RetrievalError(f"the latest dedup run used threshold {run_threshold}; a lower threshold "
                                 f"needs a new run (`retrieval dedup -t {threshold}`)", "unprocessable")
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
    return DuplicateGroupsOut(
        run_id=run.id, mode=run.mode, params=_public_params(run.params), counts=run.counts, finished_at=run.finished_at,
        page=page, per_page=per_page, total_groups=total,
        groups=[DuplicateGroupOut(
            number=g.number, size=len(members[g.id]), representative_id=g.representative_id,
            reasons=[r for r in g.reasons.split(",") if r], weakest_edge=g.weakest_edge, min_pairwise=g.min_pairwise,
            touches_reference=g.touches_reference,
            members=[GroupMemberOut(
                image_id=m.image_id, path=m.path if not m.is_reference else m.path.rsplit("/", 1)[-1],
                is_reference=m.is_reference, action=m.action, similarity=m.similarity, reason=m.reason,
                thumbnail_url=f"/images/{m.image_id}/thumbnail" if m.image_id in live else None)
                for m in members[g.id]],
        ) for g in groups],
    )


@router.get("/clusters", response_model=ClustersOut, responses=ERRORS,
            summary="Clusters of the latest `retrieval cluster` run, largest first")
def clusters(handle: ReaderDep, page: Page = 1, per_page: PerPage = 100) -> ClustersOut:
    with handle.reader.store.session() as s:
        run = _latest_run(s, ClusterRun, NO_CLUSTER_RUN)
    sizes = list(enumerate(run.sizes or []))
    sizes.sort(key=lambda cs: (-cs[1], cs[0]))
    chunk = sizes[(page - 1) * per_page: page * per_page]
    return ClustersOut(run_id=run.id, k=run.k, n_images=run.n_images, finished_at=run.finished_at, page=page,
                       per_page=per_page,
                       clusters=[ClusterSummaryOut(cluster=c, size=n, url=f"/clusters/{c}") for c, n in chunk])


@router.get("/clusters/{cluster}", response_model=ClusterOut, responses=ERRORS,
            summary="Members of one cluster, nearest the centroid first")
def cluster_members(handle: ReaderDep, cluster: Annotated[int, Path(ge=0, le=10_000_000)],
                    page: Page = 1, per_page: PerPage = 100) -> ClusterOut:
    with handle.reader.store.session() as s:
        run = _latest_run(s, ClusterRun, NO_CLUSTER_RUN)
        if cluster >= run.k:
            raise RetrievalError("no such cluster in the latest clustering run", "not_found")
        rows = s.execute(
            select(ClusterAssignment, Image.path).join(Image, Image.id == ClusterAssignment.image_id)
            .where(ClusterAssignment.run_id == run.id, ClusterAssignment.cluster == cluster)
            .order_by(ClusterAssignment.rank).offset((page - 1) * per_page).limit(per_page)).all()
    size = (run.sizes or [0] * run.k)[cluster]
    return ClusterOut(run_id=run.id, cluster=cluster, size=size, page=page, per_page=per_page,
                      members=[ClusterMemberOut(id=a.image_id, path=path, distance=round(a.distance, 6), rank=a.rank,
                                                thumbnail_url=f"/images/{a.image_id}/thumbnail") for a, path in rows])
