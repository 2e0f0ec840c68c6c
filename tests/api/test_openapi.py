"""The OpenAPI schema says what the server does: auth on the docs, error shapes, 401s, zones, Allow."""

from __future__ import annotations

from datetime import datetime

import pytest
from fastapi.testclient import TestClient
from retrieval.api.app import create_app
from retrieval.api.settings import ApiSettings

from tests.api.conftest import Indexed

DOCS = ("/openapi.json", "/docs", "/redoc")


@pytest.fixture(scope="module")
def schema() -> dict:
    return create_app(ApiSettings(index_dir="unused")).openapi()


def _operations(schema: dict):  # noqa: ANN202
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            yield path, method, operation


def test_the_schema_and_docs_follow_the_api_key(indexed: Indexed) -> None:
    with TestClient(create_app(indexed.settings(api_key="s3cret-key"))) as c:
        for url in DOCS:
            r = c.get(url)
            assert (r.status_code, r.json()) == (401, {"detail": "missing or invalid API key"}), url
            assert c.get(url, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200, url
    with TestClient(create_app(indexed.settings())) as c:
        for url in DOCS:
            assert c.get(url).status_code == 200, url
        assert c.get("/openapi.json").json()["paths"]


def test_every_route_behind_the_key_documents_401(schema: dict) -> None:
    secured = [(p, m) for p, m, op in _operations(schema) if op.get("security")]
    assert len(secured) >= 10
    for path, method, operation in _operations(schema):
        if operation.get("security"):
            response = operation["responses"].get("401")
            assert response is not None, (method, path)
            assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorOut"}
            assert "WWW-Authenticate" in response["headers"]
    assert not schema["paths"]["/healthz"]["get"].get("security")


def test_every_422_is_documented_with_the_one_error_shape(schema: dict) -> None:
    documented = 0
    for path, method, operation in _operations(schema):
        response = operation["responses"].get("422")
        if response is not None:
            documented += 1
            assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorOut"}
    assert documented >= 10
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    error = schema["components"]["schemas"]["ErrorOut"]
    assert error["properties"]["detail"]["type"] == "string"


def test_timestamps_carry_a_timezone(client: TestClient, schema: dict) -> None:
    stats = schema["components"]["schemas"]["StatsOut"]["properties"]
    assert stats["loaded_at"]["format"] == "date-time"
    body = client.get("/stats").json()
    for field in ("loaded_at", "index_run_finished_at"):
        assert datetime.fromisoformat(body[field]).tzinfo is not None, body[field]


@pytest.mark.parametrize("method", ["OPTIONS", "PUT", "DELETE", "PATCH"])
def test_unsupported_methods_list_every_allowed_one(client: TestClient, method: str) -> None:
    r = client.request(method, "/search")
    assert r.status_code == 405
    allowed = {m.strip() for m in r.headers["allow"].split(",")}
    assert {"GET", "POST"} <= allowed and method not in allowed
    r = client.request(method, "/images/1")
    assert r.status_code == 405 and "GET" in r.headers["allow"] and "POST" not in r.headers["allow"]
