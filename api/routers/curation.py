"""Duplicate groups and clusters, served from what `retrieval dedup` and `retrieval cluster` stored.

GET /duplicates and GET /clusters answer from the latest completed run; no run yet is a 404 that
says which command makes one. Pages are bounded; members come nearest-the-centroid first.
"""

from __future__ import annotations

from typing import Annotated

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

from retrieval.curation import queries
from retrieval.errors import RetrievalError

router = APIRouter(tags=["curation"], dependencies=Authorized)

ERRORS = {401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 503: {"model": ErrorOut}}
Page = Annotated[int, Query(ge=1, le=1_000_000, description="1-based page number.")]
PerPage = Annotated[int, Query(ge=1, le=500, description="Items per page.")]


def _public_params(params: dict) -> dict:
    """Run parameters without server paths (the reference folder is shown by its name only)."""
    out = dict(params)
    if out.get("against"):
        out["against"] = str(out["against"]).rstrip("/").rsplit("/", 1)[-1]
    return out


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
    found = queries.stored_groups(handle.store, mode, min_size, threshold, page, per_page)
    run, total, groups, members, live = found.run, found.total, found.groups, found.members, found.live
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
    run = queries.cluster_run(handle.store)
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
    run = queries.cluster_run(handle.store)
    if cluster >= run.k:
        raise RetrievalError("no such cluster in the latest clustering run", "not_found")
    rows = queries.cluster_members(handle.store, run, cluster, page, per_page)
    size = (run.sizes or [0] * run.k)[cluster]
    return ClusterOut(run_id=run.id, cluster=cluster, size=size, page=page, per_page=per_page,
                      members=[ClusterMemberOut(id=m.image_id, path=m.path, distance=round(m.distance, 6), rank=m.rank,
                                                thumbnail_url=f"/images/{m.image_id}/thumbnail") for m in rows])
