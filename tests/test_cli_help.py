"""Every command has help with an example, and `retrieval --help` starts without torch or faiss."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from retrieval.cli.app import app

runner = CliRunner()
COMMANDS = sorted(app.registered_commands, key=lambda c: c.name or c.callback.__name__)


def test_top_level_help_has_an_example() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output


@pytest.mark.parametrize("command", [c.name or c.callback.__name__ for c in COMMANDS])
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output, f"`retrieval {command} --help` lacks an example"
    assert f"retrieval {command}" in result.output


def test_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys; from typer.testing import CliRunner; from retrieval.cli.app import app; "
        "r = CliRunner().invoke(app, ['index', '--help']); assert r.exit_code == 0; "
        "heavy = [m for m in ('torch', 'faiss', 'transformers', 'numpy') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"--help imported {out.stdout.strip()}"
