"""Duplicate-detection quality: our exact + pixel + pHash stages vs imagededup PHash and cleanvision.

Corpus (generated, seeded, valid files only): N distinct photo-like originals (a smooth random
colour field and a linear gradient, random filled shapes, a textured patch and sensor-like noise,
at several sizes and aspect ratios), saved as JPEG q90. For a seeded subset of P originals one copy
per known transform is planted beside them in the same flat folder, under shuffled names:

* exact-copy: the same bytes; png-resave: the decoded pixels saved as PNG (identical pixels);
* jpeg-q30: the original re-encoded at quality 30;
* every transform of `retrieval calibrate` (retrieval.curation.calibrate.TRANSFORMS: resize-50%,
  crop-80%, flip, rotate-5, color-jitter, greyscale, text-overlay, padding-10%; its jpeg-q30 is the
  one above), each applied to the decoded original and written as JPEG q90 (one more re-encode, as
  copies met in the wild are).

Ground truth: a family is an original and its copies. True pairs are all unordered pairs within a
family: (original, copy) and (copy, copy) of the same original. Every other pair is false; two
originals are always distinct images (each has its own seed), so a pair of originals that a tool
groups is a false positive for that tool: "original_pairs_found" counts them.

Found pairs: every tool's output is reduced to groups (connected components of what it reports:
our duplicate groups, imagededup's duplicate map read as a graph, cleanvision's exact and near
sets merged), and found pairs are all unordered pairs inside a group. For imagededup the pairs it
lists directly (without closing groups) are scored too ("direct").

* recall per transform t = found (original, copy-by-t) pairs / planted copies made by t;
* precision per transform t = found pairs with a copy-by-t on one side that are true / all found
  pairs with a copy-by-t on one side (null when the tool found none);
* overall: recall_original_copy over all (original, copy) pairs, recall_all_true_pairs over all
  true pairs (copy-copy included: flip vs crop of one original is a true pair that no hash links),
  precision = true found pairs / found pairs.

Tools, all on the same folder:
* ours: `retrieval index` (indexer.pipeline.run_index) then the dedup library
  (retrieval.curation.dedup.run_dedup) with the embedding stage off, at our default pHash radius
  (8) and at imagededup's default (10), and with exact + identical-pixel stages only (radius -1);
* imagededup 0.3.3: PHash().find_duplicates(image_dir=..., max_distance_threshold=10 (its
  default) and 8), in its own environment (benchmarks/peers/imagededup_run.py);
* cleanvision 0.3.7: Imagelab(data_path=...).find_issues({"exact_duplicates": {},
  "near_duplicates": {}}), its defaults (benchmarks/peers/cleanvision_run.py). cleanvision stops
  the whole run on one unreadable file; this corpus holds valid images only.

Wall times are each tool's own end to end on the same files (ours: index + dedup; the index also
embeds every image, with the tiny model here; imagededup: encode + search per threshold), run one
after another; cpu_s (user + system, worker processes included) is beside them because a shared
machine's wall times move with its load. Peer process start and imports (torch for imagededup) are
not in either; process_wall_s under "peers" has them. The embedding stage is not judged here: there are no
real DINOv2 weights on this machine and a random-weight model carries no semantics. Pass --model
with a real checkpoint directory to add "ours-embeddings" (all stages, default threshold).

Usage: python -m benchmarks.dedup_quality [--quick] [--originals N] [--planted P] [--model DIR]
"""

from __future__ import annotations

import argparse
import itertools
import resource
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import save_result

SIZES = [(320, 240), (240, 320), (384, 384), (448, 336), (512, 384), (384, 512), (576, 384), (640, 480)]
PEERS_DIR = Path(__file__).parent / "peers"


# ---------------------------------------------------------------- corpus


def photo_like(rng: np.random.Generator) -> Any:
    """One distinct photo-like RGB image: smooth field + gradient, shapes, a texture patch, noise."""
    from PIL import Image, ImageDraw, ImageFilter

    w, h = SIZES[rng.integers(len(SIZES))]
    # Smooth random colour field: a coarse random grid per channel, upsampled bicubically.
    gh, gw = rng.integers(2, 7, size=2)
    coarse = rng.uniform(0, 255, (gh, gw, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse, "RGB").resize((w, h), Image.Resampling.BICUBIC), np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * np.arange(w, dtype=np.float32)[None, :] / w
            + np.sin(angle) * np.arange(h, dtype=np.float32)[:, None] / h)
    field = field * np.float32(rng.uniform(0.5, 1.0)) + ramp[..., None] * rng.uniform(-80, 80, 3).astype(np.float32)
    img = Image.fromarray(np.clip(field + np.float32(rng.uniform(0, 60)), 0, 255).astype(np.uint8))
    # Shapes on a translucent layer: objects at random places, sizes and colours.
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(rng.integers(3, 11)):
        colour = (*(int(c) for c in rng.integers(0, 256, 3)), int(rng.integers(140, 256)))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        rx, ry = rng.uniform(0.04, 0.3) * w, rng.uniform(0.04, 0.3) * h
        kind = rng.integers(4)
        if kind == 0:
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
        elif kind == 1:
            draw.rectangle([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
        elif kind == 2:
            pts = [(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 7)))]
            draw.polygon(pts, fill=colour)
        else:
            draw.line([(cx - rx, cy - ry), (cx + rx, cy + ry)], fill=colour, width=int(rng.integers(2, 12)))
    img = Image.alpha_composite(img.convert("RGBA"), layer.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5))))
    arr = np.asarray(img.convert("RGB"), np.float32)
    # A textured patch (stripes or checks) and per-pixel noise.
    px, py = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
    pw, ph = int(rng.integers(w // 8, w // 2)), int(rng.integers(h // 8, h // 2))
    period = rng.uniform(3, 12)
    yy, xx = np.mgrid[0:ph, 0:pw]
    pattern = np.sin(2 * np.pi * (xx if rng.random() < 0.5 else xx + yy) / period)
    if rng.random() < 0.5:
        pattern = pattern * np.sin(2 * np.pi * yy / period)
    arr[py : py + ph, px : px + pw] += (pattern * rng.uniform(10, 40))[..., None][: arr.shape[0] - py, : arr.shape[1] - px]
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(rng.uniform(2, 9))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def transforms() -> dict[str, Any]:
    """Transform name -> how a copy is written: the calibrate transforms plus exact and lossless copies."""
    from retrieval.curation.calibrate import TRANSFORMS

    return {"exact-copy": None, "png-resave": None, **{t: TRANSFORMS[t] for t in TRANSFORMS}}


def make_corpus(root: Path, originals: int, planted: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Write the corpus into `root` (flat) and return file name -> {"family", "kind"}."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = transforms()
    total = originals + planted * len(names)
    ids = iter(rng.permutation(total))  # shuffled names: file order tells no tool anything
    planted_set = set(rng.choice(originals, size=min(planted, originals), replace=False).tolist())
    truth: dict[str, dict[str, Any]] = {}
    for i in range(originals):
        image = photo_like(np.random.default_rng([seed, i]))
        name = f"img_{next(ids):06d}.jpg"
        image.save(root / name, format="JPEG", quality=90)
        truth[name] = {"family": i, "kind": "original"}
        if i not in planted_set:
            continue
        with Image.open(root / name) as im:
            decoded = im.convert("RGB")
        for kind, fn in names.items():
            number = next(ids)
            if kind == "exact-copy":
                copy = f"img_{number:06d}.jpg"
                shutil.copyfile(root / name, root / copy)
            elif kind == "png-resave":
                copy = f"img_{number:06d}.png"
                decoded.save(root / copy, format="PNG", compress_level=1)
            elif kind == "jpeg-q30":
                copy = f"img_{number:06d}.jpg"
                decoded.save(root / copy, format="JPEG", quality=30)
            else:
                copy = f"img_{number:06d}.jpg"
                fn(decoded).convert("RGB").save(root / copy, format="JPEG", quality=90)
            truth[copy] = {"family": i, "kind": kind}
    return truth


# ---------------------------------------------------------------- scoring


def components(pairs: list[tuple[str, str]]) -> list[set[str]]:
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb
    groups: dict[str, set[str]] = defaultdict(set)
    for a in list(parent):
        groups[find(a)].add(a)
    return [g for g in groups.values() if len(g) > 1]


def pairs_of_groups(groups: list[set[str]] | list[list[str]]) -> set[tuple[str, str]]:
    return {tuple(sorted(p)) for g in groups for p in itertools.combinations(sorted(g), 2)}  # type: ignore[misc]


def score(found: set[tuple[str, str]], truth: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Precision and recall per transform and overall (definitions in the module docstring)."""
    found = {p for p in found if p[0] in truth and p[1] in truth}
    families: dict[int, list[str]] = defaultdict(list)
    for name, t in truth.items():
        families[t["family"]].append(name)
    kinds = sorted({t["kind"] for t in truth.values()} - {"original"}, key=list(transforms()).index)
    true_pairs = pairs_of_groups([f for f in families.values() if len(f) > 1])
    orig_of = {t["family"]: n for n, t in truth.items() if t["kind"] == "original"}
    per: dict[str, Any] = {}
    for kind in kinds:
        copies = [n for n, t in truth.items() if t["kind"] == kind]
        hits = sum(1 for c in copies if tuple(sorted((c, orig_of[truth[c]["family"]]))) in found)
        touching = [p for p in found if truth[p[0]]["kind"] == kind or truth[p[1]]["kind"] == kind]
        good = sum(1 for a, b in touching if truth[a]["family"] == truth[b]["family"])
        per[kind] = {"copies": len(copies), "found": hits, "recall": round(hits / len(copies), 4) if copies else None,
                     "pairs_touching": len(touching), "precision": round(good / len(touching), 4) if touching else None}
    tp = len(found & true_pairs)
    orig_copy = {p for p in true_pairs if "original" in (truth[p[0]]["kind"], truth[p[1]]["kind"])}
    false = found - true_pairs
    return {
        "found_pairs": len(found), "true_found": tp, "false_found": len(false),
        "precision": round(tp / len(found), 4) if found else None,
        "recall_original_copy": round(len(found & orig_copy) / len(orig_copy), 4) if orig_copy else None,
        "recall_all_true_pairs": round(tp / len(true_pairs), 4) if true_pairs else None,
        "original_pairs_found": sum(1 for a, b in false if truth[a]["kind"] == truth[b]["kind"] == "original"),
        "false_examples": [[a, truth[a]["kind"], b, truth[b]["kind"]] for a, b in sorted(false)[:5]],
        "per_transform": per,
    }


# ---------------------------------------------------------------- tools


def cpu_s() -> float:
    """User + system CPU of this process and its reaped children (decode workers)."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def run_ours(corpus: Path, work: Path, model: Path, radii: list[int], with_embeddings: bool) -> dict[str, Any]:
    from retrieval.indexer.pipeline import IndexOptions, run_index

    from retrieval.curation.dedup import DedupOptions, load_nodes, load_run, run_dedup
    from retrieval.search import IndexLayout, IndexReader
    from retrieval.settings import Settings

    settings = Settings(index_dir=work / "idx", model=str(model), batch_size=64)
    t, cpu = time.perf_counter(), cpu_s()
    summary = run_index(IndexOptions(corpus=corpus, settings=settings, progress=False))
    index_s, index_cpu = time.perf_counter() - t, cpu_s() - cpu
    reader = IndexReader(IndexLayout(settings.index_dir))
    runs: dict[str, Any] = {}
    try:
        nodes = load_nodes(reader)
        phash = {p: int(h) & ((1 << 64) - 1) for p, h in zip(nodes.path, nodes.phash)}
        configs = [(f"ours-phash{r}" if r >= 0 else "ours-exact+pixel", r, False) for r in radii]
        if with_embeddings:
            configs.append(("ours-embeddings", 8, True))
        for label, radius, emb in configs:
            t, cpu = time.perf_counter(), cpu_s()
            outcome = run_dedup(reader, DedupOptions(phash_distance=radius, embeddings=emb, force=True,
                                                     max_pixels=settings.max_pixels, use_gpu=False))
            dedup_s, dedup_cpu = time.perf_counter() - t, cpu_s() - cpu
            doc = load_run(reader, outcome.run_id)
            groups = [[m["path"] for m in g["members"]] for g in doc["groups"]]
            runs[label] = {"groups": groups, "dedup_s": dedup_s, "dedup_cpu_s": dedup_cpu, "params": doc["run"]["params"],
                           "timings": doc["summary"].get("timings")}
    finally:
        reader.close()
    return {"index_s": index_s, "index_cpu_s": index_cpu, "index_timings": summary.timings, "indexed": summary.total_images,
            "failed": summary.failed, "runs": runs, "phash": phash}


def phash_distances(truth: dict[str, dict[str, Any]], phash: dict[str, int]) -> dict[str, Any]:
    """Our stored pHash: Hamming distance original -> copy per transform, and among originals."""
    orig_of = {t["family"]: n for n, t in truth.items() if t["kind"] == "original"}
    by_kind: dict[str, list[int]] = defaultdict(list)
    for name, t in truth.items():
        if t["kind"] != "original" and name in phash:
            by_kind[t["kind"]].append((phash[name] ^ phash[orig_of[t["family"]]]).bit_count())
    out: dict[str, Any] = {k: {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)),
                               "within_8": round(float(np.mean(np.array(v) <= 8)), 4),
                               "within_10": round(float(np.mean(np.array(v) <= 10)), 4)} for k, v in by_kind.items()}
    codes = np.array([phash[n] for n in orig_of.values() if n in phash], dtype=np.uint64)
    bits = np.unpackbits(codes.view(np.uint8).reshape(-1, 8), axis=1).astype(np.int16)
    dist = bits.shape[1] - (bits @ bits.T + (1 - bits) @ (1 - bits).T)  # pairwise Hamming
    iu = np.triu_indices(len(codes), 1)
    d = dist[iu]
    out["among_originals"] = {"pairs": len(d), "min": int(d.min()) if len(d) else None,
                              "within_8": int((d <= 8).sum()), "within_10": int((d <= 10).sum()),
                              "median": float(np.median(d)) if len(d) else None}
    return out


def run_peer(name: str, script: str, args: list[str], timeout: float) -> dict[str, Any]:
    from benchmarks.peers import PeerUnavailable, run_json

    t = time.perf_counter()
    try:
        out = run_json(name, PEERS_DIR / script, args, timeout=timeout)
    except PeerUnavailable as exc:
        return {"error": str(exc)}
    out["process_wall_s"] = round(time.perf_counter() - t, 2)  # incl. interpreter start and imports
    return out


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="400 originals, 80 planted (default 1,200 and 200)")
    parser.add_argument("--originals", type=int, default=None)
    parser.add_argument("--planted", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, default=None,
                        help="a real DINOv2 checkpoint directory: also score the embedding stage")
    parser.add_argument("--keep", type=Path, default=None, help="keep the corpus and index here (default: a temp dir)")
    args = parser.parse_args()
    originals = args.originals or (400 if args.quick else 1200)
    planted = args.planted or (80 if args.quick else 200)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-dedupq-"))
    corpus = work / "corpus"
    try:
        t = time.perf_counter()
        if corpus.exists():
            shutil.rmtree(corpus)
        truth = make_corpus(corpus, originals, planted, args.seed)
        make_s = time.perf_counter() - t
        print(f"corpus: {originals} originals, {planted} planted x {len(transforms())} transforms = "
              f"{len(truth)} files in {make_s:.0f} s", flush=True)
        if args.model is not None:
            model = args.model
        else:
            from tests.conftest import save_tiny_dinov2

            model = save_tiny_dinov2(work / "tiny-dinov2")
        ours = run_ours(corpus, work, model, [8, 10, -1], with_embeddings=args.model is not None)
        print(f"ours: index {ours['index_s']:.1f} s, dedup runs "
              + ", ".join(f"{k} {v['dedup_s']:.2f} s" for k, v in ours["runs"].items()), flush=True)
        timeout = 1800
        imd = run_peer("imagededup", "imagededup_run.py", [str(corpus), "--thresholds", "10,8"], timeout)
        print(f"imagededup: {imd.get('error') or [(r['max_distance_threshold'], r['wall_s']) for r in imd['runs']]}",
              flush=True)
        cv = run_peer("imagededup", "cleanvision_run.py", [str(corpus)], timeout)
        print(f"cleanvision: {cv.get('error') or cv['wall_s']}", flush=True)

        tools: dict[str, Any] = {}
        for label, run in ours["runs"].items():
            wall = ours["index_s"] + run["dedup_s"]
            tools[label] = {"wall_s": round(wall, 2), "cpu_s": round(ours["index_cpu_s"] + run["dedup_cpu_s"], 2),
                            "index_s": round(ours["index_s"], 2), "dedup_s": round(run["dedup_s"], 3),
                            "params": run["params"], "dedup_timings": run["timings"],
                            **score(pairs_of_groups(run["groups"]), truth)}
        if "error" in imd:
            tools["imagededup"] = {"error": imd["error"]}
        else:
            for r in imd["runs"]:
                direct = {tuple(p) for p in r["pairs"]}
                tools[f"imagededup-phash{r['max_distance_threshold']}"] = {
                    "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "files_hashed": r["files_hashed"],
                    **score(pairs_of_groups(components(list(direct))), truth),
                    "direct": {k: v for k, v in score(direct, truth).items() if k != "false_examples"}}
        if "error" in cv:
            tools["cleanvision"] = {"error": cv["error"]}
        else:
            sets = cv["sets"]["exact_duplicates"] + cv["sets"]["near_duplicates"]
            merged = components([p for s in sets for p in itertools.combinations(s, 2)])
            tools["cleanvision"] = {"wall_s": cv["wall_s"], "cpu_s": cv["cpu_s"], "files": cv["files"],
                                    **score(pairs_of_groups(merged), truth)}
        base = tools["ours-phash8"]
        for v in tools.values():
            if "wall_s" in v:
                v["wall_vs_ours_phash8"] = round(v["wall_s"] / base["wall_s"], 2) if base["wall_s"] else None
                v["cpu_vs_ours_phash8"] = round(v["cpu_s"] / base["cpu_s"], 2) if base["cpu_s"] else None
        result = {
            "mode": "quick" if args.quick else "full",
            "corpus": {"originals": originals, "planted": planted, "transforms": list(transforms()),
                       "files": len(truth), "seed": args.seed, "make_s": round(make_s, 1),
                       "valid_files_only": True,
                       "note": "generated photo-like JPEG q90 originals; all files decode (cleanvision aborts "
                               "on an unreadable file)"},
            "model": "real checkpoint: " + str(args.model) if args.model else
                     "tiny random DINOv2 (tests.conftest.save_tiny_dinov2): the embedding stage is not judged here",
            "ours_index": {"wall_s": round(ours["index_s"], 2), "timings": ours["index_timings"],
                           "indexed": ours["indexed"], "failed": ours["failed"]},
            "phash_distances_ours": phash_distances(truth, ours["phash"]),
            "tools": tools,
            "peers": {"imagededup": {k: v for k, v in imd.items() if k != "runs"},
                      "cleanvision": {k: v for k, v in cv.items() if k != "sets"}},
        }
        path = save_result("dedup_quality" + ("_quick" if args.quick else ""), result)
        print_table(tools)
        print(f"-> {path}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def print_table(tools: dict[str, Any]) -> None:
    kinds = next(iter(v["per_transform"] for v in tools.values() if "per_transform" in v))
    print(f"{'recall':<14}" + "".join(f"{k[:13]:>14}" for k in tools))
    for kind in kinds:
        print(f"{kind:<14}" + "".join(f"{v['per_transform'][kind]['recall']:>14}" if "per_transform" in v else f"{'-':>14}"
                                      for v in tools.values()))
    for key in ("recall_original_copy", "recall_all_true_pairs", "precision", "original_pairs_found", "wall_s",
                "cpu_s"):
        print(f"{key[:14]:<14}" + "".join(f"{v.get(key, '-')!s:>14}" for v in tools.values()))


if __name__ == "__main__":
    main()
