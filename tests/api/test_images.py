"""GET /images/{id}, its file and thumbnail; near-duplicates and POST /duplicates/check."""

from __future__ import annotations

import io

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from tests.api.conftest import Indexed
from tests.images import encode, photo


def test_image_metadata(client: TestClient, indexed: Indexed) -> None:
    image_id = indexed.ids["a/img0001.jpg"]
    body = client.get(f"/images/{image_id}").json()
    assert body["id"] == image_id and body["path"] == "a/img0001.jpg"
    assert (body["width"], body["height"], body["format"]) == (96, 72, "JPEG")
    assert body["size"] == (indexed.corpus / "a/img0001.jpg").stat().st_size and len(body["sha256"]) == 64
    assert client.get("/images/999999").status_code == 404
    assert client.get("/images/-1").status_code == 422
    assert client.get("/images/abc").status_code == 422


def test_image_file_has_the_bytes_and_the_content_type(client: TestClient, indexed: Indexed) -> None:
    for rel, mime in (("a/img0001.jpg", "image/jpeg"), ("b/img0000.png", "image/png")):
        r = client.get(f"/images/{indexed.ids[rel]}/file")
        assert r.status_code == 200
        assert r.headers["content-type"] == mime and r.headers["x-content-type-options"] == "nosniff"
        assert r.content == (indexed.corpus / rel).read_bytes()


def test_thumbnail_is_a_cached_jpeg_of_the_requested_size(client: TestClient, indexed: Indexed) -> None:
    image_id = indexed.ids["dup/orig.jpg"]  # 120 x 90
    r = client.get(f"/images/{image_id}/thumbnail", params={"size": 60})  # served from the 64 px bucket
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(r.content))
    assert thumb.format == "JPEG" and thumb.size == (64, 48)
    cached = list((indexed.index_dir / "thumbnails").glob(f"{image_id}_64_*.jpg"))
    assert len(cached) == 1 and cached[0].read_bytes() == r.content
    for size in (60, 61, 64):  # one cached file serves every size of the bucket
        assert client.get(f"/images/{image_id}/thumbnail", params={"size": size}).content == r.content
    assert len(list((indexed.index_dir / "thumbnails").glob(f"{image_id}_*.jpg"))) == 1
    default = Image.open(io.BytesIO(client.get(f"/images/{image_id}/thumbnail").content))
    assert default.size == (120, 90), "a thumbnail never upscales"
    for bad in (0, 15, 1025, "big"):
        assert client.get(f"/images/{image_id}/thumbnail", params={"size": bad}).status_code == 422
    assert client.get("/images/999999/thumbnail").status_code == 404


def test_near_duplicates_of_an_image(client: TestClient, indexed: Indexed) -> None:
    orig, copy = indexed.ids["dup/orig.jpg"], indexed.ids["dup/copy.jpg"]
    body = client.get(f"/images/{orig}/duplicates", params={"threshold": 0.9999}).json()
    assert body["image"]["id"] == orig and body["threshold"] == 0.9999
    ids, vectors = indexed.vectors()
    sims = vectors @ vectors[list(ids).index(orig)]
    expected = {int(i) for i, s in zip(ids, sims) if s >= 0.9999 and i != orig}
    assert copy in expected
    assert {d["id"] for d in body["duplicates"]} == expected
    loose = client.get(f"/images/{orig}/duplicates", params={"threshold": 0.5, "limit": 3}).json()
    assert len(loose["duplicates"]) == 3
    assert client.get(f"/images/{orig}/duplicates", params={"threshold": 1.5}).status_code == 422
    assert client.get("/images/999999/duplicates").status_code == 404


def test_duplicates_check_by_upload(client: TestClient, indexed: Indexed) -> None:
    data = encode(photo(120, 90, seed=777), "JPEG", quality=85)  # a third copy of dup/orig.jpg
    r = client.post("/duplicates/check", params={"threshold": 0.9999}, files={"file": ("x.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["duplicate"] is True and body["score"] >= 0.9999
    assert body["best_match"]["path"] in ("dup/orig.jpg", "dup/copy.jpg")
    fresh = encode(photo(120, 90, seed=4242), "PNG")
    body = client.post("/duplicates/check", params={"threshold": 0.9999}, content=fresh,
                       headers={"content-type": "image/png"}).json()
    assert body["duplicate"] is False and body["score"] < 0.9999 and body["best_match"] is not None
    ids, vectors = indexed.vectors()
    assert body["best_match"]["id"] in set(ids.tolist())
    assert np.isclose(body["threshold"], 0.9999)
