"""image=URL queries: off by default, http(s) only, no private hosts, no redirects, size and time limits."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest
from fastapi.testclient import TestClient
from retrieval.api.app import create_app

from tests.api.conftest import Indexed

BIG = 200_000


@pytest.fixture(scope="module")
def image_server(indexed: Indexed) -> Iterator[str]:
    payload = (indexed.corpus / "dup" / "orig.jpg").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/img.jpg":
                self._send(200, payload)
            elif self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "file:///etc/passwd")
                self.end_headers()
            elif self.path == "/big":
                self._send(200, b"\xff\xd8\xff" + b"0" * BIG)
            elif self.path == "/chunked-big":
                self.send_response(200)
                self.end_headers()  # no content-length: the client must count while reading
                for _ in range(BIG // 10_000 + 1):
                    self.wfile.write(b"0" * 10_000)
            elif self.path == "/slow":
                time.sleep(3)
                self._send(200, payload)
            elif self.path == "/drip":  # headers at once, then one byte at a time: each read is quick
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                for _ in range(1000):
                    self.wfile.write(b"0")
                    self.wfile.flush()
                    time.sleep(0.2)
            elif self.path == "/text":
                self._send(200, b"hello, not an image")
            else:
                self._send(404, b"missing")

        def _send(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    class QuietServer(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address) -> None:  # noqa: ANN001
            pass  # clients that time out (the /slow case) break the pipe; that is expected here

    server = QuietServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# A deadline no loaded machine reaches on loopback: a fetch that should succeed never fails for time.
# The timeout cases shorten it (short_deadline) against a server that answers far later than that.
GENEROUS_S = 60.0
SHORT_S = 1.0


@pytest.fixture(scope="module")
def url_client(indexed: Indexed) -> Iterator[TestClient]:
    settings = indexed.settings(allow_url_queries=True, url_allow_private=True, max_upload_bytes=100_000,
                                url_timeout_s=GENEROUS_S)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def short_deadline(url_client: TestClient, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    """The same server with a 1 s fetch deadline, for this test only (routes read app.state.settings)."""
    monkeypatch.setattr(url_client.app.state.settings, "url_timeout_s", SHORT_S)
    return url_client


def test_url_queries_are_off_by_default(client: TestClient, image_server: str) -> None:
    r = client.get("/search", params={"image": f"{image_server}/img.jpg"})
    assert r.status_code == 400
    assert r.json()["detail"] == "URL queries are disabled; start the server with --allow-url-queries"


def test_private_addresses_are_refused_unless_allowed(indexed: Indexed, image_server: str) -> None:
    with TestClient(create_app(indexed.settings(allow_url_queries=True))) as c:
        r = c.get("/search", params={"image": f"{image_server}/img.jpg"})
    assert r.status_code == 400
    assert r.json()["detail"] == "the URL points to a private or local address"


def test_url_query_embeds_the_fetched_image(url_client: TestClient, image_server: str, indexed: Indexed) -> None:
    r = url_client.get("/search", params={"image": f"{image_server}/img.jpg", "k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answered_from"] == "embedded URL"
    # The same bytes as dup/orig.jpg (dup/copy.jpg, a re-encode, may tie with it at the top).
    scores = {hit["id"]: hit["score"] for hit in body["results"][:2]}
    assert scores.get(indexed.ids["dup/orig.jpg"], 0) > 0.9999


@pytest.mark.parametrize("path, code, detail", [
    ("/redirect", 400, "the URL redirects; redirects are not followed"),
    ("/big", 413, "upload too large: the limit is 100000 bytes"),
    ("/chunked-big", 413, "upload too large: the limit is 100000 bytes"),
    ("/text", 415, "not an image: the upload is in no image format the server can read"),
    ("/nothing", 400, "the URL answered HTTP 404"),
])
def test_url_fetch_limits(url_client: TestClient, image_server: str, path: str, code: int, detail: str) -> None:
    r = url_client.get("/search", params={"image": f"{image_server}{path}"})
    assert r.status_code == code, r.text
    assert r.json()["detail"] == detail


@pytest.mark.parametrize("path", ["/slow", "/drip"])  # no answer for 3 s; an answer dripping over 200 s
def test_url_fetch_deadline(short_deadline: TestClient, image_server: str, path: str) -> None:
    start = time.monotonic()
    r = short_deadline.get("/search", params={"image": f"{image_server}{path}"})
    assert r.status_code == 504, r.text
    assert r.json()["detail"] == "fetching the URL timed out"
    assert time.monotonic() - start < GENEROUS_S / 2, "the short deadline, not the generous one, stopped it"


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x.jpg", "file:///etc/passwd", "gopher://127.0.0.1:70/"])
def test_only_http_and_https(url_client: TestClient, url: str) -> None:
    r = url_client.get("/search", params={"image": url})
    assert r.status_code == 400
    assert r.json()["detail"] == "only http and https URLs are accepted"


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("192.168.0.1", False), ("169.254.169.254", False),
    ("100.100.100.200", False),  # CGNAT range: a cloud metadata address
    ("::1", False), ("fe80::1", False), ("fc00::1", False), ("224.0.0.1", False), ("0.0.0.0", False),
    ("::ffff:10.0.0.1", False), ("64:ff9b::a00:1", False), ("2002:a00:1::", False),  # IPv4 wrapped in IPv6
    ("::ffff:8.8.8.8", True),
])
def test_public_address_classification(address: str, public: bool) -> None:
    import ipaddress

    from retrieval.api.url_fetch import _is_public

    assert _is_public(ipaddress.ip_address(address)) is public
