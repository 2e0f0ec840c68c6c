"""`retrieval dedup` end to end on a corpus with planted copies: reports, keep policy, HTML, --apply."""

from __future__ import annotations

import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

# The tiny random-weight model puts distinct images up to ~0.998 apart; planted copies are >= 0.9999.
T = "0.9995"


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.in_data = False
        self.data = ""
        self.summary_cells: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.in_data = tag == "script" and ("id", "report-data") in attrs

    def handle_endtag(self, tag: str) -> None:
        self.in_data = False

    def handle_data(self, data: str) -> None:
        if self.in_data:
            self.data += data


def parse_report(path: Path) -> dict:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return json.loads(page.data)


def test_dedup_finds_planted_copies_and_writes_reports(planted, cli, tmp_path: Path) -> None:
    corpus, index_dir, copies = planted
    out_dir = tmp_path / "report"
    _, out = cli("dedup", "--index-dir", index_dir, "-t", T, "-o", out_dir, "--no-progress", "--json")
    result = json.loads(out)
    s = result["summary"]
    assert (s["images"], s["groups"], s["images_in_groups"], s["images_to_remove"]) == (16, 4, 8, 4)
    assert s["removed_by_reason"] == {"exact": 1, "phash": 2, "pdq": 1}  # the flipped copy: PDQ with flips
    assert result["applied"] is None

    doc = json.loads((out_dir / "duplicates.json").read_text())
    assert doc["schema"] == "retrieval.duplicates" and doc["schema_version"] == 1
    groups = {frozenset(m["path"] for m in g["members"]): g for g in doc["groups"]}
    assert set(groups) == {frozenset(pair) for pair in copies.items()}
    for copy, original in copies.items():
        g = groups[frozenset((copy, original))]
        actions = {m["path"]: m["action"] for m in g["members"]}
        # highest-resolution (default): the resized copy loses; ties (exact copy) go to the shorter path.
        assert actions == {original: "keep", copy: "remove"}, g
        assert 0.999 <= g["weakest_edge"] <= 1.0 and g["min_pairwise_similarity"] <= 1.0

    rows = list(csv.DictReader((out_dir / "duplicates.csv").open()))
    assert len(rows) == 8 and {r["reason"] for r in rows if r["action"] == "remove"} == {"exact", "phash", "pdq"}
    assert sorted((out_dir / "remove.txt").read_text().split()) == sorted(copies)
    assert sorted((out_dir / "keep.txt").read_text().split()) == sorted(copies.values())

    data = parse_report(out_dir / "report.html")
    assert sorted(item["id"] for item in data["items"]) == [g["group"] for g in doc["groups"]]
    for item in data["items"]:
        for cell in item["cells"]:
            assert (out_dir / cell["src"]).is_file(), cell
    html = (out_dir / "report.html").read_text()
    assert "images_to_remove" in html and "<td>4</td>" in html

    # Same parameters, unchanged index: the stored run is reused.
    _, out = cli("dedup", "--index-dir", index_dir, "-t", T, "-o", out_dir, "--no-progress", "--json")
    assert json.loads(out)["reused"] and json.loads(out)["run_id"] == result["run_id"]


def test_keep_policies(planted, cli, tmp_path: Path) -> None:
    corpus, index_dir, copies = planted
    _, out = cli("dedup", "--index-dir", index_dir, "-t", T, "-o", tmp_path / "r", "--no-progress", "--json",
                 "--keep", "shortest-path", "--no-embeddings", "--pdq-distance", "-1")
    doc = json.loads((tmp_path / "r" / "duplicates.json").read_text())
    assert len(doc["groups"]) == 3  # the flipped copy is only found by PDQ (off here) or the embedding stage
    for g in doc["groups"]:
        kept = [m["path"] for m in g["members"] if m["action"] == "keep"]
        assert kept == [min((m["path"] for m in g["members"]), key=lambda p: (len(p), p))]
    code, out = cli("dedup", "--index-dir", index_dir, "--keep", "biggest", ok=False)
    # a usage error (exit 2) naming the choices, before anything runs; the library checks too (policy.py)
    assert code == 2 and "'biggest' is not one of 'highest-resolution', 'largest'" in out


def test_apply_moves_exactly_the_listed_files(planted, cli, tmp_path: Path) -> None:
    corpus, index_dir, copies = planted
    moved_to = tmp_path / "removed"
    cli("dedup", "--index-dir", index_dir, "-t", T, "-o", tmp_path / "r", "--no-progress")  # the reviewed report
    _, out = cli("dedup", "--index-dir", index_dir, "-t", T, "-o", tmp_path / "r", "--no-progress", "--json",
                 "--apply", "--move-to", moved_to)
    result = json.loads(out)
    assert sorted(result["applied"]["moved"]) == sorted(copies) and result["applied"]["skipped"] == []
    for copy in copies:
        assert not (corpus / copy).exists() and (moved_to / copy).is_file()
    for original in copies.values():
        assert (corpus / original).is_file()
    moved_files = sorted(p.relative_to(moved_to).as_posix() for p in moved_to.rglob("*") if p.is_file())
    assert moved_files == sorted(copies)
    # The index no longer holds them and is consistent; a new dedup finds nothing.
    code, out = cli("dedup", "--index-dir", index_dir, "-t", T, "-o", tmp_path / "r2", "--no-progress", "--json")
    after = json.loads(out)["summary"]
    assert (after["images"], after["groups"]) == (12, 0)
    from retrieval.layout import IndexLayout
    from retrieval.verify import verify_index

    assert verify_index(IndexLayout(index_dir), None).ok


@pytest.mark.parametrize("args, message", [
    (["-t", "0"], "--threshold must be in (0, 1]"),
    (["-t", "1.5"], "--threshold must be in (0, 1]"),
    (["--apply"], "--apply needs --move-to"),
])
def test_bad_options_are_one_line_errors(planted, cli, args: list[str], message: str) -> None:
    _, index_dir, _ = planted
    code, out = cli("dedup", "--index-dir", index_dir, *args, ok=False)
    assert code == 1 and message in out and "Traceback" not in out


def test_move_to_inside_the_corpus_is_refused(planted, cli) -> None:
    corpus, index_dir, _ = planted
    code, out = cli("dedup", "--index-dir", index_dir, "--apply", "--move-to", corpus / "trash", ok=False)
    assert code == 1 and "inside the corpus" in out
