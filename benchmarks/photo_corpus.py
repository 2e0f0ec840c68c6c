"""A corpus of real photographs with planted copies, for measuring duplicate detection.

Originals are real photographs: desktop wallpapers that Debian packages ship (fetched with
`apt-get download` + `dpkg -x` into a cache outside the repository; the photos are never committed)
and the photographs bundled with scikit-image. Only photographs are used (chosen by eye, listed in
`PHOTOS`): illustrations and abstract wallpapers (all of gnome-backgrounds 43, ukui-wallpapers,
most of Plasma's) would be easy negatives and are not what users deduplicate.

* Every photo is scaled so its long side is at most `max_side` (JPEG q90): real photos at a size
  that every tool decodes in reasonable time.
* A wide photo (aspect >= 1.6, e.g. 16:9) also yields its left and right halves as two more
  originals ("siblings"): different photos of the same scene, the hardest distractors there are.
  A half and its full photo overlap, so they are one *scene*: pairs between the full photo and a
  half are not scored at all (neither true nor false); pairs between the two disjoint halves are
  false pairs, counted separately as "sibling" false positives.
* For a seeded `planted` fraction of the originals, one copy per edit of
  `retrieval.curation.edits.EDITS` is written (JPEG q90 after the edit, as a re-upload would, except
  jpeg-q30/q70 which are the re-encode itself), plus `FILE_EDITS`: the same bytes and the decoded
  pixels as PNG. The other originals are distractors with no copy.
* Files get shuffled names in one flat folder (`img_000123.jpg`): names and order tell no tool anything.

`truth.json` beside the folder maps each file to its family (original + its copies), edit kind,
photo, and scene. The build is deterministic for a given seed and set of packages.

Usage: python -m benchmarks.photo_corpus OUT_DIR [--packages ...] [--planted 0.7] [--seed 0]
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

logger = logging.getLogger(__name__)

CACHE = Path(os.environ.get("RETRIEVAL_PHOTO_CACHE", Path.home() / ".cache" / "retrieval-photos"))

# Debian package -> glob patterns (relative to the package's root) of the photographs it ships.
# One file per picture: Plasma ships each wallpaper at several resolutions, the largest is taken.
PHOTOS: dict[str, list[str]] = {
    "mate-backgrounds": ["usr/share/backgrounds/mate/nature/*.jpg"],
    "plasma-workspace-wallpapers": [f"usr/share/wallpapers/{name}/contents/images/*" for name in (
        "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey", "Kite",
        "MilkyWay", "OneStandsOut", "Path", "summer_1am", "Volna")],
}
DEFAULT_PACKAGES = tuple(PHOTOS)
# scikit-image's bundled photographs (no download needed): small, but real, and always available.
SKIMAGE_PHOTOS = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
                  "moon.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg")


class PhotoSourceUnavailable(RuntimeError):
    """A package could not be fetched or unpacked (offline, no apt): the message says which and why."""


@dataclass
class Photo:
    name: str  # "<source>/<file>"
    load: Callable[[], Any]  # -> PIL RGB image


def _extract(package: str, cache: Path) -> Path:
    """Download `package` with apt-get and unpack it under cache/x/<package> (once)."""
    root = cache / "x" / package
    if (root / ".done").exists():
        return root
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        try:
            subprocess.run(["apt-get", "download", package], cwd=debs, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            raise PhotoSourceUnavailable(f"apt-get download {package} failed: {detail.strip()[-300:]}") from exc
        found = sorted(debs.glob(f"{package}_*.deb"))
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    try:
        subprocess.run(["dpkg", "-x", str(found[-1]), str(root)], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise PhotoSourceUnavailable(f"dpkg -x {found[-1].name} failed: {exc}") from exc
    (root / ".done").touch()
    return root


def _pixels(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return im.width * im.height


def package_photos(packages: Iterable[str], cache: Path = CACHE) -> list[Photo]:
    """The photographs of `packages` (keys of PHOTOS), the largest file per picture folder."""
    from PIL import Image

    out: list[Photo] = []
    for package in packages:
        if package not in PHOTOS:
            raise PhotoSourceUnavailable(f"no photo list for package {package!r}; known: {', '.join(PHOTOS)}")
        root = _extract(package, cache)
        files = sorted(p for p in root.rglob("*") if p.is_file())
        for pattern in PHOTOS[package]:
            hits = [p for p in files if fnmatch.fnmatch(str(p.relative_to(root)), pattern)]
            if not hits:
                logger.warning("%s: nothing matches %s", package, pattern)
                continue
            if pattern.endswith("/*"):  # one picture at several resolutions: the largest
                hits = [max(hits, key=lambda p: (_pixels(p), p.name))]
            for p in hits:
                out.append(Photo(f"{package}/{p.relative_to(root)}",
                                 lambda p=p: Image.open(p).convert("RGB")))
    return out


def skimage_photos(names: Iterable[str] = SKIMAGE_PHOTOS) -> list[Photo]:
    """scikit-image's bundled photographs, read from its package folder (skimage.data itself is not
    imported: its readers pull in plugins that need newer Pythons than the files do)."""
    import importlib.util

    from PIL import Image

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise PhotoSourceUnavailable("scikit-image is not installed (pip install scikit-image)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    out = []
    for name in names:
        path = folder / name
        if not path.exists():
            logger.warning("scikit-image has no bundled %s", name)
            continue
        out.append(Photo(f"skimage/{name}", lambda p=path: Image.open(p).convert("RGB")))
    return out


def _fit(im: Any, max_side: int) -> Any:
    from PIL import Image

    f = max_side / max(im.size)
    if f >= 1:
        return im
    return im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.Resampling.LANCZOS)


def build(out: Path, photos: list[Photo], planted: float = 0.7, seed: int = 0, max_side: int = 1024,
          edits: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Write the corpus into `out` (flat; replaced if present) and its truth beside it; return the truth.

    truth: file name -> {"family", "kind" ("original" or an edit), "photo", "scene"}.
    """
    from PIL import Image

    from retrieval.curation.edits import EDITS, FILE_EDITS

    kinds = list(FILE_EDITS) + (edits if edits is not None else list(EDITS))
    unknown = [k for k in kinds if k not in EDITS and k not in FILE_EDITS]
    if unknown:
        raise ValueError(f"unknown edit {unknown[0]!r}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    # Originals: every photo, plus both halves of the wide ones.
    originals: list[tuple[str, int, Callable[[], Any]]] = []  # (photo name, scene, loader)
    for scene, photo in enumerate(sorted(photos, key=lambda p: p.name)):
        originals.append((photo.name, scene, lambda p=photo: _fit(p.load(), max_side)))
        with photo.load() as im:
            wide = im.width >= 1.6 * im.height
        if wide:
            for side in ("left", "right"):
                def half(p: Photo = photo, side: str = side) -> Any:
                    im = p.load()
                    box = (0, 0, im.width // 2, im.height) if side == "left" else (im.width // 2, 0, im.width, im.height)
                    return _fit(im.crop(box), max_side)
                originals.append((f"{photo.name}#{side}", scene, half))
    rng = np.random.default_rng(seed)
    n_planted = round(planted * len(originals))
    planted_set = set(rng.choice(len(originals), size=n_planted, replace=False).tolist())
    total = len(originals) + n_planted * len(kinds)
    ids = iter(rng.permutation(total).tolist())
    truth: dict[str, dict[str, Any]] = {}
    for family, (name, scene, load) in enumerate(originals):
        image = load()
        src = f"img_{next(ids):06d}.jpg"
        image.save(out / src, format="JPEG", quality=90)
        truth[src] = {"family": family, "kind": "original", "photo": name, "scene": scene}
        if family not in planted_set:
            continue
        with Image.open(out / src) as im:
            decoded = im.convert("RGB")
        for kind in kinds:
            number = next(ids)
            if kind == "exact-copy":
                copy = f"img_{number:06d}.jpg"
                shutil.copyfile(out / src, out / copy)
            elif kind == "format-png":
                copy = f"img_{number:06d}.png"
                decoded.save(out / copy, format="PNG", compress_level=1)
            elif kind in ("jpeg-q30", "jpeg-q70"):
                copy = f"img_{number:06d}.jpg"
                decoded.save(out / copy, format="JPEG", quality=int(kind[-2:]))
            else:
                copy = f"img_{number:06d}.jpg"
                EDITS[kind](decoded).convert("RGB").save(out / copy, format="JPEG", quality=90)
            truth[copy] = {"family": family, "kind": kind, "photo": name, "scene": scene}
    (out.parent / f"{out.name}.truth.json").write_text(json.dumps(truth, indent=0, sort_keys=True))
    logger.info("corpus: %d originals (%d planted x %d edits), %d files", len(originals), n_planted, len(kinds), len(truth))
    return truth


def load_truth(out: Path) -> dict[str, dict[str, Any]]:
    return json.loads((out.parent / f"{out.name}.truth.json").read_text())


def pair_label(a: dict[str, Any], b: dict[str, Any]) -> str:
    """"true" (same family), "scene" (overlapping crops of one photo: not scored), "sibling" (the two
    disjoint halves of one photo: a false pair, the hardest kind) or "false"."""
    if a["family"] == b["family"]:
        return "true"
    if a["scene"] != b["scene"]:
        return "false"
    pa, pb = a["photo"], b["photo"]
    return "sibling" if "#" in pa and "#" in pb else "scene"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--packages", nargs="*", default=list(DEFAULT_PACKAGES))
    parser.add_argument("--no-skimage", action="store_true")
    parser.add_argument("--planted", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-side", type=int, default=1024)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    photos = package_photos(args.packages) + ([] if args.no_skimage else skimage_photos())
    truth = build(args.out, photos, args.planted, args.seed, args.max_side)
    print(f"{len(photos)} photos -> {len(truth)} files in {args.out}")


if __name__ == "__main__":
    main()
