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
            from retrieval.vectors import role_vectors

            opts = SyncOptions(memory_budget=settings.memory_budget, exact_threshold=settings.exact_threshold,
                               recall_target=settings.recall_target)
            sync_index(reader.store, role_vectors(reader.layout, "search", dim), reader.layout, opts)
            if reader.meta.get("copy_dim"):
                sync_index(reader.store, role_vectors(reader.layout, "copy", reader.meta["copy_dim"]), reader.layout,
                           opts, role="copy")
        with reader.store.session() as s, s.begin():
            run = s.get(DedupRun, run_id)
            if run is not None:
                run.applied_at = utcnow()
    reader._index = reader._copy_index = None  # the FAISS files changed
    for item in result.skipped:
        logger.warning("not moved: %s (%s)", item["path"], item["reason"])
    return result
