"""`dedup --apply --move-to DIR`: move the removed files out of the corpus and update the index.

What moves: the members a stored run marks `remove`, with the review decisions made in the web UI
applied on top (`apply_run`), or the corpus-relative paths of a hand-edited list (`apply_list`).

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
from retrieval.store import DedupRun, Image, chunked, utcnow

logger = logging.getLogger(__name__)


@dataclass
class ApplyResult:
    moved: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    move_to: str = ""


def apply_run(reader: IndexReader, run_id: int, move_to: Path, settings: Any) -> ApplyResult:
    """Move every image the run marks `remove` (review decisions included), then drop them from the index."""
    from retrieval.curation.queries import effective_members

    rows = [(image_id, path) for _, image_id, path, ref, action, *_ in effective_members(reader.store, run_id)
            if action == "remove" and not ref and image_id is not None]
    result = _move(reader, rows, move_to, settings)
    with reader.store.session() as s, s.begin():
        run = s.get(DedupRun, run_id)
        if run is not None:
            run.applied_at = utcnow()
    return result


def read_remove_list(path: Path) -> list[str]:
    """Corpus-relative paths, one a line; blank lines and lines starting with # are ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RetrievalError(f"cannot read the remove list {path}: {exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def apply_list(reader: IndexReader, paths: list[str], move_to: Path, settings: Any) -> ApplyResult:
    """Move the listed corpus-relative files out of the corpus; paths the index does not hold are skipped."""
    root = reader.corpus_root
    wanted = list(dict.fromkeys(_relative(p, root) for p in paths))
    with reader.store.session() as s:
        known = {path: i for part in chunked(wanted)
                 for i, path in s.execute(select(Image.id, Image.path).where(Image.path.in_(part)))}
    rows = [(known[p], p) for p in wanted if p in known]
    result = _move(reader, rows, move_to, settings)
    result.skipped[:0] = [{"path": p, "reason": "not an indexed image path (paths are relative to the corpus root)"}
                          for p in wanted if p not in known]
    for item in result.skipped[: len(wanted) - len(rows)]:
        logger.warning("not moved: %s (%s)", item["path"], item["reason"])
    return result


def _relative(path: str, root: Path) -> str:
    """A listed path as the index stores it: corpus-relative POSIX (absolute paths inside the corpus too)."""
    if Path(path).is_absolute() and is_within(Path(path), root):
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    path = path.replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return path


def _move(reader: IndexReader, rows: list[tuple[int, str]], move_to: Path, settings: Any) -> ApplyResult:
    """Move (image id, corpus-relative path) files to `move_to`, unless they changed; drop the moved ones."""
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
    reader._index = None  # the FAISS file changed
    for item in result.skipped:
        logger.warning("not moved: %s (%s)", item["path"], item["reason"])
    return result
