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


def test_curate_rerun_reuses_the_stored_run(planted, cli, tmp_path: Path, monkeypatch) -> None:
    import os

    from retrieval.curation import folders

    corpus, index_dir, _ = planted
    embedded: list[Path] = []
    real_embed = folders.embed_folder

    def counting_embed(folder, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        embedded.append(Path(folder))
        return real_embed(folder, *args, **kwargs)

    monkeypatch.setattr(folders, "embed_folder", counting_embed)
    queries = tmp_path / "queries"
    queries.mkdir()
    for name in ("a/img0001.jpg", "a/img0005.jpg", "b/img0002.jpg", "b/img0004.jpg"):
        shutil.copy(corpus / name, queries / name.replace("/", "_"))

    def curate(*args: object, out: str = "cur") -> dict:
        _, text = cli("curate", "--queries", queries, "--index-dir", index_dir, "-o", tmp_path / out,
                      "--no-progress", "--json", *args)
        return json.loads(text)

    first = curate("-k", "2", out="first")
    assert not first["reused"] and len(embedded) == 1
    again = curate("-k", "2", out="again")
    assert again["reused"] and again["run_id"] == first["run_id"] and len(embedded) == 1
    assert again["counts"] == first["counts"]
    for name in ("manifest.json", "manifest.csv", "curated.txt"):  # the reused run reports the same
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "first" / name).read_bytes(), name
    _, text = cli("curate", "--queries", queries, "-k", "2", "--index-dir", index_dir, "-o", tmp_path / "t",
                  "--no-progress")
    assert f"curation run {first['run_id']} (sample, reused: nothing changed)" in text

    # Same content: a touched query file, or an option sample mode does not use, still reuses.
    os.utime(queries / "a_img0001.jpg", ns=(1, 1))
    assert curate("-k", "2", "--per-cluster", "7")["run_id"] == first["run_id"] and len(embedded) == 1

    changed = [curate("-k", "3")["run_id"]]  # another parameter
    shutil.copy(corpus / "b/img0008.jpg", queries / "a_img0001.jpg")  # another query file content, same name
    changed.append(curate("-k", "3")["run_id"])
    forced = curate("-k", "3", "--force")
    assert not forced["reused"]
    changed.append(forced["run_id"])
    shutil.copy(corpus / "a/img0011.jpg", corpus / "a/new_copy.jpg")  # the index changes
    cli("index", corpus, "--index-dir", index_dir, "--no-progress", "-j", "0")
    changed.append(curate("-k", "3")["run_id"])
    assert len(set(changed + [first["run_id"]])) == 5 and len(embedded) == 5

    cli("cluster", "-k", "1", "--index-dir", index_dir, "-o", tmp_path / "cl", "--no-progress")
    by_cluster = curate("--mode", "cluster", "--per-cluster", "5", out="c1")
    assert curate("--mode", "cluster", "--per-cluster", "5", out="c2")["reused"]
    assert (tmp_path / "c2" / "manifest.json").read_bytes() == (tmp_path / "c1" / "manifest.json").read_bytes()
    assert curate("--mode", "cluster", "--per-cluster", "5", "-k", "9")["reused"]  # -k is sample mode's
    assert not curate("--mode", "cluster", "--per-cluster", "5", "--seed", "1")["reused"]
    cli("cluster", "-k", "1", "--force", "--index-dir", index_dir, "-o", tmp_path / "cl2", "--no-progress")
    newer = curate("--mode", "cluster", "--per-cluster", "5")  # the latest clustering run is another one
    assert not newer["reused"] and newer["run_id"] != by_cluster["run_id"]
