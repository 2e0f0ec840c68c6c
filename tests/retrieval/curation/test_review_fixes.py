"""Regressions: stale FAISS ids never become edges; --apply --run acts on a stored run; --rebuild
forgets curation runs (ids restart) and keeps the model the index was built with."""

from __future__ import annotations

import json
from pathlib import Path

from tests import db as testdb
from tests.retrieval.curation.test_dedup_e2e import T


def test_stale_faiss_ids_never_become_edges(planted, cli, tmp_path: Path) -> None:
    corpus, index_dir, copies = planted
    db = index_dir / "retrieval.db"
    with testdb.connect(db) as conn:
        # An index run killed after forgetting a deleted file but before syncing FAISS: the
        # original of the flipped copy is gone from the database, its id still in the index.
        (gone,) = conn.execute("SELECT id FROM images WHERE path = 'a/img0007.jpg'").fetchone()
        conn.execute("DELETE FROM images WHERE id = ?", (gone,))
    _, out = cli("dedup", "--index-dir", index_dir, "-t", T, "-o", tmp_path / "r", "--no-progress", "--json")
    result = json.loads(out)
    doc = json.loads((tmp_path / "r" / "duplicates.json").read_text())
    member_paths = {m["path"] for g in doc["groups"] for m in g["members"]}
    assert "a/img0007.jpg" not in member_paths
    # Its planted copy has no partner left: it must not be grouped with some unrelated image.
    assert "flipped/img0007_flip.jpg" not in member_paths
    assert result["summary"]["groups"] == len(copies) - 1


def test_apply_run_acts_on_the_reviewed_run(planted, cli, tmp_path: Path) -> None:
    corpus, index_dir, copies = planted
    _, out = cli("dedup", "--index-dir", index_dir, "-t", T, "--no-embeddings", "--pdq-distance", "-1", "-o",
                 tmp_path / "r1", "--no-progress", "--json")
    reviewed = json.loads(out)
    hash_only = set((tmp_path / "r1" / "remove.txt").read_text().split())
    assert "flipped/img0007_flip.jpg" not in hash_only  # found by PDQ (off here) or the embedding stage only
    # A later run with other options must not change what --apply --run moves.
    cli("dedup", "--index-dir", index_dir, "-t", T, "-o", tmp_path / "r2", "--no-progress")
    _, out = cli("dedup", "--index-dir", index_dir, "--apply", "--run", reviewed["run_id"], "--move-to",
                 tmp_path / "moved", "-o", tmp_path / "r3", "--no-progress", "--json")
    moved = set(json.loads(out)["applied"]["moved"])
    assert moved == hash_only and (corpus / "flipped/img0007_flip.jpg").exists()
    code, out = cli("dedup", "--index-dir", index_dir, "--apply", "--run", "999", "--move-to", tmp_path / "m2",
                    ok=False)
    assert code == 1 and "no completed dedup run with id 999" in out
    code, out = cli("dedup", "--index-dir", index_dir, "--run", "1", ok=False)
    assert code == 1 and "--apply" in out


def test_rebuild_forgets_curation_runs_and_keeps_the_model(planted, cli, tmp_path: Path) -> None:
    corpus, index_dir, _ = planted
    cli("dedup", "--index-dir", index_dir, "-t", T, "-o", tmp_path / "r", "--no-progress")
    cli("cluster", "--index-dir", index_dir, "-k", "2", "-o", tmp_path / "c", "--no-progress")
    with testdb.connect(index_dir / "retrieval.db") as conn:
        model_before = conn.execute("SELECT value FROM meta WHERE key = 'model_ref'").fetchone()[0]
    # no --model: the rebuild must use the model the index was built with, not the default hub id
    _, out = cli("index", corpus, "--index-dir", index_dir, "--rebuild", "--no-progress", "--json", "-j", "0")
    assert json.loads(out)["new"] == 16
    with testdb.connect(index_dir / "retrieval.db") as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'model_ref'").fetchone()[0] == model_before
        for table in ("dedup_runs", "duplicate_groups", "duplicate_members", "cluster_runs", "cluster_assignments"):
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table
