"""The HTML reports run in a real headless browser (Debian chromium): the script renders the groups."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from retrieval.curation.report import render_html
from tests.retrieval.curation.test_dedup_e2e import T

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _rendered_dom(page: Path, tmp_path: Path) -> str:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium for this test")
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=3000",
         "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_dedup_report_renders_every_group_in_a_browser(planted, cli, tmp_path: Path) -> None:
    corpus, index_dir, copies = planted
    cli("dedup", "--index-dir", index_dir, "-t", T, "-o", tmp_path / "r", "--no-progress")
    dom = _rendered_dom(tmp_path / "r" / "report.html", tmp_path)
    groups = re.findall(r'<div class="group" id="g\d+">', dom)
    assert len(groups) == len(copies)
    assert f"page 1 of 1 ({len(copies)} rows)" in dom
    for copy, original in copies.items():
        assert copy in dom and original in dom
    srcs = re.findall(r'<img[^>]* src="([^"]+)"', dom)
    assert len(srcs) == 2 * len(copies)
    for src in srcs:
        assert (tmp_path / "r" / src).is_file(), src


def test_large_reports_page_in_the_browser(tmp_path: Path) -> None:
    items = [{"id": i, "title": f"group {i}", "detail": "", "cells": [
        {"path": f"p/{i}_{j}.jpg", "src": "missing.jpg", "action": "keep" if j == 0 else "remove", "score": 0.99,
         "reason": "embedding"} for j in range(2)]} for i in range(120)]
    page = tmp_path / "big.html"
    page.write_text(render_html("big </script><b>report", "duplicates", {"groups": 120}, items))
    dom = _rendered_dom(page, tmp_path)
    assert "page 1 of 3 (120 rows)" in dom
    assert len(re.findall(r'<div class="group"', dom)) == 50  # one page at a time, not 120 groups
    assert "<b>report" not in dom  # the title is escaped, not markup
