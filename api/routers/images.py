"""GET /images/{id}, its file, its thumbnail and its near-duplicates; POST /duplicates/check."""

from __future__ import annotations

import mimetypes
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import FileResponse, Response
from retrieval.api import service
from retrieval.api.deps import Authorized, ReaderDep, SettingsDep, StateDep
from retrieval.api.routers.search import UPLOAD_BODY, UPLOAD_ERRORS
from retrieval.api.schemas import DuplicateCheckOut, DuplicatesOut, ErrorOut, ImageOut
from starlette.concurrency import run_in_threadpool

from retrieval.errors import RetrievalError
from retrieval.imaging.thumbnails import cached_thumbnail
from retrieval.search import MAX_K

THUMBNAIL_BUCKETS = (64, 128, 256, 512, 1024)

router = APIRouter(tags=["images"], dependencies=Authorized)

ImageId = Annotated[int, Path(ge=0, le=2**63 - 1, description="Image id.")]
Threshold = Annotated[float | None, Query(gt=0.0, le=1.0, description="Cosine at or above which images are duplicates; default: the server's.")]
ERRORS = {401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 503: {"model": ErrorOut}}

CONTENT_TYPES = {
    "JPEG": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp", "BMP": "image/bmp",
    "TIFF": "image/tiff", "MPO": "image/jpeg", "ICO": "image/x-icon", "HEIF": "image/heif", "AVIF": "image/avif",
    "JPEG2000": "image/jp2", "PPM": "image/x-portable-anymap", "TGA": "image/x-tga",
}


@router.get("/images/{image_id}", response_model=ImageOut, responses=ERRORS, summary="Metadata of one indexed image")
def image_meta(handle: ReaderDep, image_id: ImageId) -> ImageOut:
    return service.image_out(service.get_image(handle, image_id))


@router.get("/images/{image_id}/file", responses={**ERRORS, 200: {"content": {"image/*": {}}}},
            response_class=FileResponse, summary="The original image bytes")
def image_file(handle: ReaderDep, image_id: ImageId) -> Response:
    row = service.get_image(handle, image_id)
    media = CONTENT_TYPES.get(row.format.upper()) or mimetypes.guess_type(row.path)[0] or "application/octet-stream"
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600"}
    if not service.is_local(handle):  # an object store, a list of URLs, a shard: bytes from the source
        data = service.source_bytes(handle, row)
        name = row.path.rsplit("/", 1)[-1].split("#")[-1]
        return Response(data, media_type=media, headers={
            **headers, "Content-Disposition": f"inline; filename*=utf-8''{quote(name)}"})
    real = service.corpus_file(handle, row)
    return FileResponse(real, media_type=media, filename=real.name, content_disposition_type="inline",
                        headers=headers)


@router.get("/images/{image_id}/thumbnail", responses={**ERRORS, 415: {"model": ErrorOut}, 422: {"model": ErrorOut},
                                                        200: {"content": {"image/jpeg": {}}}},
            response_class=Response, summary="A cached JPEG thumbnail")
def image_thumbnail(handle: ReaderDep, settings: SettingsDep, image_id: ImageId,
                    size: Annotated[int | None, Query(ge=16, le=1024, description="Longest edge in pixels.")] = None,
                    ) -> Response:
    row = service.get_image(handle, image_id)
    real: Any = service.corpus_file(handle, row) if service.is_local(handle) else _FromSource(handle, row)
    # Cached sizes are a few buckets (the next one up), so clients cannot fill the disk with
    # one cached file per requested size.
    wanted = size or settings.thumbnail_default_size
    edge = next((b for b in THUMBNAIL_BUCKETS if b >= wanted), THUMBNAIL_BUCKETS[-1])
    try:  # an ImageDecodeError is answered like the same error in an upload (api.errors)
        data = cached_thumbnail(handle.index.path, row.id, edge, row.sha256, real, settings.max_pixels)
    except OSError:
        raise RetrievalError(service.FILE_GONE, "not_found") from None
    return Response(data, media_type="image/jpeg",
                    headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=86400"})


class _FromSource:
    """read_bytes() of a remote image, for the thumbnail cache (read only on a cache miss)."""

    def __init__(self, handle: Any, row: Any):
        self.handle, self.row = handle, row

    def read_bytes(self) -> bytes:
        return service.source_bytes(self.handle, self.row)


@router.get("/images/{image_id}/duplicates", response_model=DuplicatesOut, responses=ERRORS,
            summary="Near-duplicates of one indexed image (exact cosine at or above the threshold)")
def image_duplicates(handle: ReaderDep, settings: SettingsDep, image_id: ImageId, threshold: Threshold = None,
                     limit: Annotated[int, Query(ge=1, le=MAX_K, description="Most duplicates returned.")] = 100,
                     ) -> DuplicatesOut:
    row = service.get_image(handle, image_id)
    cut = threshold or settings.duplicate_threshold
    hits = service.search_image(handle, row, limit, None, True)
    return DuplicatesOut(image=service.image_out(row), threshold=cut,
                         duplicates=[service.hit_out(h) for h in hits if h.score >= cut])


@router.post("/duplicates/check", response_model=DuplicateCheckOut, responses=UPLOAD_ERRORS, openapi_extra=UPLOAD_BODY,
             summary="Does the corpus already hold a copy of this image?")
async def duplicates_check(request: Request, handle: ReaderDep, state: StateDep, settings: SettingsDep,
                           threshold: Threshold = None) -> DuplicateCheckOut:
    data = await service.read_upload(request, settings.max_upload_bytes)
    vector = await service.embed_upload(state, handle, data)
    cut = threshold or settings.duplicate_threshold
    hits = await run_in_threadpool(service.search_vector, handle, vector, 1, None)
    if not hits:
        return DuplicateCheckOut(duplicate=False, threshold=cut, score=None, best_match=None)
    best = hits[0]
    return DuplicateCheckOut(duplicate=best.score >= cut, threshold=cut, score=round(best.score, 6),
                             best_match=service.hit_out(best))
