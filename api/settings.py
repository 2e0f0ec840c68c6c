"""API settings: the library Settings plus what only the server needs (env prefix RETRIEVAL_)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from retrieval.settings import Settings, parse_size


class ApiSettings(Settings):
    """Everything `retrieval serve` reads; every field can be set as RETRIEVAL_<NAME>."""

    api_key: SecretStr | None = Field(None, description="When set, every endpoint but /healthz needs `Authorization: Bearer <key>`.")
    max_upload_bytes: int = Field(20_000_000, ge=1, description="Largest accepted upload (bytes); bigger bodies get 413.")
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed by CORS; empty = CORS off.")
    reload_check_s: float = Field(2.0, ge=0.0, description="How often (seconds) to look for a newer completed index run; 0 = every request.")
    batch_max_size: int = Field(16, ge=1, le=256, description="Most uploads embedded in one forward pass; 1 disables batching.")
    batch_max_wait_ms: float = Field(5.0, ge=0.0, le=1000.0, description="How long the batcher waits for more uploads.")
    upload_decode_workers: int = Field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)), ge=0, le=64,
                                       description="Processes that decode uploads (a decoder crash costs one "
                                       "request); 0 = decode on a thread of the server process.")
    upload_decode_start_method: Literal["spawn", "forkserver", "fork"] = Field(
        "spawn", description="How upload decoding processes start; 'fork' is unsafe in a threaded server.")
    duplicate_threshold: float = Field(0.95, gt=0.0, le=1.0, description="Cosine at or above which two images count as duplicates.")
    thumbnail_default_size: int = Field(256, ge=16, le=1024)
    allow_url_queries: bool = Field(False, description="Accept GET /search?image=<http(s) URL> (off: SSRF risk).")
    url_allow_private: bool = Field(False, description="Let URL queries reach private/loopback addresses.")
    url_timeout_s: float = Field(10.0, gt=0.0, le=120.0, description="Deadline for fetching a URL query.")

    @field_validator("max_upload_bytes", mode="before")
    @classmethod
    def _parse_upload(cls, value: str | int) -> int:
        return parse_size(value)

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: object) -> object:
        return None if value in ("", None) else value
