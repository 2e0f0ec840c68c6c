"""The FastAPI application: `create_app(settings)` builds it; the lifespan loads the index and model once.

    uvicorn --factory retrieval.api.app:create_app      # or: retrieval serve
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

from fastapi import FastAPI, Request
from retrieval.api.deps import Authorized
from retrieval.api.errors import BodyLimitMiddleware, install_error_handlers
from retrieval.api.metrics import Metrics
from retrieval.api.metrics import router as metrics_router
from retrieval.api.openapi import install_openapi
from retrieval.api.routers import curation, health, images, review, search, ui
from retrieval.api.settings import ApiSettings
from retrieval.api.state import AppState
from starlette.concurrency import run_in_threadpool

logger = logging.getLogger("api")

DESCRIPTION = """Search an image index built by `retrieval index`: by image id, by corpus path, or by upload.

Scores are exact cosine similarities of DINOv2 embeddings. When the server runs with
`RETRIEVAL_API_KEY`, every endpoint but `/healthz` (this schema and `/docs` included) needs
`Authorization: Bearer <key>`.
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

    # /openapi.json, /docs and /redoc follow the API key (api.openapi); the docs pages load their
    # assets from this server (offline_docs), never from a CDN.
    app = FastAPI(title="retrieval", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                  openapi_url=None, docs_url=None, redoc_url=None)
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
    install_openapi(app, Authorized)
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
    """/static (the web UI's files) and /static/docs (Swagger UI, ReDoc, for the pages of api.openapi)."""
    from fastapi.staticfiles import StaticFiles

    app.mount("/static/docs", StaticFiles(directory=docs_assets()), name="docs-assets")
    app.mount("/static", StaticFiles(directory=Path(__file__).resolve().parent / "web" / "static"), name="static")
