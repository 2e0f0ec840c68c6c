"""The stages of an index update as plain callables over batches, so that every runner drives the same code.

* `Decode`: work items -> decoded batches `(results, pixels)`: read, hash, decode and preprocess
  each file once (every role's input and the perceptual hashes from that one decode); a failure is
  a result with a kind and a reason, never an exception.
* `EmbedSearch` / `EmbedCopy`: one role's vectors for a decoded batch; the model is loaded once per
  instance (an actor of a distributed runner loads it once, on its own device).
* `Commit`: one decoded, embedded batch into the database and the vector files, crash-safe
  (retrieval.indexer.writer).

A stage holds no state about the run beyond what it was made with, so the local runner
(retrieval.indexer.runners.local: DataLoader workers, writer thread) and the Ray runner
(retrieval.indexer.runners.ray: tasks and actor pools, the driver commits) give the same rows and
the same vectors for the same batches.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from retrieval.indexer.writer import BatchCounts, write_batch, write_copy_batch

from retrieval.errors import CorpusError, IndexMismatchError
from retrieval.imaging.decode import DecodeResult, DecodeSpec, WorkItem
from retrieval.imaging.inflight import InflightMarkers
from retrieval.imaging.loader import Batch, decode_batches
from retrieval.store import Store
from retrieval.vectors import VectorStore

# A remote source that stops answering (endpoint down, credentials revoked mid-run) turns every
# read into a failure after its retries; after this many in a row the run stops with one clear
# error instead of grinding through the rest. What was committed stays; the next run resumes.
UNREACHABLE_STREAK = 200


def _unreachable(results: list[Any], streak: int) -> tuple[int, str | None]:
    """The running count of consecutive reads that failed after retries, and the last reason."""
    reason = None
    for r in results:
        if r.failure_kind == "io_error" and (r.failure_reason or "").startswith("read failed after retries"):
            streak += 1
            reason = r.failure_reason
        else:
            streak = 0
    return streak, reason


@dataclass
class ReachWatch:
    """Stops a run whose source stopped answering (see UNREACHABLE_STREAK); fed every committed batch."""

    describe: str
    streak: int = 0

    def __call__(self, results: list[Any]) -> None:
        self.streak, reason = _unreachable(results, self.streak)
        if self.streak >= UNREACHABLE_STREAK:
            raise CorpusError(f"{self.describe} stopped answering: the last {self.streak} reads failed "
                              f"({reason}); what was indexed is kept, run again to resume")


def no_vectors(dim: int) -> np.ndarray:
    return np.empty((0, dim), np.float32)


@dataclass
class Decode:
    """Read + hash + decode + preprocess work items into batches of `chunk` results, failures as data.

    `source` is a retrieval.sources Source, or its URI (a runner on another machine opens it there).
    With `workers` > 0 decoding runs in DataLoader worker processes and a decoder crash costs one file
    (retrieval.imaging.loader); `suspects` are decoded in isolation from the start.
    """

    source: Any
    spec: DecodeSpec
    max_pixels: int
    chunk: int
    workers: int = 0
    markers: InflightMarkers | None = None
    suspects: Collection[str] = field(default_factory=frozenset)
    pin_memory: bool = False
    timeout_s: float | None = None

    def __call__(self, items: Sequence[WorkItem]) -> Iterator[Batch]:
        source = self.source
        if isinstance(source, str):
            from retrieval.sources import open_source

            source = open_source(source)
        return source.decode_stream(items, lambda reader, part: decode_batches(
            reader, part, self.spec, self.max_pixels, self.chunk, self.workers, self.markers,
            suspects=self.suspects, pin_memory=self.pin_memory, timeout_s=self.timeout_s))


def _check_fingerprint(model: Any, expected: str | None, what: str) -> None:
    if expected is not None and model.fingerprint != expected:
        raise IndexMismatchError(f"the {what} model '{model.model_ref}' loaded here has other weights than the one "
                                 f"the run was planned with; every machine needs the same model files")


class _Role:
    """One embedder role: the model given, or loaded once here (and checked against the planned weights)."""

    role = ""

    def __init__(self, embedder: Any = None, *, model_ref: str | None = None, device: str = "auto",
                 precision: str = "auto", fingerprint: str | None = None):
        if embedder is None:
            embedder = self._load(str(model_ref), device=device, precision=precision)
            _check_fingerprint(embedder, fingerprint, self.role)
        self.model = embedder
        self.dim: int = embedder.dim

    @staticmethod
    def _load(model_ref: str, device: str, precision: str) -> Any:
        raise NotImplementedError


class EmbedSearch(_Role):
    """The search role (DINOv2): uint8 pixel batch -> float32 unit vectors. Loads its model once."""

    role = "search"

    @staticmethod
    def _load(model_ref: str, device: str, precision: str) -> Any:
        from retrieval.model import load_embedder

        return load_embedder(model_ref, device=device, precision=precision)

    def submit(self, pixels: Any) -> Any:
        """Queue the forward pass (on a GPU it runs while the caller moves on); `collect` waits for it."""
        return self.model.embed_async(pixels) if pixels is not None else no_vectors(self.dim)

    def collect(self, pending: Any) -> np.ndarray:
        return self.model.to_numpy(pending)

    def __call__(self, pixels: Any) -> np.ndarray:
        return self.collect(self.submit(pixels))


class EmbedCopy(_Role):
    """The copy role (SSCD or another copy model): the copy inputs of a batch's results -> vectors."""

    role = "copy"

    @staticmethod
    def _load(model_ref: str, device: str, precision: str) -> Any:
        from retrieval.embedding.copy import load_copy_embedder

        return load_copy_embedder(model_ref, device=device, precision=precision)

    def __call__(self, results: list[DecodeResult]) -> np.ndarray:
        """Vectors of the embeddable results, in order; their copy inputs are dropped once embedded."""
        inputs = [r.copy_pixels for r in results if r.embeddable]
        vecs = self.model.embed_many(inputs) if inputs else no_vectors(self.dim)
        for r in results:
            r.copy_pixels = None
        return vecs

    def backfill(self, results: list[DecodeResult]) -> tuple[list[DecodeResult], np.ndarray]:
        """Adding the role to indexed images: the results that decoded, and their vectors."""
        ok = [r for r in results if r.failure_reason is None and r.copy_pixels is not None]
        return ok, (self.model.embed_many([r.copy_pixels for r in ok]) if ok else no_vectors(self.dim))


@dataclass
class Commit:
    """One batch into the database and the vector files, in one transaction (retrieval.indexer.writer)."""

    store: Store
    vectors: VectorStore | None
    copy_vectors: VectorStore | None = None

    def __call__(self, results: list[DecodeResult], vectors: np.ndarray,
                 copy_vectors: np.ndarray | None = None) -> BatchCounts:
        assert self.vectors is not None
        return write_batch(self.store, self.vectors, results, vectors, self.copy_vectors, copy_vectors)

    def copy_only(self, results: list[DecodeResult], copy_vectors: np.ndarray) -> int:
        """The copy role of already indexed images; returns how many got a copy vector."""
        assert self.copy_vectors is not None
        return write_copy_batch(self.store, self.copy_vectors, results, copy_vectors)
