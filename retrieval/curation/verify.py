"""Geometric verification of copy-role candidate pairs: local features, RANSAC, aligned correlation.

A copy descriptor (SSCD) scores a heavy crop, a 25-degree rotation or a padded copy lower than two
different photographs of one scene (the two halves of a panorama, a burst of one subject). No
cosine threshold separates them, so the copy role proposes candidates down to a loose floor and
this stage accepts a pair only when the two images share content in one place:

1. SIFT keypoints (OpenCV) on both images, shrunk to at most `max_side` pixels; matches that pass
   Lowe's ratio test; an affine transform fitted by RANSAC (crops, scaling, rotation, padding and
   aspect changes are affine). The mirror image of the second file is tried too (flipped copies).
2. Enough RANSAC inliers, spread over enough of both images (the convex hull of the inliers).
3. The second image warped onto the first agrees with it where they overlap: the median Pearson
   correlation of the overlap's tiles. This rejects two different photos that share only a caption,
   a watermark or a logo (many inliers, all on the overlay), which keypoints alone accept.

Grouping with verified edges is chain-safe (`verified_merges`): a wide photo shares content with
each of its halves, but the halves share none, so a verified edge merges two groups only when
the anchors (largest image of every confidently joined part) of both sides verify pairwise too.
"""

from __future__ import annotations

import importlib.util
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from retrieval.curation.graph import Edges

logger = logging.getLogger(__name__)

MIN_INLIERS = 8
MIN_COVERAGE = 0.02  # inliers' convex hull / image area, in both images
MIN_CORRELATION = 0.5  # median tile correlation of the aligned overlap
MAX_SIDE = 512
FEATURES = 1000
RATIO = 0.8  # Lowe's ratio test
RANSAC_PX = 5.0
TILES = 4  # the overlap is scored on a TILES x TILES grid of the first image
MAX_ANCHORS = 4  # per side of a merge: largest images first


def available() -> bool:
    """Whether OpenCV (the `verify` extra: opencv-python-headless) is installed."""
    return importlib.util.find_spec("cv2") is not None


@dataclass(frozen=True)
class VerifyParams:
    min_inliers: int = MIN_INLIERS
    min_coverage: float = MIN_COVERAGE
    min_correlation: float = MIN_CORRELATION
    max_side: int = MAX_SIDE
    features: int = FEATURES


@dataclass
class Verdict:
    ok: bool
    inliers: int = 0
    coverage: float = 0.0
    correlation: float = 0.0
    mirrored: bool = False
    why: str = ""


@dataclass
class _Features:
    gray: np.ndarray
    points: np.ndarray
    desc: np.ndarray | None


def grey_thumbnail(path: Any, max_side: int = MAX_SIDE, max_pixels: int = 89_478_485) -> np.ndarray | None:
    """The image as a uint8 greyscale array of at most `max_side` pixels a side; None if unreadable."""
    from PIL import Image, ImageOps

    try:
        if not isinstance(path, (str, bytes)) and hasattr(path, "read_bytes") and not hasattr(path, "is_file"):
            import io

            path = io.BytesIO(path.read_bytes())  # an image of a remote source
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                return None
            im.draft("L", (max_side, max_side))
            im = ImageOps.exif_transpose(im).convert("L")
            im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            return np.asarray(im, dtype=np.uint8).copy()
    except Exception:  # noqa: BLE001 - a file changed or broken since indexing is simply not verified
        return None


class Verifier:
    """Verifies pairs of nodes; features are computed once per node and kept in a bounded cache."""

    def __init__(self, load: Callable[[int], np.ndarray | None], params: VerifyParams = VerifyParams(),
                 cache_size: int = 1024) -> None:
        import cv2

        self._cv2 = cv2
        self.load = load
        self.params = params
        self._sift = cv2.SIFT_create(nfeatures=params.features)
        self._matcher = cv2.BFMatcher(cv2.NORM_L2)
        self._cache: OrderedDict[tuple[int, bool], _Features | None] = OrderedDict()
        self._cache_size = cache_size
        self._verdicts: dict[tuple[int, int], Verdict] = {}
        self.checked = 0

    def _features(self, node: int, mirrored: bool = False) -> _Features | None:
        key = (node, mirrored)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        gray = self.load(node)
        if gray is not None and mirrored:
            gray = np.ascontiguousarray(gray[:, ::-1])
        feats = None
        if gray is not None and gray.size and min(gray.shape) >= 16:
            kp, desc = self._sift.detectAndCompute(gray, None)
            points = np.float32([k.pt for k in kp]).reshape(-1, 2)
            feats = _Features(gray, points, desc)
        self._cache[key] = feats
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return feats

    def verify(self, a: int, b: int) -> Verdict:
        """Whether nodes a and b show the same content (b possibly mirrored); cached per pair."""
        key = (min(a, b), max(a, b))
        if key in self._verdicts:
            return self._verdicts[key]
        self.checked += 1
        fa = self._features(key[0])
        if fa is None:
            verdict = Verdict(False, why="unreadable")
        else:
            verdict = self._pair(fa, self._features(key[1]))
            if not verdict.ok:
                flipped = self._pair(fa, self._features(key[1], mirrored=True))
                if flipped.ok or flipped.inliers > verdict.inliers:
                    flipped.mirrored = True
                    verdict = flipped
        self._verdicts[key] = verdict
        return verdict

    def _pair(self, fa: _Features, fb: _Features | None) -> Verdict:
        cv2, p = self._cv2, self.params
        if fb is None:
            return Verdict(False, why="unreadable")
        if fa.desc is None or fb.desc is None or len(fa.desc) < 3 or len(fb.desc) < 3:
            return Verdict(False, why="too few keypoints")
        knn = self._matcher.knnMatch(fa.desc, fb.desc, k=2)
        good = [m[0] for m in knn if len(m) == 2 and m[0].distance < RATIO * m[1].distance]
        if len(good) < max(4, p.min_inliers):
            return Verdict(False, inliers=len(good), why="too few matches")
        src = fa.points[[m.queryIdx for m in good]]
        dst = fb.points[[m.trainIdx for m in good]]
        M, mask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PX,
                                       maxIters=2000, confidence=0.995)
        if M is None or mask is None:
            return Verdict(False, why="no transform")
        inl = mask.ravel().astype(bool)
        n = int(inl.sum())
        if n < p.min_inliers:
            return Verdict(False, inliers=n, why="too few inliers")
        cover = min(_hull_share(src[inl], fa.gray.shape), _hull_share(dst[inl], fb.gray.shape))
        if cover < p.min_coverage:
            return Verdict(False, inliers=n, coverage=cover, why="inliers in a small area")
        corr = aligned_correlation(fa.gray, fb.gray, M)
        ok = corr >= p.min_correlation
        return Verdict(ok, inliers=n, coverage=cover, correlation=corr, why="" if ok else "aligned images differ")


def _hull_share(points: np.ndarray, shape: tuple[int, ...]) -> float:
    import cv2

    if len(points) < 3:
        return 0.0
    return float(cv2.contourArea(cv2.convexHull(points.astype(np.float32)))) / float(shape[0] * shape[1])


def aligned_correlation(a: np.ndarray, b: np.ndarray, affine: np.ndarray) -> float:
    """Median Pearson correlation over the tiles of `a` that `b`, warped by `affine` (a -> b), covers."""
    import cv2

    h, w = a.shape
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    warped = cv2.warpAffine(b, affine, (w, h), flags=flags).astype(np.float32)
    inside = cv2.warpAffine(np.full(b.shape, 255, np.uint8), affine, (w, h), flags=cv2.INTER_NEAREST
                            | cv2.WARP_INVERSE_MAP) > 0
    sigma = max(1.0, min(h, w) / 200)  # compare structure, not JPEG noise or resampling
    fa = cv2.GaussianBlur(a.astype(np.float32), (0, 0), sigma)
    fb = cv2.GaussianBlur(warped, (0, 0), sigma)
    scores = []
    for ys in np.array_split(np.arange(h), TILES):
        for xs in np.array_split(np.arange(w), TILES):
            m = inside[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
            if m.mean() < 0.8:
                continue
            ta = fa[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1][m]
            tb = fb[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1][m]
            if ta.std() < 2.0:  # a flat tile (sky, a border) says nothing either way
                continue
            if tb.std() < 1e-3:
                scores.append(0.0)
                continue
            scores.append(float(np.corrcoef(ta, tb)[0, 1]))
    if not scores:  # small overlap or flat everywhere: the whole overlap at once
        ta, tb = fa[inside], fb[inside]
        if len(ta) < 64 or ta.std() < 1e-3 or tb.std() < 1e-3:
            return 0.0
        return float(np.corrcoef(ta, tb)[0, 1])
    return float(np.median(scores))


@dataclass
class VerifyStats:
    candidates: int = 0
    checked: int = 0
    accepted: int = 0
    refused_pair: int = 0
    refused_chain: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def verified_merges(n_nodes: int, confident: Edges, candidates: Edges, verifier: Verifier, area: np.ndarray,
                    max_anchors: int = MAX_ANCHORS, stats: VerifyStats | None = None) -> Edges:
    """The candidate edges (most similar first) that verify and may merge their two groups.

    Groups start as the components of the `confident` edges. A candidate joining two groups is
    accepted when the pair verifies and every anchor of one side verifies against every anchor of
    the other (anchors: the largest image of each confident component merged in, up to
    `max_anchors` a side). Candidates inside one group are not needed and not returned.
    """
    stats = stats if stats is not None else VerifyStats()
    parent = np.arange(n_nodes)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = int(parent[root])
        while parent[x] != root:
            parent[x], x = root, int(parent[x])
        return root

    for a, b in zip(confident.src.tolist(), confident.dst.tolist()):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    anchors: dict[int, list[int]] = {}
    best: dict[int, int] = {}
    for x in np.unique(np.r_[candidates.src, candidates.dst]).tolist() if len(candidates) else []:
        r = find(x)
        if r not in best or area[x] > area[best[r]]:
            best[r] = x
    for x in np.unique(np.r_[confident.src, confident.dst]).tolist() if len(confident) else []:
        r = find(x)
        if r in best and area[x] > area[best[r]]:
            best[r] = x
    for r, x in best.items():
        anchors[r] = [x]
    keep = []
    order = np.argsort(-candidates.sim, kind="stable")
    stats.candidates += len(order)
    before = verifier.checked
    for e in order.tolist():
        a, b = int(candidates.src[e]), int(candidates.dst[e])
        ra, rb = find(a), find(b)
        if ra == rb:
            continue
        if not verifier.verify(a, b).ok:
            stats.refused_pair += 1
            continue
        left = sorted(anchors[ra], key=lambda x: -area[x])[:max_anchors]
        right = sorted(anchors[rb], key=lambda x: -area[x])[:max_anchors]
        if not all(verifier.verify(x, y).ok for x in left for y in right if {x, y} != {a, b}):
            stats.refused_chain += 1
            continue
        root, other = min(ra, rb), max(ra, rb)
        parent[other] = root
        anchors[root] = anchors[ra] + anchors[rb]
        anchors.pop(other, None)
        keep.append(e)
    stats.checked += verifier.checked - before
    stats.accepted += len(keep)
    sel = np.array(sorted(keep), np.int64)
    return Edges(candidates.src[sel], candidates.dst[sel], candidates.sim[sel])
