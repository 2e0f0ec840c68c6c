"""GET /healthz (liveness, never authenticated), /readyz (index and model loaded), /stats."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from retrieval.api.batcher import describe
from retrieval.api.deps import Authorized, ReaderDep, StateDep
from retrieval.api.schemas import ErrorOut, HealthOut, ReadyOut, StatsOut

from retrieval.curation import queries

router = APIRouter(tags=["operations"])


def public_model_name(model_ref: str) -> str:
    """A hub id as is; a local model folder by its name only (server paths never reach clients)."""
    if model_ref.startswith(("/", ".", "~")) or model_ref.count("/") > 1 or Path(model_ref).is_dir():
        return Path(model_ref).name
    return model_ref


@router.get("/healthz", response_model=HealthOut, summary="Liveness: the process answers")
async def healthz() -> HealthOut:
    return HealthOut()


@router.get("/readyz", response_model=ReadyOut, dependencies=Authorized,
            responses={401: {"model": ErrorOut}, 503: {"model": ReadyOut}},
            summary="Readiness: the index and the model are loaded")
async def readyz(request: Request) -> JSONResponse:
    state = getattr(request.app.state, "retrieval", None)
    index_loaded = state is not None and state.handle is not None
    model_loaded = state is not None and state.embedder is not None and not state.model_error
    ready = index_loaded and model_loaded
    detail = None if ready else (state.model_error if state is not None and state.model_error else "still loading")
    out = ReadyOut(ready=ready, index_loaded=index_loaded, model_loaded=model_loaded, detail=detail)
    return JSONResponse(out.model_dump(), status_code=200 if ready else 503)


@router.get("/stats", response_model=StatsOut, dependencies=Authorized,
            responses={401: {"model": ErrorOut}, 503: {"model": ErrorOut}}, summary="What the server is serving")
def stats(handle: ReaderDep, state: StateDep) -> StatsOut:
    index = handle.index
    spec = index.ann_spec
    # the run this handle serves (a newer one may have finished since)
    finished = queries.index_run_finished(handle.store, handle.run_id) if handle.run_id is not None else None
    return StatsOut(
        images=len(index),
        indexed_vectors=index.ann_count,
        dim=index.dim,
        model=public_model_name(str(index.model or "")),
        index_type=spec.kind if spec else None,
        index_factory=spec.factory if spec else None,
        nprobe=spec.params.get("nprobe") if spec else None,
        index_run_id=handle.run_id,
        index_run_finished_at=finished,
        loaded_at=datetime.fromtimestamp(handle.loaded_at, tz=timezone.utc),
        reloads=state.reloads,
        batching=describe(state.batcher),
    )
