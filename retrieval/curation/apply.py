"""`dedup --apply --move-to DIR`: move the removed files out of the corpus and update the index.

What moves: the members a stored run marks `remove`, with the review decisions made in the web UI
applied on top (`apply_run`), or the corpus-relative paths of a hand-edited list (`apply_list`).

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
from retrieval.store import DedupRun, Image, chunked, utcnow

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
        if os.path.realpath(keeper) == real_src and not os.path.islink(src):  # moving a link moves no data
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
    """Move every image the run marks `remove` (review decisions included), then drop them from the index.

    Refused per group, with the reason listed: every removal of a group whose kept copy is missing,
    changed, outside the corpus or a link to the file that would move.
    """
    from retrieval.curation.queries import effective_members

    members = [(group, image_id, path, ref, action)
               for group, image_id, path, ref, action, *_ in effective_members(reader.store, run_id)]
    return _apply(reader, members, move_to, settings, run_id)


def read_remove_list(path: Path) -> list[str]:
    """Corpus-relative paths, one a line; blank lines and lines starting with # are ignored."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RetrievalError(f"cannot read the remove list {path}: {exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def apply_list(reader: IndexReader, paths: list[str], move_to: Path, settings: Any) -> ApplyResult:
    """Move the listed corpus-relative files out of the corpus; paths the index does not hold are skipped.

    A hand-made list has no groups: the person who wrote it vouches for the copies that stay.
    """
    root = reader.corpus_root
    wanted = list(dict.fromkeys(_relative(p, root) for p in paths))
    with reader.store.session() as s:
        known = {path: i for part in chunked(wanted)
                 for i, path in s.execute(select(Image.id, Image.path).where(Image.path.in_(part)))}
    members = [(None, known[p], p, False, "remove") for p in wanted if p in known]
    unknown = [{"path": p, "reason": "not an indexed image path (paths are relative to the corpus root)"}
               for p in wanted if p not in known]
    for item in unknown:
        logger.warning("not moved: %s (%s)", item["path"], item["reason"])
    result = _apply(reader, members, move_to, settings, None)
    result.skipped[:0] = unknown
    return result


def _relative(path: str, root: Path) -> str:
    """A listed path as the index stores it: corpus-relative POSIX (absolute paths inside the corpus too)."""
    if Path(path).is_absolute() and is_within(Path(path), root):
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    path = path.replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    return path


Member = tuple[Any, "int | None", str, bool, str]  # (group or None, image id, path, is_reference, action)


def _apply(reader: IndexReader, members: list[Member], move_to: Path, settings: Any, run_id: int | None) -> ApplyResult:
    """Move the `remove` members, drop them from the index, sync FAISS and mark the run applied.

    Writes go through a store of their own, opened under the index lock: the reader stays read-only.
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
            _move_members(writer, members, root, move_to, result)
            moved_ids = result.moved_ids
            remove_images(writer, moved_ids, [])
            dim = reader.meta.get("dim")
            if dim is not None and moved_ids:
                from retrieval.vectors import role_vectors

                opts = SyncOptions(memory_budget=settings.memory_budget, exact_threshold=settings.exact_threshold,
                                   recall_target=settings.recall_target)
                sync_index(writer, role_vectors(reader.layout, "search", dim), reader.layout, opts)
                if reader.meta.get("copy_dim"):
                    sync_index(writer, role_vectors(reader.layout, "copy", reader.meta["copy_dim"]), reader.layout,
                               opts, role="copy")
            if run_id is not None:
                _mark_applied(writer, run_id)
        finally:
            writer.close()
    reader._index = reader._copy_index = None  # the FAISS files changed
    for item in result.skipped:
        logger.warning("not moved: %s (%s)", item["path"], item["reason"])
    return result


def _move_members(writer: Any, members: list[Member], root: Path, move_to: Path, result: ApplyResult) -> None:
    ids = [image_id for _, image_id, *_ in members if image_id is not None]
    with writer.session() as s:
        images = {r.id: r for part in chunked(ids) for r in s.scalars(select(Image).where(Image.id.in_(part)))}
    keepers: dict[Any, list[tuple[int | None, str, bool]]] = {}
    for group, image_id, path, ref, action in members:
        if group is not None and (action == "keep" or ref):
            keepers.setdefault(group, []).append((image_id, path, ref))
    for group, image_id, rel, ref, action in members:
        if action != "remove" or ref:
            continue
        src, dst = root / rel, move_to / rel
        img = images.get(image_id) if image_id is not None else None
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
            elif group is not None:
                problem = _keeper_problem(root, keepers.get(group, []), images, src)
                if problem:
                    why = f"not moved: {problem}"
        if why:
            result.skipped.append({"path": rel, "reason": why})
            continue
        why = _move(src, dst)
        if why:
            result.skipped.append({"path": rel, "reason": why})
            continue
        result.moved_ids.append(image_id)
        result.moved.append(rel)


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
    from retrieval.curation.queries import dedup_run, effective_members

    dedup_run(reader.store, run_id)  # a completed run, or one clear error
    # The actions as reviewed in `retrieval serve` (decisions over the keep rule), as apply_run uses them.
    members = [(group, image_id, path, action, reason, sim)
               for group, image_id, path, ref, action, _, sim, reason, _ in effective_members(reader.store, run_id)
               if not ref]
    removed = {image_id for _, image_id, _, action, _, _ in members if action == "remove"}
    with reader.store.session() as s:
        rows = s.execute(select(Image.id, Image.path, Image.extra).order_by(Image.id)).all()
    manifest = out_dir / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "action", "group", "reason", "similarity", "image_id"])
        for group, image_id, path, action, reason, sim in members:
            w.writerow([path, action, group, reason, f"{sim:.6f}", image_id])
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
    from retrieval.store import Store

    writer = Store(reader.store.url)  # the reader never writes (read-only media); this is the one write
    try:
        _mark_applied(writer, run_id)
    finally:
        writer.close()
    return ManifestResult(manifest=str(manifest.resolve()), kept_list=str(kept_list.resolve()), kept=len(kept),
                          removed=len(removed), shard_list=shard_list)


def _cell(value: Any) -> Any:
    """Parquet needs one type per column: nested metadata (shard .json sidecars) becomes JSON text."""
    import json

    return value if value is None or isinstance(value, str) else json.dumps(value, sort_keys=True)


def _mark_applied(writer: Any, run_id: int) -> None:
    with writer.session() as s, s.begin():
        run = s.get(DedupRun, run_id)
        if run is not None:
            run.applied_at = utcnow()
