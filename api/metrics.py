"""Prometheus metrics (prometheus-client): request latency by route and status, batching, index size.

Each app gets its own registry, so several apps in one process (tests, workers) never collide.
Routes are labelled by their template (`/images/{image_id}`), never by the raw path, so hostile
URLs cannot blow up the label cardinality.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from retrieval.api.deps import Authorized


class _ServerCollector:
    """Reads the batcher counters and the index size from the app state at scrape time."""

    def __init__(self, get_state: Callable[[], Any]):
        self._get_state = get_state

    def collect(self) -> Iterator[Any]:
        state = self._get_state()
        batches = CounterMetricFamily("retrieval_embed_batches", "Forward passes run by the upload batcher")
        items = CounterMetricFamily("retrieval_embed_batched_images", "Uploads embedded by the batcher")
        images = GaugeMetricFamily("retrieval_indexed_images", "Images in the served index")
        if state is not None:
            batches.add_metric([], state.batcher.stats.batches)
            items.add_metric([], state.batcher.stats.items)
            if state.handle is not None:
                images.add_metric([], len(state.handle.index))
        yield from (batches, items, images)


class Metrics:
    def __init__(self, get_state: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "retrieval_http_request_duration_seconds", "HTTP request latency", ["method", "route", "status"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self.registry.register(_ServerCollector(get_state))

    def observe(self, request: Request, status: int, seconds: float) -> None:
        route = request.scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        self.latency.labels(request.method, template, str(status)).observe(seconds)


router = APIRouter(tags=["operations"])


@router.get("/metrics", dependencies=Authorized, summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
