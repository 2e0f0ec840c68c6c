"""Review a dedup run: its groups with every member's facts, keep/remove decisions, CSV export.

Decisions are stored in the database (table review_decisions) and override the computed actions
in reports and in `retrieval dedup --apply --run ID`. Changing them needs write access
(`deps.require_write_access`): the API key when one is set, a loopback listener otherwise.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response
from retrieval.api.deps import Authorized, ReaderDep, StateDep, WriteAuthorized
from retrieval.api.routers.curation import _public_params as public_params
from retrieval.api.schemas import (
    DecisionsIn,
    DecisionsOut,
    DedupRunOut,
    ErrorOut,
    GroupDecisionIn,
    ReviewGroupOut,
    ReviewMemberOut,
    ReviewPageOut,
)
from starlette.concurrency import run_in_threadpool

from retrieval.curation import queries

router = APIRouter(tags=["review"], dependencies=Authorized)

ERRORS = {401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 503: {"model": ErrorOut}}
WRITE_ERRORS = {**ERRORS, 403: {"model": ErrorOut}, 422: {"model": ErrorOut}}
RunId = Annotated[int, Path(ge=1, le=2**62, description="Dedup run id (`retrieval dedup` prints it).")]
Page = Annotated[int, Query(ge=1, le=1_000_000, description="1-based page number.")]


def run_out(run: queries.DedupRunInfo) -> DedupRunOut:
    return DedupRunOut(id=run.id, mode=run.mode, params=public_params(run.params), counts=run.counts, finished_at=run.finished_at,
                       applied_at=run.applied_at, decisions=run.decisions, warnings=queries.run_warnings(run))


def member_out(m: queries.ReviewMember) -> ReviewMemberOut:
    live = m.in_index and m.image_id is not None
    return ReviewMemberOut(
        member_id=m.member_id, image_id=m.image_id, path=m.path, is_reference=m.is_reference, action=m.action,
        computed_action=m.computed_action, reviewed=m.decided, similarity=round(m.similarity, 6), reason=m.reason,
        width=m.width, height=m.height, size=m.size, format=m.format,
        thumbnail_url=f"/images/{m.image_id}/thumbnail" if live else None,
        file_url=f"/images/{m.image_id}/file" if live else None)


def group_out(g: queries.ReviewGroup) -> ReviewGroupOut:
    return ReviewGroupOut(number=g.number, size=g.size, representative_id=g.representative_id, reasons=g.reasons,
                          weakest_edge=round(g.weakest_edge, 6), min_pairwise=round(g.min_pairwise, 6),
                          touches_reference=g.touches_reference, all_removed=g.all_removed,
                          members=[member_out(m) for m in g.members])


@router.get("/review/runs", response_model=list[DedupRunOut], responses=ERRORS,
            summary="Completed dedup runs, newest first")
def review_runs(handle: ReaderDep) -> list[DedupRunOut]:
    return [run_out(r) for r in queries.dedup_runs(handle.store)]


@router.get("/review/runs/{run_id}/groups", response_model=ReviewPageOut, responses={**ERRORS, 422: {"model": ErrorOut}},
            summary="One page of a run's groups with sizes, formats and the reviewed actions")
def review_groups(
    handle: ReaderDep, run_id: RunId, page: Page = 1,
    per_page: Annotated[int, Query(ge=1, le=200)] = 20,
    sort: Annotated[Literal["size", "weakest"], Query(description="size: largest first; weakest: lowest joining similarity first.")] = "size",
    reason: Annotated[Literal["exact", "phash", "pdq", "copy", "verified", "embedding", "reference"] | None, Query(description="Only groups with a member joined by this stage.")] = None,
    folder: Annotated[str | None, Query(max_length=1024, description="Only groups with a member under this corpus folder.")] = None,
) -> ReviewPageOut:
    p = queries.review_page(handle.store, run_id, sort, reason, folder, page, per_page)
    return ReviewPageOut(run=run_out(p.run), page=p.page, per_page=p.per_page, total_groups=p.total_groups,
                         groups=[group_out(g) for g in p.groups])


@router.post("/review/runs/{run_id}/decisions", response_model=DecisionsOut, responses=WRITE_ERRORS,
             dependencies=WriteAuthorized, summary="Set keep/remove for members (null resets one)")
async def post_decisions(state: StateDep, run_id: RunId, body: DecisionsIn) -> DecisionsOut:
    store = state.writer_store()
    changed = await run_in_threadpool(queries.set_decisions, store, run_id, body.decisions)
    run = await run_in_threadpool(queries.dedup_run, store, run_id)
    return DecisionsOut(run_id=run_id, changed=changed, decisions=run.decisions)


@router.post("/review/runs/{run_id}/groups/{number}/decision", response_model=DecisionsOut, responses=WRITE_ERRORS,
             dependencies=WriteAuthorized, summary="Keep or remove a whole group, or reset it")
async def post_group_decision(state: StateDep, run_id: RunId, number: Annotated[int, Path(ge=1, le=2**62)],
                              body: GroupDecisionIn) -> DecisionsOut:
    store = state.writer_store()
    changed = await run_in_threadpool(queries.set_group_decision, store, run_id, number, body.action)
    run = await run_in_threadpool(queries.dedup_run, store, run_id)
    return DecisionsOut(run_id=run_id, changed=changed, decisions=run.decisions)


@router.get("/review/runs/{run_id}/decisions.csv", responses={**ERRORS, 200: {"content": {"text/csv": {}}}},
            response_class=Response, summary="The reviewed run as CSV (final and computed action per member)")
def decisions_csv(handle: ReaderDep, run_id: RunId) -> Response:
    text = queries.decisions_csv(handle.store, run_id)
    return Response(text, media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": f'attachment; filename="dedup-run-{run_id}-reviewed.csv"'})
