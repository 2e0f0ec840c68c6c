"""A new `retrieval index` run is picked up without a restart; requests in flight keep the old reader."""

from __future__ import annotations

from fastapi.testclient import TestClient
from retrieval.api.app import create_app

from tests.api.conftest import Indexed, run_index
from tests.images import photo, write


def test_reindex_is_picked_up_and_old_reader_finishes(private_index: Indexed) -> None:
    app = create_app(private_index.settings(reload_check_s=0))
    with TestClient(app) as c:
        before = c.get("/stats").json()
        assert before["images"] == len(private_index.ids) and before["reloads"] == 0
        state = app.state.retrieval
        old = state.handle
        with state.acquire() as in_flight:  # a request that started before the re-index
            assert in_flight is old
            write(private_index.corpus / "new" / "fresh.jpg", photo(100, 80, seed=31337), "JPEG")
            run_index(private_index.corpus, private_index.index_dir, private_index.model)
            after = c.get("/stats").json()
            assert after["reloads"] == 1 and after["images"] == before["images"] + 1
            assert after["index_run_id"] > before["index_run_id"]
            assert state.handle is not old and old.retired
            # the in-flight request can still use its (retired, not yet closed) reader, which answers
            # for its own pinned generation: the image indexed meanwhile is not in it
            assert len(in_flight.index) == before["images"]
            assert in_flight.index.image("new/fresh.jpg") is None
            assert old.users == 1
        assert old.users == 0
        r = c.get("/search", params={"image": "new/fresh.jpg", "k": 1, "exclude_self": "false"})
        assert r.status_code == 200 and r.json()["results"][0]["path"] == "new/fresh.jpg"
        up = c.post("/search?k=1", content=(private_index.corpus / "new" / "fresh.jpg").read_bytes())
        assert up.json()["results"][0]["path"] == "new/fresh.jpg"
        # nothing new: no reload
        c.get("/stats")
        assert c.get("/stats").json()["reloads"] == 1


def test_no_reload_before_the_check_interval(private_index: Indexed) -> None:
    app = create_app(private_index.settings(reload_check_s=3600))
    with TestClient(app) as c:
        n = c.get("/stats").json()["images"]
        write(private_index.corpus / "new" / "fresh.jpg", photo(100, 80, seed=31337), "JPEG")
        run_index(private_index.corpus, private_index.index_dir, private_index.model)
        stats = c.get("/stats").json()
        assert stats["reloads"] == 0 and stats["indexed_vectors"] == n


def test_index_change_without_an_index_run_is_picked_up(private_index: Indexed) -> None:
    """`retrieval dedup --apply` drops images and re-syncs FAISS without an index run."""
    from retrieval.layout import IndexLayout
    from retrieval.store import Store, remove_images
    from retrieval.sync import SyncOptions, sync_index
    from retrieval.vectors import VectorStore

    app = create_app(private_index.settings(reload_check_s=0))
    with TestClient(app) as c:
        before = c.get("/stats").json()
        gone = private_index.ids["dup/copy.jpg"]
        layout = IndexLayout(private_index.index_dir)
        store = Store(layout.default_db_url())
        remove_images(store, [gone], [])
        sync_index(store, VectorStore(layout.vectors_path, 32), layout,
                   SyncOptions(memory_budget=10**9, exact_threshold=50_000, recall_target=0.95))
        store.close()
        after = c.get("/stats").json()
        assert after["reloads"] == 1 and after["indexed_vectors"] == before["indexed_vectors"] - 1
        assert after["index_run_id"] == before["index_run_id"]
        r = c.get("/search", params={"image": "dup/orig.jpg", "k": 20})
        assert gone not in [h["id"] for h in r.json()["results"]]
        assert len(r.json()["results"]) == before["indexed_vectors"] - 2  # all but the query and the gone one
