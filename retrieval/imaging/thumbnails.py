"""Small JPEG thumbnails of corpus images, cached in the index directory.

The cache file name carries the image id, the size and the content hash, so a changed image
never gets a stale thumbnail and a re-index needs no invalidation step.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

from PIL import Image, ImageOps

from retrieval.errors import ImageDecodeError
from retrieval.imaging.preprocess import classify_decode_error, to_rgb

logger = logging.getLogger(__name__)

CACHE_DIR = "thumbnails"


def cache_path(index_root: Path, image_id: int, size: int, sha256: str) -> Path:
    return index_root / CACHE_DIR / f"{image_id}_{size}_{sha256[:16]}.jpg"


def make_thumbnail(data: bytes, size: int, max_pixels: int, quality: int = 85) -> bytes:
    """JPEG bytes of `data` fitted into size x size, EXIF orientation applied, alpha on white.

    A file that does not decode raises the same ImageDecodeError (same failure kind) as indexing it would.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)", "empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            if w * h > max_pixels or w <= 0 or h <= 0:
                raise ImageDecodeError(f"too many pixels for a thumbnail: {w}x{h}", "too_large")
            if image.format == "JPEG":
                image.draft("RGB", (size, size))
            image.load()
            image = to_rgb(ImageOps.exif_transpose(image))  # the same conversion the model input gets
            image.thumbnail((size, size), Image.Resampling.LANCZOS)
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=quality, optimize=True)
            return out.getvalue()
    except ImageDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is "cannot thumbnail this file"
        raise classify_decode_error(exc, data[:16], max_pixels) from None


def cached_thumbnail(index_root: Path, image_id: int, size: int, sha256: str, source: Path, max_pixels: int) -> bytes:
    """The thumbnail bytes, from the cache or made now and cached (best effort: a read-only index dir is fine)."""
    path = cache_path(index_root, image_id, size, sha256)
    try:
        return path.read_bytes()
    except OSError:
        pass
    data = make_thumbnail(source.read_bytes(), size, max_pixels)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # unique per thread and process
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        logger.warning("cannot cache thumbnail %s: %s", path.name, exc)
    return data
