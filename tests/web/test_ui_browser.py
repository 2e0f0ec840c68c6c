"""The web UI in a real browser: search by upload, review and apply, clusters, curation, offline docs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests import db as testdb
from tests.web.conftest import ROOT, Served


def _no_missing_alt(page: Any) -> None:
    missing = page.eval_on_selector_all("img", "els => els.filter(e => e.closest('[hidden]') === null && "
                                               "e.id !== 'viewer-img' && !e.getAttribute('alt')).length")
    assert missing == 0


def _images_loaded(page: Any, selector: str) -> int:
    page.wait_for_function(f"""() => {{ const imgs = [...document.querySelectorAll({json.dumps(selector)})];
        return imgs.length > 0 && imgs.every(i => i.complete); }}""")
    return page.eval_on_selector_all(selector, "els => els.filter(e => e.naturalWidth > 0).length")


def test_upload_an_image_and_see_its_copy_first(page: Any, served: Served, tmp_path: Path) -> None:
    upload = tmp_path / "my-upload.jpg"
    shutil.copy(served.indexed.corpus / "a" / "img0005.jpg", upload)  # a copy of a corpus image
    page.goto(served.base + "/")
    page.wait_for_selector("body[data-ready]")
    assert _images_loaded(page, ".results img") > 0  # a starting sample of the index
    served.shot(page, "search-start")
    page.fill("input[name=k]", "8")
    page.set_input_files("#file", str(upload))
    page.wait_for_selector("#upload-status:has-text('Results for your image')")
    top = page.locator(".results .card").first
    assert top.locator(".path").inner_text() == "a/img0005.jpg"
    assert float(top.locator(".score").inner_text()) > 0.999
    assert page.locator(".results .card").count() == 8
    assert "k=8" in page.url
    _images_loaded(page, ".results img")
    _no_missing_alt(page)
    served.shot(page, "search")
    # More like this: click the second result; the search is now in the URL and can be shared.
    second_path = page.locator(".results .card .path").nth(1).inner_text()
    page.locator(".results .card a.more").nth(1).click()
    page.wait_for_selector("body[data-ready] .query")
    assert "image=" in page.url and "k=8" in page.url
    assert second_path in page.locator(".query").inner_text()
    # Keyboard: arrows move over results, Enter searches by the focused one.
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    focused = page.locator(".results .card.focused")
    focused_id = focused.get_attribute("data-id")
    page.keyboard.press("Enter")
    page.wait_for_url(f"**image={focused_id}**")
    assert served.blocked == []


def test_review_flip_a_decision_reload_and_apply(page: Any, served: Served, tmp_path: Path) -> None:
    page.goto(served.base + "/ui/duplicates")
    page.wait_for_selector("body[data-ready]")
    copy = page.locator(".member", has=page.locator(".path", has_text="dup/copy.jpg"))
    orig = page.locator(".member", has=page.locator(".path", has_text="dup/orig.jpg"))
    assert "remove" in copy.get_attribute("class") and "keep" in orig.get_attribute("class")
    assert _images_loaded(page, ".member img") >= 2
    _no_missing_alt(page)
    served.shot(page, "duplicates")
    # Full image on click.
    copy.locator("button.open").click()
    page.wait_for_selector("#viewer[open]")
    # The full image loads after the dialog opens: wait for it (a loaded machine is slow), then check it.
    page.wait_for_function("() => { const e = document.querySelector('#viewer-img'); "
                           "return e !== null && e.complete && e.naturalWidth > 0; }", timeout=30_000)
    assert page.eval_on_selector("#viewer-img", "e => e.naturalWidth") == 120
    served.shot(page, "duplicates-full-image")
    page.keyboard.press("Escape")
    # Flip: keep the copy, remove the original.
    copy.locator("button[data-set=keep]").click()
    page.wait_for_selector("#review-status:has-text('Saved')")
    orig.locator("button[data-set=remove]").click()
    page.wait_for_function("document.querySelector('#review-status').textContent === 'Saved.' && "
                           "document.querySelector('#decision-count').textContent === '2'")
    page.reload()
    page.wait_for_selector("body[data-ready]")
    copy = page.locator(".member", has=page.locator(".path", has_text="dup/copy.jpg"))
    orig = page.locator(".member", has=page.locator(".path", has_text="dup/orig.jpg"))
    assert "keep" in copy.get_attribute("class").split() and "reviewed" in copy.get_attribute("class").split()
    assert "remove" in orig.get_attribute("class").split()
    assert copy.locator("button[data-set=keep]").get_attribute("aria-pressed") == "true"
    copy.scroll_into_view_if_needed()
    served.shot(page, "duplicates-reviewed")
    # Keyboard: j focuses the first group.
    page.keyboard.press("j")
    assert page.locator(".group.focused").count() == 1
    # The CSV export carries the decisions.
    with page.expect_download() as download:
        page.click("text=Export CSV")
    text = Path(download.value.path()).read_text()
    assert "dup/orig.jpg,remove,keep,1" in text
    # Apply the reviewed run from the command line: exactly the reviewed removals move.
    with testdb.connect(served.indexed.index_dir / "retrieval.db") as conn:
        run_id = conn.execute("SELECT max(id) FROM dedup_runs").fetchone()[0]
    moved_to = tmp_path / "moved"
    out = subprocess.run([sys.executable, "-m", "retrieval.cli", "dedup", "--index-dir", str(served.indexed.index_dir),
                          "--apply", "--run", str(run_id), "--move-to", str(moved_to), "-o", str(tmp_path / "r"),
                          "--json", "--no-progress"], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0, out.stderr
    moved = json.loads(out.stdout)["applied"]["moved"]
    assert "dup/orig.jpg" in moved and "dup/copy.jpg" not in moved
    assert (moved_to / "dup" / "orig.jpg").is_file() and not (served.indexed.corpus / "dup" / "orig.jpg").exists()
    assert (served.indexed.corpus / "dup" / "copy.jpg").is_file()
    page.reload()
    assert "applied" in page.locator(".summary").inner_text()
    assert served.blocked == []


def test_open_a_cluster(page: Any, served: Served) -> None:
    page.goto(served.base + "/ui/clusters")
    assert _images_loaded(page, ".mosaic img") > 0
    _no_missing_alt(page)
    served.shot(page, "clusters")
    first = page.locator(".clusters .card").first
    size = int(first.locator(".meta span").inner_text().split()[0])
    first.locator("a.more").click()
    page.wait_for_selector("h1:has-text('Cluster')")
    assert page.locator(".results .card").count() == size
    distances = [float(t) for t in page.locator(".results .score").all_inner_texts()]
    assert distances == sorted(distances)  # nearest the centroid first
    _images_loaded(page, ".results img")
    served.shot(page, "cluster")
    assert served.blocked == []


def test_curation_runs_show_how_each_image_got_in(page: Any, served: Served) -> None:
    page.goto(served.base + "/ui/curation")
    page.click("text=run 1")
    page.wait_for_selector(".results .card")
    assert "retrieved by img0003.png" in page.locator(".results").inner_text()
    _images_loaded(page, ".results img")
    served.shot(page, "curation")


def test_docs_render_with_the_network_blocked(page: Any, served: Served) -> None:
    page.goto(served.base + "/docs")
    page.wait_for_selector(".swagger-ui .opblock-tag", state="visible")
    assert page.locator(".opblock-summary-path", has_text="/search").count() >= 1
    served.shot(page, "docs")
    page.goto(served.base + "/redoc")
    page.wait_for_selector("text=Nearest neighbours of an uploaded image", state="attached")
    served.shot(page, "redoc")
    assert served.blocked == []  # nothing had to be fetched from outside
