"""CLI commands of the curation pipeline: dedup, cluster, curate, calibrate.

Thin: parse options, call one library function, write reports, print a summary. Register them on
the main app with `register(app)` (or `app.command()(fn)` for each function).
"""

from __future__ import annotations

import json
from pathlib import Path
from dataclasses import asdict
from types import SimpleNamespace
from typing import Any, Optional

import typer

from retrieval.cli.options import DbOpt, IndexDirOpt, JsonOpt, ProgressOpt
from retrieval.cli.options import settings as _settings
from retrieval.errors import RetrievalError


def _reader(index_dir: Optional[Path], db: Optional[str]) -> tuple[Any, Any]:
    from retrieval.layout import IndexLayout
    from retrieval.search import IndexReader

    settings = _settings(index_dir=index_dir, db_url=db)
    return settings, IndexReader(IndexLayout(settings.index_dir), settings.db_url)


def _print(data: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        for line in lines:
            typer.echo(line)


def dedup(
    index_dir: Optional[Path] = IndexDirOpt,
    db: Optional[str] = DbOpt,
    threshold: Optional[float] = typer.Option(None, "--threshold", "-t", help="Cosine at or above which two images are copies [default: 0.95; 0.90 with --against]."),
    k: int = typer.Option(64, "-k", help="Neighbours per image in the k-NN graph (the paper's 64); capped at N-1."),
    phash_distance: int = typer.Option(8, "--phash-distance", help="pHash Hamming radius for near-exact copies; -1 turns the stage off."),
    keep: str = typer.Option("highest-resolution", "--keep", help="Which copy survives: highest-resolution, largest, oldest, shortest-path or first."),
    max_group_diameter: Optional[float] = typer.Option(None, "--max-group-diameter", help="Split groups so every member is within this cosine distance (1 - cos) of its representative [default: off, plain connected components as in the paper]."),
    against: Optional[str] = typer.Option(None, "--against", help="Reference set (e.g. benchmark images): a folder, URL prefix, list or shards; embedded, not indexed; every group touching it is removed whole."),
    embeddings: bool = typer.Option(True, "--embeddings/--no-embeddings", help="Run the embedding (copy detection) stage."),
    report_dir: Path = typer.Option(Path("dedup-report"), "--report-dir", "-o", help="Where the reports are written."),
    apply: bool = typer.Option(False, "--apply", help="Move the files marked remove to --move-to and drop them from the index (default: dry run). For a remote or list source: write manifest.csv and a filtered kept.parquet instead."),
    move_to: Optional[Path] = typer.Option(None, "--move-to", help="Folder outside the corpus that removed files move to, keeping their relative paths."),
    force: bool = typer.Option(False, "--force", help="Recompute even when an identical run on the unchanged index exists."),
    run: Optional[int] = typer.Option(None, "--run", help="With --apply: apply this stored run (the id its report shows) instead of the run the other options select."),
    progress: bool = ProgressOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Find exact, near-exact and embedding duplicates; write reports; optionally move the extra copies.

    Nothing is deleted, ever: --apply moves files to --move-to. Without --apply this is a dry run.
    Review a run's report, then apply exactly that run with --apply --run ID (or repeat the same
    options with --apply: an identical run on an unchanged index is reused, not recomputed).

    Example:

        retrieval dedup --report-dir ./dedup && retrieval dedup --apply --run 1 --move-to ../removed
    """
    from retrieval.curation.apply import apply_run, write_manifest
    from retrieval.curation.dedup import DedupOptions, load_run, run_dedup
    from retrieval.curation.report import write_dedup_reports

    if move_to is not None and not apply:
        raise RetrievalError("--move-to only acts together with --apply (the default is a dry run)")
    if run is not None and not apply:
        raise RetrievalError("--run selects the stored run that --apply acts on; without --apply there is nothing to do")
    settings, reader = _reader(index_dir, db)
    in_place = reader.source.writable
    if apply and move_to is None and in_place:
        reader.close()
        raise RetrievalError("--apply needs --move-to DIR: removed files are moved there, never deleted")
    try:
        outcome = SimpleNamespace(run_id=run, reused=True) if run is not None else run_dedup(reader, DedupOptions(
            threshold=threshold, k=k, phash_distance=phash_distance, keep=keep, max_group_diameter=max_group_diameter,
            against=against, embeddings=embeddings, progress=progress, force=force, max_pixels=settings.max_pixels,
            batch_size=settings.batch_size, workers=settings.workers or 0))
        doc = load_run(reader, outcome.run_id)
        files = write_dedup_reports(doc, report_dir, settings.max_pixels, progress)
        applied = manifest = None
        if apply and not in_place:
            manifest = write_manifest(reader, outcome.run_id, report_dir)
        elif apply:
            assert move_to is not None
            applied = apply_run(reader, outcome.run_id, move_to, settings)
            from retrieval.curation.report import write_text_lines

            write_text_lines(report_dir / "moved.txt", applied.moved)
    finally:
        reader.close()
    s = doc["summary"]
    lines = [
        f"dedup run {outcome.run_id}{' (reused: nothing changed)' if outcome.reused else ''}: "
        f"{s.get('images_in_groups', 0)} of {s.get('images', 0)} images in {s.get('groups', 0)} groups; "
        f"{s.get('images_to_remove', 0)} to remove ({', '.join(f'{k}: {v}' for k, v in s.get('removed_by_reason', {}).items()) or 'none'})",
        f"reports: {report_dir.resolve()} (report.html, duplicates.json, duplicates.csv, remove.txt, keep.txt)",
    ]
    if doc["reference_failures"]:
        lines.append(f"{len(doc['reference_failures'])} reference files could not be used (listed in duplicates.json)")
    if manifest is not None:
        lines.append(f"the source ({reader.source.kind}: {reader.corpus_name}) is not changed in place: nothing "
                     f"moved; wrote {manifest.manifest} and the filtered list {manifest.kept_list} "
                     f"({manifest.kept} images kept, {manifest.removed} removed)"
                     + (f", shards {manifest.shard_list}" if manifest.shard_list else ""))
    elif applied is not None:
        lines.append(f"moved {len(applied.moved)} files to {applied.move_to}; skipped {len(applied.skipped)}")
    else:
        lines.append("dry run: nothing moved (use --apply --move-to DIR)")
    data = {"run_id": outcome.run_id, "reused": outcome.reused, "summary": s, "report_dir": str(report_dir.resolve()),
            "files": {k: str(v) for k, v in files.items()},
            "applied": None if applied is None else {"moved": applied.moved, "skipped": applied.skipped,
                                                     "move_to": applied.move_to},
            "manifest": None if manifest is None else asdict(manifest)}
    _print(data, as_json, lines)


def register(app: typer.Typer) -> None:
    """Add every curation command to `app`."""
    for fn in COMMANDS:
        app.command()(fn)


COMMANDS = [dedup]


def cluster(
    k: Optional[int] = typer.Option(None, "-k", help="Number of clusters [default: sqrt(N), at most 100000]."),
    index_dir: Optional[Path] = IndexDirOpt,
    db: Optional[str] = DbOpt,
    niter: int = typer.Option(20, "--niter", help="k-means iterations.", min=1),
    seed: int = typer.Option(0, "--seed", help="Random seed (sampling and initialisation)."),
    report_dir: Path = typer.Option(Path("cluster-report"), "--report-dir", "-o", help="Where clusters.html and clusters.json go."),
    force: bool = typer.Option(False, "--force", help="Recompute even when an identical run on the unchanged index exists."),
    progress: bool = ProgressOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Cluster all embeddings with spherical k-means; store image -> cluster and write a mosaic per cluster.

    Example:

        retrieval cluster -k 100 --report-dir ./clusters
    """
    from retrieval.curation.clusters import run_clustering, write_cluster_report

    settings, reader = _reader(index_dir, db)
    try:
        outcome = run_clustering(reader, k, niter, seed, force, progress)
        page = write_cluster_report(reader, outcome, report_dir, settings.max_pixels, progress=progress)
    finally:
        reader.close()
    sizes = outcome.sizes
    data = {"run_id": outcome.run_id, "k": outcome.k, "images": outcome.n_images, "reused": outcome.reused,
            "sizes": sizes, "report": str(page.resolve())}
    _print(data, as_json, [
        f"cluster run {outcome.run_id}{' (reused)' if outcome.reused else ''}: {outcome.n_images} images in "
        f"{outcome.k} clusters (sizes {min(sizes)}..{max(sizes)}, {sum(1 for x in sizes if x == 0)} empty)",
        f"report: {page.resolve()}"])


COMMANDS.append(cluster)


def curate(
    queries: str = typer.Option(..., "--queries", help="Query images (embedded, not indexed): a folder, URL prefix, list or shards."),
    mode: str = typer.Option("sample", "--mode", help="sample: k nearest per query; cluster: sample clusters holding > --min-queries queries."),
    k: int = typer.Option(4, "-k", help="Nearest corpus images per query in sample mode (the paper's 4)."),
    per_cluster: int = typer.Option(10_000, "--per-cluster", help="Images sampled from each selected cluster (cluster mode)."),
    min_queries: int = typer.Option(3, "--min-queries", help="A cluster is selected when it holds more than this many queries."),
    max_images: int = typer.Option(1_000_000, "--max-images", help="Cap on the curated list."),
    cluster_run: Optional[int] = typer.Option(None, "--cluster-run", help="Clustering run to use [default: the latest]."),
    seed: int = typer.Option(0, "--seed", help="Random seed of the per-cluster sample (cluster mode)."),
    index_dir: Optional[Path] = IndexDirOpt,
    db: Optional[str] = DbOpt,
    report_dir: Path = typer.Option(Path("curation-report"), "--report-dir", "-o", help="Where curated.txt and the manifest go."),
    force: bool = typer.Option(False, "--force", help="Recompute even when an identical run (same options, same query files, same clustering run) on the unchanged index exists."),
    progress: bool = ProgressOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Curate the corpus from a query set: the images near the queries, with a manifest of how each got in.

    A rerun with the same options and query files on an unchanged index reuses the stored run.

    Example:

        retrieval curate --queries ./imagenet-val --mode sample -k 4
    """
    from retrieval.curation.curate import (
        CurateOptions,
        run_curation,
        write_curation_report,
    )

    settings, reader = _reader(index_dir, db)
    try:
        outcome = run_curation(reader, CurateOptions(
            queries=queries, mode=mode, k=k, per_cluster=per_cluster, min_queries=min_queries, max_images=max_images,
            cluster_run=cluster_run, seed=seed, progress=progress, max_pixels=settings.max_pixels,
            batch_size=settings.batch_size, workers=settings.workers or 0, force=force))
        files = write_curation_report(reader, outcome, report_dir, settings.max_pixels, progress)
    finally:
        reader.close()
    c = outcome.counts
    lines = [f"curation run {outcome.run_id} ({mode}{', reused: nothing changed' if outcome.reused else ''}): "
             f"{c.get('unique_images', 0)} images from {c['queries']} queries ({c['queries_failed']} query files failed)"]
    if mode == "sample":
        lines.append(f"{c['retrieved']} retrievals, {c['collisions']} collisions "
                     f"({c['images_retrieved_more_than_once']} images retrieved by several queries)")
    lines.append(f"curated list: {files['curated.txt'].resolve()}")
    _print({"run_id": outcome.run_id, "reused": outcome.reused, "counts": c,
            "files": {k: str(v) for k, v in files.items()}}, as_json, lines)


COMMANDS.append(curate)


def calibrate(
    sample: int = typer.Option(100, "--sample", "-n", help="Corpus images to copy under each transform.", min=1),
    target_precision: float = typer.Option(0.95, "--target-precision", help="Precision the suggested threshold must reach."),
    seed: int = typer.Option(0, "--seed", help="Random seed of the sample."),
    transform: Optional[list[str]] = typer.Option(None, "--transform", help="Only these transforms (repeatable) [default: all]."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the full curves as JSON here."),
    index_dir: Optional[Path] = IndexDirOpt,
    db: Optional[str] = DbOpt,
    progress: bool = ProgressOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Measure precision/recall of duplicate detection per transform on your corpus; suggest a threshold.

    Example:

        retrieval calibrate --sample 200 --target-precision 0.99 -o calibration.json
    """
    from dataclasses import asdict

    from retrieval.curation.calibrate import format_table, run_calibration

    _, reader = _reader(index_dir, db)
    try:
        cal = run_calibration(reader, sample, target_precision, seed, transform, progress)
    finally:
        reader.close()
    data = asdict(cal)
    if output is not None:
        output.write_text(json.dumps(data, indent=1))
    _print(data, as_json, format_table(cal))


COMMANDS.append(calibrate)
