"""GET /metrics: Prometheus text with per-route latency, labelled by route template."""

from __future__ import annotations

from fastapi.testclient import TestClient
from retrieval.api.app import create_app

from tests.api.conftest import Indexed


def test_metrics_count_requests_by_route_template(client: TestClient, indexed: Indexed) -> None:
    image_id = next(iter(indexed.ids.values()))
    assert client.get(f"/images/{image_id}").status_code == 200
    assert client.get("/images/999999").status_code == 404
    client.get("/no/such/../route")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'route="/images/{image_id}",status="200"' in text
    assert 'route="/images/{image_id}",status="404"' in text
    assert 'route="unmatched"' in text
    assert f"/images/{image_id}\"" not in text, "raw paths must not become labels"
    assert f"retrieval_indexed_images {float(len(indexed.ids))}" in text


def test_metrics_need_the_api_key(indexed: Indexed) -> None:
    with TestClient(create_app(indexed.settings(api_key="k3y"))) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer k3y"}).status_code == 200
