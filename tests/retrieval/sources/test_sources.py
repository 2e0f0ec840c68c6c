"""Sources one by one: what a corpus argument means, listing, bounded and retried reads, list columns."""

from __future__ import annotations

import csv
import http.server
import json
import threading
import time
from pathlib import Path

import pytest

from retrieval.errors import CorpusError, ReadFailure
from retrieval.sources import open_source
from retrieval.sources.base import ReadLimits, read_bounded, with_retries
from retrieval.sources.folder import FolderSource
from retrieval.sources.lists import ListSource
from retrieval.sources.remote import PrefixSource, read_url
from retrieval.sources.shards import ShardSource, braceexpand, split_member
from tests.conftest import make_corpus
from tests.images import encode, photo
from tests.servers import http_server

FAST = ReadLimits(timeout_s=2.0, retries=2, max_bytes=10**7, backoff_s=0.01)


def test_a_corpus_argument_names_the_right_source(tmp_path: Path) -> None:
    make_corpus(tmp_path / "photos", 2)
    (tmp_path / "urls.txt").write_text("a.jpg\n")
    assert isinstance(open_source(tmp_path / "photos"), FolderSource)
    assert isinstance(open_source(str(tmp_path / "urls.txt")), ListSource)
    assert isinstance(open_source("s3://bucket/photos"), PrefixSource)
    assert open_source("s3://bucket/photos/").uri == "s3://bucket/photos", "not mangled into s3:/bucket"
    assert isinstance(open_source("shards/{000000..000009}.tar"), ShardSource)
    assert isinstance(open_source("s3://bucket/shards-*.tar"), ShardSource)
    with pytest.raises(CorpusError, match="does not exist"):
        open_source(tmp_path / "nope")
    with pytest.raises(CorpusError, match="not a folder"):
        open_source(tmp_path / "photos" / "a" / "img0001.jpg")


def test_brace_patterns_expand_like_webdataset() -> None:
    assert braceexpand("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert braceexpand("{a,b}/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"]
    assert split_member("dir/000123_0042.seg.jpg") == ("dir/000123_0042", ".seg.jpg")


def test_lists_keep_img2dataset_columns_as_metadata(tmp_path: Path) -> None:
    make_corpus(tmp_path / "imgs", 3)
    with open(tmp_path / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "url", "caption"])
        w.writerow(["k0", "imgs/b/img0000.png", "a red thing"])
        w.writerow(["k1", "https://example.invalid/x.jpg", "remote"])
        w.writerow(["k0b", "imgs/b/img0000.png", "listed twice"])
    listed = open_source(str(tmp_path / "list.csv"))
    entries = list(listed.scan())
    assert listed.owns("https://example.invalid/x.jpg") and not listed.owns("/etc/passwd")
    assert [e.path for e in entries] == [str(tmp_path / "imgs/b/img0000.png"), "https://example.invalid/x.jpg"]
    assert entries[0].meta == {"key": "k0", "caption": "a red thing"} and entries[0].size > 0
    assert entries[1].size == 0 and entries[1].meta["key"] == "k1"

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"url": ["imgs/a/img0001.jpg", None], "key": ["1", "2"], "width": [96, 1]}),
                   tmp_path / "list.parquet")
    got = list(open_source(str(tmp_path / "list.parquet")).scan())
    assert [(e.path, e.meta) for e in got] == [(str(tmp_path / "imgs/a/img0001.jpg"), {"key": "1", "width": 96})]
    (tmp_path / "paths.txt").write_text("# a comment\n\nimgs/a/img0001.jpg\nmissing.jpg\n")
    got = list(open_source(str(tmp_path / "paths.txt")).scan())
    assert [e.size for e in got][1] == -1, "a listed file that is missing becomes a recorded failure"


def test_reads_are_bounded() -> None:
    import io

    assert read_bounded(io.BytesIO(b"x" * 100), 100) == b"x" * 100
    with pytest.raises(ReadFailure) as info:
        read_bounded(io.BytesIO(b"x" * 101), 100)
    assert info.value.failure_kind == "too_large"


def test_transient_errors_are_retried_with_backoff_then_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    from retrieval.sources import base

    calls = []
    delays: list[float] = []
    monkeypatch.setattr(base.time, "sleep", delays.append)

    def flaky() -> bytes:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return b"ok"

    assert with_retries(flaky, FAST, "x") == b"ok" and len(calls) == 3
    assert delays == [FAST.backoff_s, 2 * FAST.backoff_s], "exponential backoff between attempts"

    def gone() -> bytes:
        raise FileNotFoundError("nope")

    with pytest.raises(ReadFailure) as info:
        with_retries(gone, FAST, "x")
    assert info.value.failure_kind == "vanished"

    def always() -> bytes:
        raise TimeoutError("timed out")

    with pytest.raises(ReadFailure) as info:
        with_retries(always, FAST, "x")
    assert info.value.failure_kind == "io_error" and "TimeoutError" in info.value.reason


class _Flaky(http.server.BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        n = self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if self.path == "/flaky.jpg" and n < 2:
            self.send_response(503)
            self.end_headers()
            return
        if self.path == "/slow.jpg":
            time.sleep(3)
        if self.path == "/denied.jpg":
            self.send_response(403)
            self.end_headers()
            return
        if self.path == "/big.jpg":
            body = b"x" * 2_000_000
        elif self.path in ("/flaky.jpg", "/slow.jpg"):
            body = encode(photo(32, 32, seed=1), "JPEG")
        else:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_http_reads_time_out_retry_and_fail_with_a_reason() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    limits = ReadLimits(timeout_s=0.5, retries=1, max_bytes=1_000_000, backoff_s=0.01)
    try:
        assert read_url(f"{base}/flaky.jpg", limits)[:2] == b"\xff\xd8", "a 503 is retried"
        failures = {}
        for name in ("missing.jpg", "denied.jpg", "big.jpg", "slow.jpg"):
            start = time.monotonic()
            with pytest.raises(ReadFailure) as info:
                read_url(f"{base}/{name}", limits)
            failures[name] = info.value.failure_kind
            assert time.monotonic() - start < 3, f"{name}: a read never hangs past its timeout and retries"
        assert failures == {"missing.jpg": "vanished", "denied.jpg": "unreadable", "big.jpg": "too_large",
                            "slow.jpg": "io_error"}
    finally:
        server.shutdown()
        server.server_close()


def test_an_http_prefix_is_listed_from_its_index_pages(tmp_path: Path) -> None:
    make_corpus(tmp_path / "site", 4)
    (tmp_path / "site" / "notes.txt").write_text("not an image")
    with http_server(tmp_path / "site") as base:
        source = open_source(base + "/")
        entries = list(source.scan())
        assert sorted(e.path for e in entries) == sorted(
            f"{base}/{p.relative_to(tmp_path / 'site').as_posix()}" for p in (tmp_path / "site").rglob("img*"))
        assert all(e.size > 0 for e in entries)
        data = source.read_bytes(entries[0].path)
        assert data == (tmp_path / "site" / entries[0].path[len(base) + 1:]).read_bytes()
        assert source.owns(entries[0].path) and not source.owns("http://elsewhere/x.jpg")
        assert not source.owns(f"{base}/../etc/passwd")


def test_shard_members_are_listed_with_sidecars_and_staged_in_one_pass(tmp_path: Path) -> None:
    webdataset = pytest.importorskip("webdataset")
    (tmp_path / "shards").mkdir()
    for s in range(2):
        with webdataset.TarWriter(str(tmp_path / "shards" / f"{s:06d}.tar")) as sink:
            for i in range(3):
                sink.write({"__key__": f"{s:06d}_{i:04d}", "jpg": encode(photo(40, 30, seed=s * 10 + i), "JPEG"),
                            "json": json.dumps({"caption": f"c{s}{i}"}).encode(), "txt": b"hello"})
    source = open_source(str(tmp_path / "shards" / "{000000..000001}.tar"))
    entries = list(source.scan(cache_dir=tmp_path / "cache"))
    assert [e.path for e in entries][:2] == ["000000.tar#000000_0000.jpg", "000000.tar#000000_0001.jpg"]
    assert len(entries) == 6 and all(e.etag for e in entries)
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 2, "listings are cached per shard"
    staged = source.stage("000001.tar", {"000001.tar#000001_0002.jpg"}, tmp_path)
    assert staged.read("000001.tar#000001_0002.jpg", -1) == source.read_bytes("000001.tar#000001_0002.jpg")
    assert staged.meta("000001.tar#000001_0002.jpg") == {"json": {"caption": "c12"}, "txt": "hello"}
    with pytest.raises(ReadFailure):
        staged.read("000001.tar#000001_0001.jpg", -1)  # not wanted, not staged
    assert source.owns("000001.tar#000001_0002.jpg") and not source.owns("../../etc/passwd#x")


def test_staging_part_of_a_shard_stops_reading_after_the_last_wanted_sample(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that wants the first samples of a shard (how `index --ray` cuts shards into batches)
    reads up to them and their sidecars, not the rest of the tar."""
    webdataset = pytest.importorskip("webdataset")
    with webdataset.TarWriter(str(tmp_path / "000000.tar")) as sink:
        for i in range(20):
            sink.write({"__key__": f"000000_{i:04d}", "jpg": encode(photo(64, 48, seed=i), "JPEG"),
                        "json": json.dumps({"caption": f"c{i}"}).encode()})
    source = open_source(str(tmp_path / "{000000..000000}.tar"))
    list(source.scan(cache_dir=tmp_path / "cache"))
    read = []
    original = type(source)._open

    def counting_open(self, location, block_size=None):  # type: ignore[no-untyped-def]
        f = original(self, location, block_size=block_size)
        inner_read = f.read

        def counted(n=-1):  # type: ignore[no-untyped-def]
            data = inner_read(n)
            read.append(len(data))
            return data

        f.read = counted
        return f

    monkeypatch.setattr(type(source), "_open", counting_open)
    (tmp_path / "staged").mkdir()
    (tmp_path / "staged2").mkdir()
    wanted = {"000000.tar#000000_0000.jpg", "000000.tar#000000_0001.jpg"}
    staged = source.stage("000000.tar", wanted, tmp_path / "staged")
    assert staged.meta("000000.tar#000000_0001.jpg") == {"json": {"caption": "c1"}}
    assert 0 < sum(read) < (tmp_path / "000000.tar").stat().st_size / 2
    read.clear()
    staged = source.stage("000000.tar", {"000000.tar#000000_0019.jpg"}, tmp_path / "staged2")
    assert staged.meta("000000.tar#000000_0019.jpg") == {"json": {"caption": "c19"}}  # the last sample's sidecar too
