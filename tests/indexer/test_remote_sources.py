"""`retrieval index` from an S3-compatible server, an HTTP server, URL lists and WebDataset shards,
then search, the API, dedup and curate on the URIs they give: real servers on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import make_corpus
from tests.images import encode, photo
from tests.indexer.test_pipeline import (  # the folder tests' helpers: JSON summary, -j 0 -b 8
    cli,
    index,
)
from tests.servers import http_server


def db_rows(index_dir: str = "retrieval-index") -> dict[str, tuple]:
    from tests import db as testdb

    with testdb.connect(f"{index_dir}/retrieval.db") as conn:
        return {r[0]: r[1:] for r in conn.execute("SELECT path, id, sha256, size, etag, extra FROM images")}


@pytest.fixture(autouse=True)
def _fast_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETRIEVAL_READ_RETRIES", "1")
    monkeypatch.setenv("RETRIEVAL_READ_BACKOFF", "0.01")
    monkeypatch.setenv("RETRIEVAL_READ_TIMEOUT", "10")


def upload(fs, bucket: str, folder: Path, prefix: str = "photos", protocol: str = "s3") -> dict[str, bytes]:  # noqa: ANN001
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            key = f"{bucket}/{prefix}/{p.relative_to(folder).as_posix()}"
            fs.pipe(key, p.read_bytes())
            out[f"{protocol}://{key}"] = p.read_bytes()
    return out


def index_counting_reads(url: str, model: Path) -> tuple[dict, list]:
    """index(url) and the remote reads it made."""
    from retrieval.sources import remote

    calls: list[tuple] = []
    original = remote.read_url
    remote.read_url = lambda *a, **k: calls.append(a) or original(*a, **k)
    try:
        return index(url, model), calls
    finally:
        remote.read_url = original


def test_index_an_s3_bucket_then_search_serve_and_reindex_without_reads(s3, tmp_path: Path,  # noqa: ANN001
                                                                        tiny_model_dir: Path) -> None:
    fs, bucket = s3
    make_corpus(tmp_path / "local", 10)
    objects = upload(fs, bucket, tmp_path / "local")
    fs.pipe(f"{bucket}/photos/readme.txt", b"not an image")
    fs.pipe(f"{bucket}/photos/broken.jpg", b"\xff\xd8\xff garbage")
    url = f"s3://{bucket}/photos"

    summary = index(url, tiny_model_dir)
    assert (summary["new"], summary["failed"]) == (10, 1) and summary["corpus"] == url
    got = db_rows()
    assert set(got) == set(objects), "every image is stored under its s3:// URI"
    assert all(etag for (_id, _sha, _size, etag, _x) in got.values())
    code, out = cli("info", "--failures")
    assert f"s3://{bucket}/photos/broken.jpg" in out

    # search by URI: the stored vector
    first = sorted(objects)[0]
    code, out = cli("search", first, "-k", "3", "--json")
    assert code == 0, out
    result = json.loads(out)
    assert result["answered_from"].startswith(f"stored vector of {first}")
    assert all(h["path"].startswith(url + "/") for h in result["results"])

    # unchanged bucket: a listing, no reads, no model
    again, calls = index_counting_reads(url, tiny_model_dir)
    assert (again["new"], again["changed"], again["unchanged"], again["known_failures"]) == (0, 0, 10, 1)
    assert calls == [] and again["device"] == "-"

    # a changed object (new ETag), a new one and a deleted one
    changed = sorted(objects)[1]
    fs.pipe(changed[len("s3://"):], encode(photo(96, 72, seed=4242), "JPEG"))
    fs.pipe(f"{bucket}/photos/new/extra.jpg", encode(photo(96, 72, seed=4343), "JPEG"))
    fs.rm(sorted(objects)[2][len("s3://"):])
    third = index(url, tiny_model_dir)
    assert (third["new"], third["changed"], third["removed"]) == (1, 1, 1)
    assert cli("verify")[0] == 0

    # The API serves the bytes from the bucket, and thumbnails; nothing outside the source.
    from fastapi.testclient import TestClient
    from retrieval.api.app import create_app
    from retrieval.api.settings import ApiSettings

    rows = db_rows()
    image_id = rows[first][0]
    with TestClient(create_app(ApiSettings(index_dir=Path("retrieval-index"), device="cpu",
                                           reload_check_s=3600.0))) as client:
        r = client.get(f"/images/{image_id}/file")
        assert r.status_code == 200 and r.content == objects[first]
        r = client.get(f"/images/{image_id}/thumbnail?size=64")
        assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"
        r = client.get(f"/search?image={image_id}&k=3")
        assert r.status_code == 200 and r.json()["results"][0]["path"].startswith("s3://")
    from tests import db as testdb

    with testdb.connect("retrieval-index/retrieval.db") as conn:  # a row pointing elsewhere is not served
        conn.execute("UPDATE images SET path = ? WHERE id = ?", (f"s3://{bucket}-other/x.jpg", image_id))
    # (a running server answers from the generation it loaded: a fresh one sees the changed row)
    with TestClient(create_app(ApiSettings(index_dir=Path("retrieval-index"), device="cpu",
                                           reload_check_s=3600.0))) as client:
        r = client.get(f"/images/{image_id}/file")
        assert r.status_code == 404


def test_a_bucket_that_disappears_mid_run_fails_cleanly(s3, tmp_path: Path, tiny_model_dir: Path,  # noqa: ANN001
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fs, bucket = s3
    make_corpus(tmp_path / "local", 6)
    upload(fs, bucket, tmp_path / "local")
    from retrieval.sources.remote import PrefixSource

    listed = PrefixSource.scan

    def scan_then_delete(self, *a, **k):  # noqa: ANN001, ANN002, ANN003
        entries = list(listed(self, *a, **k))
        fs.rm(f"{bucket}/photos", recursive=True)  # gone between the listing and the reads
        return iter(entries)

    monkeypatch.setattr(PrefixSource, "scan", scan_then_delete)
    summary = index(f"s3://{bucket}/photos", tiny_model_dir)
    assert (summary["new"], summary["failed"]) == (0, 6)
    assert summary["failure_kinds"] == {"vanished": 6}
    monkeypatch.setattr(PrefixSource, "scan", listed)
    code, out = cli("index", f"s3://{bucket}/photos", "--no-progress")
    assert code == 1 and "no images found in s3://" in out and out.count("\n") == 1, out
    code, out = cli("index", f"s3://{bucket}-never-made/photos", "--index-dir", "other", "--no-progress")
    assert code == 1 and out.count("\n") == 1 and "Error:" in out


def test_an_interrupted_s3_run_resumes(s3, s3_endpoint: str, tmp_path: Path,  # noqa: ANN001
                                       tiny_model_dir: Path) -> None:
    fs, bucket = s3
    make_corpus(tmp_path / "local", 48)
    upload(fs, bucket, tmp_path / "local")
    url = f"s3://{bucket}/photos"
    from tests import db as testdb

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), **testdb.env("retrieval-index"))
    proc = subprocess.Popen([sys.executable, "-m", "retrieval.cli", "index", url, "--model", str(tiny_model_dir),
                             "--no-progress", "-b", "4", "-j", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    db = Path("retrieval-index/retrieval.db")
    deadline = time.monotonic() + 120
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        if len(_count(db)) >= 8:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    proc.wait()
    assert killed, proc.stdout.read().decode() if proc.stdout else ""
    before = _count(db)
    assert 8 <= len(before) < 48
    summary = index(url, tiny_model_dir)
    assert summary["new"] == 48 - len(before) and summary["total_images"] == 48
    after = _count(db)
    assert {p: i for p, i in after.items() if p in before} == before, "committed images keep their ids"
    assert cli("verify")[0] == 0


def _count(db: Path) -> dict[str, int]:
    from tests import db as testdb

    return dict(testdb.peek(db, "SELECT path, id FROM images"))


def test_index_webdataset_shards_local_and_on_s3(s3, tmp_path: Path, tiny_model_dir: Path) -> None:  # noqa: ANN001
    webdataset = pytest.importorskip("webdataset")
    fs, bucket = s3
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(3):
        with webdataset.TarWriter(str(shards / f"{s:06d}.tar")) as sink:
            for i in range(4):
                sink.write({"__key__": f"{s:06d}_{i:04d}", "jpg": encode(photo(64, 48, seed=100 * s + i), "JPEG"),
                            "json": json.dumps({"caption": f"shard {s} item {i}"}).encode()})
            sink.write({"__key__": f"{s:06d}_bad", "jpg": b"\xff\xd8 not a jpeg"})
    pattern = str(shards / "{000000..000002}.tar")
    from retrieval.sources import shards as shard_module

    streams = []
    original = shard_module.ShardSource._stream
    shard_module.ShardSource._stream = lambda self, sid, *a: streams.append(sid) or original(self, sid, *a)
    try:
        summary = index(pattern, tiny_model_dir)
    finally:
        shard_module.ShardSource._stream = original
    assert (summary["new"], summary["failed"]) == (12, 3)
    assert sorted(streams) == ["000000.tar", "000001.tar", "000002.tar"], "each shard is streamed once"
    rows = db_rows()
    assert "000001.tar#000001_0002.jpg" in rows
    assert rows["000001.tar#000001_0002.jpg"][4] is not None
    assert json.loads(rows["000001.tar#000001_0002.jpg"][4])["json"] == {"caption": "shard 1 item 2"}
    again = index(pattern, tiny_model_dir)
    assert (again["new"], again["unchanged"], again["known_failures"]) == (0, 12, 3)
    code, out = cli("search", "000001.tar#000001_0002.jpg", "-k", "2", "--json")
    assert code == 0 and json.loads(out)["results"][0]["path"].endswith(".jpg")
    import tarfile

    from fastapi.testclient import TestClient
    from retrieval.api.app import create_app
    from retrieval.api.settings import ApiSettings

    with tarfile.open(shards / "000001.tar") as tar:
        member = tar.extractfile("000001_0002.jpg").read()  # type: ignore[union-attr]
    with TestClient(create_app(ApiSettings(index_dir=Path("retrieval-index"), device="cpu",
                                           reload_check_s=3600.0))) as client:
        r = client.get(f"/images/{rows['000001.tar#000001_0002.jpg'][0]}/file")
        assert r.status_code == 200 and r.content == member
        assert client.get(f"/images/{rows['000001.tar#000001_0002.jpg'][0]}/thumbnail").status_code == 200

    # the same shards on the S3 server, by glob
    for p in sorted(shards.glob("*.tar")):
        fs.pipe(f"{bucket}/shards/{p.name}", p.read_bytes())
    remote = index(f"s3://{bucket}/shards/*.tar", tiny_model_dir, "--index-dir", "remote-index")
    assert (remote["new"], remote["failed"]) == (12, 3)
    rows = db_rows("remote-index")
    assert f"s3://{bucket}/shards/000002.tar#000002_0003.jpg" in rows

    # dedup --apply on shards writes a manifest and a filtered list instead of moving anything
    fs.pipe(f"{bucket}/shards/000003.tar", (shards / "000000.tar").read_bytes())  # a whole shard of copies
    index(f"s3://{bucket}/shards/*.tar", tiny_model_dir, "--index-dir", "remote-index")
    args = ("dedup", "--index-dir", "remote-index", "--report-dir", "dd", "--no-progress", "--no-embeddings",
            "--phash-distance", "-1", "--pdq-distance", "-1")  # exact copies only: random weights
    code, out = cli(*args)  # the report first: --apply acts on a reviewed run only
    assert code == 0, out
    from retrieval.curation.queries import set_decisions
    from retrieval.store import DuplicateMember, Store
    from tests import db as testdb

    store = Store(testdb.url("remote-index"))  # a reviewer keeps one removal
    try:
        with store.session() as s:
            kept_by_review = s.query(DuplicateMember).filter(DuplicateMember.run_id == 1,
                                                             DuplicateMember.action == "remove").first()
            assert kept_by_review is not None
        set_decisions(store, 1, {kept_by_review.id: "keep"})
    finally:
        store.close()
    code, out = cli(*args, "--apply", "--run", "1")
    assert code == 0, out
    assert "not changed in place" in out and "nothing moved" in out
    import pyarrow.parquet as pq

    kept = pq.read_table("dd/kept.parquet").to_pydict()
    assert len(kept["url"]) == 16 - 3 and "json" in kept  # 4 copies, one kept by the review decision
    assert kept_by_review.path in kept["url"]
    assert fs.exists(f"{bucket}/shards/000003.tar")
    shards_left = (Path("dd") / "kept-shards.txt").read_text().split()
    assert shards_left == sorted({u.partition("#")[0] for u in kept["url"]})
    assert len(shards_left) == 3 + ("000003.tar#" in kept_by_review.path)  # the copies' shard goes unless kept


def test_index_a_parquet_list_of_http_urls_then_dedup_against_and_curate_with_remote_sets(
        tmp_path: Path, tiny_model_dir: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    site = tmp_path / "site"
    make_corpus(site / "imgs", 12)
    make_corpus(site / "refs", 2)  # the same first two images: contamination
    make_corpus(site / "queries", 3, start=3)
    with http_server(site) as base:
        urls = [f"{base}/imgs/{p.relative_to(site / 'imgs').as_posix()}" for p in sorted((site / "imgs").rglob("*.*"))]
        pq.write_table(pa.table({"url": urls + [f"{base}/imgs/missing.jpg"], "key": [f"{i:05d}" for i in range(13)],
                                 "caption": [f"c{i}" for i in range(13)]}), tmp_path / "urls.parquet")
        summary = index(tmp_path / "urls.parquet", tiny_model_dir)
        assert (summary["new"], summary["failed"], summary["failure_kinds"]) == (12, 1, {"vanished": 1})
        rows = db_rows()
        assert set(rows) == set(urls)
        assert json.loads(rows[urls[0]][4]) == {"key": "00000", "caption": "c0"}
        query = f"{base}/queries/a/img0003.png"  # not indexed: fetched and embedded
        code, out = cli("search", query, "-k", "2", "--json")
        assert code == 0 and json.loads(out)["answered_from"] == "embedded URL", out
        code, out = cli("search", f"{base}/nothing-here.jpg", "-k", "2")
        assert code == 1 and "cannot read" in out and out.count("\n") == 1

        code, out = cli("dedup", "--against", f"{base}/refs/", "--report-dir", "rel", "--no-progress", "--json")
        assert code == 0, out
        doc = json.loads((Path("rel") / "duplicates.json").read_text())
        refs = [m["path"] for g in doc["groups"] for m in g["members"] if m["reference"]]
        assert refs and all(r.startswith(f"{base}/refs/") for r in refs)
        assert len(list(Path("rel/thumbs").glob("*.jpg"))) >= 4, "thumbnails of URL images and references"

        (tmp_path / "queries.txt").write_text("".join(f"{base}/queries/{p.relative_to(site / 'queries').as_posix()}\n"
                                                      for p in sorted((site / "queries").rglob("*.*"))))
        code, out = cli("curate", "--queries", tmp_path / "queries.txt", "-k", "1", "--report-dir", "cur",
                        "--no-progress", "--json")
        assert code == 0, out
        curated = (Path("cur") / "curated.txt").read_text().split()
        assert curated and all(u.startswith(base) for u in curated)
        code, out = cli("dedup", "--report-dir", "dd", "--no-progress", "--json")  # review first, then apply
        assert code == 0, out
        code, out = cli("dedup", "--apply", "--run", json.loads(out)["run_id"], "--report-dir", "dd", "--no-progress")
        assert code == 0 and "kept.parquet" in out


def test_a_server_that_goes_away_mid_run_stops_the_run_with_one_line(tmp_path: Path, tiny_model_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from retrieval.indexer import stages
    from retrieval.sources.remote import PrefixSource

    monkeypatch.setattr(stages, "UNREACHABLE_STREAK", 5)
    make_corpus(tmp_path / "site", 16)
    with http_server(tmp_path / "site") as base:
        entries = list(PrefixSource(base + "/").scan())
    # The server is gone now: the listing is replayed, every read is refused.
    monkeypatch.setattr(PrefixSource, "scan", lambda self, *a, **k: iter(entries))
    start = time.monotonic()
    code, out = cli("index", base + "/", "--model", tiny_model_dir, "--no-progress", "-j", "0", "-b", "4")
    assert code == 1 and out.count("\n") == 1 and "stopped answering" in out, out
    assert time.monotonic() - start < 60
    from tests import db as testdb

    with testdb.connect("retrieval-index/retrieval.db") as conn:
        status, error = conn.execute("SELECT status, error FROM index_runs ORDER BY id DESC").fetchone()
        kinds = conn.execute("SELECT DISTINCT kind FROM failures").fetchall()
    assert status == "failed" and "stopped answering" in error
    assert kinds == [("io_error",)], "reads that failed are recorded (and retried by the next run)"


def test_a_new_remote_shard_is_fetched_once(tmp_path: Path, tiny_model_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Listing a new remote shard keeps its bytes (one GET); decoding reads that copy, not the server."""
    import collections

    webdataset = pytest.importorskip("webdataset")
    site = tmp_path / "site"
    site.mkdir()
    for s in range(2):
        with webdataset.TarWriter(str(site / f"{s:06d}.tar")) as sink:
            for i in range(5):
                sink.write({"__key__": f"{s:06d}_{i:04d}", "jpg": encode(photo(64, 48, seed=10 * s + i), "JPEG"),
                            "json": json.dumps({"i": i}).encode()})
    sizes = {f"/{p.name}": p.stat().st_size for p in site.glob("*.tar")}
    gets: collections.Counter = collections.Counter()
    sent: collections.Counter = collections.Counter()
    with http_server(site, gets, sent) as base:
        pattern = base + "/{000000..000001}.tar"
        summary = index(pattern, tiny_model_dir)
        assert (summary["new"], summary["failed"]) == (10, 0)
        assert {p: gets[p] for p in sizes} == {p: 1 for p in sizes}, gets
        assert {p: sent[p] for p in sizes} == sizes, "each shard's bytes crossed the network once"
        assert db_rows()[f"{base}/000001.tar#000001_0003.jpg"][4] is not None  # sidecars from the local copy

        gets.clear()
        again = index(pattern, tiny_model_dir)
        assert (again["new"], again["unchanged"]) == (0, 10)
        assert not any(p.endswith(".tar") for p in gets), "an unchanged shard is not read at all"

        # With the spool turned off a new shard is read twice, each time as one sequential stream.
        monkeypatch.setenv("RETRIEVAL_SHARD_SPOOL_BYTES", "0")
        gets.clear()
        other = index(pattern, tiny_model_dir, "--index-dir", "other-index")
        assert other["new"] == 10 and {p: gets[p] for p in sizes} == {p: 2 for p in sizes}, gets
    assert not list(Path(tempfile.gettempdir()).glob("retrieval-shard-spool-*/*.tar")), "no spool file left"
