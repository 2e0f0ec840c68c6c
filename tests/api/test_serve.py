"""`retrieval serve` as a real process on a free loopback port, answering concurrent uploads."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests import db as testdb
from tests.api.conftest import Indexed

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(index_dir: Path, workdir: Path, env: dict[str, str], headers: dict[str, str] | None = None,
                   startup_s: float = 120) -> Iterator[str]:
    """`retrieval serve` on a free loopback port until the block ends; yields its base URL."""
    port = free_port()
    log_path = workdir / "server.log"
    log = log_path.open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "retrieval.cli", "serve", "--index-dir", str(index_dir),
                             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                            env={**env, **testdb.env(index_dir), "PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s  # a startup wait, not an assertion on speed
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{base}/readyz", headers=headers, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def server(indexed: Indexed, tmp_path: Path):  # noqa: ANN201
    env = {**os.environ, "RETRIEVAL_API_KEY": "k3y", "RETRIEVAL_DEVICE": "cpu",
           "RETRIEVAL_BATCH_MAX_WAIT_MS": "20", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with running_server(indexed.index_dir, tmp_path, env, {"Authorization": "Bearer k3y"}) as base:
        yield base


def test_serve_answers_concurrent_uploads(server: str, indexed: Indexed) -> None:
    names = ["a/img0001.jpg", "b/img0002.jpg", "a/img0003.png", "b/img0004.jpg", "a/img0005.jpg", "b/img0006.png"]
    auth = {"Authorization": "Bearer k3y"}
    assert httpx.get(f"{server}/healthz").status_code == 200
    assert httpx.get(f"{server}/stats").status_code == 401

    def upload(name: str) -> dict:
        with httpx.Client(timeout=60) as c:
            r = c.post(f"{server}/search", params={"k": 3}, headers=auth,
                       files={"file": (Path(name).name, (indexed.corpus / name).read_bytes(), "image/jpeg")})
            assert r.status_code == 200, r.text
            return r.json()

    with ThreadPoolExecutor(len(names) * 2) as pool:
        answers = list(pool.map(upload, names * 2))
    for name, body in zip(names * 2, answers):
        assert body["results"][0]["path"] == name and body["results"][0]["score"] > 0.999
    by_id = httpx.get(f"{server}/search", params={"image": "a/img0001.jpg", "k": 3}, headers=auth).json()
    assert len(by_id["results"]) == 3 and by_id["answered_from"] == "stored vector"
    bad = httpx.post(f"{server}/search", content=b"not an image", headers=auth)
    assert bad.status_code == 415
    assert httpx.get(f"{server}/readyz", headers=auth).json()["ready"] is True
