"""`retrieval calibrate`: measure duplicate detection on the user's own corpus.

A seeded sample of indexed images is copied under known transforms, the copies are embedded with
the index's model, and each copy is searched in the index. A copy's score against its source is a
positive; every other image in its top 10 is a candidate false positive. Per transform and
threshold we report precision and recall, plus the pHash distance of the copies, and suggest the
lowest threshold whose overall precision reaches the target.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from sqlalchemy import select

from retrieval.curation.graph import is_exact_index, search_exact_topk
from retrieval.curation.hashing import hamming
from retrieval.errors import RetrievalError
from retrieval.search import IndexReader
from retrieval.store import Image as ImageRow
from retrieval.store import to_unsigned64

logger = logging.getLogger(__name__)

THRESHOLDS = [round(x, 3) for x in np.r_[np.arange(0.5, 0.99, 0.01), 0.99, 0.995, 0.999]]
NEIGHBOURS = 10


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _overlay(im: Image.Image) -> Image.Image:
    out = im.copy()
    draw = ImageDraw.Draw(out)
    h = max(10, out.height // 8)
    draw.rectangle([0, out.height - h, out.width, out.height], fill=(0, 0, 0))
    draw.text((4, out.height - h + 2), "© sample watermark text", fill=(255, 255, 255))
    return out


TRANSFORMS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "resize-50%": lambda im: im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.Resampling.BICUBIC),
    "jpeg-q30": lambda im: _jpeg(im, 30),
    "crop-80%": lambda im: im.crop((im.width // 10, im.height // 10, im.width - im.width // 10, im.height - im.height // 10)),
    "flip": lambda im: ImageOps.mirror(im),
    "rotate-5": lambda im: im.rotate(5, resample=Image.Resampling.BICUBIC, expand=False, fillcolor=(0, 0, 0)),
    "color-jitter": lambda im: ImageEnhance.Color(ImageEnhance.Contrast(ImageEnhance.Brightness(im).enhance(1.2)).enhance(0.8)).enhance(1.3),
    "greyscale": lambda im: ImageOps.grayscale(im).convert("RGB"),
    "text-overlay": _overlay,
    "padding-10%": lambda im: ImageOps.expand(im, border=max(1, min(im.size) // 10), fill=(255, 255, 255)),
}


@dataclass
class Calibration:
    sample: int
    target_precision: float
    rows: dict[str, list[dict[str, float]]] = field(default_factory=dict)  # transform -> per threshold
    phash: dict[str, dict[str, float]] = field(default_factory=dict)
    suggested_threshold: float | None = None
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


def run_calibration(reader: IndexReader, sample: int = 100, target_precision: float = 0.95, seed: int = 0,
                    transforms: list[str] | None = None, progress: bool = False) -> Calibration:
    from tqdm import tqdm

    from retrieval.imaging.decode import perceptual_hash
    from retrieval.imaging.preprocess import decode_image, preprocess

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
    embedder = reader.embedder()
    cfg = embedder.preprocess
    exact = is_exact_index(reader.index)
    result = Calibration(sample=len(picked), target_precision=target_precision)
    pos: dict[str, list[float]] = {t: [] for t in names}
    neg: dict[str, list[np.ndarray]] = {t: [] for t in names}
    dist: dict[str, list[int]] = {t: [] for t in names}
    for image_id, rel, ph in tqdm(picked, desc="calibrating", disable=not progress):
        try:
            original = decode_image(reader.locate(rel).read_bytes(), cfg, 10**9).image
        except Exception as exc:  # noqa: BLE001 - a file changed since indexing: skip it, say so
            result.failed.append(f"{rel}: {exc}")
            continue
        copies = [TRANSFORMS[t](original) for t in names]
        pixels = np.stack([preprocess(decode_image(_png(c), cfg, 10**9), cfg) for c in copies])
        vecs = embedder.embed(pixels)
        sims, nbrs = search_exact_topk(reader.index, vecs, None, min(NEIGHBOURS, len(rows)), reader.vectors.read, exact)
        source = reader.vectors.read([image_id])[0]
        for t, v, s_row, n_row, c in zip(names, vecs, sims, nbrs, copies):
            pos[t].append(float(min(1.0, v @ source)))
            neg[t].append(s_row[(n_row != image_id) & (n_row >= 0)])
            dist[t].append(hamming(perceptual_hash(c), to_unsigned64(int(ph))))
    all_pos, all_neg = [], []
    for t in names:
        result.rows[t] = pr_curve(np.array(pos[t]), neg[t], THRESHOLDS)
        d = np.array(dist[t]) if dist[t] else np.array([64])
        result.phash[t] = {"median": float(np.median(d)), "p90": float(np.percentile(d, 90)),
                           "within_8": float((d <= 8).mean())}
        all_pos += pos[t]
        all_neg += neg[t]
    result.rows["all"] = pr_curve(np.array(all_pos), all_neg, THRESHOLDS)
    result.suggested_threshold = suggest(result.rows["all"], target_precision)
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
    lines.append(f"suggested threshold for precision >= {cal.target_precision}: {cal.suggested_threshold}"
                 f" ({cal.sample} sampled images)")
    return lines
