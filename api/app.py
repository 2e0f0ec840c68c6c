"""The FastAPI application: `create_app(settings)` builds it; the lifespan loads the index and model once.

    uvicorn --factory retrieval.api.app:create_app      # or: retrieval serve
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from retrieval.api.errors import BodyLimitMiddleware, install_error_handlers
from retrieval.api.metrics import Metrics
from retrieval.api.metrics import router as metrics_router
from retrieval.api.routers import curation, health, images, review, search, ui
from retrieval.api.settings import ApiSettings
from retrieval.api.state import AppState
from starlette.concurrency import run_in_threadpool

logger = logging.getLogger("api")

DESCRIPTION = """Search an image index built by `retrieval index`: by image id, by corpus path, or by upload.

Scores are exact cosine similarities of DINOv2 embeddings. When the server runs with
`RETRIEVAL_API_KEY`, every endpoint but `/healthz` needs `Authorization: Bearer <key>`.
"""


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings if settings is not None else ApiSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = AppState(settings)
        await run_in_threadpool(state.load)  # the index (memory-mapped where possible) and the model
        state.decoder.start()  # upload decoding processes (api.decoding)
        await state.batcher.start()
        app.state.retrieval = state
        logger.info("serving %s", settings.index_dir)
        try:
            yield
        finally:
            app.state.retrieval = None
            await state.batcher.stop()
            state.close()

    # /docs and /redoc are served from assets installed with the package (no CDN): see offline_docs.
    app = FastAPI(title="retrieval", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.retrieval = None
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(search.router)
    app.include_router(images.router)
    app.include_router(curation.router)
    app.include_router(review.router)
    app.include_router(ui.router)
    app.include_router(ui.pages)
    offline_docs(app)
    app.include_router(metrics_router)
    app.state.metrics = Metrics(lambda: app.state.retrieval)

    @app.middleware("http")
    async def log_requests(request: Request, call_next):  # noqa: ANN001, ANN202
        start = time.perf_counter()
        response = await call_next(request)
        elapsed_ms = (time.perf_counter() - start) * 1000
        app.state.metrics.observe(request, response.status_code, elapsed_ms / 1000)
        response.headers["Server-Timing"] = f"total;dur={elapsed_ms:.1f}"
        logger.info("%s %s -> %d in %.1f ms", request.method, request.url.path, response.status_code, elapsed_ms)
        return response

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


def docs_assets() -> Path:
    """Swagger UI and ReDoc as installed by the fastapi-offline package (maintained, vendored bundles)."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).resolve().parent / "static"


def offline_docs(app: FastAPI) -> None:
    """/static (the web UI's files), /static/docs (Swagger UI, ReDoc), /docs and /redoc, all local."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    app.mount("/static/docs", StaticFiles(directory=docs_assets()), name="docs-assets")
    app.mount("/static", StaticFiles(directory=Path(__file__).resolve().parent / "web" / "static"), name="static")

    # The bundles know a few outside addresses (ReDoc's logo on a CDN): the browser is told to fetch
    # nothing but this server, so the pages never wait on, or leak to, the network.
    csp = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' "
                                      "'unsafe-inline'; script-src 'self' 'unsafe-inline'; worker-src 'self' blob:; "
                                      "font-src 'self' data:; connect-src 'self'"}

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        page = get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} · API docs",
                                   swagger_js_url="/static/docs/swagger-ui-bundle.js",
                                   swagger_css_url="/static/docs/swagger-ui.css",
                                   swagger_favicon_url="/static/docs/favicon.png")
        return with_headers(page, csp)

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        page = get_redoc_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} · API reference",
                              redoc_js_url="/static/docs/redoc.standalone.js",
                              redoc_favicon_url="/static/docs/favicon.png", with_google_fonts=False)
        return with_headers(page, csp)


def with_headers(response: Any, headers: dict[str, str]) -> Any:
    response.headers.update(headers)
    return response
