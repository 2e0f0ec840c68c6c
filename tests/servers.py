"""Real servers on loopback for the source and database tests: moto's S3 server, the standard
library's HTTP file server, and PostgreSQL (TEST_POSTGRES_URL from .ci/run, else one started here
from Debian's binaries).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import glob
import http.server
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's standalone S3-compatible server over HTTP on 127.0.0.1 (a real socket, not a mock)."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[object, str]]:
    """(s3fs filesystem, fresh bucket name); credentials and endpoint only through the environment."""
    import s3fs

    for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(key, value)
    from retrieval.sources import remote

    remote._FILESYSTEMS.clear()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    yield fs, bucket
    remote._FILESYSTEMS.clear()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class _CountingRangeHandler(_QuietHandler):
    """Counts GETs per path (and bytes sent) and answers `Range: bytes=a-b` as object stores do."""

    gets: collections.Counter
    sent: collections.Counter

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.gets[self.path] += 1
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = self.translate_path(self.path)
        if match is None or not os.path.isfile(path):
            return super().do_GET()
        size = os.path.getsize(path)
        start = int(match.group(1))
        end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
        if start >= size:
            self.send_error(416)
            return
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(body)
        self.sent[self.path] += len(body)

    def copyfile(self, source: Any, outputfile: Any) -> None:
        data = source.read()
        outputfile.write(data)
        self.sent[self.path] += len(data)


@contextlib.contextmanager
def http_server(folder: Path, gets: collections.Counter | None = None,
                sent: collections.Counter | None = None) -> Iterator[str]:
    """http.server serving `folder` (directory index pages included) on 127.0.0.1.

    With `gets` (and `sent`): the server also answers Range requests, and counts GETs (and bytes) per path.
    """
    if gets is not None:
        sent = collections.Counter() if sent is None else sent
        counting = type("Handler", (_CountingRangeHandler,), {"gets": gets, "sent": sent})
        handler = functools.partial(counting, directory=str(folder))
    else:
        handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --- PostgreSQL -----------------------------------------------------------------------------------
def _start_postgres() -> tuple[str, callable] | None:  # type: ignore[valid-type]
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        return None
    bindir = os.path.dirname(bins[-1])
    data = tempfile.mkdtemp(prefix="retrieval-test-pg-")
    port = free_port()
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(data, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*prefix, f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)
    subprocess.run([*prefix, f"{bindir}/pg_ctl", "-D", data, "-l", f"{data}/log", "-w", "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True)

    def stop() -> None:
        subprocess.run([*prefix, f"{bindir}/pg_ctl", "-D", data, "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)

    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", stop


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """URL of a PostgreSQL server's maintenance database."""
    pytest.importorskip("psycopg")
    url = os.environ.get("TEST_POSTGRES_URL")
    if url:
        yield url
        return
    started = _start_postgres()
    if started is None:
        pytest.skip("no PostgreSQL server: set TEST_POSTGRES_URL or install Debian's postgresql (.ci/run does)")
    url, stop = started
    try:
        yield url
    finally:
        stop()


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database on the server for one test, dropped afterwards."""
    import psycopg
    from sqlalchemy.engine import make_url

    base = make_url(postgres_server)
    name = f"t_{uuid.uuid4().hex[:16]}"
    plain = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on SQLite (a file in tmp_path) and on a real PostgreSQL server."""
    if request.param == "sqlite":
        from tests import db

        if db.postgres():
            pytest.skip("the SQLite pass runs the SQLite case")
        return f"sqlite:///{tmp_path / 'param.db'}"
    return request.getfixturevalue("postgres_url")


# --- Google Cloud Storage and Azure Blob Storage emulators ----------------------------------------
def _wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout  # a startup wait, not an assertion on speed
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the emulator exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@pytest.fixture(scope="session")
def gcs_endpoint() -> Iterator[str]:
    """gcp-storage-emulator (PyPI, pure Python) on 127.0.0.1: the GCS JSON API that gcsfs speaks."""
    # The emulator has no Storage Control (gRPC) API, so gcsfs's bucket-type probe for hierarchical
    # namespaces would fail and warn on every call; read before gcsfs is first imported.
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    pytest.importorskip("gcsfs")
    server_module = pytest.importorskip("gcp_storage_emulator.server")
    port = free_port()
    server = server_module.create_server("127.0.0.1", port, in_memory=True)
    server.start()
    httpd = server._api._httpd
    report = httpd.handle_error

    def handle_error(request: Any, address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up early is no error
            report(request, address)

    httpd.handle_error = handle_error
    try:
        _wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def gcs(gcs_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[object, str]]:
    """(gcsfs filesystem, fresh bucket); the endpoint only through gcsfs's STORAGE_EMULATOR_HOST."""
    import gcsfs

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint)
    from retrieval.sources import remote

    remote._FILESYSTEMS.clear()
    fs = gcsfs.GCSFileSystem(skip_instance_cache=True, use_listings_cache=False)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    yield fs, bucket
    remote._FILESYSTEMS.clear()


# Azurite's documented development account (public, the same in every Azurite install).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def azurite_binary() -> str | None:
    """`azurite-blob` from PATH or AZURITE_BLOB (.ci/run installs it from npm)."""
    return os.environ.get("AZURITE_BLOB") or shutil.which("azurite-blob")


@pytest.fixture(scope="session")
def azurite_endpoint() -> Iterator[str]:
    """Azurite (Microsoft's Azure Storage emulator, from npm) serving Blob storage on 127.0.0.1."""
    pytest.importorskip("adlfs")
    binary = azurite_binary()
    if binary is None or not os.access(binary, os.X_OK):
        if os.environ.get("CI") or os.environ.get("AZURITE_BLOB"):
            pytest.fail(f"azurite-blob is missing ({binary}): .ci/run installs it with npm")
        pytest.skip("Azurite is not installed (npm install azurite; put azurite-blob on PATH or set AZURITE_BLOB)")
    port = free_port()
    proc = subprocess.Popen([binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
                             "--silent", "--skipApiVersionCheck", "--disableTelemetry"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_port(port, proc)
        yield f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def azure(azurite_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[object, str]]:
    """(adlfs filesystem, fresh container); the account only through AZURE_STORAGE_CONNECTION_STRING."""
    import adlfs

    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING",
                       f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
                       f"BlobEndpoint={azurite_endpoint};")
    from retrieval.sources import remote

    remote._FILESYSTEMS.clear()
    fs = adlfs.AzureBlobFileSystem(skip_instance_cache=True)
    container = f"c-{uuid.uuid4().hex[:12]}"
    fs.mkdir(container)
    yield fs, container
    remote._FILESYSTEMS.clear()
