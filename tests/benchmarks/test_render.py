"""benchmarks.render: README tables from the result JSON files (no benchmark is run here)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import render
from benchmarks.render import (
    NAMES,
    MarkerError,
    main,
    render_section,
    update_readme,
    updated_text,
)

HEADERS = {
    "embed_throughput": "| path | img/s | vs ceiling |",
    "embed_throughput_gpu": "| model | precision | forward pass alone (ceiling), img/s |",
    "index_quality": "| d | N | tool @ memory budget |",
    "dedup_scale": "| N | index | index build s | dedup wall s |",
    "pdq_dihedral": "| n | plain CPU s (planted found) |",
    "dedup_quality": "| tool @ threshold | precision | recall (all true pairs) |",
    "api_batching": "| endpoint | batching | clients | QPS | p50 ms | p99 ms |",
    "incremental_reindex": "| run | wall s | detail |",
    "ui_render": "| page | kind | FCP ms | server ms | JSON round trip ms |",
    "embed_copy": "| copy model | forward only, img/s | `index --copy-model`, img/s |",
    "sources": "| source | img/s | vs local folder |",
    "ray_curation": "| stage | run | wall s | CPU s | CPU ratio vs local |",
    "sources_bucket": "| run | wall s | listing s | comparison s |",
    "ray_index": "| runner | img/s | img/s after the first batch |",
}
NO_GOAL = {"embed_copy"}  # a measurement the issue sets no goal for

ENV = {"commit": "abc1234", "cpu_count": 2, "cpu_model": "Test CPU", "cuda": None, "torch": "2.0", "faiss": "1.9"}


def _eval(r10: float, single: float, batch: float) -> dict[str, Any]:
    return {"recall_at_1": 1.0, "recall_at_10": r10,
            "latency_single": {"p50_ms": single, "p99_ms": single * 2},
            "latency_batch64": {"p50_ms": batch, "p99_ms": batch * 2}}


def _iq_row(label: str, index: str, r10: float, single: float, batch: float) -> dict[str, Any]:
    return {"tool": "autofaiss" if label.startswith("autofaiss") else "ours", "label": label, "index": index,
            "search_params": "nprobe=8", "build": {"build_s": 1.5, "peak_rss_bytes": 200 * 2**20},
            "index_bytes_per_vector": 100.0, "store_bytes_per_vector": 768.0, "total_bytes_per_vector": 868.0,
            "eval": _eval(r10, single, batch)}


# Fabricated shape of benchmarks/index_quality.py's result (made-up numbers: test only).
INDEX_QUALITY = {
    "benchmark": "index_quality", "when": "2030-01-02T03:04:05Z", "env": ENV,
    "config": {"sizes": [1000], "dims": [384], "queries": 100, "batch": 64, "k": 10, "build_threads": 2,
               "search_threads": 1, "latency_slack": 1.1, "recall_goal": 0.95,
               "settings": {"memory_budget": 4_000_000_000}},
    "data": "synthetic",
    "cases": [
        {"n": 1000, "dim": 384, "rows": [
            _iq_row("ours (auto)", "IVF64,PQ48", 0.97, 1.0, 10.0),
            _iq_row("autofaiss @ our index bytes", "IVF64,PQ32", 0.90, 1.05, 12.0),
            {"tool": "autofaiss", "label": "autofaiss @ nominal budget", "error": "boom"},
        ]},
        {"n": 2000, "dim": 384, "rows": [
            _iq_row("ours (auto)", "IVF64,PQ48", 0.93, 1.0, 10.0),
            _iq_row("autofaiss @ our index bytes", "IVF64,PQ32", 0.99, 0.5, 12.0),
        ]},
    ],
}


def _write(folder: Path, name: str, data: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(data))


def test_renders_the_committed_results() -> None:
    text = render.render()
    for name in NAMES:
        data, _ = render.load(render.RESULTS, name)
        if data is None:
            assert f"no `benchmarks/results/{name}.json`" in text
        else:
            assert HEADERS[name] in text, name
    positions = [text.index(f"## {title}") for _, title, _ in render.ORDER]
    assert positions == sorted(positions)
    assert text.count("**Goal**") == sum(render.load(render.RESULTS, n)[0] is not None for n in NAMES
                                        if n not in NO_GOAL)


def test_missing_and_quick_fallback(tmp_path: Path) -> None:
    assert "Not run yet" in render_section("api_batching", tmp_path)
    _write(tmp_path, "index_quality_quick", INDEX_QUALITY)
    _write(tmp_path, "tmp_index_quality", {"benchmark": "nope"})
    quick = render_section("index_quality", tmp_path)
    assert "(quick mode)" in quick and HEADERS["index_quality"] in quick
    _write(tmp_path, "index_quality", INDEX_QUALITY)
    assert "(quick mode)" not in render_section("index_quality", tmp_path)


def test_index_quality_goal_from_the_numbers(tmp_path: Path) -> None:
    _write(tmp_path, "index_quality", INDEX_QUALITY)
    text = render_section("index_quality", tmp_path)
    assert "met in 1 of 2 cases" in text
    assert "- d = 384, N = 1,000: **met**" in text  # 1.05x slower single query is inside the 10% allowance
    assert "- d = 384, N = 2,000: **missed**" in text
    assert "recall@10 0.9300 >= 0.95: missed by 2.1%" in text
    assert "Test CPU, 2 CPUs, no GPU" in text and "`abc1234`" in text and "2030-01-02 03:04 UTC" in text


def _gpu_e2e(rate: float) -> dict[str, Any]:
    return {"images_per_s": rate, "timings": {}, "workers": 16}


# Fabricated shape of benchmarks/embed_gpu.py's result (made-up numbers: test only).
EMBED_GPU = {
    "benchmark": "embed_throughput_gpu", "when": "2030-01-02T03:04:05Z", "env": {**ENV, "cuda": "Test GPU"},
    "batch_size": 256, "default_workers": 16,
    "corpora": {"photos": {"images": 100, "worker_chunk": 32, "sizes": ["640x480"], "mean_kb": 50.0,
                           "cpu_decode_only_img_s": {"16": 500.0}, "nvjpeg_decode_only_img_s": 1000.0},
                "web": {"images": 400, "worker_chunk": 64, "sizes": ["500x375"], "mean_kb": 20.0,
                        "cpu_decode_only_img_s": {"16": 2000.0}, "nvjpeg_decode_only_img_s": None}},
    "runs": [
        {"shape": "vits14", "precision": "bf16", "forward_only_img_s": 4000.0,
         "end_to_end": {"photos/16": _gpu_e2e(400.0), "web/16": _gpu_e2e(1000.0)},
         "ablation": {"photos/chunk-256/thread": _gpu_e2e(200.0), "web/chunk-auto/inline": _gpu_e2e(1100.0)},
         "reference_img_s": {"photos": {"one_at_a_time": 10.0, "batched": 12.0},
                             "web": {"one_at_a_time": 50.0, "batched": 60.0}}},
        {"shape": "vitb14", "precision": "fp16", "forward_only_img_s": 2000.0,
         "end_to_end": {"photos/16": _gpu_e2e(380.0), "web/16": _gpu_e2e(1700.0)}},
    ],
}


def test_embed_gpu_goal_and_ablation_from_the_numbers(tmp_path: Path) -> None:
    _write(tmp_path, "embed_throughput_gpu", EMBED_GPU)
    text = render_section("embed_throughput_gpu", tmp_path)
    assert "| ViT-S/14 | bf16 | 4,000 | 400 (0.10x) | 1,000 (0.25x) | photos 12.0, web 60.0 |" in text
    assert "| ViT-B/14 | fp16 | 2,000 | 380 (0.19x) | 1,700 (0.85x) | – |" in text
    assert "0.10x to 0.85x the ceiling; met in 1 of 4 runs (model, precision, corpus)." in text
    assert "| photos | 500 | 400 (0.80x) | 1,000 (2.00x) |" in text
    assert "| web | 2,000 | 1,700 (0.85x) | not measured (no torchvision) |" in text
    assert "| photos | chunk of 256, writer thread | 200 (0.50x the default) |" in text
    assert "| web | chunk picked from the run's size, main thread writes | 1,100 (1.10x the default) |" in text
    assert "ViT-B/14 end to end: 1,700 img/s per GPU" in text
    slow = copy.deepcopy(EMBED_GPU)
    slow["runs"][1]["end_to_end"]["web/16"]["images_per_s"] = 800.0
    _write(tmp_path, "embed_throughput_gpu", slow)
    assert "0.10x to 0.40x the ceiling; missed, by 50.0% in the best case (ViT-B/14, fp16)." in render_section(
        "embed_throughput_gpu", tmp_path)


def test_dedup_scale_goals(tmp_path: Path) -> None:
    size = {"n": 1_000_000, "dim": 384, "index": "IVF4096,PQ48", "index_build_s": 100.0,
            "dedup": {"wall_s": 240.0, "peak_rss_mb": 4096.0, "cpu_s": 300.0,
                      "counts": {"groups": 5, "images_to_remove": 7, "timings": {"graph_s": 200.0},
                                 "cpu_s": {"exact": 1.0, "phash": 35.0, "graph": 250.0, "groups": 9.0},
                                 "peak_rss_mb_after": {"exact": 100.0, "phash": 900.0, "graph": 4000.0, "groups": 4096.0},
                                 "graph": {"edge_recall_sample": {"queries": 256, "true_edges": 400, "recall": 0.99}}}},
            "quality": {"planted_pairs_grouped": {"exact": 1.0}, "edge_recall_in_groups": 0.99}}
    side = [{"n": 10_000, "imagededup": {"wall_s": 50.0, "peak_rss_mb": 900.0}, "ours": {"dedup_wall_s": 2.0},
             "identical_groups": False, "groups_only_ours": 1, "groups_only_imagededup": 2},
            {"n": 40_000, "imagededup": {"error": "not run: too big"}, "ours": {"dedup_wall_s": 5.0}}]
    _write(tmp_path, "dedup_scale", {"env": ENV, "when": "x", "sizes": [size], "side_by_side": side})
    text = render_section("dedup_scale", tmp_path)
    assert "4.00 min (< 3 min: missed: 1.33x the limit)" in text
    assert "10M vectors < 1 hour and < 8 GiB: no completed run in the results (see the text below the table)" in text
    assert "300 (1.00 / 35.0 / 250 / 9.00)" in text  # CPU per stage
    assert "100 / 900 / 4,000 / 4,096" in text  # peak RSS after each stage
    assert "0.9900 (400 edges)" in text and "lowest 0.9900 (missed)" in text
    assert "peak RSS 4.00 GiB (< 8 GiB: met)" in text
    assert "(n = 10,000): 25.0x, met" in text
    assert "not run: too big" in text
    assert "no (1 only ours, 2 only imagededup)" in text
    # the 10M run, kept in its own file, joins the table and the goals
    ten = {"n": 10_000_000, "dim": 384, "commit": "def5678", "machine_note": "2 cores; nothing else running",
           "dedup": {"wall_s": 1800.0, "peak_rss_mb": 9000.0, "cpu_s": 3000.0, "counts": {"groups": 9}},
           "quality": {"planted_pairs": 10, "planted_pairs_grouped": 1.0}}
    _write(tmp_path, "dedup_scale_10m", ten)
    text = render_section("dedup_scale", tmp_path)
    assert "| 10,000,000 |" in text and "all: 1.00" in text and "commit `def5678`" in text
    assert "10,000,000 vectors in 30.0 min (< 60 min: met); peak RSS 8.79 GiB (< 8 GiB: missed" in text
    assert "10M vectors < 1 hour and < 8 GiB: no completed run" not in text


def test_goal_formatting() -> None:
    assert render._at_least(0.778, 0.8) == "missed by 2.8%"
    assert render._at_least(1.3, 1.3) == "met"
    assert render._ratio(1.2996, 1.3) == "1.2996x"  # never shown as equal to a goal it misses
    assert render._ratio(143.36) == "143x"
    assert render._below(2.1, 60) == "met"


README = """# Project

intro

## Benchmarks

Hand-written lead.

<!-- benchmarks:begin -->
stale table
<!-- benchmarks:end -->

What limits it: prose that stays.

## Layout
"""


def test_update_readme_replaces_only_between_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert update_readme(readme, render.RESULTS) is True
    text = readme.read_text()
    head, rest = text.split("<!-- benchmarks:begin -->\n")
    body, tail = rest.split("<!-- benchmarks:end -->")
    assert head == README.split("<!-- benchmarks:begin -->\n")[0]
    assert tail == README.split("<!-- benchmarks:end -->")[1]
    assert "stale table" not in body and body.strip().endswith(render.render().strip())
    assert update_readme(readme, render.RESULTS) is False  # idempotent
    assert readme.read_text() == text


def test_named_blocks(tmp_path: Path) -> None:
    _write(tmp_path, "index_quality", INDEX_QUALITY)
    text = ("a\n<!-- benchmarks:begin index_quality -->\nold\n<!-- benchmarks:end index_quality -->\n"
            "prose between\n<!-- benchmarks:begin api_batching -->\n<!-- benchmarks:end api_batching -->\nz\n")
    new = updated_text(text, tmp_path)
    assert HEADERS["index_quality"] in new and "Not run yet: no `benchmarks/results/api_batching.json`" in new
    assert "prose between" in new and "old" not in new and new.endswith("z\n")
    assert updated_text(new, tmp_path) == new


@pytest.mark.parametrize("text", [
    "no markers at all\n",
    "<!-- benchmarks:begin -->\nno end\n",
    ("<!-- benchmarks:begin -->\n<!-- benchmarks:begin api_batching -->\n"
     "<!-- benchmarks:end api_batching -->\n<!-- benchmarks:end -->\n"),
    "<!-- benchmarks:begin nope -->\n<!-- benchmarks:end nope -->\n",
])
def test_marker_errors(tmp_path: Path, text: str) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(text)
    with pytest.raises(MarkerError):
        update_readme(readme, render.RESULTS)
    assert readme.read_text() == text
    assert main(["--readme", str(readme)]) == 2


def test_check_detects_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "results"
    api, _ = render.load(render.RESULTS, "api_batching")
    if api is None:
        pytest.skip("no api_batching result committed")
    _write(results, "api_batching", api)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert main(["--check", "--readme", str(readme), "--results", str(results)]) == 1
    assert readme.read_text() == README  # --check never writes
    assert "-stale table" in capsys.readouterr().out
    assert main(["--readme", str(readme), "--results", str(results)]) == 0
    assert main(["--check", "--readme", str(readme), "--results", str(results)]) == 0
    changed = copy.deepcopy(api)
    changed["forward_only_batch32_img_s"] *= 2
    _write(results, "api_batching", changed)
    assert main(["--check", "--readme", str(readme), "--results", str(results)]) == 1
    assert "forward pass alone ran at" in capsys.readouterr().out


def _ray_run(wall: float, cpu: float) -> dict[str, float]:
    return {"wall_s": wall, "cpu_s": cpu}


RAY_CURATION = {
    "env": ENV, "n": 20_000, "dim": 128, "k": 64, "threshold": 0.9, "shard": 2500, "index": "IVF512,PQ32",
    "load_average": [2.0, 3.0], "idle_cpu_per_s": {"ray_1_node": 0.1, "ray_2_nodes": 0.2},
    "identical": {"ray_1_node": {"graph_edges": True, "assignments": True},
                  "ray_2_nodes": {"graph_edges": True, "assignments": False}},
    "stages": {
        "graph": {"local": _ray_run(10.0, 10.0), "ray_1_node": _ray_run(12.0, 10.5), "ray_2_nodes": _ray_run(6.0, 10.5)},
        "assign": {"local": {**_ray_run(1, 1), "clusters": 141}, "ray_1_node": _ray_run(3, 2),
                   "ray_2_nodes": _ray_run(2, 2.5)},
        "index_build": {"local": _ray_run(5, 4), "ray_1_node": _ray_run(5, 4.2), "ray_2_nodes": _ray_run(3, 4.2)},
    },
}


def test_ray_curation_overhead_scaling_and_extrapolation(tmp_path: Path) -> None:
    _write(tmp_path, "ray_curation", RAY_CURATION)
    text = render_section("ray_curation", tmp_path)
    assert HEADERS["ray_curation"] in text
    assert "graph 5.0% (met)" in text and "assign 100.0% (missed)" in text  # CPU 10.5/10 and 2/1
    assert "graph 2.00x (met)" in text and "assign 1.60x (missed by 11.1%)" in text  # 2 x 10.5/10.5, 2 x 2/2.5
    assert "| k-NN graph | Ray, 1 worker node x 1 CPU | 12.0 | 10.5 | 1.05x | 0.93x |" in text  # 10.5 - 0.1 x 12
    assert "| NO |" in text  # a Ray result that differs from local is shown, not hidden
    assert "no GPU result" in text and "index --ray" not in text  # neither input present: said, not invented
    _write(tmp_path, "embed_throughput_gpu", {"env": {"cuda": "Test GPU"}, "runs": [
        {"shape": "vits14", "precision": "bf16", "end_to_end": {"web/16": {"images_per_s": 1000.0}}}]})
    _write(tmp_path, "ray_index", {"env": ENV, "rows": [{"runner": "local", "images_per_s": 900.0}],
                                   "per_node_images_per_s": 500.0, "per_node_device": "cuda"})
    text = render_section("ray_curation", tmp_path)
    # 1.2e9 images / (1000 img/s x 8 GPUs x 20 nodes) = 7,500 s
    assert "| 1,000 img/s per GPU (Test GPU) | 8,000 | 2.08 |" in text
    # the per-node rate by name, never the local runner's faster rate: 1.2e9 / (500 x 20) s = 33.3 h
    assert "| `index --ray` (ray_index.json, cuda) | 500 img/s per node as measured" in text and "| 33.3 |" in text
def test_pdq_dihedral_and_cpu_ratio_columns(tmp_path: Path) -> None:
    row = {"n": 25_000, "radius": 31, "planted_pairs": 250,
           "plain": {"cpu_s": 0.5, "wall_s": 1.0, "pairs": 0, "planted_found": 0.0},
           "dihedral": {"cpu_s": 6.0, "wall_s": 9.0, "pairs": 250, "planted_found": 1.0},
           "eight_passes": {"cpu_s": 5.0, "wall_s": 8.0, "pairs": 250, "planted_found": 1.0},
           "dihedral_equals_eight_passes": True, "dihedral_contains_plain": True}
    _write(tmp_path, "pdq_dihedral", {"env": ENV, "when": "x", "sizes": [row]})
    text = render_section("pdq_dihedral", tmp_path)
    assert "| 25,000 | 0.50 (0.00) | 6.00 (1.00) | 5.00 (1.00) | 12.0x | 1.20x | yes |" in text
    assert "at n = 25,000, 12.0x the plain self-join (missed)" in text
    side = [{"n": 20_000, "imagededup": {"wall_s": 100.0, "cpu_s": 90.0, "peak_rss_mb": 900.0},
             "ours": {"dedup_wall_s": 50.0, "dedup_cpu_s": 9.0}, "identical_groups": True}]
    _write(tmp_path, "dedup_scale", {"env": ENV, "when": "x", "sizes": [], "side_by_side": side})
    text = render_section("dedup_scale", tmp_path)
    assert "| 2.00x | 10.0x | yes |" in text
    assert "in CPU seconds there: 10.0x, missed" in text
