"""Small things users hit: --version, shell completion, verify --json, choices in --help, plurals,
progress bars only on a terminal, clipped scores, the default output folders ignored by git."""

from __future__ import annotations

import io
import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import retrieval
from retrieval.cli.app import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def test_version_matches_the_installed_distribution() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"retrieval {retrieval.__version__}" == f"retrieval {version('retrieval')}"


def test_shell_completion_is_offered() -> None:
    assert "--install-completion" in runner.invoke(app, ["--help"]).output
    result = runner.invoke(app, ["--show-completion", "bash"], prog_name="retrieval")
    assert result.exit_code == 0, result.output
    assert "_RETRIEVAL_COMPLETE" in result.output


@pytest.mark.parametrize(("command", "choices"), [
    ("dedup", "highest-resolution|largest|oldest|shortest-path|first"),
    ("curate", "sample|cluster"),
])
def test_choices_are_listed_in_help_and_enforced(command: str, choices: str) -> None:
    assert choices in runner.invoke(app, [command, "--help"], terminal_width=200).output
    option = "--keep" if command == "dedup" else "--mode"
    result = runner.invoke(app, [command, option, "nonsense", "--queries", "."] if command == "curate"
                           else [command, option, "nonsense"])
    assert result.exit_code == 2 and "nonsense" in result.output


def test_progress_bars_only_when_stderr_is_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from retrieval.index import show_progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert show_progress(None) is False and show_progress(True) is True
    monkeypatch.setattr("sys.stderr", Tty())
    assert show_progress(None) is True and show_progress(False) is False


def test_plurals() -> None:
    from retrieval.report_text import plural

    assert [plural(1, "group"), plural(2, "group"), plural(0, "image"), plural(1, "query", "queries"),
            plural(3, "query", "queries"), plural(1200, "image")] == [
        "1 group", "2 groups", "0 images", "1 query", "3 queries", "1,200 images"]


def test_scores_are_clipped_but_no_candidate_stays_minus_infinity() -> None:
    from retrieval.vectors import clip_cosine

    got = clip_cosine(np.array([1.0004, 0.5, -1.0002, -np.inf], np.float32))
    assert got.dtype == np.float32 and got.tolist() == [1.0, 0.5, -1.0, -np.inf]
    assert clip_cosine(1.0002) == 1.0


def test_default_output_folders_are_ignored_by_git() -> None:
    ignored = (ROOT / ".gitignore").read_text().split()
    for folder in ("retrieval-index/", "dedup-report/", "cluster-report/", "curation-report/", "retrieval-export/"):
        assert folder in ignored


def test_verify_json(corpus: Path, tiny_model_dir: Path) -> None:
    built = runner.invoke(app, ["index", str(corpus), "--model", str(tiny_model_dir), "-j", "0", "--json"])
    assert built.exit_code == 0, built.output
    result = runner.invoke(app, ["verify", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["ok"] is True and data["problems"] == [] and data["checked"]
    Path("retrieval-index/index.faiss").unlink()
    result = runner.invoke(app, ["verify", "--json"])
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["ok"] is False and "missing" in data["problems"][0]


def test_one_cluster_is_singular(corpus: Path, tiny_model_dir: Path) -> None:
    assert runner.invoke(app, ["index", str(corpus), "--model", str(tiny_model_dir), "-j", "0"]).exit_code == 0
    result = runner.invoke(app, ["cluster", "-k", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "24 images in 1 cluster (" in result.output
