"""`dedup --apply` never moves the last copy of an image out of the corpus (issue 12 item 2).

Before: a symlink to the original was kept (shorter path) and the real file moved, leaving a
dangling link (now a real file always wins the keep rule, and a link kept by a review decision
still blocks moving its target); applying a stored run after its keeper had moved moved the remaining copy too;
and `--apply` alone computed a new, unreviewed run and applied it in the same command.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tests.retrieval.curation.test_dedup_e2e import T


def _dry_run(cli, index_dir: Path, out: Path, *extra: object) -> dict:
    _, text = cli("dedup", "--index-dir", index_dir, "-t", T, "-o", out, "--no-progress", "--json", *extra)
    return json.loads(text)


def _group_of(report_dir: Path, path: str) -> dict:
    doc = json.loads((report_dir / "duplicates.json").read_text())
    return next(g for g in doc["groups"] if any(m["path"] == path for m in g["members"]))


def test_a_real_file_is_kept_over_a_link_to_it_whatever_the_policy(planted, cli, tmp_path: Path,
                                                                    tiny_model_dir: Path) -> None:
    corpus, index_dir, _ = planted
    os.symlink("a/img0009.png", corpus / "L.jpg")  # shorter path: shortest-path alone would keep the link
    cli("index", corpus, "--model", tiny_model_dir, "--index-dir", index_dir, "--no-progress", "-j", "0")
    report = tmp_path / "r"
    run = _dry_run(cli, index_dir, report, "--keep", "shortest-path")["run_id"]
    group = _group_of(report, "L.jpg")
    assert {m["path"]: m["action"] for m in group["members"]} == {"L.jpg": "remove", "a/img0009.png": "keep"}
    _, text = cli("dedup", "--index-dir", index_dir, "--apply", "--run", run, "--move-to", tmp_path / "moved",
                  "-o", report, "--no-progress", "--json")
    applied = json.loads(text)["applied"]
    assert "L.jpg" in applied["moved"] and "a/img0009.png" not in applied["moved"], applied["skipped"]
    assert (corpus / "a" / "img0009.png").is_file() and not os.path.lexists(corpus / "L.jpg")


def test_a_link_kept_by_a_decision_does_not_get_its_own_target_moved(planted, tmp_path: Path,
                                                                     tiny_model_dir: Path, cli) -> None:
    """A person may still keep the link (a review decision): then moving its target is refused."""
    from retrieval.curation.apply import apply_run
    from retrieval.curation.queries import set_decisions
    from retrieval.layout import IndexLayout
    from retrieval.search import IndexReader
    from retrieval.settings import Settings
    from retrieval.store import DuplicateMember, Store

    corpus, index_dir, _ = planted
    os.symlink("a/img0009.png", corpus / "L.jpg")
    cli("index", corpus, "--model", tiny_model_dir, "--index-dir", index_dir, "--no-progress", "-j", "0")
    run = _dry_run(cli, index_dir, tmp_path / "r")["run_id"]
    store = Store(IndexLayout(index_dir).default_db_url())
    try:
        with store.session() as s:
            ids = dict(s.query(DuplicateMember.path, DuplicateMember.id).filter(DuplicateMember.run_id == run).all())
        set_decisions(store, run, {ids["L.jpg"]: "keep", ids["a/img0009.png"]: "remove"})
    finally:
        store.close()
    reader = IndexReader(IndexLayout(index_dir))
    try:
        applied = apply_run(reader, run, tmp_path / "moved", Settings(index_dir=index_dir))
    finally:
        reader.close()
    assert "a/img0009.png" not in applied.moved
    reason = next(s["reason"] for s in applied.skipped if s["path"] == "a/img0009.png")
    assert "link to this very file" in reason
    assert (corpus / "a" / "img0009.png").is_file() and (corpus / "L.jpg").resolve().is_file()


def test_a_stored_run_whose_keeper_moved_away_moves_nothing_of_that_group(planted, cli, tmp_path: Path) -> None:
    corpus, index_dir, copies = planted
    report = tmp_path / "r"
    run = _dry_run(cli, index_dir, report)["run_id"]
    group = _group_of(report, "b/copy_of_1.jpg")
    keeper = next(m["path"] for m in group["members"] if m["action"] == "keep")
    spare = next(m["path"] for m in group["members"] if m["action"] == "remove")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(corpus / keeper, elsewhere / "keeper.jpg")  # the user moved the keeper after reviewing
    _, text = cli("dedup", "--index-dir", index_dir, "--apply", "--run", run, "--move-to", tmp_path / "moved",
                  "-o", report, "--no-progress", "--json")
    applied = json.loads(text)["applied"]
    assert spare not in applied["moved"]
    reason = next(s["reason"] for s in applied["skipped"] if s["path"] == spare)
    assert f"the kept copy {keeper} vanished" in reason
    assert (corpus / spare).is_file()  # the last copy in the corpus stays
    # the other groups, whose keepers are in place, are applied
    assert set(applied["moved"]) == set(copies) - {spare}


def test_apply_without_a_reviewed_run_computes_none_and_moves_nothing(planted, cli, tmp_path: Path) -> None:
    corpus, index_dir, copies = planted
    code, out = cli("dedup", "--index-dir", index_dir, "-t", T, "-o", tmp_path / "r", "--no-progress",
                    "--apply", "--move-to", tmp_path / "moved", ok=False)
    assert code == 1 and "nothing was moved" in out and "--apply --run 1" in out
    assert "Traceback" not in out and out.strip().count("\n") == 0
    assert all((corpus / c).is_file() for c in copies) and not (tmp_path / "moved").exists()
    # the same options once more: the run is the reviewed one now, and it is applied
    _, out = cli("dedup", "--index-dir", index_dir, "-t", T, "-o", tmp_path / "r", "--no-progress", "--json",
                 "--apply", "--move-to", tmp_path / "moved")
    assert sorted(json.loads(out)["applied"]["moved"]) == sorted(copies)


def test_apply_to_a_target_it_cannot_write_skips_every_file_in_one_line_each(planted, cli, tmp_path: Path) -> None:
    corpus, index_dir, copies = planted
    report = tmp_path / "r"
    run = _dry_run(cli, index_dir, report)["run_id"]
    target = tmp_path / "not-a-folder"
    target.write_text("a file where the target folder should be")
    _, text = cli("dedup", "--index-dir", index_dir, "--apply", "--run", run, "--move-to", target, "-o", report,
                  "--no-progress", "--json")
    applied = json.loads(text)["applied"]
    assert applied["moved"] == [] and len(applied["skipped"]) == len(copies)
    assert all("cannot move it" in s["reason"] and "\n" not in s["reason"] for s in applied["skipped"])
    assert all((corpus / c).is_file() for c in copies)


def test_keep_and_remove_lists_are_unambiguous_for_names_with_newlines(planted, cli, tmp_path: Path,
                                                                       tiny_model_dir: Path) -> None:
    corpus, index_dir, _ = planted
    shutil.copy(corpus / "a" / "img0011.jpg", corpus / "a" / "two\nlines.jpg")
    cli("index", corpus, "--model", tiny_model_dir, "--index-dir", index_dir, "--no-progress", "-j", "0")
    report = tmp_path / "r"
    _dry_run(cli, index_dir, report)
    group = _group_of(report, "a/two\nlines.jpg")
    names = {m["action"]: m["path"] for m in group["members"]}
    listed = {"keep": (report / "keep.nul").read_bytes().split(b"\0")[:-1],
              "remove": (report / "remove.nul").read_bytes().split(b"\0")[:-1]}
    for action, path in names.items():
        assert path.encode() in listed[action]
    lines = (report / "keep.txt").read_text().splitlines() + (report / "remove.txt").read_text().splitlines()
    assert "a/two\\nlines.jpg" in lines and "a/two" not in lines
