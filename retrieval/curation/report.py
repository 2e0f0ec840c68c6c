"""Report files a person can review and a script can act on.

duplicates.json (versioned schema), duplicates.csv (one row per image), remove.txt / keep.txt
(one corpus-relative path per line) and a self-contained report.html: summary numbers in images,
then pages of groups rendered lazily by a small script from an embedded JSON block, so a report
with 100k groups opens at once. Thumbnails are small JPEGs written to thumbs/ next to the report
(past `max_thumbnails` the page points at the original files instead).
"""

from __future__ import annotations

import csv
import html
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

from retrieval.layout import atomic_write_bytes

logger = logging.getLogger(__name__)

THUMB_SIZE = 160
MAX_THUMBNAILS = 20_000


class Thumbnailer:
    """Writes thumbs/<key>.jpg for files and returns the src to use in the page (relative to it)."""

    def __init__(self, out_dir: Path, max_pixels: int, limit: int = MAX_THUMBNAILS, workers: int = 2):
        self.out_dir, self.max_pixels, self.limit, self.workers = out_dir, max_pixels, limit, workers
        self.jobs: dict[str, Path] = {}

    def src(self, key: str, source: Path) -> str:
        if len(self.jobs) < self.limit or key in self.jobs:
            self.jobs[key] = source
            return f"thumbs/{key}.jpg"
        if not isinstance(source, Path):  # an image of a remote source: linked by its URI
            return str(source)
        return Path(os.path.relpath(source, self.out_dir)).as_posix()

    def write_all(self, progress: bool = False) -> int:
        from tqdm import tqdm

        from retrieval.imaging.thumbnails import make_thumbnail

        folder = self.out_dir / "thumbs"
        folder.mkdir(parents=True, exist_ok=True)

        def one(item: tuple[str, Path]) -> bool:
            key, source = item
            try:
                data = make_thumbnail(source.read_bytes(), THUMB_SIZE, self.max_pixels, quality=75)
            except Exception as exc:  # noqa: BLE001 - a vanished or broken file gets a placeholder
                logger.warning("no thumbnail for %s: %s", source, exc)
                data = _PLACEHOLDER
            (folder / f"{key}.jpg").write_bytes(data)
            return True

        with ThreadPoolExecutor(self.workers) as pool:
            done = sum(tqdm(pool.map(one, self.jobs.items()), total=len(self.jobs), desc="thumbnails",
                            disable=not progress))
        return done


def _placeholder() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (THUMB_SIZE, THUMB_SIZE), (200, 200, 200)).save(buf, format="JPEG", quality=50)
    return buf.getvalue()


_PLACEHOLDER = _placeholder()


def render_html(title: str, kind: str, summary: dict[str, Any], items: list[dict[str, Any]], notes: str = "") -> str:
    """The page: static summary table plus a JSON data block the script pages through."""
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in summary.items() if not isinstance(v, (dict, list)))
    data = json.dumps({"kind": kind, "items": items}, separators=(",", ":")).replace("</", "<\\/")
    from retrieval.curation.html_template import PAGE as page

    return (page.replace("{{TITLE}}", html.escape(title)).replace("{{SUMMARY}}", rows)
            .replace("{{NOTES}}", html.escape(notes)).replace("{{DATA}}", data))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)


def escape_line(path: str) -> str:
    """A path on one line: backslash, newline and carriage return written as \\\\, \\n and \\r."""
    return path.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def write_text_lines(path: Path, lines: Iterable[str]) -> None:
    """`path` (one path a line, escaped by escape_line so that each is one line) and, beside it,
    the same paths separated by NUL bytes, exactly as they are (`<name>.nul`, for `xargs -0`)."""
    items = list(lines)
    atomic_write_bytes(path, "".join(f"{escape_line(line)}\n" for line in items).encode("utf-8", "surrogateescape"))
    atomic_write_bytes(path.with_suffix(".nul"), b"".join(line.encode("utf-8", "surrogateescape") + b"\0"
                                                          for line in items))


def write_dedup_reports(doc: dict[str, Any], out_dir: Path, max_pixels: int, progress: bool = False,
                        max_thumbnails: int = MAX_THUMBNAILS) -> dict[str, Path]:
    """Write every dedup report file into `out_dir`; returns their paths by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    from retrieval.sources import source_from_meta

    source = source_from_meta({"corpus_root": doc["corpus_root"], "source": doc.get("source")})
    files = {name: out_dir / name for name in ("duplicates.json", "duplicates.csv", "remove.txt", "keep.txt",
                                                "report.html")}
    atomic_write_bytes(files["duplicates.json"], json.dumps(doc, indent=1).encode())
    with open(files["duplicates.csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "group", "action", "similarity", "reason", "image_id", "reference"])
        for g in doc["groups"]:
            for m in g["members"]:
                w.writerow([m["path"], g["group"], m["action"], f"{m['similarity']:.6f}", m["reason"],
                            "" if m["image_id"] is None else m["image_id"], int(m["reference"])])
    members = [m for g in doc["groups"] for m in g["members"] if not m["reference"]]
    write_text_lines(files["remove.txt"], (m["path"] for m in members if m["action"] == "remove"))
    write_text_lines(files["keep.txt"], (m["path"] for m in members if m["action"] == "keep"))

    thumbs = Thumbnailer(out_dir, max_pixels, max_thumbnails)
    items = []
    for g in doc["groups"]:
        cells = []
        for i, m in enumerate(g["members"]):
            located = _locate_reference(m["path"]) if m["reference"] else _locate(source, m["path"])
            key = f"i{m['image_id']}" if m["image_id"] is not None else f"r{g['group']}_{i}"
            cells.append({"src": thumbs.src(key, located), "path": m["path"], "action": m["action"],
                          "score": m["similarity"], "reason": m["reason"]})
        items.append({"id": g["group"], "title": f"group {g['group']}: {g['size']} images",
                      "detail": f"weakest edge {g['weakest_edge']:.4f} · min pairwise {g['min_pairwise_similarity']:.4f}"
                                f" · {', '.join(g['reasons'])}", "cells": cells})
    thumbs.write_all(progress)
    s = doc["summary"]
    summary = {"run": doc["run"]["id"], "mode": doc["run"]["mode"], "corpus": doc["corpus_root"],
               **{k: v for k, v in doc["run"]["params"].items()}, **s}
    notes = ("Numbers are images, not graph edges. Kept images are outlined in green; the score is the exact "
             "cosine to the representative (to the nearest reference file in reference groups); the reason is "
             "the stage of the edge that joined the image to its group (exact, phash, pdq, copy, verified, embedding).")
    warnings = [w["message"] for w in s.get("warnings", [])]
    if warnings:
        notes = " ".join(f"WARNING: {w}" for w in warnings) + " " + notes
    atomic_write_bytes(files["report.html"],
                       render_html(f"Duplicates (run {doc['run']['id']})", "groups", summary, items, notes).encode())
    return files


def _locate(source: Any, path: str) -> Any:
    if source.local_root is not None:
        return source.local_root / path
    from retrieval.sources.base import Located

    return Located(source, path)


def _locate_reference(path: str) -> Any:
    """A reference file: a local path, or the URI of a reference source's image."""
    if "://" not in path:
        return Path(path)
    from retrieval.sources.base import Located, ReadLimits
    from retrieval.sources.remote import UrlReader

    return Located(UrlReader(ReadLimits.from_env()), path)


def write_grid_report(path: Path, title: str, summary: dict[str, Any], items: list[dict[str, Any]],
                      notes: str = "") -> None:
    """A paged report of titled rows of thumbnails (clusters, curation runs)."""
    atomic_write_bytes(path, render_html(title, "groups", summary, items, notes).encode())
