"""The OpenAPI schema as the server really answers, and /openapi.json, /docs and /redoc behind the API key.

FastAPI documents request validation errors with its own list-shaped body, but this server answers
every error as `ErrorOut` (api.errors); and a route that follows the API key can answer 401. Both
are made true in the schema here, for every route at once. The schema and the pages that render it
follow the API key like every other route (the README says so): with a key, send the same header.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.params import Depends

ERROR_REF = {"$ref": "#/components/schemas/ErrorOut"}
# The docs pages load their bundles from this server (api.app.offline_docs). The bundles know a few
# outside addresses (ReDoc's logo on a CDN): the browser is told to fetch nothing but this server,
# so the pages never wait on, or leak to, the network.
DOCS_CSP = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' "
                                       "'unsafe-inline'; script-src 'self' 'unsafe-inline'; worker-src 'self' blob:; "
                                       "font-src 'self' data:; connect-src 'self'"}
FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ERROR_REF}}}


def conform(schema: dict[str, Any]) -> dict[str, Any]:
    """Every 422 is an ErrorOut; every operation that needs the API key documents its 401; every
    operation with a body documents the 400 and 413 that its parsing and the body limit answer."""
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            responses = operation.setdefault("responses", {})
            if "422" in responses:
                responses["422"] = error_response("The request is malformed, or its image cannot be used")
            if "requestBody" in operation:  # every body passes the size limit and the JSON/multipart parser
                responses.setdefault("400", error_response("The request body cannot be parsed"))
                responses.setdefault("413", error_response("The request body is larger than the upload limit"))
            if operation.get("security") and "401" not in responses:
                responses["401"] = error_response("Missing or invalid API key")
            if "401" in responses:
                responses["401"].setdefault("headers", {})["WWW-Authenticate"] = {
                    "description": "Bearer", "schema": {"type": "string"}}
    components = schema.get("components", {}).get("schemas", {})
    for name in FASTAPI_VALIDATION_SCHEMAS:
        components.pop(name, None)
    return schema


def install_openapi(app: FastAPI, dependencies: list[Depends]) -> None:
    """Serve the conformed schema and its two renderings; `app` must be built with openapi_url=None."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = conform(get_openapi(title=app.title, version=app.version,
                                                     description=app.description, routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    router = APIRouter(dependencies=dependencies, include_in_schema=False)

    @router.get("/openapi.json")
    def openapi_json() -> JSONResponse:
        return JSONResponse(openapi())

    @router.get("/docs")
    def swagger() -> HTMLResponse:
        page = get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} · API docs",
                                   swagger_js_url="/static/docs/swagger-ui-bundle.js",
                                   swagger_css_url="/static/docs/swagger-ui.css",
                                   swagger_favicon_url="/static/docs/favicon.png")
        page.headers.update(DOCS_CSP)
        return page

    @router.get("/redoc")
    def redoc() -> HTMLResponse:
        page = get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} · API reference",
                              redoc_js_url="/static/docs/redoc.standalone.js",
                              redoc_favicon_url="/static/docs/favicon.png", with_google_fonts=False)
        page.headers.update(DOCS_CSP)
        return page

    app.include_router(router)
