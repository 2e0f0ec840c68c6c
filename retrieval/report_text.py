"""Plain-text renderings for the terminal: the end-of-run summary and `retrieval info`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from retrieval import runs
from retrieval.errors import IndexNotFoundError
from retrieval.layout import IndexLayout
from retrieval.store import Failure, Image, IndexRun, Store


def plural(n: int, singular: str, plural_form: str | None = None) -> str:
    """'1 group', '2 groups', '0 images'; pass `plural_form` for irregular words ('1 query', '2 queries')."""
    word = singular if n == 1 else (plural_form or singular + "s")
    return f"{n:,} {word}"


def _size(n_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n_bytes < 1000 or unit == "TB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000  # type: ignore[assignment]
    return ""


def format_index_summary(summary: Any) -> str:
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(summary.failure_kinds.items()))
    lines = [
        f"Indexed {summary.corpus} -> {summary.index_dir} in {summary.elapsed_s:.1f} s",
        f"  new {summary.new}, changed {summary.changed}, unchanged {summary.unchanged + summary.touched}, "
        f"removed {summary.removed}, failed {summary.failed}"
        + (f" (+{summary.known_failures} known failures skipped)" if summary.known_failures else ""),
    ]
    embedded = summary.new + summary.changed
    if embedded:
        lines.append(f"  embedded {plural(embedded, 'image')} at {summary.images_per_s:.1f} img/s with {summary.model} on {summary.device}")
    if summary.index_type:
        quality = "exact" if summary.index_type == "flat" else (
            f"nprobe {summary.nprobe}, recall@10 {summary.recall_at_10:.3f}" if summary.recall_at_10 is not None else "")
        action = "rebuilt" if summary.index_rebuilt else ("updated" if summary.index_changed else "unchanged")
        lines.append(f"  index {summary.index_factory} ({summary.index_type}, {quality}), {action}")
    lines.append(f"  total {plural(summary.total_images, 'image')} searchable")
    if kinds:
        lines.append(f"  failures by kind: {kinds} -- see `retrieval info --failures`")
    return "\n".join(lines)


def collect_info(layout: IndexLayout, db_url: str | None, list_failures: bool = False) -> dict[str, Any]:
    if db_url is None and not layout.exists():
        raise IndexNotFoundError(f"no index in {layout.root.resolve()}; run `retrieval index CORPUS` first")
    store = Store(db_url or layout.default_db_url(), readonly=True)
    try:
        meta = store.all_meta()
        with store.session() as s:
            n_images = s.scalar(select(func.count(Image.id))) or 0
            n_bytes = s.scalar(select(func.coalesce(func.sum(Image.size), 0))) or 0
            kinds = dict(s.execute(select(Failure.kind, func.count()).group_by(Failure.kind)).all())
            formats = dict(s.execute(select(Image.format, func.count()).group_by(Image.format)).all())
            last = runs.latest(s, IndexRun, any_status=True)
            failures = [
                {"path": f.path, "kind": f.kind, "reason": f.reason}
                for f in s.scalars(select(Failure).order_by(Failure.path))
            ] if list_failures else None
        files = {p.name: p.stat().st_size for p in (layout.db_path, layout.vectors_path, layout.legacy_vectors_path,
                                                        layout.faiss_path, layout.vectors_for("copy"),
                                                        layout.faiss_for("copy")) if p.exists()}
        return {
            "index_dir": str(layout.root.resolve()),
            "corpus_root": meta.get("corpus_root"),
            "model": meta.get("model_ref"),
            "dim": meta.get("dim"),
            "copy_model": meta.get("copy_model_ref"),
            "copy_dim": meta.get("copy_dim"),
            "preprocess": meta.get("preprocess"),
            "images": n_images,
            "image_bytes": n_bytes,
            "formats": formats,
            "failures_by_kind": kinds,
            "index": meta.get("index"),
            "files": files,
            "last_run": None if last is None else {
                "id": last.id, "status": last.status, "started_at": last.started_at, "finished_at": last.finished_at,
                "counts": last.counts, "timings": last.timings, "images_per_s": last.images_per_s, "error": last.error,
            },
            "failures": failures,
        }
    finally:
        store.close()


def format_info(data: dict[str, Any]) -> str:
    lines = [
        f"index folder  {data['index_dir']}",
        f"corpus        {data['corpus_root']}",
        f"model         {data['model']} ({data['dim']}-d)",
        f"images        {data['images']:,} ({_size(data['image_bytes'])}); "
        + ", ".join(f"{k} {v}" for k, v in sorted(data["formats"].items())),
        f"failures      {sum(data['failures_by_kind'].values()):,}"
        + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(data["failures_by_kind"].items())) + ")"
           if data["failures_by_kind"] else ""),
    ]
    spec = data.get("index")
    if spec:
        params = spec.get("params", {})
        detail = "exact" if spec["kind"] == "flat" else (
            f"nlist {spec.get('nlist')}" + (f", PQ {spec['pq_m']} bytes" if spec.get("pq_m") else "")
            + f", nprobe {params.get('nprobe')}, recall@10 {params.get('recall_at_10')} (target {params.get('target')})")
        if params.get("missed"):
            detail += (f"; replaces {params['missed']['factory']}, which reached recall@10 "
                       f"{params['missed']['recall_at_10']} only")
        lines.append(f"faiss index   {spec['factory']} ({detail}), built {params.get('built_at', '?')}")
    else:
        lines.append("faiss index   none")
    lines.append("files         " + ", ".join(f"{name} {_size(size)}" for name, size in data["files"].items()))
    run = data.get("last_run")
    if run:
        lines.append(f"last run      #{run['id']} {run['status']}, started {run['started_at']}"
                     + (f", {run['images_per_s']:.1f} img/s" if run.get("images_per_s") else ""))
        if run.get("error"):
            lines.append(f"              error: {run['error']}")
    if data.get("failures") is not None:
        lines.append("failed files:")
        lines.extend(f"  {f['path']}: [{f['kind']}] {f['reason']}" for f in data["failures"])
    return "\n".join(lines)
