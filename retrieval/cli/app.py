"""The `retrieval` command line: each command parses options, calls one library function, prints.

Heavy libraries (torch, transformers, faiss) are imported inside the commands, so `--help` is fast.
Every RetrievalError becomes one line on stderr and exit code 1, here and nowhere else.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import click
import typer
from typer.core import TyperGroup

from retrieval.cli.options import DbOpt, IndexDirOpt, JsonOpt, ProgressOpt, RayOpt, open_index
from retrieval.cli.options import settings as _settings
from retrieval.errors import RetrievalError


class _Group(TyperGroup):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RetrievalError as exc:
            typer.echo(f"Error: {exc}", err=True)
            raise typer.Exit(1) from None
        except _database_errors() as exc:
            first = str(getattr(exc, "orig", exc)).splitlines()[0]
            typer.echo(f"Error: database error: {first}", err=True)
            raise typer.Exit(1) from None
        except MemoryError:
            typer.echo("Error: out of memory", err=True)
            raise typer.Exit(1) from None
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            typer.echo(f"Error: {exc.strerror or exc}{where}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("Interrupted. Run the same command again to resume where it stopped.", err=True)
            raise typer.Exit(130) from None


def _database_errors() -> tuple[type[BaseException], ...]:
    """SQLAlchemy's operational errors (locked, disk full, unreachable server), imported only if loaded."""
    sa_exc = sys.modules.get("sqlalchemy.exc")
    return (sa_exc.OperationalError,) if sa_exc is not None else ()


app = typer.Typer(
    cls=_Group,
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

def _print_version(value: bool) -> None:
    if value:
        from retrieval import __version__

        typer.echo(f"retrieval {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what happens (INFO level)."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Index images with DINOv2, search them, and curate the dataset.

    Example:

        retrieval index ./photos && retrieval search ./photos/cat.jpg -k 5
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def index(
    corpus: str = typer.Argument(..., help="Folder of images (searched recursively), fsspec URL prefix (s3://, gs://, az://, http(s)://, file://), .txt/.csv/.parquet list of paths or URLs, or WebDataset .tar shards (glob or {000..009} pattern).", show_default=False),
    index_dir: Optional[Path] = IndexDirOpt,
    db: Optional[str] = DbOpt,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Hub id, local save_pretrained folder, or cached hub id [default: facebook/dinov2-small, or the model the index was built with]."),
    copy_model: Optional[str] = typer.Option(None, "--copy-model", help="Copy-detection model for dedup (the `copy` role): sscd, sscd-int8, sscd-distilled, a .pt/.onnx file or a transformers model; added to an existing index by embedding only that role [env: RETRIEVAL_COPY_MODEL; default: the one the index has, else none]."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N [default: auto]."),
    precision: Optional[str] = typer.Option(None, help="auto, fp32, fp16, bf16 [default: auto: fp16/bf16 on GPU, fp32 on CPU]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", help="Images per forward pass [default: 32]."),
    workers: Optional[int] = typer.Option(None, "--workers", "-j", help="Decode worker processes; 0 decodes in the main process [default: from the CPU count]."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Reject images with more pixels (decompression bombs) [default: 89478485]."),
    decode_timeout: Optional[float] = typer.Option(None, "--decode-timeout", help="Seconds one file may take to decode before it is stopped and recorded as a timeout; 0 = no limit [default: 60]."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="RAM for the FAISS index, e.g. 2GB [default: 4GB]."),
    index_factory: Optional[str] = typer.Option(None, "--index-factory", help="FAISS factory string to use instead of the automatic choice, e.g. 'IVF1024,PQ32'; later runs keep it until 'auto'."),
    exact_threshold: Optional[int] = typer.Option(None, "--exact-threshold", help="Below this many images the index is exact [default: 50000]."),
    recall_target: Optional[float] = typer.Option(None, "--recall-target", help="recall@10 vs exact search that nprobe is tuned for [default: 0.95]."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Forget the existing index and embed everything again (after changing the model)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Try again files that failed before, even if unchanged."),
    progress: Optional[bool] = ProgressOpt,
    as_json: bool = JsonOpt,
    ray: Optional[str] = RayOpt,
) -> None:
    """Index a folder of images (or a bucket, a list, shards): embed new and changed files, drop deleted ones, update the FAISS index.

    Re-running is cheap (only changes are processed) and an interrupted run resumes where it stopped.
    Unreadable, corrupt, truncated and oversized files are recorded with a reason and skipped.

    Example:

        retrieval index ./photos --model ./models/dinov2-small

        retrieval index s3://bucket/photos   |   retrieval index 'shards/{000000..000009}.tar'   |   retrieval index urls.parquet

        retrieval index /shared/photos --ray auto      (decode and embed on a Ray cluster; the index stays here)
    """
    index = open_index(index_dir=index_dir, db_url=db, model=model, copy_model=copy_model, device=device, precision=precision,
                       batch_size=batch_size, workers=workers, max_pixels=max_pixels, memory_budget=memory_budget,
                       decode_timeout_s=decode_timeout, exact_threshold=exact_threshold,
                       recall_target=recall_target)
    summary = index.update(corpus, rebuild=rebuild, retry_failed=retry_failed, index_factory=index_factory,
                           progress=progress, ray=ray)
    if as_json:
        typer.echo(json.dumps(asdict(summary), indent=2))
        return
    from retrieval.report_text import format_index_summary

    typer.echo(format_index_summary(summary))


@app.command()
def search(
    image: str = typer.Argument(..., help="An image file (inside or outside the corpus), an image id, or a URI (s3://..., https://..., shard.tar#member).", show_default=False),
    k: int = typer.Option(10, "-k", help="Number of neighbours.", min=1, max=1000),
    index_dir: Optional[Path] = IndexDirOpt,
    db: Optional[str] = DbOpt,
    include_self: bool = typer.Option(False, "--include-self", help="Keep the query image in its own results."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON."),
) -> None:
    """Print the nearest indexed images with their cosine similarity.

    An image already in the index is answered from its stored vector; any other file is embedded.

    Example:

        retrieval search ./photos/cat.jpg -k 5
    """
    from retrieval.report_text import plural

    with open_index(index_dir=index_dir, db_url=db) as index:
        result = index.search(image, k, include_self=include_self)
        corpus_name = index.reader.corpus_name
    if as_json:
        typer.echo(json.dumps({"query": image, "answered_from": result.answered_from,
                               "results": [asdict(h) for h in result.hits]}, indent=2))
        return
    typer.echo(f"{plural(len(result.hits), 'nearest image')} to {image} ({result.answered_from}), corpus {corpus_name}:")
    for rank, hit in enumerate(result.hits, 1):
        typer.echo(f"{rank:>4}  {hit.score:.4f}  id={hit.id:<8} {hit.path}  ({hit.width}x{hit.height} {hit.format})")


@app.command()
def info(
    index_dir: Optional[Path] = IndexDirOpt,
    db: Optional[str] = DbOpt,
    failures: bool = typer.Option(False, "--failures", help="List every failed file with its reason."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Show what an index holds: corpus, model, counts, index type, last run, failures.

    Example:

        retrieval info --failures
    """
    from retrieval.report_text import format_info

    data = open_index(index_dir=index_dir, db_url=db).info(failures=failures)
    typer.echo(json.dumps(data, indent=2, default=str) if as_json else format_info(data))


@app.command()
def verify(
    index_dir: Optional[Path] = IndexDirOpt,
    db: Optional[str] = DbOpt,
    as_json: bool = typer.Option(False, "--json", help="Print {ok, checked, problems} as JSON."),
) -> None:
    """Check that the database, the vector file and the FAISS index agree (counts, ids, dims, model).

    Exits with code 1 and a list of problems when they do not.

    Example:

        retrieval verify --index-dir ./retrieval-index --json
    """
    report = open_index(index_dir=index_dir, db_url=db).verify()
    if as_json:
        typer.echo(json.dumps({"ok": report.ok, "checked": report.checked, "problems": report.problems}, indent=2))
        if not report.ok:
            raise typer.Exit(1)
        return
    for line in report.checked:
        typer.echo(f"ok       {line}")
    for line in report.problems:
        typer.echo(f"PROBLEM  {line}")
    if not report.ok:
        raise typer.Exit(1)
    typer.echo("index is consistent")


@app.command()
def serve(
    index_dir: Optional[Path] = IndexDirOpt,
    db: Optional[str] = DbOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 exposes the API to the network."),
    port: int = typer.Option(8000, "--port", "-p", help="TCP port.", min=0, max=65535),
    workers: int = typer.Option(1, "--workers", help="Server processes; each loads the model and the index.", min=1, max=64),
    log_level: str = typer.Option("info", "--log-level", help="critical, error, warning, info or debug."),
    allow_url_queries: bool = typer.Option(False, "--allow-url-queries", help="Accept GET /search?image=<http(s) URL> (off by default: the server would fetch URLs for clients)."),
) -> None:
    """Serve the index over HTTP (search by id, path or upload; images; duplicates; health and stats).

    Settings such as RETRIEVAL_API_KEY and RETRIEVAL_MAX_UPLOAD_BYTES come from the environment.
    A new `retrieval index` run on the same index is picked up without a restart.

    Example:

        retrieval serve --index-dir ./retrieval-index --port 8000
    """
    import os

    import uvicorn

    from retrieval.errors import IndexNotFoundError
    from retrieval.layout import IndexLayout

    settings = _settings(index_dir=index_dir, db_url=db)
    layout = IndexLayout(settings.index_dir)
    if settings.db_url is None and not layout.exists():
        raise IndexNotFoundError(f"no index in {layout.root.resolve()}; run `retrieval index CORPUS` first or pass --index-dir")
    # Every worker process builds its app from the environment, so pass the resolved choices on.
    os.environ["RETRIEVAL_INDEX_DIR"] = str(layout.root.resolve())
    if settings.db_url:
        os.environ["RETRIEVAL_DB_URL"] = settings.db_url
    if allow_url_queries:
        os.environ["RETRIEVAL_ALLOW_URL_QUERIES"] = "1"
    logging.getLogger("api").setLevel(log_level.upper())
    if not os.environ.get("RETRIEVAL_API_KEY") and not host.startswith(("127.", "localhost", "::1")):
        typer.echo(f"note: listening on {host} without RETRIEVAL_API_KEY: the API is open to the network and "
                   "review decisions cannot be changed (set RETRIEVAL_API_KEY)", err=True)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    typer.echo(f"retrieval: open http://{shown}:{port}/ in a browser (API docs at /docs)", err=True)
    uvicorn.run("retrieval.api.app:create_app", factory=True, host=host, port=port, workers=workers, log_level=log_level)


@app.command()
def export(
    output: Path = typer.Option(Path("retrieval-export"), "--output", "-o", help="Folder the files are written to."),
    index_dir: Optional[Path] = IndexDirOpt,
    db: Optional[str] = DbOpt,
    parquet: bool = typer.Option(True, "--parquet/--no-parquet", help="Write images.parquet (needs pyarrow)."),
    npy: bool = typer.Option(True, "--npy/--no-npy", help="Write embeddings_<role>.npy and ids.npy."),
    batch_size: int = typer.Option(10_000, "--batch-size", "-b", min=1, help="Images per written batch (memory bound)."),
    progress: Optional[bool] = ProgressOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Export the dataset: images.parquet (one row per image with its embeddings, hashes, latest dedup
    group and action, cluster) and .npy embeddings that pandas, polars, Hugging Face datasets,
    LanceDB and numpy load as they are.

    Example:

        retrieval export -o ./dataset --batch-size 50000
    """
    from retrieval.report_text import plural

    with open_index(index_dir=index_dir, db_url=db) as index:
        result = index.export(output, parquet=parquet, npy=npy, batch_size=batch_size, progress=progress)
    files = [p for p in (result.parquet, *result.npy.values(), result.ids) if p is not None]
    if as_json:
        typer.echo(json.dumps({"rows": result.rows, "dedup_run": result.dedup_run, "cluster_run": result.cluster_run,
                               "files": [str(p.resolve()) for p in files]}, indent=2))
        return
    runs = ", ".join(f"{what} run {run}" for what, run in (("dedup", result.dedup_run), ("cluster", result.cluster_run))
                     if run is not None)
    typer.echo(f"exported {plural(result.rows, 'image')}" + (f" (with {runs})" if runs else "") + ":")
    for path in files:
        typer.echo(f"  {path.resolve()}")


from retrieval.cli.curation import register as _register_curation  # noqa: E402 - light: imports lazily

_register_curation(app)


def run() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(app())
