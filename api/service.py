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
from fastapi import Request
from retrieval.api.schemas import DuplicateOut, HitOut, ImageOut
from retrieval.api.state import AppState, ReaderHandle
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from retrieval.errors import RetrievalError
from retrieval.layout import is_within
from retrieval.search import MAX_K, Hit
from retrieval.store import Image

logger = logging.getLogger(__name__)

MAX_REF_CHARS = 4096
_DRIVE = re.compile(r"^[A-Za-z]:")
NO_SUCH_ID = "no indexed image with this id"
NOT_A_REFERENCE = "image must be an image id or a path relative to the corpus root"
FILE_GONE = "the image file is not available"


# --- references --------------------------------------------------------------------------------
def parse_ref(ref: str) -> int | str:
    """An image id, or a normalised corpus-relative POSIX path. Anything that could escape: invalid."""
    if not ref or len(ref) > MAX_REF_CHARS or "\x00" in ref:
        raise RetrievalError("invalid image reference", "invalid")
    if ref.isascii() and ref.isdigit():
        value = int(ref)
        if value >= 2**63:
            raise RetrievalError(NO_SUCH_ID, "not_found")
        return value
    if ref.startswith(("/", "\\", "~")) or "\\" in ref or _DRIVE.match(ref):
        raise RetrievalError(NOT_A_REFERENCE, "invalid")
    parts = [p for p in ref.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        raise RetrievalError(NOT_A_REFERENCE, "invalid")
    return "/".join(parts)


def get_image(handle: ReaderHandle, image_id: int) -> Image:
    if not 0 <= image_id < 2**63:
        raise RetrievalError(NO_SUCH_ID, "not_found")
    row = handle.index.image(image_id)  # the generation the FAISS index and vectors belong to
    if row is None:
        raise RetrievalError(NO_SUCH_ID, "not_found")
    return row


def resolve_ref(handle: ReaderHandle, ref: str) -> Image:
    parsed = parse_ref(ref)
    if isinstance(parsed, int):
        return get_image(handle, parsed)
    row = handle.index.image(parsed)  # a database lookup: the file system is never touched
    if row is None:
        raise RetrievalError("no indexed image at this path", "not_found")
    return row


def corpus_file(handle: ReaderHandle, row: Image) -> Path:
    """The real path of an indexed image, only if it is a regular file inside the corpus root."""
    if handle.index.source.local_root is None:
        raise RetrievalError("the image file is not available", "not_found")
    root = os.path.realpath(handle.index.corpus_root)
    real = os.path.realpath(os.path.join(root, row.path))
    if not is_within(real, root) or not os.path.isfile(real):
        raise RetrievalError(FILE_GONE, "not_found")
    return Path(real)


def is_local(handle: ReaderHandle) -> bool:
    return handle.index.source.local_root is not None


def source_bytes(handle: ReaderHandle, row: Image) -> bytes:
    """An image of a remote source, read from it; only paths that belong to the indexed source."""
    from retrieval.errors import ReadFailure

    source = handle.index.source
    if not source.owns(row.path):
        raise RetrievalError("the image file is not available", "not_found")
    try:
        return source.read_bytes(row.path)
    except ReadFailure as exc:
        logger.warning("cannot read %s from its source: %s", row.path, exc.reason)
        raise RetrievalError("the image file is not available", "not_found") from None


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


def search_vector(handle: ReaderHandle, vector: np.ndarray, k: int, nprobe: int | None) -> list[Hit]:
    """Nearest neighbours of a query vector; `nprobe` applies to this call only, so concurrent searches need no lock."""
    if handle.index.ann_count == 0:
        return []
    return handle.index.search(vector, k, nprobe=nprobe).hits


def search_image(handle: ReaderHandle, row: Image, k: int, nprobe: int | None, exclude_self: bool) -> list[Hit]:
    """Nearest neighbours of an indexed image, from its stored vector (nothing is embedded)."""
    if handle.index.ann_count == 0:
        return []
    return handle.index.search(row.id, k, include_self=not exclude_self, nprobe=nprobe).hits


def collapse(handle: ReaderHandle, hits: list[Hit], k: int, threshold: float) -> list[HitOut]:
    """Fold each hit that is a near-duplicate (exact cosine >= threshold) of a better kept hit into it."""
    if not hits:
        return []
    vectors = handle.index.embeddings([h.id for h in hits])
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
        except (ClientDisconnect, HTTPException):  # the client left; Starlette's own 400 (too many parts)
            raise
        except Exception:  # noqa: BLE001 - malformed multipart framing
            raise RetrievalError("malformed multipart body", "invalid") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise RetrievalError("multipart upload needs a `file` field with the image", "unprocessable")
        data = await upload.read(max_bytes + 1)
        await form.close()
    elif content_type.startswith("application/x-www-form-urlencoded"):
        raise RetrievalError("send the image as multipart/form-data (field `file`) or as the raw request body",
                             "unsupported_media")
    else:
        data = await request.body()
    if len(data) > max_bytes:
        raise RetrievalError(f"upload too large: the limit is {max_bytes} bytes", "too_large")
    if not data:
        raise RetrievalError("empty upload: send the image bytes", "unprocessable")
    return data


async def embed_upload(state: AppState, handle: ReaderHandle, data: bytes) -> np.ndarray:
    """Decode and preprocess like the indexer (a helper process, api.decoding), then embed through the batcher."""
    embedder, fn = state.embedder, state.embed_fn
    if embedder is None or state.model_error:
        raise RetrievalError(state.model_error or "the embedding model is not loaded", "unavailable")
    pixels = await state.decoder.decode(data, embedder.preprocess, state.settings.max_pixels)
    if embedder.fingerprint != handle.index.model_fingerprint:
        # The reader this request holds was built with another model than the one now loaded
        # (a re-index with a new model happened meanwhile): its vectors are not comparable.
        raise RetrievalError("the index changed its model; try again", "unavailable")
    vector = await state.batcher.embed(fn, pixels)
    return vector
