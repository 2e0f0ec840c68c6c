"""CLI commands of the curation pipeline: dedup, cluster, curate, calibrate.

Thin: parse options, call one library function, write reports, print a summary. Register them on
the main app with `register(app)` (or `app.command()(fn)` for each function).
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from dataclasses import asdict
from typing import Any, Optional

import typer

from retrieval.cli.options import DbOpt, IndexDirOpt, JsonOpt, ProgressOpt, RayOpt, open_index
from retrieval.curation.policy import DEFAULT_POLICY, POLICIES
from retrieval.errors import RetrievalError

CURATION_MODES = ("sample", "cluster")  # retrieval.curation.curate checks them too (not imported here: numpy)
# Enums make --help list the choices and reject anything else before a command starts.
Keep = enum.Enum("Keep", {p: p for p in POLICIES}, type=str)  # type: ignore[misc]
Mode = enum.Enum("Mode", {m: m for m in CURATION_MODES}, type=str)  # type: ignore[misc]


def _plural(n: int, word: str, plural_form: str | None = None) -> str:
    from retrieval.report_text import plural

    return plural(n, word, plural_form)


def _print(data: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        for line in lines:
            typer.echo(line)


def dedup(
    index_dir: Optional[Path] = IndexDirOpt,
    db: Optional[str] = DbOpt,
    threshold: Optional[float] = typer.Option(None, "--threshold", "-t", help="Cosine at or above which two images are copies [default: per copy model (retrieval.curation.dedup.COPY_THRESHOLDS); without a copy model 0.95, 0.90 with --against, provisional]."),
    k: int = typer.Option(64, "-k", help="Neighbours per image in the k-NN graph (the paper's 64); capped at N-1."),
    phash_distance: int = typer.Option(8, "--phash-distance", help="pHash Hamming radius for near-exact copies; -1 turns the stage off."),
    pdq_distance: int = typer.Option(31, "--pdq-distance", help="PDQ Hamming radius (of 256 bits) under any flip or 90-degree rotation; -1 turns the stage off."),
    role: str = typer.Option("auto", "--role", help="Embedding the k-NN graph runs on: auto (the copy role when the index has one), copy or search."),
    keep: Keep = typer.Option(DEFAULT_POLICY, "--keep", help="Which copy survives: the most pixels, the largest file, the oldest file, the shortest path, or the first indexed."),
    max_group_diameter: Optional[float] = typer.Option(None, "--max-group-diameter", help="Split groups so every member is within this cosine distance (1 - cos) of its representative [default: off, plain connected components as in the paper]."),
    against: Optional[str] = typer.Option(None, "--against", help="Reference set (e.g. benchmark images): a folder, URL prefix, list or shards; embedded, not indexed; every group touching it is removed whole."),
    embeddings: bool = typer.Option(True, "--embeddings/--no-embeddings", help="Run the embedding (copy detection) stage."),
    verify: Optional[bool] = typer.Option(None, "--verify/--no-verify", help="Geometric verification of copy-role pairs between --verify-floor and the threshold (local features + RANSAC; needs OpenCV, the [verify] extra) [default: on with a copy role when OpenCV is installed]."),
    verify_floor: Optional[float] = typer.Option(None, "--verify-floor", help="Lowest copy-role cosine that geometric verification looks at [default: per copy model, retrieval.curation.dedup.VERIFY_FLOORS]."),
    report_dir: Path = typer.Option(Path("dedup-report"), "--report-dir", "-o", help="Where the reports are written."),
    apply: bool = typer.Option(False, "--apply", help="Move the files marked remove to --move-to and drop them from the index (default: dry run). For a remote or list source: write manifest.csv and a filtered kept.parquet instead."),
    move_to: Optional[Path] = typer.Option(None, "--move-to", help="Folder outside the corpus that removed files move to, keeping their relative paths."),
    force: bool = typer.Option(False, "--force", help="Recompute even when an identical run on the unchanged index exists."),
    run: Optional[int] = typer.Option(None, "--run", help="With --apply: apply this stored run (the id its report shows, with the keep/remove decisions reviewed in `retrieval serve`) instead of the run the other options select."),
    remove_list: Optional[Path] = typer.Option(None, "--remove-list", help="With --apply: move the files this list names (corpus-relative paths, one a line, e.g. an edited remove.txt) instead of a run's."),
    ray: Optional[str] = RayOpt,
    progress: Optional[bool] = ProgressOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Find exact, near-exact and embedding duplicates; write reports; optionally move the extra copies.

    Nothing is deleted, ever: --apply moves files to --move-to. Without --apply this is a dry run.
    Review a run in the web UI (`retrieval serve`, then Duplicates) or in its report, then apply
    exactly that run, with your decisions, with --apply --run ID; or edit remove.txt and apply it
    with --apply --remove-list FILE.

    Example:

        retrieval dedup --report-dir ./dedup && retrieval dedup --apply --run 1 --move-to ../removed
    """
    if move_to is not None and not apply:
        raise RetrievalError("--move-to only acts together with --apply (the default is a dry run)")
    if run is not None and not apply:
        raise RetrievalError("--run selects the stored run that --apply acts on; without --apply there is nothing to do")
    if remove_list is not None:
        if not apply:
            raise RetrievalError("--remove-list names the files --apply moves; without --apply there is nothing to do")
        if run is not None:
            raise RetrievalError("--remove-list and --run both say what to move; give one of them")
        assert move_to is not None
        with open_index(index_dir=index_dir, db_url=db) as index:
            listed = index.apply_remove_list(remove_list, move_to)
        n_listed = len(listed.moved) + len(listed.skipped)
        _print({"listed": n_listed, "moved": listed.moved, "skipped": listed.skipped, "move_to": listed.move_to},
               as_json, [f"moved {len(listed.moved)} of {_plural(n_listed, 'listed file')} to {listed.move_to}; "
                         f"skipped {len(listed.skipped)}"]
               + [f"  not moved: {x['path']} ({x['reason']})" for x in listed.skipped[:20]])
        return
    with open_index(index_dir=index_dir, db_url=db) as index:
        # A folder is changed in place (files move out); a remote, list or shard source never is:
        # --apply writes a manifest and a filtered list instead.
        in_place = index.source.writable
        if apply and move_to is None and in_place:
            raise RetrievalError("--apply needs --move-to DIR: removed files are moved there, never deleted")
        if move_to is not None and in_place:
            from retrieval.curation.apply import check_move_to

            check_move_to(index.corpus_root, move_to)
        result = index.dedup_run(run) if run is not None else index.dedup(
            threshold=threshold, k=k, phash_distance=phash_distance, pdq_distance=pdq_distance, role=role,
            keep=keep.value, max_group_diameter=max_group_diameter,
            against=against, embeddings=embeddings, progress=progress, force=force, ray=ray, verify=verify,
            verify_floor=verify_floor)
        files = index.write_report(result, report_dir, progress)
        applied = manifest = None
        if apply and run is None and not result.reused:
            raise RetrievalError(
                f"the index or the options changed since the last dedup report, so this computed a new run "
                f"{result.run_id} (report in {report_dir}); nothing was moved. Review it, then apply exactly "
                f"that run with --apply --run {result.run_id}")
        if apply and not in_place:
            manifest = index.write_dedup_manifest(result, report_dir)
            corpus_kind, corpus_name = index.source.kind, index.reader.corpus_name
        elif apply:
            assert move_to is not None
            applied = index.apply_dedup(result, move_to)
            from retrieval.curation.report import write_text_lines

            write_text_lines(report_dir / "moved.txt", applied.moved)
    s = result.summary
    lines = [
        f"dedup run {result.run_id}{' (reused: nothing changed)' if result.reused else ''}: "
        f"{s.get('images_in_groups', 0)} of {_plural(s.get('images', 0), 'image')} in {_plural(s.get('groups', 0), 'group')}; "
        f"{s.get('images_to_remove', 0)} to remove ({', '.join(f'{k}: {v}' for k, v in s.get('removed_by_reason', {}).items()) or 'none'})",
        f"reports: {report_dir.resolve()} (report.html, duplicates.json, duplicates.csv, remove.txt, keep.txt, and remove.nul, keep.nul: NUL-separated)",
    ]
    for warning in s.get("warnings", []):
        lines.append(f"warning: {warning['message']}")
    if result.reference_failures:
        lines.append(f"{_plural(len(result.reference_failures), 'reference file')} could not be used (listed in duplicates.json)")
    if manifest is not None:
        lines.append(f"the source ({corpus_kind}: {corpus_name}) is not changed in place: nothing "
                     f"moved; wrote {manifest.manifest} and the filtered list {manifest.kept_list} "
                     f"({manifest.kept} images kept, {manifest.removed} removed)"
                     + (f", shards {manifest.shard_list}" if manifest.shard_list else ""))
    elif applied is not None:
        lines.append(f"moved {_plural(len(applied.moved), 'file')} to {applied.move_to}; skipped {len(applied.skipped)}")
    else:
        lines.append("dry run: nothing moved (use --apply --move-to DIR)")
    data = {"run_id": result.run_id, "reused": result.reused, "summary": s, "report_dir": str(report_dir.resolve()),
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
    ray: Optional[str] = RayOpt,
    progress: Optional[bool] = ProgressOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Cluster all embeddings with spherical k-means; store image -> cluster and write a mosaic per cluster.

    Example:

        retrieval cluster -k 100 --report-dir ./clusters      (add --ray auto to assign on a Ray cluster)
    """
    with open_index(index_dir=index_dir, db_url=db) as index:
        outcome = index.cluster(k, niter=niter, seed=seed, force=force, progress=progress, ray=ray)
        page = index.write_report(outcome, report_dir, progress)["clusters.html"]
    sizes = outcome.sizes
    data = {"run_id": outcome.run_id, "k": outcome.k, "images": outcome.n_images, "reused": outcome.reused,
            "sizes": sizes, "report": str(page.resolve())}
    _print(data, as_json, [
        f"cluster run {outcome.run_id}{' (reused)' if outcome.reused else ''}: {_plural(outcome.n_images, 'image')} in "
        f"{_plural(outcome.k, 'cluster')} (sizes {min(sizes)}..{max(sizes)}, {sum(1 for x in sizes if x == 0)} empty)",
        f"report: {page.resolve()}"])


COMMANDS.append(cluster)


def curate(
    queries: str = typer.Option(..., "--queries", help="Query images (embedded, not indexed): a folder, URL prefix, list or shards."),
    mode: Mode = typer.Option("sample", "--mode", help="sample: k nearest per query; cluster: sample clusters holding > --min-queries queries."),
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
    ray: Optional[str] = RayOpt,
    progress: Optional[bool] = ProgressOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Curate the corpus from a query set: the images near the queries, with a manifest of how each got in.

    A rerun with the same options and query files on an unchanged index reuses the stored run.

    Example:

        retrieval curate --queries ./imagenet-val --mode sample -k 4      (add --ray auto to search on a Ray cluster)
    """
    with open_index(index_dir=index_dir, db_url=db) as index:
        outcome = index.curate(queries, mode=mode.value, k=k, per_cluster=per_cluster, min_queries=min_queries,
                               max_images=max_images, cluster_run=cluster_run, seed=seed, force=force,
                               progress=progress, ray=ray)
        files = index.write_report(outcome, report_dir, progress)
    c = outcome.counts
    lines = [f"curation run {outcome.run_id} ({mode.value}{', reused: nothing changed' if outcome.reused else ''}): "
             f"{_plural(c.get('unique_images', 0), 'image')} from {_plural(c['queries'], 'query', 'queries')} "
             f"({_plural(c['queries_failed'], 'query file')} failed)"]
    if mode.value == "sample":
        lines.append(f"{_plural(c['retrieved'], 'retrieval')}, {_plural(c['collisions'], 'collision')} "
                     f"({_plural(c['images_retrieved_more_than_once'], 'image')} retrieved by several queries)")
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
    role: str = typer.Option("search", "--role", help="Embedder role to calibrate (search, or copy when indexed)."),
    index_dir: Optional[Path] = IndexDirOpt,
    db: Optional[str] = DbOpt,
    progress: Optional[bool] = ProgressOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Measure precision/recall of duplicate detection per transform on your corpus; suggest a threshold.

    Example:

        retrieval calibrate --sample 200 --target-precision 0.99 -o calibration.json
    """
    from dataclasses import asdict

    from retrieval.curation.calibrate import format_table

    with open_index(index_dir=index_dir, db_url=db) as index:
        cal = index.calibrate(sample, target_precision, seed, transform, progress, role=role)
    data = asdict(cal)
    if output is not None:
        output.write_text(json.dumps(data, indent=1))
    _print(data, as_json, format_table(cal))


COMMANDS.append(calibrate)
