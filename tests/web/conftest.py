"""A real `retrieval serve` on loopback and Debian's chromium driven by Playwright (no browser download).

Every page runs with the network blocked: any request not to 127.0.0.1 is aborted and recorded.
Screenshots land in a pytest temp folder (printed); with SAVE_UI_SCREENSHOTS=1 they are also
copied to docs/screenshots/ for the README.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import pytest
from typer.testing import CliRunner

from retrieval.cli.app import app as cli_app
from tests.api.conftest import Indexed, _ids, run_index
from tests.api.test_serve import running_server
from tests.conftest import make_corpus
from tests.images import photo, write

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]


def cli(*args: object) -> str:
    result = CliRunner().invoke(cli_app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@dataclass
class Served:
    base: str
    indexed: Indexed
    shots: Path
    blocked: list[str] = field(default_factory=list)

    def shot(self, page: Any, name: str) -> Path:
        path = self.shots / f"{name}.png"
        page.screenshot(path=str(path), full_page=False)
        if os.environ.get("SAVE_UI_SCREENSHOTS"):
            (ROOT / "docs" / "screenshots").mkdir(parents=True, exist_ok=True)
            shutil.copy(path, ROOT / "docs" / "screenshots" / path.name)
        return path


def _corpus_with_copies(root: Path, model: Path) -> Indexed:
    """16 pictures, the dup/ pair of the API tests, and a few more copies (exact, resized) in other folders."""
    from PIL import Image

    corpus = root / "corpus"
    make_corpus(corpus, 16)
    write(corpus / "dup" / "orig.jpg", photo(120, 90, seed=777), "JPEG", quality=95)
    write(corpus / "dup" / "copy.jpg", photo(120, 90, seed=777), "JPEG", quality=80)
    (corpus / "backup" / "old").mkdir(parents=True)
    shutil.copy(corpus / "a" / "img0001.jpg", corpus / "backup" / "img0001.jpg")
    shutil.copy(corpus / "a" / "img0001.jpg", corpus / "backup" / "old" / "img0001 (1).jpg")
    small = Image.open(corpus / "b" / "img0002.jpg").resize((64, 48), Image.Resampling.LANCZOS)
    write(corpus / "resized" / "img0002_small.jpg", small, "JPEG", quality=90)
    index_dir = root / "index"
    run_index(corpus, index_dir, model)
    return Indexed(corpus, index_dir, model, _ids(index_dir))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("web")
    indexed = _corpus_with_copies(root, tiny_model_dir)
    reports = root / "reports"
    cli("dedup", "--index-dir", indexed.index_dir, "--no-embeddings", "-o", reports / "d", "--no-progress")
    cli("cluster", "--index-dir", indexed.index_dir, "-k", "3", "-o", reports / "c", "--no-progress")
    queries = root / "queries"
    make_corpus(queries, 2, start=3)  # the same pictures as a/img0003.png and b/img0004.jpg
    cli("curate", "--index-dir", indexed.index_dir, "--queries", queries, "-k", "3", "-o", reports / "q",
        "--no-progress")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETRIEVAL_")}
    env.update({"RETRIEVAL_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "RETRIEVAL_UPLOAD_DECODE_WORKERS": "1", "RETRIEVAL_RELOAD_CHECK_S": "0"})
    with running_server(indexed.index_dir, root, env, startup_s=300) as base:
        shots = tmp_path_factory.mktemp("ui-screenshots")
        print(f"screenshots: {shots}")
        yield Served(base, indexed, shots)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium for the browser tests")
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any, served: Served) -> Iterator[Any]:
    """A fresh page whose every request to anything but 127.0.0.1 is aborted (and recorded)."""
    context = browser.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
    served.blocked.clear()

    def gate(route: Any) -> None:
        if urlparse(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            served.blocked.append(route.request.url)
            route.abort()

    context.route("**/*", gate)
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield pg
        assert errors == [], errors  # no script errors on any page
    finally:
        context.close()
