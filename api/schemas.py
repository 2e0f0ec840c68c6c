"""Response models of the API (separate from the ORM rows in retrieval.store)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _as_utc(value: datetime) -> datetime:
    """SQLite hands timestamps back without their zone; they are stored in UTC."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


# A timestamp always sent with its zone (RFC 3339 date-time, as the schema says).
UtcDatetime = Annotated[datetime, AfterValidator(_as_utc)]


class FieldErrorOut(BaseModel):
    loc: list[str | int] = Field(..., description="Where the bad value is, e.g. [\"query\", \"k\"].")
    msg: str
    type: str


class ErrorOut(BaseModel):
    """Every error body: a one-line `detail`; a malformed request also lists its bad fields."""

    detail: str = Field(..., examples=["no indexed image with this id"])
    errors: list[FieldErrorOut] | None = Field(None, description="Request validation errors (422 only).")


class ImageOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": 7, "path": "holiday/beach.jpg", "width": 4032, "height": 3024, "format": "JPEG", "size": 2345678,
        "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "file_url": "/images/7/file", "thumbnail_url": "/images/7/thumbnail"}]})

    id: int
    path: str = Field(..., description="POSIX path relative to the corpus root.")
    width: int
    height: int
    format: str
    size: int | None = Field(None, description="File size in bytes.")
    sha256: str | None = None
    file_url: str
    thumbnail_url: str


class DuplicateOut(BaseModel):
    id: int
    path: str
    score: float = Field(..., description="Exact cosine similarity to the result it was folded into.")


class HitOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": 12, "path": "holiday/beach2.jpg", "score": 0.9731, "width": 4032, "height": 3024, "format": "JPEG",
        "file_url": "/images/12/file", "thumbnail_url": "/images/12/thumbnail", "duplicates": []}]})

    id: int
    path: str
    score: float = Field(..., description="Exact cosine similarity to the query (re-ranked from stored vectors).")
    width: int
    height: int
    format: str
    file_url: str
    thumbnail_url: str
    duplicates: list[DuplicateOut] = Field(default_factory=list,
                                           description="Near-duplicates folded into this result (collapse_duplicates).")


class SearchOut(BaseModel):
    query: str = Field(..., description="What was searched: `id:N`, a corpus path, or `upload`.")
    answered_from: Literal["stored vector", "embedded upload", "embedded URL"]
    k: int
    results: list[HitOut]


class DuplicatesOut(BaseModel):
    image: ImageOut
    threshold: float
    duplicates: list[HitOut]


class DuplicateCheckOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "duplicate": True, "threshold": 0.95, "score": 0.998,
        "best_match": {"id": 3, "path": "a/img3.jpg", "score": 0.998, "width": 96, "height": 72, "format": "JPEG",
                       "file_url": "/images/3/file", "thumbnail_url": "/images/3/thumbnail", "duplicates": []}}]})

    duplicate: bool = Field(..., description="True when the best match scores at or above the threshold.")
    threshold: float
    score: float | None = Field(None, description="Cosine of the best match; null for an empty index.")
    best_match: HitOut | None


class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyOut(BaseModel):
    ready: bool
    index_loaded: bool
    model_loaded: bool
    detail: str | None = None


class StatsOut(BaseModel):
    images: int
    indexed_vectors: int
    dim: int
    model: str
    index_type: str | None
    index_factory: str | None
    nprobe: int | None
    index_run_id: int | None
    index_run_finished_at: UtcDatetime | None
    loaded_at: UtcDatetime
    reloads: int
    batching: dict[str, Any]


class GroupMemberOut(BaseModel):
    image_id: int | None = Field(..., description="null for a reference-set file (relative dedup).")
    path: str
    is_reference: bool
    action: Literal["keep", "remove"]
    similarity: float = Field(..., description="Exact cosine to the group's representative.")
    reason: str = Field(..., description="exact, phash, embedding, reference or representative.")
    thumbnail_url: str | None


class DuplicateGroupOut(BaseModel):
    number: int
    size: int
    representative_id: int | None
    reasons: list[str]
    weakest_edge: float = Field(..., description="Lowest similarity of the edges that joined the group.")
    min_pairwise: float = Field(..., description="Lowest similarity between any two members.")
    touches_reference: bool
    members: list[GroupMemberOut]


class DuplicateGroupsOut(BaseModel):
    run_id: int
    mode: str
    params: dict[str, Any]
    counts: dict[str, Any] | None
    finished_at: UtcDatetime | None
    page: int
    per_page: int
    total_groups: int
    groups: list[DuplicateGroupOut]


class ClusterSummaryOut(BaseModel):
    cluster: int
    size: int
    url: str


class ClustersOut(BaseModel):
    run_id: int
    k: int
    n_images: int
    finished_at: UtcDatetime | None
    page: int
    per_page: int
    clusters: list[ClusterSummaryOut] = Field(..., description="Largest clusters first.")


class ClusterMemberOut(BaseModel):
    id: int
    path: str
    distance: float = Field(..., description="1 - cosine to the centroid.")
    rank: int = Field(..., description="0 = nearest the centroid.")
    thumbnail_url: str


class ClusterOut(BaseModel):
    run_id: int
    cluster: int
    size: int
    page: int
    per_page: int
    members: list[ClusterMemberOut] = Field(..., description="Nearest the centroid first.")


# --- review of dedup runs (the web UI's Duplicates page uses these) ------------------------------
class DedupRunOut(BaseModel):
    id: int
    mode: str
    params: dict[str, Any]
    counts: dict[str, Any]
    finished_at: datetime | None
    applied_at: datetime | None
    decisions: int = Field(..., description="Members whose action a reviewer changed.")
    warnings: list[str] = Field(default_factory=list, description="Giant or chained groups, mass removal.")


class ReviewMemberOut(BaseModel):
    member_id: int = Field(..., description="Use this id to store a decision.")
    image_id: int | None
    path: str
    is_reference: bool
    action: Literal["keep", "remove"] = Field(..., description="The decision when there is one, else computed_action.")
    computed_action: Literal["keep", "remove"]
    reviewed: bool
    similarity: float = Field(..., description="Exact cosine to the image the run kept (the representative).")
    reason: str = Field(..., description="The stage whose edge joined it: exact, phash, embedding, reference; "
                                         "representative for the kept image.")
    width: int | None
    height: int | None
    size: int | None = Field(None, description="File size in bytes.")
    format: str | None
    thumbnail_url: str | None
    file_url: str | None


class ReviewGroupOut(BaseModel):
    number: int
    size: int
    representative_id: int | None
    reasons: list[str]
    weakest_edge: float
    min_pairwise: float
    touches_reference: bool
    all_removed: bool = Field(..., description="Every corpus member is marked remove (nothing of it survives).")
    members: list[ReviewMemberOut]


class ReviewPageOut(BaseModel):
    run: DedupRunOut
    page: int
    per_page: int
    total_groups: int
    groups: list[ReviewGroupOut]


class DecisionsIn(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"decisions": {"17": "keep", "18": "remove",
                                                                             "19": None}}]})

    decisions: dict[int, Literal["keep", "remove"] | None] = Field(
        ..., max_length=10_000, description="member id -> keep, remove, or null (back to the computed action).")


class GroupDecisionIn(BaseModel):
    action: Literal["keep", "remove", "reset"] = Field(
        ..., description="keep every member, remove every member, or reset the group to the computed actions.")


class DecisionsOut(BaseModel):
    run_id: int
    changed: int
    decisions: int = Field(..., description="Decisions the run now holds.")
