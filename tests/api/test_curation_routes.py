"""GET /duplicates and /clusters serve what `retrieval dedup` and `retrieval cluster` stored."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from fastapi.testclient import TestClient
from retrieval.api.app import create_app
from typer.testing import CliRunner

from retrieval.cli.app import app as cli_app
from tests import db as testdb
from tests.api.conftest import Indexed, build_indexed


def _cli(*args: str) -> None:
    result = CliRunner().invoke(cli_app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory, api_model_dir: Path) -> Indexed:
    indexed = build_indexed(tmp_path_factory.mktemp("curated"), api_model_dir, n=10)
    # dup/orig.jpg and dup/copy.jpg are one picture at two JPEG qualities: a pHash duplicate pair.
    report = tmp_path_factory.mktemp("reports")
    _cli("dedup", "--index-dir", indexed.index_dir, "--no-embeddings", "-o", report / "dedup", "--no-progress")
    _cli("cluster", "--index-dir", indexed.index_dir, "-k", "3", "-o", report / "clusters", "--no-progress")
    return indexed


@pytest.fixture(scope="module")
def curated_client(curated: Indexed) -> Iterator[TestClient]:
    with TestClient(create_app(curated.settings())) as c:
        yield c


def test_no_runs_yet_is_a_404_that_names_the_command(client: TestClient) -> None:
    r = client.get("/duplicates")
    assert r.status_code == 404 and r.json()["detail"] == "no dedup run yet: run `retrieval dedup` on this index"
    r = client.get("/clusters")
    assert r.status_code == 404 and "retrieval cluster" in r.json()["detail"]


def test_duplicate_groups_are_served_with_members(curated_client: TestClient, curated: Indexed) -> None:
    r = curated_client.get("/duplicates")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total_groups"] >= 1 and body["mode"] == "self"
    pair = {curated.ids["dup/orig.jpg"], curated.ids["dup/copy.jpg"]}
    group = next(g for g in body["groups"] if {m["image_id"] for m in g["members"]} >= pair)
    actions = sorted(m["action"] for m in group["members"])
    assert actions.count("keep") == 1 and len(actions) == group["size"]
    assert all(m["thumbnail_url"] == f"/images/{m['image_id']}/thumbnail" for m in group["members"])
    # paging is bounded and consistent
    assert curated_client.get("/duplicates", params={"per_page": 501}).status_code == 422
    page2 = curated_client.get("/duplicates", params={"page": 2, "per_page": 1}).json()
    assert page2["page"] == 2 and len(page2["groups"]) == (1 if body["total_groups"] >= 2 else 0)


def test_clusters_list_and_members_nearest_first(curated_client: TestClient, curated: Indexed) -> None:
    r = curated_client.get("/clusters")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["k"] == 3 and sum(c["size"] for c in body["clusters"]) == len(curated.ids)
    sizes = [c["size"] for c in body["clusters"]]
    assert sizes == sorted(sizes, reverse=True)
    with testdb.connect(curated.index_dir / "retrieval.db") as conn:
        expected = {c: [row[0] for row in conn.execute(
            "SELECT image_id FROM cluster_assignments WHERE run_id = ? AND cluster = ? ORDER BY distance",
            (body["run_id"], c))] for c in range(3)}
    for c in range(3):
        members = curated_client.get(f"/clusters/{c}").json()["members"]
        assert [m["id"] for m in members] == expected[c]
        assert [m["rank"] for m in members] == list(range(len(members)))
    assert curated_client.get("/clusters/3").status_code == 404
    assert curated_client.get("/clusters/-1").status_code == 422


def test_duplicates_threshold_is_a_stricter_view_of_the_run(curated_client: TestClient) -> None:
    body = curated_client.get("/duplicates").json()
    run_threshold = body["params"]["threshold"]
    r = curated_client.get("/duplicates", params={"threshold": run_threshold / 2})
    assert r.status_code == 422 and "needs a new run" in r.json()["detail"]
    strict = curated_client.get("/duplicates", params={"threshold": 1.0}).json()
    for group in strict["groups"]:
        assert len(group["members"]) >= 2 and all(m["similarity"] >= 1.0 for m in group["members"])
        assert group["size"] == len(group["members"])
    all_sims = [m["similarity"] for g in body["groups"] for m in g["members"]]
    mid = sorted(all_sims)[len(all_sims) // 2]
    if mid > run_threshold:
        view = curated_client.get("/duplicates", params={"threshold": mid}).json()
        assert all(m["similarity"] >= mid for g in view["groups"] for m in g["members"])
        assert view["total_groups"] <= body["total_groups"]


def test_run_timestamps_carry_a_timezone(curated_client: TestClient) -> None:
    from datetime import datetime, timezone

    for url in ("/duplicates", "/clusters"):
        finished = curated_client.get(url).json()["finished_at"]
        assert datetime.fromisoformat(finished).utcoffset() == timezone.utc.utcoffset(None), (url, finished)
