"""Retrieval-based curation: collision accounting, sample and cluster modes through the CLI."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np

from retrieval.curation.curate import sample_based


def test_sample_based_counts_collisions_once() -> None:
    sims = np.array([[0.9, 0.8, 0.7], [0.95, 0.6, 0.5], [0.4, 0.3, -np.inf]], np.float32)
    nbrs = np.array([[1, 2, 3], [2, 4, 1], [1, 5, -1]])
    items, counts = sample_based(["q0", "q1", "q2"], sims, nbrs)
    assert counts == {"retrieved": 8, "unique_images": 5, "collisions": 3, "images_retrieved_more_than_once": 2}
    by_id = {d["image_id"]: d for d in items}
    assert by_id[1]["times_retrieved"] == 3 and by_id[1]["query"] == "q0"
    assert by_id[2]["times_retrieved"] == 2 and by_id[2]["query"] == "q1" and by_id[2]["score"] == np.float32(0.95)
    assert [d["image_id"] for d in items][0] == 2


def test_curate_sample_and_cluster_modes(planted, cli, tmp_path: Path) -> None:
    corpus, index_dir, _ = planted
    queries = tmp_path / "queries"
    queries.mkdir()
    for name in ("a/img0001.jpg", "a/img0005.jpg", "b/img0002.jpg", "b/img0004.jpg"):
        shutil.copy(corpus / name, queries / name.replace("/", "_"))
    (queries / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "cur"
    _, text = cli("curate", "--queries", queries, "-k", "4", "--index-dir", index_dir, "-o", out, "--no-progress", "--json")
    c = json.loads(text)["counts"]
    assert c["queries"] == 4 and c["queries_failed"] == 1 and c["retrieved"] == 16
    assert c["unique_images"] + c["collisions"] == 16 and c["unique_images"] == len((out / "curated.txt").read_text().split())
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert sum(int(r["times_retrieved"]) for r in rows) == 16
    assert all((corpus / r["path"]).is_file() and r["how"] == "sample" for r in rows)

    code, text = cli("curate", "--queries", queries, "--mode", "cluster", "--index-dir", index_dir, ok=False)
    assert code == 1 and "run `retrieval cluster` first" in text
    cli("cluster", "-k", "1", "--index-dir", index_dir, "-o", tmp_path / "cl", "--no-progress")
    _, text = cli("curate", "--queries", queries, "--mode", "cluster", "--per-cluster", "5", "--index-dir", index_dir,
                  "-o", tmp_path / "cur2", "--no-progress", "--json")
    c = json.loads(text)["counts"]
    assert c["clusters_selected"] == 1 and c["unique_images"] == 5  # one cluster with 4 > 3 queries, 5 sampled
    _, text = cli("curate", "--queries", queries, "--mode", "cluster", "--min-queries", "4", "--index-dir", index_dir,
                  "-o", tmp_path / "cur3", "--no-progress", "--json")
    assert json.loads(text)["counts"]["clusters_selected"] == 0
