"""`dedup --apply --move-to DIR`: move the removed files out of the corpus and update the index.

Nothing is deleted: each file moves to DIR/<its corpus-relative path>. A file that changed since
it was indexed (size or mtime differ), vanished, or whose destination already exists is skipped
and listed, and so is every removal of a group whose kept copy is missing, changed, outside the
corpus, or a link to the file that would move (moving it would leave no copy in the corpus). Moved images leave the database, and the FAISS index is synced (same code path as
`retrieval index` uses for deleted files).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from retrieval.errors import RetrievalError
from retrieval.layout import IndexLock, is_within, remove_stale_temporaries
from retrieval.search import IndexReader
from retrieval.store import DedupRun, DuplicateMember, Image, chunked, utcnow

logger = logging.getLogger(__name__)


@dataclass
class ApplyResult:
    moved: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    move_to: str = ""
    moved_ids: list[int] = field(default_factory=list)


def _changed(path: Path, img: Image) -> str | None:
    """Why `path` no longer holds the indexed image `img` (None: it still does)."""
    if not path.is_file():
        return "vanished"
    st = path.stat()
    if (st.st_size, st.st_mtime_ns) != (img.size, img.mtime_ns):
        return "changed since it was indexed"
    return None


def _keeper_problem(root: Path, keepers: list[tuple[int | None, str, bool]], images: dict[int, Image],
                    src: Path) -> str | None:
    """Why a group's kept copies cannot vouch for `src` being a spare copy (None: they can).

    A group's keeper must still be there, unchanged, inside the corpus, and not be `src` itself
    through a link: otherwise moving `src` could move the last copy of the image out of the corpus.
    """
    if not keepers:
        return "its group has no kept copy"
    real_src = os.path.realpath(src)
    for image_id, rel, is_reference in keepers:
        if is_reference:
            if not Path(rel).is_file():
                return f"the reference file {rel} that its group matched is gone"
            continue
        keeper = root / rel
        img = images.get(image_id) if image_id is not None else None
        if img is None or img.path != rel:
            return f"the kept copy {rel} is no longer in the index"
        why = _changed(keeper, img)
        if why:
            return f"the kept copy {rel} {why}; run `retrieval index` and dedup again"
        if not is_within(keeper, root):
            return f"the kept copy {rel} is a link to a file outside the corpus"
        if os.path.realpath(keeper) == real_src:
            return f"the kept copy {rel} is a link to this very file"
    return None


def check_move_to(root: Path, move_to: Path) -> None:
    """--move-to must lie outside the corpus (checked before any run is computed)."""
    if is_within(move_to, root):
        raise RetrievalError(f"--move-to {move_to} lies inside the corpus {root}; the next index run would find "
                             f"the files again. Choose a folder outside the corpus")


def _move(src: Path, dst: Path) -> str | None:
    """Move one file; None when it moved, else why not. Nothing is lost either way: a copy made to
    another file system whose source cannot then be deleted (a read-only corpus) is removed again."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dst))
        return None
    except OSError as exc:
        if os.path.lexists(src) and os.path.lexists(dst):
            try:
                os.unlink(dst)
            except OSError:
                pass
        return f"cannot move it: {exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}"


def apply_run(reader: IndexReader, run_id: int, move_to: Path, settings: Any) -> ApplyResult:
    """Move every image the run marks `remove`, then drop them from the index.

    Refused per group, with the reason listed: every removal of a group whose kept copy is missing,
    changed, outside the corpus or a link to the file that would move. Writes go through a store
    of their own, opened under the index lock: the reader stays read-only.
    """
    from retrieval.store import Store, remove_images
    from retrieval.sync import SyncOptions, sync_index

    root = reader.corpus_root
    move_to = Path(move_to)
    check_move_to(root, move_to)
    result = ApplyResult(move_to=str(move_to.resolve()))
    with IndexLock(reader.layout):
        remove_stale_temporaries(reader.layout.root)
        writer = Store(reader.store.url)
        try:
            _apply(reader, writer, run_id, root, move_to, result)
            moved_ids = result.moved_ids
            remove_images(writer, moved_ids, [])
            dim = reader.meta.get("dim")
            if dim is not None and moved_ids:
                from retrieval.vectors import VectorStore

                sync_index(writer, VectorStore(reader.layout.vectors_path, dim), reader.layout, SyncOptions(
                    memory_budget=settings.memory_budget, exact_threshold=settings.exact_threshold,
                    recall_target=settings.recall_target))
            with writer.session() as s, s.begin():
                run = s.get(DedupRun, run_id)
                if run is not None:
                    run.applied_at = utcnow()
        finally:
            writer.close()
    reader._index = None  # the FAISS file changed
    for item in result.skipped:
        logger.warning("not moved: %s (%s)", item["path"], item["reason"])
    return result


def _apply(reader: IndexReader, writer: Any, run_id: int, root: Path, move_to: Path, result: ApplyResult) -> None:
    with writer.session() as s:
        members = s.execute(select(DuplicateMember.group_id, DuplicateMember.image_id, DuplicateMember.path,
                                   DuplicateMember.action, DuplicateMember.is_reference).where(
            DuplicateMember.run_id == run_id)).all()
        ids = [m.image_id for m in members if m.image_id is not None]
        images = {r.id: r for part in chunked(ids) for r in s.scalars(select(Image).where(Image.id.in_(part)))}
    keepers: dict[int, list[tuple[int | None, str, bool]]] = {}
    for m in members:
        if m.action == "keep" or m.is_reference:
            keepers.setdefault(m.group_id, []).append((m.image_id, m.path, m.is_reference))
    for m in members:
        if m.action != "remove" or m.is_reference:
            continue
        rel, src, dst = m.path, root / m.path, move_to / m.path
        img = images.get(m.image_id)
        why = None
        if img is None or img.path != rel:
            why = "no longer in the index"
        elif not os.path.lexists(src):
            why = "file vanished"
        else:
            why = _changed(src, img)
            if why:
                why = f"file {why}; run `retrieval index` and dedup again"
            elif os.path.lexists(dst):
                why = f"destination {dst} already exists"
            else:
                problem = _keeper_problem(root, keepers.get(m.group_id, []), images, src)
                if problem:
                    why = f"not moved: {problem}"
        if why:
            result.skipped.append({"path": rel, "reason": why})
            continue
        why = _move(src, dst)
        if why:
            result.skipped.append({"path": rel, "reason": why})
            continue
        result.moved_ids.append(m.image_id)
        result.moved.append(rel)
