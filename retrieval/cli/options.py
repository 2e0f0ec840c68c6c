"""Options shared by the command groups, and the settings every command builds from them."""

from __future__ import annotations

from typing import Any

import typer

from retrieval.errors import RetrievalError

IndexDirOpt = typer.Option(None, "--index-dir", help="Index folder [default: ./retrieval-index, env RETRIEVAL_INDEX_DIR].")
DbOpt = typer.Option(None, "--db", help="SQLAlchemy URL of the metadata DB [default: SQLite in the index folder].")
ProgressOpt = typer.Option(None, "--progress/--no-progress", show_default=False,
                           help="Show progress bars [default: only when stderr is a terminal].")
JsonOpt = typer.Option(False, "--json", help="Print the summary as JSON.")


def open_index(**overrides: Any) -> Any:
    """The retrieval.Index the options name (opened lazily: commands that build one work too)."""
    from retrieval.index import Index

    return Index(settings(**overrides))


def settings(**overrides: Any) -> Any:
    """Settings from the environment, with the options the user passed on top (None means not passed)."""
    from pydantic import ValidationError

    from retrieval.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise RetrievalError(f"invalid --{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
RayOpt = typer.Option(None, "--ray", metavar="auto|local|ADDRESS",
                      help="Run on a Ray cluster: auto (the cluster this machine joined), local (a private "
                           "one-machine Ray), or an address [default: env RETRIEVAL_RAY_ADDRESS, else no Ray].")
