"""GET /search (by id or corpus path, stored vector) and POST /search (upload, embedded)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from retrieval.api import service
from retrieval.api.deps import Authorized, ReaderDep, SettingsDep, StateDep
from retrieval.api.schemas import ErrorOut, SearchOut
from retrieval.api.url_fetch import fetch_image_url, is_url
from starlette.concurrency import run_in_threadpool

from retrieval.errors import RetrievalError
from retrieval.search import MAX_K

router = APIRouter(tags=["search"], dependencies=Authorized)

K = Annotated[int, Query(ge=1, le=MAX_K, description="Number of results.")]
NProbe = Annotated[int | None, Query(ge=1, le=65536, description="IVF lists to visit (ignored by exact indexes); default: the tuned value.")]
MinScore = Annotated[float | None, Query(ge=-1.0, le=1.0, description="Drop results with a lower cosine.")]
Collapse = Annotated[bool, Query(description="Fold results that are near-duplicates of a better result into it.")]
CollapseAt = Annotated[float | None, Query(gt=0.0, le=1.0, description="Cosine for collapse_duplicates; default: the server's duplicate threshold.")]

ERRORS = {400: {"model": ErrorOut}, 401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 503: {"model": ErrorOut}}
UPLOAD_ERRORS = {400: {"model": ErrorOut}, 401: {"model": ErrorOut}, 413: {"model": ErrorOut},
                 415: {"model": ErrorOut}, 503: {"model": ErrorOut}}
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "The query image: multipart/form-data with a `file` field, or the raw image bytes.",
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                               "properties": {"file": {"type": "string", "format": "binary"}}}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.get("/search", response_model=SearchOut, responses={**ERRORS, 413: {"model": ErrorOut},
                                                           415: {"model": ErrorOut}, 504: {"model": ErrorOut}},
            summary="Nearest neighbours of an indexed image (by id or corpus path) or of an image URL")
async def search_indexed(
    handle: ReaderDep,
    state: StateDep,
    settings: SettingsDep,
    image: Annotated[str, Query(min_length=1, max_length=service.MAX_REF_CHARS,
                                description="An image id, a path relative to the corpus root, or (only when "
                                            "the server runs with --allow-url-queries) an http(s) URL.",
                                examples=["42", "holiday/beach.jpg"])],
    k: K = 10,
    nprobe: NProbe = None,
    exclude_self: Annotated[bool, Query(description="Leave the query image out of its results.")] = True,
    min_score: MinScore = None,
    collapse_duplicates: Collapse = False,
    collapse_threshold: CollapseAt = None,
) -> SearchOut:
    threshold = (collapse_threshold or settings.duplicate_threshold) if collapse_duplicates else None
    if is_url(image):
        if not settings.allow_url_queries:
            raise RetrievalError("URL queries are disabled; start the server with --allow-url-queries", "invalid")
        data = await run_in_threadpool(fetch_image_url, image, settings.max_upload_bytes, settings.url_timeout_s,
                                       settings.url_allow_private)
        vector = await service.embed_upload(state, handle, data)

        def run_url() -> SearchOut:
            hits = service.search_vector(handle, vector, service.fetch_depth(k, collapse_duplicates), nprobe)
            return SearchOut(query="url", answered_from="embedded URL", k=k,
                             results=service.finish(handle, hits, k, min_score, threshold))

        return await run_in_threadpool(run_url)

    def run() -> SearchOut:  # FAISS and SQLite run in a worker thread, never on the event loop
        row = service.resolve_ref(handle, image)
        hits = service.search_image(handle, row, service.fetch_depth(k, collapse_duplicates), nprobe, exclude_self)
        return SearchOut(query=f"id:{row.id}" if image.isdigit() else row.path, answered_from="stored vector", k=k,
                         results=service.finish(handle, hits, k, min_score, threshold))

    return await run_in_threadpool(run)


@router.post("/search", response_model=SearchOut, responses=UPLOAD_ERRORS, openapi_extra=UPLOAD_BODY,
             summary="Nearest neighbours of an uploaded image")
async def search_upload(
    request: Request,
    handle: ReaderDep,
    state: StateDep,
    settings: SettingsDep,
    k: K = 10,
    nprobe: NProbe = None,
    min_score: MinScore = None,
    collapse_duplicates: Collapse = False,
    collapse_threshold: CollapseAt = None,
) -> SearchOut:
    data = await service.read_upload(request, settings.max_upload_bytes)
    vector = await service.embed_upload(state, handle, data)
    threshold = (collapse_threshold or settings.duplicate_threshold) if collapse_duplicates else None

    def run() -> SearchOut:
        hits = service.search_vector(handle, vector, service.fetch_depth(k, collapse_duplicates), nprobe)
        return SearchOut(query="upload", answered_from="embedded upload", k=k,
                         results=service.finish(handle, hits, k, min_score, threshold))

    return await run_in_threadpool(run)
