"""Hostile input: traversal, oversized and broken uploads, bombs, auth, and no leaks in errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from retrieval.api.app import create_app
from retrieval.api.deps import get_reader

from tests.api.conftest import Indexed
from tests.images import encode, photo


def _no_leak(text: str, *paths: Path) -> None:
    assert "Traceback" not in text and "/tmp" not in text
    for p in paths:
        assert str(p) not in text


@pytest.mark.parametrize("ref", [
    "../corpus/a/img0001.jpg", "a/../../index/retrieval.db", "..", "/etc/passwd", "//etc/passwd",
    "\\etc\\passwd", "a\\..\\..\\x", "C:/Windows/win.ini", "~/secret", "a/\x00.jpg",
])
def test_traversal_refs_are_400(client: TestClient, ref: str) -> None:
    r = client.get("/search", params={"image": ref})
    assert r.status_code == 400, r.text
    assert r.json()["detail"] in ("image must be an image id or a path relative to the corpus root",
                                  "invalid image reference")


@pytest.mark.parametrize("raw_query", [
    "image=..%2F..%2Fetc%2Fpasswd", "image=%2Fetc%2Fpasswd", "image=%2e%2e%2fcorpus%2fa%2fimg0001.jpg",
    "image=a%2F..%2F..%2Fx", "image=..%5C..%5Cx",
])
def test_url_encoded_traversal_is_400(client: TestClient, raw_query: str) -> None:
    r = client.get(f"/search?{raw_query}")
    assert r.status_code == 400, r.text


@pytest.mark.parametrize("raw_query", ["image=%252e%252e%252fetc%252fpasswd", "image=..%252Fetc%252Fpasswd"])
def test_double_encoded_traversal_is_just_an_unknown_path(client: TestClient, raw_query: str) -> None:
    r = client.get(f"/search?{raw_query}")
    assert r.status_code in (400, 404) and "detail" in r.json()


def test_a_symlink_out_of_the_corpus_is_never_served(private_index: Indexed, tmp_path: Path) -> None:
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(encode(photo(50, 40, seed=9), "JPEG") + b"TOP-SECRET")
    target = private_index.corpus / "a" / "img0001.jpg"
    image_id = private_index.ids["a/img0001.jpg"]
    target.unlink()
    os.symlink(secret, target)  # swapped after indexing: the row still points at it
    with TestClient(create_app(private_index.settings())) as c:
        for url in (f"/images/{image_id}/file", f"/images/{image_id}/thumbnail"):
            r = c.get(url)
            assert r.status_code == 404 and r.json() == {"detail": "the image file is not available"}
            assert b"TOP-SECRET" not in r.content
        # a symlink inside the corpus is fine
        inside = private_index.corpus / "b" / "img0002.jpg"
        real = private_index.corpus / "b" / "real.jpg"
        inside.rename(real)
        os.symlink(real, inside)
        r = c.get(f"/images/{private_index.ids['b/img0002.jpg']}/file")
        assert r.status_code == 200 and r.content == real.read_bytes()


def test_upload_over_the_cap_is_413(indexed: Indexed) -> None:
    with TestClient(create_app(indexed.settings(max_upload_bytes=50_000))) as c:
        big = encode(photo(400, 300, seed=3), "PNG")
        assert len(big) > 50_000 + 64 * 1024 or True
        payload = big + b"\0" * max(0, 200_000 - len(big))
        r = c.post("/search", content=payload, headers={"content-type": "image/png"})
        assert (r.status_code, r.json()) == (413, {"detail": "upload too large: the limit is 50000 bytes"})
        r = c.post("/search", files={"file": ("big.png", payload, "image/png")})
        assert r.status_code == 413

        def chunks():  # no content-length: the limit applies while streaming
            for _ in range(40):
                yield b"\0" * 10_000

        r = c.post("/search", content=chunks(), headers={"content-type": "image/png"})
        assert r.status_code == 413
        # just above the file limit but within the multipart allowance: still 413
        r = c.post("/search", content=b"\xff" * 50_001, headers={"content-type": "image/jpeg"})
        assert r.status_code == 413
        assert c.get("/healthz").status_code == 200


@pytest.mark.parametrize("data, status, detail", [
    (b"this is just some text, not a picture", 415, "not an image"),
    (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2, 422, "corrupt image"),
    (encode(photo(300, 200, seed=1), "JPEG")[:1500], 422, "truncated image"),
    (b"", 422, "empty upload"),
])
def test_bad_uploads_get_clear_4xx(client: TestClient, data: bytes, status: int, detail: str) -> None:
    for kwargs in ({"content": data, "headers": {"content-type": "image/jpeg"}},
                   {"files": {"file": ("x.jpg", data, "image/jpeg")}}):
        r = client.post("/search", **kwargs)
        assert r.status_code == status, r.text
        assert r.json()["detail"].startswith(detail)
        _no_leak(r.text)


def test_decompression_bomb_is_422_and_the_server_keeps_serving(client: TestClient, indexed: Indexed,
                                                                tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(bomb)  # 100 MP in a few KB
    r = client.post("/search", content=bomb.read_bytes(), headers={"content-type": "image/png"})
    assert r.status_code == 422 and r.json()["detail"].startswith("image has too many pixels")
    ok = client.get("/search", params={"image": indexed.ids["a/img0001.jpg"], "k": 2})
    assert ok.status_code == 200


def test_other_bad_requests(client: TestClient) -> None:
    r = client.post("/search", data={"x": "1"})
    assert r.status_code == 415
    r = client.post("/search", files={"other": ("x.jpg", b"abc", "image/jpeg")})
    assert r.status_code == 422 and "`file` field" in r.json()["detail"]
    r = client.post("/search", content=b"--zzz\r\nbroken", headers={"content-type": "multipart/form-data; boundary=zzz"})
    assert 400 <= r.status_code < 500
    assert client.get("/nope").status_code == 404 and client.get("/nope").json() == {"detail": "Not Found"}


def test_api_key(indexed: Indexed) -> None:
    with TestClient(create_app(indexed.settings(api_key="s3cret-key"))) as c:
        assert c.get("/healthz").status_code == 200
        image_id = indexed.ids["a/img0001.jpg"]
        for url in ("/readyz", "/stats", f"/search?image={image_id}", f"/images/{image_id}",
                    f"/images/{image_id}/file", f"/images/{image_id}/thumbnail", f"/images/{image_id}/duplicates"):
            assert c.get(url).status_code == 401, url
            assert c.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401, url
            assert c.get(url, headers={"Authorization": "Basic s3cret-key"}).status_code == 401, url
            assert c.get(url, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200, url
        r = c.post("/search", content=b"x")
        assert (r.status_code, r.json()) == (401, {"detail": "missing or invalid API key"})
        assert r.headers["www-authenticate"] == "Bearer"
        assert c.post("/duplicates/check", content=b"x").status_code == 401


def test_unexpected_errors_are_a_bare_500(indexed: Indexed) -> None:
    app = create_app(indexed.settings())

    def broken():  # noqa: ANN202
        raise RuntimeError(f"boom in {indexed.index_dir}")

    app.dependency_overrides[get_reader] = broken
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.get("/stats")
        assert (r.status_code, r.json()) == (500, {"detail": "internal server error"})
        _no_leak(r.text, indexed.index_dir)
        assert c.get("/healthz").status_code == 200


def test_errors_never_name_server_paths(client: TestClient, indexed: Indexed) -> None:
    for url in ("/search?image=../../etc/passwd", "/search?image=a/missing.jpg", "/images/424242/file",
                "/search?k=0&image=1"):
        _no_leak(client.get(url).text, indexed.index_dir, indexed.corpus)


def test_cors_is_off_unless_configured(client: TestClient, indexed: Indexed) -> None:
    r = client.get("/healthz", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    with TestClient(create_app(indexed.settings(cors_origins=["https://ui.example"]))) as c:
        r = c.get("/healthz", headers={"Origin": "https://ui.example"})
        assert r.headers["access-control-allow-origin"] == "https://ui.example"
