"""Dynamic batching: concurrent requests share forward passes and each gets its own answer."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from retrieval.api.app import create_app
from retrieval.api.batcher import Batcher

from tests.api.conftest import Indexed


def test_batcher_fills_a_batch_and_answers_each_request() -> None:
    calls: list[int] = []

    def fn(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return x.reshape(len(x), -1).astype(np.float32) * 2

    async def main() -> list[np.ndarray]:
        b = Batcher(max_batch=8, max_wait_s=5.0)  # a full batch goes at once, never after the wait
        await b.start()
        try:
            return await asyncio.gather(*(b.embed(fn, np.full((3, 1, 1), i, np.uint8)) for i in range(8)))
        finally:
            await b.stop()

    out = asyncio.run(main())
    assert calls == [8]
    assert [v.tolist() for v in out] == [[2.0 * i] * 3 for i in range(8)]


def test_batcher_splits_at_max_batch_and_propagates_errors() -> None:
    calls: list[int] = []

    def fn(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        return x.reshape(len(x), -1).astype(np.float32)

    def failing(x: np.ndarray) -> np.ndarray:
        raise ValueError("model exploded")

    async def main() -> None:
        b = Batcher(max_batch=4, max_wait_s=0.5)  # partial batches (2, then 1, 1) each wait this long
        await b.start()
        try:
            out = await asyncio.gather(*(b.embed(fn, np.full((1, 1, 1), i, np.uint8)) for i in range(10)),
                                       return_exceptions=True)
            assert [float(v[0]) for v in out] == list(range(10))
            with pytest.raises(ValueError, match="model exploded"):
                await b.embed(failing, np.zeros((1, 1, 1), np.uint8))
            # the batcher survives a failed batch
            assert float((await b.embed(fn, np.full((1, 1, 1), 5, np.uint8)))[0]) == 5.0
        finally:
            await b.stop()

    asyncio.run(main())
    assert sum(calls) == 11 and max(calls) <= 4 and calls[:3] == [4, 4, 2]


def test_concurrent_uploads_each_get_their_own_neighbours(indexed: Indexed) -> None:
    """Eight different images uploaded at once through the app: every answer belongs to its request."""
    names = ["a/img0001.jpg", "b/img0002.jpg", "a/img0003.png", "b/img0004.jpg",
             "a/img0005.jpg", "b/img0006.png", "a/img0007.jpg", "dup/orig.jpg"]
    app = create_app(indexed.settings(batch_max_size=8, batch_max_wait_ms=1000))

    async def main() -> tuple[list[dict], dict]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                async def one(name: str) -> dict:
                    r = await c.post("/search?k=2&collapse_duplicates=true&collapse_threshold=0.9999",
                                     content=(indexed.corpus / name).read_bytes(),
                                     headers={"content-type": "application/octet-stream"})
                    assert r.status_code == 200, r.text
                    return r.json()

                results = await asyncio.gather(*(one(n) for n in names))
                stats = (await c.get("/stats")).json()
        return results, stats

    results, stats = asyncio.run(main())
    for name, body in zip(names, results):
        top = body["results"][0]
        assert top["path"] == name or name.startswith("dup/") and top["path"].startswith("dup/"), (name, top)
        assert top["score"] > 0.999
    assert stats["batching"]["items"] == len(names)
    assert stats["batching"]["batches"] < len(names), "concurrent uploads should share forward passes"
