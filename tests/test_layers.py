"""The house's arrows: the core never imports the indexer or the API (the CLI adapter aside), no
module imports itself back through others, and only `retrieval` is importable after install.

The core is every module under retrieval/ except retrieval/cli/. It may not import retrieval.indexer,
retrieval.api or retrieval.cli, at the top or inside a function, nor name them in a dynamic import.
`retrieval.Index.update` still runs the indexer: the indexer registers its update function in the
package metadata (entry-point group `retrieval.updaters` in pyproject.toml) and the core looks it up
by name, so the dependency points from the indexer to the core, never back.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Where each installed package lives in the repository (pyproject's package-dir mapping).
PACKAGES = {"retrieval": ROOT / "retrieval", "retrieval.indexer": ROOT / "indexer",
            "retrieval.api": ROOT / "api", "retrieval.migrations": ROOT / "migrations"}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every project module this one imports, at the top or inside a function."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


GRAPH = {m: _imports(m, p, set(_modules())) for m, p in _modules().items()}


def _is_core(module: str) -> bool:
    top = module.split(".")[:2]
    return module == "retrieval" or (top[0] == "retrieval" and top[1] not in {"indexer", "api", "migrations", "cli"})


def test_the_core_never_imports_the_indexer_or_the_api() -> None:
    bad = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if _is_core(m)
                 for t in targets if t.startswith(("retrieval.indexer", "retrieval.api", "retrieval.cli")))
    assert bad == []


def test_the_core_names_no_adapter_in_a_dynamic_import() -> None:
    """importlib.import_module("retrieval.indexer...") would dodge the import graph above."""
    adapters = ("retrieval.indexer", "retrieval.api", "retrieval.cli")
    bad = []
    for module, path in _modules().items():
        if not _is_core(module):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__"):
                bad += [f"{module}: {a.value}" for a in node.args
                        if isinstance(a, ast.Constant) and str(a.value).startswith(adapters)]
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(adapters) \
                    and " " not in node.value:
                bad.append(f"{module}: {node.value!r}")
    assert bad == []


def test_the_indexer_is_reached_through_its_entry_point() -> None:
    from importlib.metadata import entry_points

    (updater,) = [ep for ep in entry_points(group="retrieval.updaters") if ep.name == "local"]
    assert updater.value.startswith("retrieval.indexer.")


def test_the_indexer_and_the_api_do_not_import_each_other_or_the_cli() -> None:
    bad = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets
                 if (m.startswith("retrieval.indexer") and t.startswith(("retrieval.api", "retrieval.cli")))
                 or (m.startswith("retrieval.api") and t.startswith(("retrieval.indexer", "retrieval.cli"))))
    assert bad == []


def _cycle() -> list[str] | None:
    """A cycle among module imports, ignoring a package's imports of its own submodules' names."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(GRAPH.get(m, ())):
            if m.startswith(t + "."):  # a submodule importing its own package's __init__
                continue
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle() -> None:
    assert _cycle() is None


def test_the_cycle_check_can_fail() -> None:
    assert "retrieval.errors" in GRAPH["retrieval.imaging.scan"]
    GRAPH["retrieval.errors"].add("retrieval.imaging.scan")
    try:
        assert _cycle() is not None
    finally:
        GRAPH["retrieval.errors"].discard("retrieval.imaging.scan")


@pytest.mark.parametrize("name", ["api", "indexer", "migrations"])
def test_only_retrieval_is_importable_at_top_level(name: str, tmp_path: Path) -> None:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is not None)"
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path).returncode == 0
    code = f"import retrieval.{name}"
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path).returncode == 0
