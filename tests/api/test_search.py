"""Search by id, by corpus path and by upload; parameters, bounds and health/stats endpoints."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import Indexed


def oracle(indexed: Indexed, query: np.ndarray, exclude: int | None = None) -> tuple[list[int], np.ndarray]:
    ids, vectors = indexed.vectors()
    sims = vectors @ query
    order = [i for i in np.argsort(-sims, kind="stable") if ids[i] != exclude]
    return [int(ids[i]) for i in order], sims[order]


def test_search_by_id_is_the_exact_neighbour_list(client: TestClient, indexed: Indexed) -> None:
    qid = indexed.ids["a/img0001.jpg"]
    r = client.get("/search", params={"image": qid, "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answered_from"] == "stored vector" and body["query"] == f"id:{qid}" and body["k"] == 5
    ids, vectors = indexed.vectors()
    want_ids, want_scores = oracle(indexed, vectors[list(ids).index(qid)], exclude=qid)
    assert [h["id"] for h in body["results"]] == want_ids[:5]
    np.testing.assert_allclose([h["score"] for h in body["results"]], want_scores[:5], atol=1e-5)
    first = body["results"][0]
    assert first["file_url"] == f"/images/{first['id']}/file"
    assert first["thumbnail_url"] == f"/images/{first['id']}/thumbnail"
    assert (first["width"], first["height"]) == (96, 72) and first["format"] in ("JPEG", "PNG")


def test_search_by_path_equals_search_by_id(client: TestClient, indexed: Indexed) -> None:
    by_path = client.get("/search", params={"image": "b/img0002.jpg", "k": 4}).json()
    by_id = client.get("/search", params={"image": indexed.ids["b/img0002.jpg"], "k": 4}).json()
    assert by_path["query"] == "b/img0002.jpg"
    assert by_path["results"] == by_id["results"]
    # harmless spellings of the same relative path resolve to the same image
    again = client.get("/search", params={"image": "./b//img0002.jpg", "k": 4}).json()
    assert again["results"] == by_path["results"]


def test_exclude_self_and_min_score(client: TestClient, indexed: Indexed) -> None:
    qid = indexed.ids["a/img0003.png"]
    with_self = client.get("/search", params={"image": qid, "k": 3, "exclude_self": "false"}).json()["results"]
    assert with_self[0]["id"] == qid and with_self[0]["score"] > 0.999
    all_hits = client.get("/search", params={"image": qid, "k": 1000}).json()["results"]
    assert len(all_hits) == len(indexed.ids) - 1
    cut = all_hits[len(all_hits) // 2]["score"]
    some = client.get("/search", params={"image": qid, "k": 1000, "min_score": cut}).json()["results"]
    assert some and all(h["score"] >= cut for h in some)
    assert len(some) < len(all_hits)


@pytest.mark.parametrize("params", [
    {"k": 0}, {"k": 1001}, {"k": -3}, {"k": "ten"}, {"nprobe": 0}, {"nprobe": 70000},
    {"min_score": 2}, {"collapse_threshold": 0},
])
def test_out_of_range_parameters_are_422(client: TestClient, indexed: Indexed, params: dict) -> None:
    r = client.get("/search", params={"image": indexed.ids["a/img0001.jpg"], **params})
    assert r.status_code == 422
    body = r.json()  # the one error shape: a one-line detail, plus the fields for a validation error
    assert isinstance(body["detail"], str) and body["detail"].startswith("invalid request: query.")
    errors = body["errors"]
    assert errors[0]["loc"][0] == "query" and "input" not in errors[0]


def test_missing_image_parameter_is_422(client: TestClient) -> None:
    assert client.get("/search").status_code == 422


def test_unknown_id_and_path_are_404(client: TestClient) -> None:
    r = client.get("/search", params={"image": 999999})
    assert (r.status_code, r.json()) == (404, {"detail": "no indexed image with this id"})
    r = client.get("/search", params={"image": "a/nope.jpg"})
    assert (r.status_code, r.json()) == (404, {"detail": "no indexed image at this path"})
    assert client.get("/search", params={"image": "9" * 30}).status_code == 404


def test_nprobe_is_accepted_by_an_exact_index(client: TestClient, indexed: Indexed) -> None:
    qid = indexed.ids["a/img0001.jpg"]
    a = client.get("/search", params={"image": qid, "k": 5}).json()["results"]
    b = client.get("/search", params={"image": qid, "k": 5, "nprobe": 7}).json()["results"]
    assert a == b


def test_upload_multipart_and_raw_body(client: TestClient, indexed: Indexed) -> None:
    data = (indexed.corpus / "b" / "img0004.jpg").read_bytes()
    r = client.post("/search?k=3", files={"file": ("q.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answered_from"] == "embedded upload" and body["query"] == "upload"
    assert body["results"][0]["path"] == "b/img0004.jpg" and body["results"][0]["score"] > 0.999
    raw = client.post("/search?k=3", content=data, headers={"content-type": "image/jpeg"})
    assert raw.status_code == 200, raw.text
    assert [h["id"] for h in raw.json()["results"]] == [h["id"] for h in body["results"]]
    octet = client.post("/search?k=3", content=data, headers={"content-type": "application/octet-stream"})
    assert octet.json()["results"][0]["path"] == "b/img0004.jpg"


def test_upload_matches_the_embedding_of_the_indexer(client: TestClient, indexed: Indexed) -> None:
    """An upload is preprocessed exactly like the indexer: its vector is the stored one."""
    ids, vectors = indexed.vectors()
    data = (indexed.corpus / "b" / "img0000.png").read_bytes()
    hits = client.post("/search?k=1000", content=data, headers={"content-type": "image/png"}).json()["results"]
    top = hits[0]
    stored = vectors[list(ids).index(top["id"])]
    want_ids, want_scores = oracle(indexed, stored)
    assert [h["id"] for h in hits] == want_ids
    np.testing.assert_allclose([h["score"] for h in hits], want_scores, atol=2e-3)  # fp16 storage vs fp32 query


def test_collapse_duplicates_folds_the_copy_into_the_original(client: TestClient, indexed: Indexed) -> None:
    orig, copy = indexed.ids["dup/orig.jpg"], indexed.ids["dup/copy.jpg"]
    plain = client.get("/search", params={"image": orig, "k": 5, "exclude_self": "false"}).json()["results"]
    assert [h["id"] for h in plain[:2]] in ([orig, copy], [copy, orig])
    folded = client.get("/search", params={"image": orig, "k": 5, "exclude_self": "false",
                                           "collapse_duplicates": "true", "collapse_threshold": 0.9999}).json()
    results = folded["results"]
    assert len(results) == 5
    assert results[0]["id"] in (orig, copy)
    other = copy if results[0]["id"] == orig else orig
    assert [d["id"] for d in results[0]["duplicates"]] == [other]
    assert other not in [h["id"] for h in results]
    ids, vectors = indexed.vectors()
    # every kept result is below the threshold to every other kept result
    kept = vectors[[list(ids).index(h["id"]) for h in results]]
    sims = kept @ kept.T
    assert (sims[~np.eye(len(kept), dtype=bool)] < 0.9999).all()


def test_health_ready_and_stats(client: TestClient, indexed: Indexed) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    stats = client.get("/stats").json()
    assert stats["images"] == len(indexed.ids) == stats["indexed_vectors"]
    assert stats["dim"] == 32 and stats["index_type"] == "flat" and stats["index_run_id"] >= 1
    assert stats["model"] == "tiny-dinov2", "a local model folder is shown by name, never by server path"
    assert "max_batch" in stats["batching"]
