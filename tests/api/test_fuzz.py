"""Property-based fuzzing of every operation in the OpenAPI schema (schemathesis): never a 5xx."""

from __future__ import annotations

from typing import Iterator

import pytest
from fastapi.testclient import TestClient

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from retrieval.api.app import create_app  # noqa: E402
from retrieval.api.settings import ApiSettings  # noqa: E402

from tests.api.conftest import Indexed  # noqa: E402

# The schema needs no loaded index (the lifespan is not run here).
SCHEMA = schemathesis.openapi.from_dict(create_app(ApiSettings(index_dir="unused")).openapi())
OPERATIONS = {op.ok().label: op.ok() for op in SCHEMA.get_all_operations()}


@pytest.fixture(scope="module")
def fuzz_client(indexed: Indexed) -> Iterator[TestClient]:
    # one app with its lifespan open; every generated case is sent through this client
    with TestClient(create_app(indexed.settings(max_upload_bytes=200_000)), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_no_server_errors(label: str, fuzz_client: TestClient) -> None:
    operation = OPERATIONS[label]

    @given(case=operation.as_strategy())
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case) -> None:  # noqa: ANN001
        kwargs = case.as_transport_kwargs(base_url="http://testserver")
        for key in ("allow_redirects", "follow_redirects", "verify", "cert", "timeout", "cookies"):
            kwargs.pop(key, None)
        # the check is ours (schemathesis' not_a_server_error): its response validation cannot read
        # httpx multipart requests back, so the status is asserted directly
        response = fuzz_client.request(**kwargs)
        assert response.status_code < 500, (case.method, case.formatted_path, response.status_code, response.text)

    check()
