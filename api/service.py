"""The work behind the routes, in plain functions: resolve references, search, collapse, embed uploads.

Everything here that touches FAISS, SQLite, the vector file or the model is called through a worker
thread (`run_in_threadpool`) or the batcher, never on the event loop; uploads are decoded in helper
processes (api.decoding).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
from fastapi import HTTPException, Request, status
from retrieval.api.decoding import CRASH_DETAIL, DecoderCrashed
from retrieval.api.schemas import DuplicateOut, HitOut, ImageOut
from retrieval.api.state import AppState, ReaderHandle

from retrieval import ann
from retrieval.errors import ImageDecodeError
from retrieval.layout import is_within
from retrieval.search import MAX_K, Hit
from retrieval.store import Image

logger = logging.getLogger(__name__)

MAX_REF_CHARS = 4096
_DRIVE = re.compile(r"^[A-Za-z]:")


# --- references --------------------------------------------------------------------------------
def parse_ref(ref: str) -> int | str:
    """An image id, or a normalised corpus-relative POSIX path. Anything that could escape: 400."""
    if not ref or len(ref) > MAX_REF_CHARS or "\x00" in ref:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "invalid image reference")
    if ref.isascii() and ref.isdigit():
        value = int(ref)
        if value >= 2**63:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "no indexed image with this id")
        return value
    if ref.startswith(("/", "\\", "~")) or "\\" in ref or _DRIVE.match(ref):
        raise HTTPException(status.HTTP_400_BAD_REQUEST,
                            "image must be an image id or a path relative to the corpus root")
    parts = [p for p in ref.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise HTTPException(status.HTTP_400_BAD_REQUEST,
                            "image must be an image id or a path relative to the corpus root")
    return "/".join(parts)


def get_image(handle: ReaderHandle, image_id: int) -> Image:
    if not 0 <= image_id < 2**63:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no indexed image with this id")
    with handle.reader.store.session() as s:
        row = s.get(Image, image_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no indexed image with this id")
    return row


def resolve_ref(handle: ReaderHandle, ref: str) -> Image:
    parsed = parse_ref(ref)
    if isinstance(parsed, int):
        return get_image(handle, parsed)
    row = handle.reader.image_by_path(parsed)  # a database lookup: the file system is never touched
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no indexed image at this path")
    return row


def corpus_file(handle: ReaderHandle, row: Image) -> Path:
    """The real path of an indexed image, only if it is a regular file inside the corpus root."""
    if handle.reader.source.local_root is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "the image file is not available")
    root = os.path.realpath(handle.reader.corpus_root)
    real = os.path.realpath(os.path.join(root, row.path))
    if not is_within(real, root) or not os.path.isfile(real):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "the image file is not available")
    return Path(real)


def is_local(handle: ReaderHandle) -> bool:
    return handle.reader.source.local_root is not None


def source_bytes(handle: ReaderHandle, row: Image) -> bytes:
    """An image of a remote source, read from it; only paths that belong to the indexed source."""
    from retrieval.errors import ReadFailure

    source = handle.reader.source
    if not source.owns(row.path):
        raise HTTPException(status.HTTP_404_NOT_FOUND, "the image file is not available")
    try:
        return source.read_bytes(row.path)
    except ReadFailure as exc:
        logger.warning("cannot read %s from its source: %s", row.path, exc.reason)
        raise HTTPException(status.HTTP_404_NOT_FOUND, "the image file is not available") from None


# --- output ------------------------------------------------------------------------------------
def image_out(row: Image) -> ImageOut:
    return ImageOut(id=row.id, path=row.path, width=row.width, height=row.height, format=row.format,
                    size=row.size, sha256=row.sha256, file_url=f"/images/{row.id}/file",
                    thumbnail_url=f"/images/{row.id}/thumbnail")


def hit_out(hit: Hit, duplicates: list[DuplicateOut] | None = None) -> HitOut:
    return HitOut(id=hit.id, path=hit.path, score=round(float(hit.score), 6), width=hit.width, height=hit.height,
                  format=hit.format, file_url=f"/images/{hit.id}/file", thumbnail_url=f"/images/{hit.id}/thumbnail",
                  duplicates=duplicates or [])


# --- searching ---------------------------------------------------------------------------------
def fetch_depth(k: int, collapse: bool) -> int:
    return min(MAX_K, max(k * 5, k + 50)) if collapse else k


def search_vector(handle: ReaderHandle, vector: np.ndarray, k: int, nprobe: int | None,
                  exclude_id: int | None) -> list[Hit]:
    reader = handle.reader
    spec = reader.spec
    if spec is None or reader.index.ntotal == 0:
        return []
    if spec.kind == "flat":  # no shared search state: concurrent searches need no lock
        return reader.search_vector(vector, k, exclude_id=exclude_id)
    with handle.search_lock:  # nprobe is index state: set it, search, restore
        try:
            return reader.search_vector(vector, k, exclude_id=exclude_id, nprobe=nprobe)
        finally:
            ann.set_nprobe(reader.index, spec.params.get("nprobe") or 1)


def collapse(handle: ReaderHandle, hits: list[Hit], k: int, threshold: float) -> list[HitOut]:
    """Fold each hit that is a near-duplicate (exact cosine >= threshold) of a better kept hit into it."""
    if not hits:
        return []
    vectors = handle.reader.vectors.read([h.id for h in hits])
    kept: list[int] = []
    folded: dict[int, list[DuplicateOut]] = {}
    for i, hit in enumerate(hits):
        if kept:
            sims = vectors[kept] @ vectors[i]
            best = int(np.argmax(sims))
            if sims[best] >= threshold:
                folded[kept[best]].append(DuplicateOut(id=hit.id, path=hit.path, score=round(float(sims[best]), 6)))
                continue
        if len(kept) == k:
            continue  # keep scanning: later hits may still be duplicates of kept ones
        kept.append(i)
        folded[i] = []
    return [hit_out(hits[i], folded[i]) for i in kept]


def finish(handle: ReaderHandle, hits: list[Hit], k: int, min_score: float | None, collapse_threshold: float | None
           ) -> list[HitOut]:
    if min_score is not None:
        hits = [h for h in hits if h.score >= min_score]
    if collapse_threshold is not None:
        return collapse(handle, hits, k, collapse_threshold)
    return [hit_out(h) for h in hits[:k]]


# --- uploads -----------------------------------------------------------------------------------
async def read_upload(request: Request, max_bytes: int) -> bytes:
    """The image bytes of a multipart upload (field `file`) or of a raw request body."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=1, max_fields=16)
        except HTTPException:
            raise
        except Exception:  # noqa: BLE001 - malformed multipart framing
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "malformed multipart body") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise HTTPException(422, "multipart upload needs a `file` field with the image")
        data = await upload.read(max_bytes + 1)
        await form.close()
    elif content_type.startswith("application/x-www-form-urlencoded"):
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                            "send the image as multipart/form-data (field `file`) or as the raw request body")
    else:
        data = await request.body()
    if len(data) > max_bytes:
        raise HTTPException(413, f"upload too large: the limit is {max_bytes} bytes")
    if not data:
        raise HTTPException(422, "empty upload: send the image bytes")
    return data


_DECODE_ERRORS = {
    "not_an_image": (status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                     "not an image: the upload is in no image format the server can read"),
    "too_large": (422, "image has too many pixels (decompression bomb guard)"),
    "truncated": (422, "truncated image: the data ends early"),
    "empty": (422, "empty upload: send the image bytes"),
    "corrupt": (422, "corrupt image: the data cannot be decoded"),
}


def decode_error(exc: ImageDecodeError) -> HTTPException:
    code, detail = _DECODE_ERRORS.get(exc.kind, _DECODE_ERRORS["corrupt"])
    return HTTPException(code, detail)


async def embed_upload(state: AppState, handle: ReaderHandle, data: bytes) -> np.ndarray:
    """Decode and preprocess like the indexer (a helper process, api.decoding), then embed through the batcher."""
    embedder, fn = state.embedder, state.embed_fn
    if embedder is None or state.model_error:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            state.model_error or "the embedding model is not loaded")
    try:
        pixels = await state.decoder.decode(data, embedder.preprocess, state.settings.max_pixels)
    except ImageDecodeError as exc:
        raise decode_error(exc) from None
    except DecoderCrashed:
        raise HTTPException(422, CRASH_DETAIL) from None
    if embedder.fingerprint != handle.reader.meta.get("model_fingerprint"):
        # The reader this request holds was built with another model than the one now loaded
        # (a re-index with a new model happened meanwhile): its vectors are not comparable.
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the index changed its model; try again")
    vector = await state.batcher.embed(fn, pixels)
    return vector
