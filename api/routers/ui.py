"""The web UI: server-rendered pages over the same library calls as the JSON API.

    /                     search (by upload, id or path; "more like this"); state in the URL
    /ui/duplicates        review a dedup run: keep/remove per image and per group
    /ui/clusters          clusters with mosaics; /ui/clusters/{c}: members nearest the centroid first
    /ui/curation          curation runs; /ui/curation/{id}: how each image got in
    /login, /logout       only when the server has an API key: the key becomes an HttpOnly cookie

Pages are rendered on the server (Jinja2) and paged in SQL, so the first render does not wait for
any script; api/web/static/app.js adds uploads, decisions and keyboard navigation on top.
"""

from __future__ import annotations

from pathlib import Path as FsPath
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.templating import Jinja2Templates
from retrieval.api import service
from retrieval.api.errors import SignInRequired, error_status, public_detail
from retrieval.api.deps import SESSION_COOKIE, ReaderDep, SettingsDep, StateDep, _bearer, key_matches, request_key
from retrieval.api.routers.review import group_out, run_out
from retrieval.api.schemas import HitOut
from retrieval.api.state import ReaderHandle
from starlette.concurrency import run_in_threadpool

from retrieval.curation import queries
from retrieval.errors import RetrievalError
from retrieval.search import MAX_K

WEB = FsPath(__file__).resolve().parent.parent / "web"
templates = Jinja2Templates(directory=str(WEB / "templates"))
UI_MAX_K = min(MAX_K, 500)


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


templates.env.filters["bytes"] = _fmt_bytes


def ui_login_required(request: Request, settings: SettingsDep,
                      credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    """Pages send a person without the key to the sign-in form instead of answering 401."""
    if settings.api_key is not None and not key_matches(settings, request_key(request, credentials)):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise SignInRequired("/login?" + urlencode({"next": target}))


router = APIRouter(include_in_schema=False)
pages = APIRouter(include_in_schema=False, dependencies=[Depends(ui_login_required)])


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    settings = request.app.state.settings
    return templates.TemplateResponse(request, name, {"auth": settings.api_key is not None, **context},
                                      status_code=status_code)


def _query(**values: Any) -> str:
    return urlencode({k: v for k, v in values.items() if v not in (None, "", False)})


# --- sign in -----------------------------------------------------------------------------------
def _safe_next(target: str | None) -> str:
    return target if target and target.startswith("/") and not target.startswith("//") else "/"


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str | None = None) -> HTMLResponse:  # noqa: A002 - the URL's name
    return render(request, "login.html", next=_safe_next(next), error=None)


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, settings: SettingsDep, key: Annotated[str, Form(max_length=4096)],
          next: Annotated[str, Form(max_length=4096)] = "/") -> Response:  # noqa: A002
    if settings.api_key is None or not key_matches(settings, key):
        return render(request, "login.html", status_code=401, next=_safe_next(next),
                      error=None if settings.api_key is None else "That is not the server's API key.")
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(SESSION_COOKIE, key, httponly=True, samesite="strict", secure=request.url.scheme == "https",
                        path="/")
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


# --- search ------------------------------------------------------------------------------------
K = Annotated[int, Query(ge=1, le=UI_MAX_K)]
MinScore = Annotated[float | None, Query(ge=-1.0, le=1.0)]


def _hits_view(handle: ReaderHandle, hits: list[HitOut]) -> list[dict[str, Any]]:
    facts = queries.image_facts(handle.store, [h.id for h in hits])
    return [{"hit": h, "size": getattr(facts.get(h.id), "size", None)} for h in hits]


def _search_stored(handle: ReaderHandle, image: str, k: int, min_score: float | None, threshold: float | None
                   ) -> tuple[Any, list[dict[str, Any]]]:
    row = service.resolve_ref(handle, image)
    hits = service.search_image(handle, row, service.fetch_depth(k, threshold is not None), None, True)
    return row, _hits_view(handle, service.finish(handle, hits, k, min_score, threshold))


@pages.get("/", response_class=HTMLResponse)
def search_page(request: Request, handle: ReaderDep, settings: SettingsDep,
                image: Annotated[str | None, Query(max_length=service.MAX_REF_CHARS)] = None,
                k: K = 24, min_score: MinScore = None, collapse: bool = False) -> HTMLResponse:
    threshold = settings.duplicate_threshold if collapse else None
    context: dict[str, Any] = {"image": image or "", "k": k, "min_score": min_score, "collapse": collapse,
                               "query": None, "results": None, "error": None, "sample": None,
                               "images": len(handle.index), "state_query": _query}
    code = 200
    if image:
        try:
            context["query"], context["results"] = _search_stored(handle, image.strip(), k, min_score, threshold)
        except RetrievalError as exc:
            context["error"], code = public_detail(exc), error_status(exc)
    else:
        context["sample"] = queries.sample_images(handle.store, 24)
    return render(request, "search.html", status_code=code, **context)


@pages.post("/ui/search", response_class=HTMLResponse)
async def search_upload_fragment(request: Request, handle: ReaderDep, state: StateDep, settings: SettingsDep,
                                 k: K = 24, min_score: MinScore = None, collapse: bool = False) -> HTMLResponse:
    """The result grid for an uploaded (dropped, pasted, chosen) image, as an HTML fragment."""
    data = await service.read_upload(request, settings.max_upload_bytes)
    vector = await service.embed_upload(state, handle, data)
    threshold = settings.duplicate_threshold if collapse else None

    def run() -> list[dict[str, Any]]:
        hits = service.search_vector(handle, vector, service.fetch_depth(k, collapse), None)
        return _hits_view(handle, service.finish(handle, hits, k, min_score, threshold))

    results = await run_in_threadpool(run)
    return render(request, "_results.html", results=results, k=k, min_score=min_score, collapse=collapse,
                  state_query=_query)


# --- duplicates --------------------------------------------------------------------------------
@pages.get("/ui/duplicates", response_class=HTMLResponse)
def review_page(request: Request, handle: ReaderDep,
                run: Annotated[int | None, Query(ge=1, le=2**62)] = None,
                sort: Literal["size", "weakest"] = "size",
                reason: Literal["exact", "phash", "pdq", "copy", "verified", "embedding", "reference", ""] = "",
                folder: Annotated[str, Query(max_length=1024)] = "",
                page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
                per_page: Annotated[int, Query(ge=1, le=200)] = 20) -> HTMLResponse:
    store = handle.store
    runs = queries.dedup_runs(store)
    if not runs and run is None:
        return render(request, "empty.html", title="Duplicates", what="dedup run", command="retrieval dedup")
    p = queries.review_page(store, run, sort, reason or None, folder or None, page, per_page)
    pages_total = max(1, -(-p.total_groups // per_page))
    state = {"run": p.run.id, "sort": sort, "reason": reason, "folder": folder, "per_page": per_page}
    return render(request, "review.html", runs=runs, run=run_out(p.run), groups=[group_out(g) for g in p.groups],
                  total=p.total_groups, page=page, pages=pages_total, state=state, state_query=_query,
                  folders=queries.folders(store, p.run.id))


# --- clusters ----------------------------------------------------------------------------------
@pages.get("/ui/clusters", response_class=HTMLResponse)
def clusters_page(request: Request, handle: ReaderDep, run: Annotated[int | None, Query(ge=1, le=2**62)] = None,
                  page: Annotated[int, Query(ge=1, le=1_000_000)] = 1) -> HTMLResponse:
    store = handle.store
    try:
        crun = queries.cluster_run(store, run)
    except queries.NotFound:
        if run is not None:
            raise
        return render(request, "empty.html", title="Clusters", what="clustering run", command="retrieval cluster")
    per_page = 24
    total, clusters = queries.cluster_page(store, crun, page, per_page)
    return render(request, "clusters.html", crun=crun, clusters=clusters, page=page,
                  pages=max(1, -(-total // per_page)), total=total, state_query=_query)


@pages.get("/ui/clusters/{cluster}", response_class=HTMLResponse)
def cluster_page(request: Request, handle: ReaderDep, cluster: Annotated[int, Path(ge=0, le=10_000_000)],
                 run: Annotated[int | None, Query(ge=1, le=2**62)] = None,
                 page: Annotated[int, Query(ge=1, le=1_000_000)] = 1) -> HTMLResponse:
    store = handle.store
    crun = queries.cluster_run(store, run)
    per_page = 60
    members = queries.cluster_members(store, crun, cluster, page, per_page)
    size = (crun.sizes or [0] * crun.k)[cluster]
    return render(request, "cluster.html", crun=crun, cluster=cluster, size=size, members=members, page=page,
                  pages=max(1, -(-size // per_page)), per_page=per_page, state_query=_query)


# --- curation runs -----------------------------------------------------------------------------
@pages.get("/ui/curation", response_class=HTMLResponse)
def curation_list(request: Request, handle: ReaderDep) -> HTMLResponse:
    runs = queries.curation_runs(handle.store)
    if not runs:
        return render(request, "empty.html", title="Curation", what="curation run",
                      command="retrieval curate --queries FOLDER")
    return render(request, "curation.html", runs=runs)


@pages.get("/ui/curation/{run_id}", response_class=HTMLResponse)
def curation_run(request: Request, handle: ReaderDep, run_id: Annotated[int, Path(ge=1, le=2**62)],
                 page: Annotated[int, Query(ge=1, le=1_000_000)] = 1) -> HTMLResponse:
    per_page = 60
    crun, total, items = queries.curation_items(handle.store, run_id, page, per_page)
    return render(request, "curation_run.html", crun=crun, total=total, items=items, page=page,
                  pages=max(1, -(-total // per_page)), state_query=_query)
