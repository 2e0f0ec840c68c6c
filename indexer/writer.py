"""Stage 4: persist one batch: vectors to the fp16 files, rows to the database, in a crash-safe order.

Vectors (of the search role, and of the copy role when one is configured) are written and fsynced
inside the open transaction, before the commit that makes their ids visible. A kill before the commit leaves only unreferenced rows in the vector file (the
next run overwrites them); a kill after it leaves a complete batch. Nothing in between is visible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import delete

from retrieval.imaging.decode import DecodeResult
from retrieval.imaging.scan import text_path
from retrieval.store import COPY_NONE, COPY_WRITTEN, Failure, Image, Store, to_signed64, utcnow
from retrieval.vectors import VectorStore


@dataclass
class BatchCounts:
    new: int = 0
    changed: int = 0
    touched: int = 0  # mtime changed, bytes identical: no re-embedding
    failed: int = 0


def _record_failure(session, result: DecodeResult) -> None:  # noqa: ANN001
    item = result.item
    path = text_path(item.path)  # a name that is not UTF-8 is recorded with its bad bytes as \xNN
    session.execute(delete(Failure).where(Failure.path == path))
    session.add(Failure(path=path, size=max(item.size, 0), mtime_ns=item.mtime_ns, etag=item.etag,
                        kind=result.failure_kind or "corrupt", reason=result.failure_reason or "unknown"))


def write_batch(store: Store, vectors: VectorStore, results: list[DecodeResult], embeddings: np.ndarray,
                copy_vectors: VectorStore | None = None, copy_embeddings: np.ndarray | None = None) -> BatchCounts:
    """`embeddings[i]` (and `copy_embeddings[i]`) belong to the i-th embeddable result. One transaction."""
    counts = BatchCounts()
    embedded = [r for r in results if r.embeddable]
    if len(embedded) != len(embeddings):
        raise ValueError(f"{len(embeddings)} embeddings for {len(embedded)} decoded images")
    if copy_embeddings is not None and len(copy_embeddings) != len(embedded):
        raise ValueError(f"{len(copy_embeddings)} copy embeddings for {len(embedded)} decoded images")
    copy_state = COPY_WRITTEN if copy_embeddings is not None else COPY_NONE
    now = utcnow()
    with store.session() as s, s.begin():
        rows: list[Image] = []
        for r in embedded:
            item = r.item
            fields = dict(size=item.size, mtime_ns=item.mtime_ns, sha256=r.sha256, width=r.width, height=r.height,
                          format=r.format[:16], phash=to_signed64(r.phash), indexed=False, updated_at=now,
                          pdq=r.pdq, pdq_quality=r.pdq_quality, copy_state=copy_state, etag=item.etag, extra=r.meta)
            if item.image_id is None:
                row = Image(path=item.path, added_at=now, **fields)
                s.add(row)
                counts.new += 1
            else:
                row = s.get(Image, item.image_id)
                if row is None:  # removed meanwhile by another tool: treat as new
                    row = Image(path=item.path, added_at=now, **fields)
                    s.add(row)
                    counts.new += 1
                else:
                    for key, value in fields.items():
                        setattr(row, key, value)
                    counts.changed += 1
            rows.append(row)
        for r in results:
            item = r.item
            if r.unchanged_content and item.image_id is not None:
                row = s.get(Image, item.image_id)
                if row is not None:
                    row.size, row.mtime_ns, row.updated_at, row.etag = item.size, item.mtime_ns, now, item.etag
                    counts.touched += 1
            elif r.failure_reason is not None:
                _record_failure(s, r)
                if item.image_id is not None:  # a changed file that no longer decodes leaves the index
                    s.execute(delete(Image).where(Image.id == item.image_id))
                counts.failed += 1
        succeeded = [r.item.path for r in results if r.failure_reason is None]
        if succeeded:
            s.execute(delete(Failure).where(Failure.path.in_(succeeded)))
        s.flush()  # assigns ids to new rows, inside the still-open transaction
        if rows:
            ids = np.array([row.id for row in rows], dtype=np.int64)
            vectors.write(ids, embeddings)
            if copy_embeddings is not None and copy_vectors is not None:
                copy_vectors.write(ids, copy_embeddings)
    return counts


def write_copy_batch(store: Store, copy_vectors: VectorStore, results: list[DecodeResult],
                     embeddings: np.ndarray) -> int:
    """Adding the copy role to indexed images: their copy vectors and PDQ hashes, crash-safe like
    write_batch. `results` are decodes of already indexed files (item.image_id set); one whose bytes
    changed since is left to the next `index` run. Returns how many images got a copy vector."""
    if len(results) != len(embeddings):
        raise ValueError(f"{len(embeddings)} copy embeddings for {len(results)} decoded images")
    with store.session() as s, s.begin():
        ids, rows = [], []
        for i, r in enumerate(results):
            row = s.get(Image, r.item.image_id)
            if row is None or row.sha256 != r.sha256:
                continue
            row.pdq, row.pdq_quality, row.copy_state = r.pdq, r.pdq_quality, COPY_WRITTEN
            ids.append(row.id)
            rows.append(i)
        s.flush()
        if ids:
            copy_vectors.write(np.array(ids, dtype=np.int64), embeddings[rows])
    return len(ids)


