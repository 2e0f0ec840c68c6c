"""Review decisions (made in the web UI) change what a run's reports and `--apply --run` act on;
`--apply --remove-list` moves a hand-edited list."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from retrieval.curation import queries
from retrieval.store import Store
from tests.retrieval.curation.test_dedup_e2e import T


def _store(index_dir: Path) -> Store:
    from retrieval.layout import IndexLayout

    return Store(IndexLayout(index_dir).default_db_url())


def _dedup(cli, index_dir: Path, out: Path) -> dict:
    _, text = cli("dedup", "--index-dir", index_dir, "-t", T, "--no-embeddings", "-o", out, "--no-progress", "--json")
    return json.loads(text)


def test_decisions_override_the_run_in_reports_csv_and_apply(planted, cli, tmp_path: Path) -> None:
    corpus, index_dir, copies = planted
    run_id = _dedup(cli, index_dir, tmp_path / "r1")["run_id"]
    store = _store(index_dir)
    try:
        page = queries.review_page(store, run_id, per_page=100)
        assert page.total_groups >= 2
        members = {m.path: m for g in page.groups for m in g.members}
        pair = members["b/copy_of_1.jpg"], members["a/img0001.jpg"]
        assert [m.action for m in pair] == ["remove", "keep"]
        assert all(m.width and m.height and m.size and m.format for m in pair)  # facts for the side-by-side view
        # Swap which copy survives, and keep both images of another group.
        queries.set_decisions(store, run_id, {pair[0].member_id: "keep", pair[1].member_id: "remove"})
        other = next(g for g in page.groups if "a/img0001.jpg" not in {m.path for m in g.members})
        queries.set_group_decision(store, run_id, other.number, "keep")
        again = {m.path: m for g in queries.review_page(store, run_id, per_page=100).groups for m in g.members}
        assert (again["b/copy_of_1.jpg"].action, again["a/img0001.jpg"].action) == ("keep", "remove")
        assert again["a/img0001.jpg"].decided and again["a/img0001.jpg"].computed_action == "keep"
        assert all(m.action == "keep" for m in again.values() if m.path in {x.path for x in other.members})
        assert queries.dedup_run(store, run_id).decisions == 3  # the group's kept image needed no decision
        rows = list(csv.DictReader(io.StringIO(queries.decisions_csv(store, run_id))))
        by_path = {r["path"]: r for r in rows}
        assert by_path["a/img0001.jpg"]["action"] == "remove" and by_path["a/img0001.jpg"]["reviewed"] == "1"
        assert by_path["a/img0001.jpg"]["computed_action"] == "keep"
        # Bad decisions are refused with one clear message and change nothing.
        with pytest.raises(queries.InvalidRequest, match="not part of dedup run"):
            queries.set_decisions(store, run_id, {10**9: "keep"})
        with pytest.raises(queries.InvalidRequest, match="keep or remove"):
            queries.set_decisions(store, run_id, {pair[0].member_id: "delete"})
        expected_removed = {p for p, m in again.items() if m.action == "remove"}
    finally:
        store.close()
    # The written reports follow the decisions, and --apply --run moves exactly the reviewed set.
    _, out = cli("dedup", "--index-dir", index_dir, "--apply", "--run", run_id, "--move-to", tmp_path / "moved",
                 "-o", tmp_path / "r2", "--no-progress", "--json")
    result = json.loads(out)
    assert set(result["applied"]["moved"]) == expected_removed
    assert "a/img0001.jpg" in expected_removed and "b/copy_of_1.jpg" not in expected_removed
    assert not expected_removed & {x.path for x in other.members}
    assert set((tmp_path / "r2" / "remove.txt").read_text().split()) == expected_removed
    assert (tmp_path / "moved" / "a/img0001.jpg").is_file() and (corpus / "b/copy_of_1.jpg").is_file()
    assert not (corpus / "a/img0001.jpg").exists()


def test_reset_returns_to_the_computed_action(planted, cli, tmp_path: Path) -> None:
    _, index_dir, _ = planted
    run_id = _dedup(cli, index_dir, tmp_path / "r")["run_id"]
    store = _store(index_dir)
    try:
        g = queries.review_page(store, run_id).groups[0]
        queries.set_group_decision(store, run_id, g.number, "remove")
        assert queries.review_page(store, run_id, group=g.number).groups[0].all_removed
        queries.set_group_decision(store, run_id, g.number, "reset")
        assert queries.dedup_run(store, run_id).decisions == 0
        with pytest.raises(queries.NotFound):
            queries.set_group_decision(store, run_id, 10**6, "keep")
    finally:
        store.close()


def test_filters_and_sorting(planted, cli, tmp_path: Path) -> None:
    _, index_dir, _ = planted
    run_id = _dedup(cli, index_dir, tmp_path / "r")["run_id"]
    store = _store(index_dir)
    try:
        everything = queries.review_page(store, run_id, per_page=100)
        in_b = queries.review_page(store, run_id, folder="b", per_page=100)
        assert in_b.total_groups == 1 and any(m.path.startswith("b/") for m in in_b.groups[0].members)
        assert queries.review_page(store, run_id, folder="nowhere").total_groups == 0
        exact = queries.review_page(store, run_id, reason="exact", per_page=100)
        assert 1 <= exact.total_groups <= everything.total_groups
        assert all(any(m.reason == "exact" for m in g.members) for g in exact.groups)
        weakest = queries.review_page(store, run_id, sort="weakest", per_page=100).groups
        assert [g.weakest_edge for g in weakest] == sorted(g.weakest_edge for g in weakest)
        assert ("b", 1) in queries.folders(store, run_id)
    finally:
        store.close()


def test_apply_a_hand_edited_remove_list(planted, cli, tmp_path: Path) -> None:
    corpus, index_dir, _ = planted
    listing = tmp_path / "remove.txt"
    listing.write_text("# reviewed by hand\nb/copy_of_1.jpg\n\n./resized/img0005_small.jpg\nno/such.jpg\n"
                       f"{corpus / 'flipped/img0007_flip.jpg'}\n")
    _, out = cli("dedup", "--index-dir", index_dir, "--apply", "--remove-list", listing, "--move-to",
                 tmp_path / "moved", "--json")
    result = json.loads(out)
    assert sorted(result["moved"]) == ["b/copy_of_1.jpg", "flipped/img0007_flip.jpg", "resized/img0005_small.jpg"]
    assert [s["path"] for s in result["skipped"]] == ["no/such.jpg"]
    for rel in result["moved"]:
        assert (tmp_path / "moved" / rel).is_file() and not (corpus / rel).exists()
    code, out = cli("dedup", "--index-dir", index_dir, "--remove-list", listing, ok=False)
    assert code == 1 and "--apply" in out
    code, out = cli("dedup", "--index-dir", index_dir, "--apply", "--remove-list", tmp_path / "missing.txt",
                    "--move-to", tmp_path / "m", ok=False)
    assert code == 1 and "cannot read the remove list" in out


def test_run_warnings_name_what_to_check_first() -> None:
    run = queries.DedupRunInfo(id=1, mode="self", status="completed", params={"threshold": 0.5}, finished_at=None,
                               applied_at=None, counts={"images": 100, "images_to_remove": 80, "largest_group": 70,
                                                        "chained_groups": 3})
    text = " ".join(queries.run_warnings(run))
    assert "80 of 100 images (80%)" in text and "70 images" in text and "3 groups are chained" in text
    calm = queries.DedupRunInfo(id=2, mode="self", status="completed", params={}, finished_at=None, applied_at=None,
                                counts={"images": 100, "images_to_remove": 5, "largest_group": 3, "chained_groups": 0})
    assert queries.run_warnings(calm) == []
