"""Errors become HTTP answers in one place (api.errors): a kind picks the status, the message is the detail."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from retrieval.api.app import create_app
from retrieval.api.errors import DECODE_DETAILS, KIND_STATUS, install_error_handlers

from retrieval.errors import KINDS, ImageDecodeError, RetrievalError
from tests.api.conftest import Indexed
from tests.images import encode, photo

API = Path(__file__).resolve().parents[2] / "api"


def _raising_app(exc: Exception) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise exc

    return TestClient(app, raise_server_exceptions=False)


def test_every_kind_has_one_status() -> None:
    assert set(KIND_STATUS) == set(KINDS)
    with pytest.raises(ValueError):
        RetrievalError("x", "teapot")


@pytest.mark.parametrize("kind", KINDS)
def test_a_kind_is_answered_with_its_status_and_message(kind: str) -> None:
    r = _raising_app(RetrievalError(f"it was {kind}", kind)).get("/boom")
    assert (r.status_code, r.json()) == (KIND_STATUS[kind], {"detail": f"it was {kind}"})
    assert ("www-authenticate" in r.headers) == (kind == "unauthorized")


@pytest.mark.parametrize("failure, status", [("not_an_image", 415), ("too_large", 422), ("truncated", 422),
                                             ("empty", 422), ("corrupt", 422)])
def test_decode_failures_get_a_fixed_detail_without_internals(failure: str, status: int) -> None:
    r = _raising_app(ImageDecodeError("/srv/secret/x.jpg: broken", failure)).get("/boom")
    assert (r.status_code, r.json()) == (status, {"detail": DECODE_DETAILS[failure]})


def test_http_answers_are_made_in_one_place_only() -> None:
    """No module of the API raises HTTP exceptions itself: it raises RetrievalError with a kind."""
    offenders = [f"{p.name}:{n}" for p in sorted(API.rglob("*.py")) if p.name != "errors.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"raise\s+HTTPException\(|HTTP_\d{3}_", line)]
    assert offenders == []


def test_a_thumbnail_decode_error_is_answered_like_the_same_upload(private_index: Indexed) -> None:
    image_id = private_index.ids["a/img0001.jpg"]
    broken = {"not_an_image": b"this is plain text, not a picture " * 4,
              "corrupt": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2,
              "truncated": encode(photo(300, 200, seed=1), "JPEG")[:1500]}
    with TestClient(create_app(private_index.settings())) as c:
        for failure, data in broken.items():
            (private_index.corpus / "a" / "img0001.jpg").write_bytes(data)
            thumb = c.get(f"/images/{image_id}/thumbnail", params={"size": 64 + 64 * len(failure)})
            upload = c.post("/search", content=data, headers={"content-type": "application/octet-stream"})
            assert (thumb.status_code, thumb.json()) == (upload.status_code, upload.json()), failure
            assert thumb.json() == {"detail": DECODE_DETAILS[failure]}
            documented = c.get("/openapi.json").json()["paths"]["/images/{image_id}/thumbnail"]["get"]["responses"]
            assert str(thumb.status_code) in documented


def test_validation_errors_and_own_errors_share_one_body_shape(client: TestClient) -> None:
    bad = client.get("/search", params={"image": "1", "k": 0})
    own = client.post("/search", content=b"")
    for r in (bad, own):
        assert r.status_code == 422 and isinstance(r.json()["detail"], str)
    assert bad.json()["detail"].startswith("invalid request: query.k: ")
    assert bad.json()["errors"][0]["loc"] == ["query", "k"]


def test_a_client_leaving_mid_upload_is_not_an_error(indexed: Indexed, caplog: pytest.LogCaptureFixture) -> None:
    """The body stops with http.disconnect: logged as the client's doing, never as an unhandled error."""
    app = create_app(indexed.settings())
    sent: list[dict] = []

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            for path in ("/search", "/duplicates/check"):
                for content_type in (b"application/octet-stream", b"multipart/form-data; boundary=zz"):
                    chunks = [{"type": "http.request", "body": b"\xff\xd8\xff" + b"\0" * 1000, "more_body": True},
                              {"type": "http.disconnect"}]

                    async def receive() -> dict:
                        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

                    async def send(message: dict) -> None:
                        sent.append(message)

                    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                             "root_path": "", "headers": [(b"host", b"testserver"), (b"content-type", content_type),
                                                          (b"content-length", b"50000")],
                             "client": ("127.0.0.1", 5000), "server": ("testserver", 80)}
                    await app(scope, receive, send)

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert all(m.get("status", 400) < 500 for m in sent if m["type"] == "http.response.start")
