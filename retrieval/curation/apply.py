"""`dedup --apply --move-to DIR`: move the removed files out of the corpus and update the index.

Nothing is deleted: each file moves to DIR/<its corpus-relative path>. A file that changed since
it was indexed (size or mtime differ), vanished, or whose destination already exists is skipped
and listed. Moved images leave the database, and the FAISS index is synced (same code path as
`retrieval index` uses for deleted files).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from retrieval.errors import RetrievalError
from retrieval.layout import IndexLock, is_within
from retrieval.search import IndexReader
from retrieval.store import DedupRun, DuplicateMember, Image, chunked, utcnow

logger = logging.getLogger(__name__)


@dataclass
class ApplyResult:
    moved: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    move_to: str = ""


def apply_run(reader: IndexReader, run_id: int, move_to: Path, settings: Any) -> ApplyResult:
    """Move every image the run marks `remove`, then drop them from the index."""
    from retrieval.store import remove_images
    from retrieval.sync import SyncOptions, sync_index

    root = reader.corpus_root
    move_to = Path(move_to)
    if is_within(move_to, root):
        raise RetrievalError(f"--move-to {move_to} lies inside the corpus {root}; the next index run would find "
                             f"the files again. Choose a folder outside the corpus")
    result = ApplyResult(move_to=str(move_to.resolve()))
    with IndexLock(reader.layout):
        with reader.store.session() as s:
            rows = s.execute(select(DuplicateMember.image_id, DuplicateMember.path).where(
                DuplicateMember.run_id == run_id, DuplicateMember.action == "remove",
                DuplicateMember.is_reference.is_(False))).all()
            images = {r.id: r for part in chunked(r[0] for r in rows)
                      for r in s.scalars(select(Image).where(Image.id.in_(part)))}
        moved_ids: list[int] = []
        for image_id, rel in rows:
            src, dst = root / rel, move_to / rel
            img = images.get(image_id)
            why = None
            if img is None or img.path != rel:
                why = "no longer in the index"
            elif not src.is_file():
                why = "file vanished"
            else:
                st = src.stat()
                if (st.st_size, st.st_mtime_ns) != (img.size, img.mtime_ns):
                    why = "file changed since it was indexed; run `retrieval index` and dedup again"
                elif dst.exists():
                    why = f"destination {dst} already exists"
            if why:
                result.skipped.append({"path": rel, "reason": why})
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(src), str(dst))
            moved_ids.append(image_id)
            result.moved.append(rel)
        remove_images(reader.store, moved_ids, [])
        dim = reader.meta.get("dim")
        if dim is not None and moved_ids:
            from retrieval.vectors import VectorStore

            sync_index(reader.store, VectorStore(reader.layout.vectors_path, dim), reader.layout, SyncOptions(
                memory_budget=settings.memory_budget, exact_threshold=settings.exact_threshold,
                recall_target=settings.recall_target))
        with reader.store.session() as s, s.begin():
            run = s.get(DedupRun, run_id)
            if run is not None:
                run.applied_at = utcnow()
    reader._index = None  # the FAISS file changed
    for item in result.skipped:
        logger.warning("not moved: %s (%s)", item["path"], item["reason"])
    return result


@dataclass
class ManifestResult:
    """`dedup --apply` on a source that cannot be changed in place: what was written instead of moving."""

    manifest: str
    kept_list: str
    kept: int
    removed: int
    shard_list: str | None = None


def write_manifest(reader: IndexReader, run_id: int, out_dir: Path) -> ManifestResult:
    """A keep/remove manifest and a filtered list of the kept images (Parquet, img2dataset's `url`
    column plus every metadata column; shards also get the list of shards still holding kept images).

    Remote and list sources are never modified: train on the filtered list instead. The index is
    left as it is (the removed images are still in the source, so the next index run would see them).
    """
    import csv

    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise RetrievalError("writing the filtered list needs pyarrow: pip install 'retrieval[sources]'") from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with reader.store.session() as s:
        members = s.execute(select(DuplicateMember.image_id, DuplicateMember.path, DuplicateMember.action,
                                   DuplicateMember.group_id, DuplicateMember.reason, DuplicateMember.similarity)
                            .where(DuplicateMember.run_id == run_id, DuplicateMember.is_reference.is_(False))
                            .order_by(DuplicateMember.id)).all()
        if not members and s.get(DedupRun, run_id) is None:
            raise RetrievalError(f"no dedup run with id {run_id} in this index")
        removed = {m.image_id for m in members if m.action == "remove"}
        rows = s.execute(select(Image.id, Image.path, Image.extra).order_by(Image.id)).all()
    manifest = out_dir / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "action", "group_id", "reason", "similarity", "image_id"])
        for m in members:
            w.writerow([m.path, m.action, m.group_id, m.reason, f"{m.similarity:.6f}", m.image_id])
    kept = [r for r in rows if r.id not in removed]
    columns: dict[str, list[Any]] = {"url": [r.path for r in kept], "image_id": [r.id for r in kept]}
    keys = sorted({k for r in kept for k in (r.extra or {}) if k != "tar_offset"})
    for k in keys:
        columns[k] = [_cell((r.extra or {}).get(k)) for r in kept]
    kept_list = out_dir / "kept.parquet"
    pq.write_table(pa.table(columns), kept_list)
    shard_list = None
    if reader.source.kind == "shards":
        shards = sorted({r.path.partition("#")[0] for r in kept})
        shard_list = str(out_dir / "kept-shards.txt")
        Path(shard_list).write_text("".join(f"{x}\n" for x in shards))
        with open(out_dir / "kept-members.txt", "w", encoding="utf-8") as f:
            f.writelines(f"{r.path}\n" for r in kept)
    with reader.store.session() as s, s.begin():
        run = s.get(DedupRun, run_id)
        if run is not None:
            run.applied_at = utcnow()
    return ManifestResult(manifest=str(manifest.resolve()), kept_list=str(kept_list.resolve()), kept=len(kept),
                          removed=len(removed), shard_list=shard_list)


def _cell(value: Any) -> Any:
    """Parquet needs one type per column: nested metadata (shard .json sidecars) becomes JSON text."""
    import json

    return value if value is None or isinstance(value, str) else json.dumps(value, sort_keys=True)
