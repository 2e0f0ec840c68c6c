"""`retrieval index gs://...` and `az://...` against emulators on 127.0.0.1: gcp-storage-emulator
(PyPI) for Google Cloud Storage through gcsfs, Azurite (npm) for Azure Blob Storage through adlfs.
Credentials and endpoints come only from each backend's standard environment.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import make_corpus
from tests.images import encode, photo
from tests.indexer.test_pipeline import cli, index
from tests.indexer.test_remote_sources import _fast_reads, db_rows, index_counting_reads, upload  # noqa: F401


@pytest.mark.parametrize("backend,protocol", [("gcs", "gs"), ("azure", "az")])
def test_index_a_bucket_then_search_serve_and_reindex(backend: str, protocol: str, request: pytest.FixtureRequest,
                                                      tmp_path: Path, tiny_model_dir: Path) -> None:
    fs, bucket = request.getfixturevalue(backend)
    make_corpus(tmp_path / "local", 6)
    objects = upload(fs, bucket, tmp_path / "local", protocol=protocol)
    fs.pipe(f"{bucket}/photos/notes.txt", b"not an image")
    fs.pipe(f"{bucket}/photos/broken.jpg", b"\xff\xd8\xff garbage")
    url = f"{protocol}://{bucket}/photos"

    summary = index(url, tiny_model_dir)
    assert (summary["new"], summary["failed"]) == (6, 1) and summary["corpus"] == url
    rows = db_rows()
    assert set(rows) == set(objects), "every image is stored under its URI"
    assert all(etag for (_id, _sha, _size, etag, _x) in rows.values()), "the listing's ETags are kept"

    first = sorted(objects)[0]
    code, out = cli("search", first, "-k", "3", "--json")
    assert code == 0, out
    assert all(h["path"].startswith(url + "/") for h in json.loads(out)["results"])

    # unchanged: a listing and a database comparison, no reads, no model
    again, calls = index_counting_reads(url, tiny_model_dir)
    assert (again["new"], again["unchanged"], again["known_failures"]) == (0, 6, 1)
    assert calls == [] and again["device"] == "-"

    # a rewritten object (new ETag), a new one and a deleted one
    fs.pipe(sorted(objects)[1][len(protocol) + 3:], encode(photo(96, 72, seed=4242), "JPEG"))
    fs.pipe(f"{bucket}/photos/new/extra.jpg", encode(photo(96, 72, seed=4343), "JPEG"))
    fs.rm(sorted(objects)[2][len(protocol) + 3:])
    third = index(url, tiny_model_dir)
    assert (third["new"], third["changed"], third["removed"]) == (1, 1, 1)
    assert cli("verify")[0] == 0

    # the API serves the bytes from the bucket
    from fastapi.testclient import TestClient
    from retrieval.api.app import create_app
    from retrieval.api.settings import ApiSettings

    image_id = db_rows()[first][0]
    with TestClient(create_app(ApiSettings(index_dir=Path("retrieval-index"), device="cpu",
                                           reload_check_s=3600.0))) as client:
        r = client.get(f"/images/{image_id}/file")
        assert r.status_code == 200 and r.content == objects[first]
