"""The review endpoints, the web UI's pages, sign-in and who may change decisions."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterator

import pytest
from fastapi.testclient import TestClient
from retrieval.api.app import create_app

from tests.api.conftest import Indexed, build_indexed
from tests.api.test_curation_routes import _cli

LOOPBACK = "http://127.0.0.1"


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory: pytest.TempPathFactory, api_model_dir: Path) -> Indexed:
    indexed = build_indexed(tmp_path_factory.mktemp("review"), api_model_dir, n=8)
    reports = tmp_path_factory.mktemp("review-reports")
    _cli("dedup", "--index-dir", indexed.index_dir, "--no-embeddings", "-o", reports / "d", "--no-progress")
    _cli("cluster", "--index-dir", indexed.index_dir, "-k", "2", "-o", reports / "c", "--no-progress")
    return indexed


@pytest.fixture(scope="module")
def local(reviewed: Indexed) -> Iterator[TestClient]:
    """A client whose requests arrive on a loopback address (as `retrieval serve` by default)."""
    with TestClient(create_app(reviewed.settings()), base_url=LOOPBACK) as c:
        yield c


def _pair(client: TestClient, indexed: Indexed) -> tuple[int, dict, dict]:
    run = client.get("/review/runs").json()[0]
    groups = client.get(f"/review/runs/{run['id']}/groups", params={"per_page": 200}).json()["groups"]
    g = next(g for g in groups if {m["path"] for m in g["members"]} >= {"dup/orig.jpg", "dup/copy.jpg"})
    by = {m["path"]: m for m in g["members"]}
    return run["id"], by["dup/orig.jpg"], by["dup/copy.jpg"]


def test_groups_carry_what_a_reviewer_decides_on(local: TestClient, reviewed: Indexed) -> None:
    run_id, orig, copy = _pair(local, reviewed)
    for m in (orig, copy):
        assert m["width"] == 120 and m["height"] == 90 and m["format"] == "JPEG" and m["size"] > 0
        assert m["thumbnail_url"] == f"/images/{m['image_id']}/thumbnail" and m["file_url"].endswith("/file")
    assert orig["action"] == "keep" and copy["action"] == "remove"  # quality 95 is the larger file
    assert copy["reason"] in ("exact", "phash") and not copy["reviewed"]
    assert local.get(f"/review/runs/{run_id}/groups", params={"reason": "bogus"}).status_code == 422
    assert local.get("/review/runs/999/groups").status_code == 404


def test_a_decision_is_stored_exported_and_reset(local: TestClient, reviewed: Indexed) -> None:
    run_id, orig, copy = _pair(local, reviewed)
    r = local.post(f"/review/runs/{run_id}/decisions", json={"decisions": {str(copy["member_id"]): "keep"}})
    assert r.status_code == 200, r.text and r.json()["decisions"] == 1
    _, _, after = _pair(local, reviewed)
    assert after["action"] == "keep" and after["reviewed"] and after["computed_action"] == "remove"
    rows = {row["path"]: row for row in csv.DictReader(io.StringIO(local.get(f"/review/runs/{run_id}/decisions.csv").text))}
    assert rows["dup/copy.jpg"]["action"] == "keep" and rows["dup/copy.jpg"]["reviewed"] == "1"
    bad = local.post(f"/review/runs/{run_id}/decisions", json={"decisions": {"99999999": "keep"}})
    assert bad.status_code == 422 and "not part of dedup run" in bad.json()["detail"]
    assert local.post(f"/review/runs/{run_id}/decisions", json={"decisions": {"1": "delete"}}).status_code == 422
    number = next(g["number"] for g in local.get(f"/review/runs/{run_id}/groups", params={"per_page": 200}).json()["groups"]
                  if any(m["member_id"] == copy["member_id"] for m in g["members"]))
    r = local.post(f"/review/runs/{run_id}/groups/{number}/decision", json={"action": "reset"})
    assert r.status_code == 200 and r.json()["decisions"] == 0


def test_decisions_need_loopback_or_a_key(reviewed: Indexed) -> None:
    run_path = "/review/runs/1/decisions"
    body = {"decisions": {}}
    # No key and a request that arrived on a non-loopback address: refused.
    with TestClient(create_app(reviewed.settings()), base_url="http://192.0.2.10") as c:
        r = c.post(run_path, json=body)
        assert r.status_code == 403 and "RETRIEVAL_API_KEY" in r.json()["detail"]
        assert c.get("/review/runs").status_code == 200  # reading stays open, as for the rest of the API
    with TestClient(create_app(reviewed.settings(api_key="s3cret")), base_url="http://192.0.2.10") as c:
        assert c.post(run_path, json=body).status_code == 401
        assert c.post(run_path, json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        # another site's page cannot post with the browser's credentials
        r = c.post(run_path, json=body, headers={"Authorization": "Bearer s3cret", "Origin": "http://evil.example"})
        assert r.status_code == 403


def test_sign_in_sets_a_cookie_the_pages_and_endpoints_accept(reviewed: Indexed) -> None:
    with TestClient(create_app(reviewed.settings(api_key="s3cret")), base_url=LOOPBACK) as c:
        r = c.get("/ui/duplicates?sort=weakest", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Fui%2Fduplicates%3Fsort%3Dweakest"
        assert c.get("/login").status_code == 200
        r = c.post("/login", data={"key": "wrong", "next": "/"}, follow_redirects=False)
        assert r.status_code == 401 and "not the server" in r.text
        r = c.post("/login", data={"key": "s3cret", "next": "//evil.example/"}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/"  # no open redirect
        cookie = r.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert c.get("/ui/duplicates").status_code == 200
        assert c.get("/review/runs").status_code == 200
        c.post("/logout")
        assert c.get("/review/runs").status_code == 401


def test_pages_render(local: TestClient, reviewed: Indexed) -> None:
    home = local.get("/")
    assert home.status_code == 200 and 'id="drop"' in home.text and "images in the index" in home.text
    r = local.get("/", params={"image": "dup/orig.jpg", "k": 3})
    assert r.status_code == 200
    first = r.text.split('class="grid results"', 1)[1]
    assert first.index("dup/copy.jpg") < first.index("</li>")  # the copy is the top result
    assert local.get("/", params={"image": "no/such.jpg"}).status_code == 404
    review = local.get("/ui/duplicates", params={"sort": "weakest"})
    assert review.status_code == 200 and "dup/copy.jpg" in review.text and "Export CSV" in review.text
    assert local.get("/ui/duplicates", params={"folder": "dup"}).text.count('class="group') >= 1
    clusters = local.get("/ui/clusters")
    assert clusters.status_code == 200 and "/ui/clusters/0" in clusters.text
    assert local.get("/ui/clusters/0").status_code == 200 and local.get("/ui/clusters/7").status_code == 404
    assert "No curation run" in local.get("/ui/curation").text
    assert local.get("/ui/curation/" + "9" * 30).status_code == 422
    up = local.post("/ui/search", params={"k": 2},
                    files={"file": ("q.jpg", (reviewed.corpus / "dup/orig.jpg").read_bytes(), "image/jpeg")})
    assert up.status_code == 200 and up.text.count('class="card"') == 2


def test_docs_work_offline(local: TestClient) -> None:
    docs = local.get("/docs").text
    assert "/static/docs/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    redoc = local.get("/redoc").text
    assert "/static/docs/redoc.standalone.js" in redoc and "fonts.googleapis" not in redoc
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        r = local.get(f"/static/docs/{asset}")
        assert r.status_code == 200 and len(r.content) > 50_000
    assert local.get("/static/app.js").status_code == 200


def test_every_web_file_ships_in_the_wheel() -> None:
    import tomllib
    from fnmatch import fnmatch

    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["retrieval.api"]
    files = [p.relative_to(root / "api").as_posix() for p in (root / "api" / "web").rglob("*") if p.is_file()]
    assert files and [f for f in files if not any(fnmatch(f, pat) for pat in patterns)] == []
