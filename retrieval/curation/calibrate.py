"""`retrieval calibrate`: measure duplicate detection on the user's own corpus.

A seeded sample of indexed images is copied under known edits (retrieval.curation.edits), the copies
are embedded with one embedder role's model, and each copy is searched among that role's vectors.
A copy's score against its source is a positive; every other image in its top 10 is a candidate
false positive. Per edit and threshold we report precision and recall, plus the pHash distance of
the copies, and suggest the lowest threshold whose overall precision reaches the target. The run
always ends with an answer: a threshold, or a sentence saying why none qualifies and what to try.

The role is an argument (`RoleView`): calibration needs a way to embed PIL images, to read stored
vectors and to search them, nothing else, so every role (search, copy) calibrates the same way.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from sqlalchemy import select

from retrieval.curation.edits import EDITS
from retrieval.curation.hashing import hamming
from retrieval.errors import RetrievalError
from retrieval.search import IndexReader
from retrieval.store import Image as ImageRow
from retrieval.store import to_unsigned64

logger = logging.getLogger(__name__)

THRESHOLDS = [round(x, 3) for x in np.r_[np.arange(0.3, 0.99, 0.01), 0.99, 0.995, 0.999]]
NEIGHBOURS = 10
TRANSFORMS = EDITS  # the edits calibration copies under (one list with the benchmarks' photo corpus)


@dataclass
class RoleView:
    """What calibration needs of one embedder role.

    embed: PIL RGB images -> L2-normalised float32 vectors (n, d), preprocessed as the role indexes.
    read: image ids -> their stored vectors. topk: (queries, k) -> (scores, ids) among the stored
    vectors, best first, ids < 0 for padding. decode: the preprocessing whose size the sampled
    originals are decoded at (JPEG draft decoding; None: up to 4096 pixels a side).
    """

    name: str
    embed: Callable[[list[Image.Image]], np.ndarray]
    read: Callable[[Sequence[int]], np.ndarray]
    topk: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
    decode: Any = None


def search_role(reader: IndexReader) -> RoleView:
    """The search (retrieval) role of an index: its model, vectors and FAISS index."""
    from retrieval.curation.graph import is_exact_index, search_exact_topk
    from retrieval.imaging.preprocess import decode_image, preprocess

    embedder = reader.embedder()
    cfg = embedder.preprocess
    exact = is_exact_index(reader.index)

    def embed(images: list[Image.Image]) -> np.ndarray:
        return embedder.embed(np.stack([preprocess(decode_image(_png(im), cfg, 10**9), cfg) for im in images]))

    def topk(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return search_exact_topk(reader.index, queries, None, k, reader.vectors.read, exact)

    return RoleView("search", embed, lambda ids: reader.vectors.read(list(ids)), topk, cfg)


def copy_role(reader: IndexReader) -> RoleView:
    """The copy-detection role of an index (`index --copy-model`): its model, vectors and FAISS index."""
    from retrieval.curation.graph import is_exact_index, search_exact_topk
    from retrieval.imaging.preprocess import DecodedImage

    embedder = reader.copy_embedder()
    index = reader.copy_index
    exact = is_exact_index(index)

    def embed(images: list[Image.Image]) -> np.ndarray:
        rgb = [im.convert("RGB") for im in images]
        return embedder.embed_many([embedder.prepare(DecodedImage(im, im.width, im.height, "PNG")) for im in rgb])

    def topk(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return search_exact_topk(index, queries, None, k, reader.copy_vectors.read, exact)

    return RoleView("copy", embed, lambda ids: reader.copy_vectors.read(list(ids)), topk, None)


def role_view(reader: IndexReader, role: str = "search") -> RoleView:
    """The named role of an index, or one clear error saying how to get it."""
    if role == "search":
        return search_role(reader)
    if role == "copy" and reader.has_copy_role:
        return copy_role(reader)
    raise RetrievalError(f"this index has no {role!r} embedder role; index with a copy model first "
                         "(retrieval index --copy-model ...) or calibrate the search role")


@dataclass
class Calibration:
    sample: int
    target_precision: float
    role: str = "search"
    rows: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # transform -> per threshold
    phash: dict[str, dict[str, float]] = field(default_factory=dict)
    suggested_threshold: float | None = None
    advice: str = ""  # always set: the threshold and what it buys, or why there is none and what to try
    failed: list[str] = field(default_factory=list)


def pr_curve(positives: np.ndarray, negatives: list[np.ndarray], thresholds: list[float]) -> list[dict[str, float]]:
    """Precision/recall per threshold: TP = copies whose source scores >= t, FP = other images >= t."""
    out = []
    for t in thresholds:
        tp = int((positives >= t).sum())
        fp = int(sum(int((neg >= t).sum()) for neg in negatives))
        out.append({"threshold": t, "precision": tp / (tp + fp) if tp + fp else 1.0,
                    "recall": tp / len(positives) if len(positives) else 0.0, "tp": tp, "fp": fp})
    return out


def suggest(rows: list[dict[str, float]], target: float) -> float | None:
    """The lowest threshold (highest recall) whose precision reaches the target."""
    ok = [r["threshold"] for r in rows if r["precision"] >= target and r["tp"] > 0]
    return min(ok) if ok else None


def advise(cal: Calibration, negatives_seen: int) -> str:
    """One or two sentences a user can act on, whatever the curves look like."""
    rows = cal.rows.get("all", [])
    if not rows or not any(r["tp"] for r in rows):
        return ("no copy scored above the lowest threshold tried; this model does not recognise edited copies "
                "of your images: calibrate a copy-detection role (retrieval index --copy-model sscd-distilled) "
                "or rely on the exact and hash stages only")
    at = {r["threshold"]: r for r in rows}
    def best_recall(curve: list[dict[str, float]]) -> float:  # at the target precision; 0 when never reached
        return max((r["recall"] for r in curve if r["precision"] >= cal.target_precision), default=0.0)

    hard = sorted((name for name in cal.rows if name != "all"), key=lambda name: best_recall(cal.rows[name]))
    few = (f" Only {negatives_seen} non-copy neighbours were scored, so precision is measured coarsely: "
           "raise --sample." if negatives_seen < 100 else "")
    if cal.suggested_threshold is not None:
        r = at[cal.suggested_threshold]
        missed = [name for name in hard if {x["threshold"]: x for x in cal.rows[name]}[cal.suggested_threshold]["recall"] < 0.5]
        text = (f"use threshold {cal.suggested_threshold}: precision {r['precision']:.3f}, "
                f"recall {r['recall']:.3f} over all edits")
        if missed:
            text += f"; it misses most copies made by {', '.join(missed[:4])}"
        return text + "." + few
    best = max(rows, key=lambda r: (r["precision"], r["recall"]))
    return (f"no threshold reaches precision {cal.target_precision}: the best is {best['precision']:.3f} "
            f"(recall {best['recall']:.3f}) at {best['threshold']}, because non-copies in your corpus score as "
            f"high as edited copies (hardest edits: {', '.join(hard[:3])}). Try: a lower --target-precision, "
            "a copy-detection role (retrieval index --copy-model sscd-int8) if this is the search role, "
            "or --transform with only the edits you need to catch." + few)


def run_calibration(reader: IndexReader, sample: int = 100, target_precision: float = 0.95, seed: int = 0,
                    transforms: list[str] | None = None, progress: bool = False,
                    role: RoleView | None = None) -> Calibration:
    """Calibrate `role` (default: the index's search role) on a seeded sample of the index's images."""
    from tqdm import tqdm

    from retrieval.imaging.decode import perceptual_hash
    from retrieval.imaging.preprocess import PreprocessConfig, decode_image

    if not 0.0 < target_precision <= 1.0:
        raise RetrievalError(f"--target-precision must be in (0, 1], got {target_precision}")
    names = transforms or list(TRANSFORMS)
    unknown = [t for t in names if t not in TRANSFORMS]
    if unknown:
        raise RetrievalError(f"unknown transform {unknown[0]!r}; choose from {', '.join(TRANSFORMS)}")
    with reader.store.session() as s:
        rows = s.execute(select(ImageRow.id, ImageRow.path, ImageRow.phash).order_by(ImageRow.id)).all()
    if len(rows) < 2:
        raise RetrievalError("calibration needs at least 2 indexed images")
    rng = np.random.default_rng(seed)
    picked = [rows[i] for i in np.sort(rng.choice(len(rows), size=min(sample, len(rows)), replace=False))]
    view = role if role is not None else search_role(reader)
    cfg = view.decode if view.decode is not None else PreprocessConfig(resize_shortest_edge=None, resize_height=4096,
                                                                       resize_width=4096)
    result = Calibration(sample=len(picked), target_precision=target_precision, role=view.name)
    pos: dict[str, list[float]] = {t: [] for t in names}
    neg: dict[str, list[np.ndarray]] = {t: [] for t in names}
    dist: dict[str, list[int]] = {t: [] for t in names}
    k = min(NEIGHBOURS, len(rows))
    for image_id, rel, ph in tqdm(picked, desc="calibrating", disable=not progress):
        try:
            original = decode_image(reader.locate(rel).read_bytes(), cfg, 10**9).image
        except Exception as exc:  # noqa: BLE001 - a file changed since indexing: skip it, say so
            result.failed.append(f"{rel}: {exc}")
            continue
        copies = [TRANSFORMS[t](original).convert("RGB") for t in names]
        vecs = np.asarray(view.embed(copies), dtype=np.float32)
        sims, nbrs = view.topk(vecs, k)
        source = np.asarray(view.read([image_id]), dtype=np.float32)[0]
        for t, v, s_row, n_row, c in zip(names, vecs, sims, nbrs, copies):
            pos[t].append(float(min(1.0, v @ source)))
            neg[t].append(s_row[(n_row != image_id) & (n_row >= 0)])
            dist[t].append(hamming(perceptual_hash(c), to_unsigned64(int(ph))))
    all_pos: list[float] = []
    all_neg: list[np.ndarray] = []
    for t in names:
        result.rows[t] = pr_curve(np.array(pos[t]), neg[t], THRESHOLDS)
        d = np.array(dist[t]) if dist[t] else np.array([64])
        result.phash[t] = {"median": float(np.median(d)), "p90": float(np.percentile(d, 90)),
                           "within_8": float((d <= 8).mean())}
        all_pos += pos[t]
        all_neg += neg[t]
    result.rows["all"] = pr_curve(np.array(all_pos), all_neg, THRESHOLDS)
    result.suggested_threshold = suggest(result.rows["all"], target_precision)
    result.advice = advise(result, sum(len(n) for n in all_neg))
    return result


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def format_table(cal: Calibration, show: tuple[float, ...] = (0.8, 0.9, 0.95, 0.98, 0.99)) -> list[str]:
    lines = [f"{'transform':<14}" + "".join(f"  P/R@{t:<5}" for t in show) + "  pHash median (<=8)"]
    for name, rows in cal.rows.items():
        at = {r["threshold"]: r for r in rows}
        cells = "".join(f"  {at[t]['precision']:.2f}/{at[t]['recall']:.2f}" if t in at else "  -" for t in show)
        ph = cal.phash.get(name)
        lines.append(f"{name:<14}{cells}" + (f"  {ph['median']:.0f} ({ph['within_8']:.0%})" if ph else ""))
    lines.append(f"suggested threshold for precision >= {cal.target_precision} ({cal.role} role, "
                 f"{cal.sample} sampled images): {cal.suggested_threshold}")
    lines.append(cal.advice)
    return lines
