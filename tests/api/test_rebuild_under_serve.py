"""`index --rebuild` while the server runs: answers come from one generation, never a mix (issue 12 item 3).

Before: during a rebuild the server paired its loaded FAISS index and vectors with the database's
new rows, whose ids restarted at 1, so queries got 404s and wrong neighbours. The rebuild runs
here in this process; at the moment it has written every new row and vector but not yet its
FAISS index, the server (with reload checks on every request) is queried: it must answer exactly
as before the rebuild. When the rebuild completes, it must answer from the new generation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from retrieval.api.app import create_app

from tests.api.conftest import Indexed
from tests.conftest import make_corpus


def _answers(client: TestClient, refs: list[str]) -> dict[str, Any]:
    out = {}
    for ref in refs:
        r = client.get("/search", params={"image": ref, "k": 4})
        out[ref] = (r.status_code, [(h["id"], h["path"], round(h["score"], 4)) for h in r.json().get("results", [])]
                    if r.status_code == 200 else r.json())
    return out


def test_a_rebuild_under_a_running_server_never_mixes_generations(private_index: Indexed, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import retrieval.indexer.pipeline as pipeline
    from retrieval.indexer.pipeline import IndexOptions, run_index

    from retrieval.settings import Settings

    app = create_app(private_index.settings(reload_check_s=0))
    old_ids = private_index.ids
    refs = [str(i) for i in sorted(old_ids.values())] + sorted(old_ids)[:3]
    with TestClient(app) as client:
        before = _answers(client, refs)
        assert all(code == 200 and hits for code, hits in before.values())
        # The corpus changes before the rebuild: ids restart at 1 over other files.
        for rel in sorted(old_ids)[:4]:
            (private_index.corpus / rel).unlink()
        make_corpus(private_index.corpus / "new", 5, start=500)
        during: dict[str, Any] = {}
        real_sync = pipeline.sync_index

        def sync_after_querying(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            during.update(_answers(client, refs))  # every new row and vector is written by now
            return real_sync(*args, **kwargs)

        monkeypatch.setattr(pipeline, "sync_index", sync_after_querying)
        settings = Settings(index_dir=private_index.index_dir, model=str(private_index.model), device="cpu",
                            workers=0, batch_size=16)
        run_index(IndexOptions(corpus=private_index.corpus, settings=settings, rebuild=True, progress=False))
        assert during == before  # the old generation, whole: same ids, same paths, same scores

        after = _answers(client, ["1", "2"])
        from tests import db as testdb

        with testdb.connect(private_index.index_dir / "retrieval.db") as conn:
            new_paths = dict(conn.execute("SELECT id, path FROM images"))
        for code, hits in after.values():
            assert code == 200
            assert all(new_paths[i] == path for i, path, _ in hits)  # the new generation, whole
        assert client.get("/stats").json()["reloads"] >= 1
