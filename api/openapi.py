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
FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ERROR_REF}}}


def conform(schema: dict[str, Any]) -> dict[str, Any]:
    """Every 422 is an ErrorOut; every operation that needs the API key documents its 401."""
    for path_item in schema.get("paths", {}).values():
        for operation in path_item.values():
            responses = operation.setdefault("responses", {})
            if "422" in responses:
                responses["422"] = error_response("The request is malformed, or its image cannot be used")
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
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - Swagger UI")

    @router.get("/redoc")
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

    app.include_router(router)
