"""Time to first render of the web UI on a large index, in a real browser, next to its peers.

A small real corpus is indexed with a DINOv2 ViT-S/14-shaped random model, then the index is grown
to N images (default 100,000): synthetic rows, random unit vectors (dim 384) and an exact FAISS index, each
synthetic path a symlink to a real file so thumbnails load. A dedup run of G groups (sizes 2..8) is
stored the way `retrieval dedup` stores one (building a real k-NN graph over 10^5 images is the
dedup benchmarks' business, not this one's). Then a real `retrieval serve` is started and Debian's
chromium (Playwright) opens, R times each:

* the review page (largest groups first; weakest similarity first; one folder),
* a search by id (`/?image=ID`, k = 24) and a search by upload (drop an image: POST /ui/search),

recording first contentful paint (FCP, from the browser's paint timing) and the server's own time
(Server-Timing). Peers in the same run: the JSON API for the same data (GET /duplicates, GET /search)
and the static report.html of the same run (`write_dedup_reports`, opened from file://).

Usage: python -m benchmarks.ui_render [--images 100000] [--groups 10000] [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import save_result, vit_s14_dir

CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]


def _corpus(root: Path, n: int = 40) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        base = rng.integers(0, 255, (1, 1, 3))
        grad = np.linspace(0, 1, 160)[None, :, None] * rng.integers(0, 255, (1, 1, 3))
        arr = np.clip(base * 0.5 + grad + rng.normal(0, 12, (120, 160, 3)), 0, 255).astype(np.uint8)
        path = root / "real" / f"img{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path, quality=90)
    return root


def _grow(index_dir: Path, corpus: Path, n_images: int, n_groups: int, seed: int = 0) -> dict[str, Any]:
    """Add synthetic images up to n_images, sync FAISS, and store a synthetic dedup run of n_groups."""
    from sqlalchemy import func, insert, select

    from retrieval.layout import IndexLayout
    from retrieval.settings import Settings
    from retrieval.store import DedupRun, DuplicateGroup, DuplicateMember, Image, Store, utcnow
    from retrieval.sync import SyncOptions, sync_index
    from retrieval.vectors import VectorStore

    rng = np.random.default_rng(seed)
    layout = IndexLayout(index_dir)
    store = Store(layout.default_db_url())
    dim = int(store.get_meta("dim"))
    with store.session() as s:
        real = s.execute(select(Image.id, Image.path)).all()
        first = (s.scalar(select(func.max(Image.id))) or 0) + 1
    extra = n_images - len(real)
    ids = np.arange(first, first + extra, dtype=np.int64)
    t = time.perf_counter()
    rows = []
    for k, i in enumerate(ids):
        folder = f"synthetic/f{k % 50:02d}"
        path = f"{folder}/s{int(i):07d}.jpg"
        src = corpus / real[k % len(real)][1]
        dst = corpus / path
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src, dst)
        rows.append({"id": int(i), "path": path, "size": int(rng.integers(20_000, 4_000_000)), "mtime_ns": 0,
                     "sha256": f"{int(i):064x}", "width": int(rng.choice([640, 1024, 1920, 4032])),
                     "height": int(rng.choice([480, 768, 1080, 3024])), "format": "JPEG",
                     "phash": int(rng.integers(-2**63, 2**63 - 1)), "indexed": True,
                     "added_at": utcnow(), "updated_at": utcnow()})
    with store.session() as s, s.begin():
        for start in range(0, len(rows), 20_000):
            s.execute(insert(Image), rows[start:start + 20_000])
    vecs = rng.normal(size=(extra, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    VectorStore(layout.vectors_path, dim).write(ids, vecs)
    settings = Settings(index_dir=index_dir)
    # An exact (flat) index: what the pages cost should not hide behind IVF training and tuning,
    # which `retrieval index` does once and index_quality measures.
    sync = sync_index(store, VectorStore(layout.vectors_path, dim), layout, SyncOptions(
        memory_budget=settings.memory_budget, exact_threshold=max(settings.exact_threshold, n_images + 1),
        recall_target=settings.recall_target))
    grow_s = time.perf_counter() - t
    # A dedup run as `retrieval dedup` stores it: groups largest first, kept member first.
    sizes = np.sort(np.minimum(2 + rng.zipf(2.0, n_groups) - 1, 8))[::-1]
    members = rng.choice(ids, size=int(sizes.sum()), replace=False)
    reasons = ["exact", "phash", "embedding"]
    with store.session() as s, s.begin():
        run = DedupRun(status="running", mode="self", fingerprint="synthetic", params={
            "threshold": 0.95, "k": 64, "keep": "highest-resolution", "phash_distance": 8})
        s.add(run)
        s.flush()
        pos = 0
        group_rows, member_rows = [], []
        for number, size in enumerate(sizes, 1):
            chunk = members[pos:pos + size]
            pos += size
            weakest = float(rng.uniform(0.95, 1.0))
            group_rows.append({"run_id": run.id, "number": number, "size": int(size),
                               "representative_id": int(chunk[0]), "reasons": reasons[number % 3],
                               "weakest_edge": weakest, "min_pairwise": weakest - 0.01, "touches_reference": False})
        s.execute(insert(DuplicateGroup), group_rows)
        gid = dict(s.execute(select(DuplicateGroup.number, DuplicateGroup.id).where(DuplicateGroup.run_id == run.id)).all())
        pos = 0
        for number, size in enumerate(sizes, 1):
            chunk = members[pos:pos + size]
            pos += size
            for j, image_id in enumerate(chunk):
                member_rows.append({"group_id": gid[number], "run_id": run.id, "image_id": int(image_id),
                                    "path": f"synthetic/f{(int(image_id) - first) % 50:02d}/s{int(image_id):07d}.jpg",
                                    "is_reference": False, "action": "keep" if j == 0 else "remove",
                                    "similarity": 1.0 if j == 0 else float(rng.uniform(0.95, 1.0)),
                                    "reason": "representative" if j == 0 else reasons[number % 3]})
        s.execute(insert(DuplicateMember), member_rows)
        run = s.get(DedupRun, run.id)
        run.status, run.finished_at = "completed", utcnow()
        run.counts = {"images": n_images, "groups": n_groups, "images_in_groups": int(sizes.sum()),
                      "images_to_remove": int(sizes.sum()) - n_groups, "largest_group": int(sizes.max()),
                      "chained_groups": 0}
        run_id = run.id
    store.close()
    return {"run_id": run_id, "grow_s": round(grow_s, 1), "index_kind": sync.spec.kind if sync.spec else None,
            "members": int(sizes.sum()), "first_synthetic_id": int(first)}


def _serve(index_dir: Path, port: int, log: Path) -> subprocess.Popen:
    import httpx

    env = {**os.environ, "RETRIEVAL_DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "RETRIEVAL_UPLOAD_DECODE_WORKERS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "retrieval.cli", "serve", "--index-dir", str(index_dir),
                             "--port", str(port), "--log-level", "warning"], env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-2000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server not ready in time")


_FCP = """() => new Promise(resolve => {
  const done = () => { const p = performance.getEntriesByName('first-contentful-paint')[0];
    const nav = performance.getEntriesByType('navigation')[0];
    resolve({fcp_ms: p ? p.startTime : null, dom_ms: nav ? nav.domContentLoadedEventEnd : null,
             server_ms: nav && nav.serverTiming && nav.serverTiming[0] ? nav.serverTiming[0].duration : null,
             bytes: nav ? nav.transferSize : null}); };
  if (performance.getEntriesByName('first-contentful-paint').length) done(); else setTimeout(done, 500);
})"""


def _page_times(browser: Any, url: str, repeats: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(repeats):
        ctx = browser.new_context(viewport={"width": 1280, "height": 860})
        page = ctx.new_page()
        page.goto(url, wait_until="load", timeout=120_000)
        out.append(page.evaluate(_FCP))
        # Let the lazy thumbnails finish, so they do not compete with the next measurement.
        page.wait_for_load_state("networkidle", timeout=120_000)
        ctx.close()
    return out


def _upload_times(browser: Any, base: str, image: Path, repeats: int) -> list[dict[str, Any]]:
    """From choosing a file to the result grid painted (client-measured), plus the server's time."""
    out = []
    for _ in range(repeats):
        ctx = browser.new_context(viewport={"width": 1280, "height": 860})
        page = ctx.new_page()
        page.goto(base + "/?k=24", wait_until="load")
        page.evaluate("window.__t0 = performance.now()")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#upload-status:has-text('Results for your image')", timeout=120_000)
        ms = page.evaluate("new Promise(r => requestAnimationFrame(() => r(performance.now() - window.__t0)))")
        server = page.evaluate("performance.getEntriesByType('resource').filter(e => e.name.includes('/ui/search'))"
                               ".map(e => e.serverTiming && e.serverTiming[0] ? e.serverTiming[0].duration : null)[0]")
        out.append({"fcp_ms": ms, "server_ms": server})
        page.wait_for_load_state("networkidle", timeout=120_000)
        ctx.close()
    return out


def _api_times(url: str, repeats: int) -> list[float]:
    import httpx

    out = []
    with httpx.Client(timeout=120) as c:
        for _ in range(repeats):
            t = time.perf_counter()
            r = c.get(url)
            r.raise_for_status()
            out.append((time.perf_counter() - t) * 1000)
    return out


def _median(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 1) if values else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--groups", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="5,000 images, 500 groups, 3 repeats")
    ap.add_argument("--keep", type=Path, default=None, help="Work in this folder and keep it.")
    args = ap.parse_args()
    if args.quick:
        args.images, args.groups, args.repeats = 5_000, 500, 3
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("Debian's chromium is needed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    from benchmarks.api_batching import _free_port

    work = Path(args.keep or tempfile.mkdtemp(prefix="ui-render-"))
    corpus = _corpus(work / "corpus")
    model = vit_s14_dir(work / "models")
    index_dir = work / "index"
    subprocess.run([sys.executable, "-m", "retrieval.cli", "index", str(corpus), "--index-dir", str(index_dir),
                    "--model", str(model), "--no-progress", "-j", "0"], check=True, env={**os.environ,
                                                                                        "HF_HUB_OFFLINE": "1"})
    grown = _grow(index_dir, corpus, args.images, args.groups)
    print(f"grown to {args.images} images, {args.groups} groups in {grown['grow_s']} s ({grown['index_kind']})")
    from retrieval.curation.dedup import load_run
    from retrieval.curation.report import write_dedup_reports
    from retrieval.layout import IndexLayout
    from retrieval.search import IndexReader

    reader = IndexReader(IndexLayout(index_dir), None)
    try:
        t = time.perf_counter()
        doc = load_run(reader, grown["run_id"])
        files = write_dedup_reports(doc, work / "report", 10**8, max_thumbnails=0)
        report_write_s = time.perf_counter() - t
    finally:
        reader.close()
    port = _free_port()
    proc = _serve(index_dir, port, work / "server.log")
    base = f"http://127.0.0.1:{port}"
    query_id = grown["first_synthetic_id"] + 12_345 % max(1, args.images - 100)
    rows: list[dict[str, Any]] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
            _page_times(browser, base + "/ui/duplicates", 1)  # warm-up: thumbnails cached, SQLite pages warm
            cases = [
                ("review page, largest groups first", "web UI", f"{base}/ui/duplicates"),
                ("review page, weakest similarity first", "web UI", f"{base}/ui/duplicates?sort=weakest"),
                ("review page, one folder", "web UI", f"{base}/ui/duplicates?folder=synthetic/f07"),
                ("review page, page 200", "web UI", f"{base}/ui/duplicates?page=200"),
                ("search by id, k=24", "web UI", f"{base}/?image={query_id}&k=24"),
                ("dedup report.html (static, same run)", "peer: static report", files["report.html"].as_uri()),
            ]
            for name, kind, url in cases:
                times = _page_times(browser, url, args.repeats)
                rows.append({"case": name, "kind": kind, "fcp_ms": _median([t["fcp_ms"] for t in times]),
                             "dom_ms": _median([t["dom_ms"] for t in times]),
                             "server_ms": _median([t["server_ms"] for t in times]),
                             "bytes": times[0].get("bytes")})
                print(rows[-1])
            up = _upload_times(browser, base, corpus / "real" / "img005.jpg", args.repeats)
            rows.append({"case": "search by upload, k=24 (choose file to grid painted)", "kind": "web UI",
                         "fcp_ms": _median([t["fcp_ms"] for t in up]), "dom_ms": None,
                         "server_ms": _median([t["server_ms"] for t in up]), "bytes": None})
            print(rows[-1])
            browser.close()
        for name, url in [("GET /duplicates (JSON, 50 groups)", f"{base}/duplicates"),
                          ("GET /search?image=ID&k=24 (JSON)", f"{base}/search?image={query_id}&k=24")]:
            rows.append({"case": name, "kind": "peer: JSON API", "fcp_ms": None, "dom_ms": None,
                         "server_ms": None, "api_ms": _median(_api_times(url, args.repeats)), "bytes": None})
            print(rows[-1])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    path = save_result("ui_render" if not args.quick else "ui_render_quick", {
        "quick": args.quick, "images": args.images, "groups": args.groups, "group_members": grown["members"],
        "repeats": args.repeats, "index_kind": grown["index_kind"], "dim": 384,
        "report_html_write_s": round(report_write_s, 1), "rows": rows})
    print(f"wrote {path}")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
