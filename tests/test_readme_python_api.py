"""The README's Python API example (and the readers example of docs/export.md) run as written, on a tiny model."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import make_corpus

ROOT = Path(__file__).resolve().parent.parent


def readme_block(heading: str, page: str = "README.md") -> str:
    """The first ```python block after `heading` in README.md (or another page, e.g. docs/export.md)."""
    text = "\n" + (ROOT / page).read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n")
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match, f"no python block after {heading}"
    return match.group(1)


def test_the_python_api_example_runs(tmp_path: Path, tiny_model_dir: Path) -> None:
    code = readme_block("## Python API")
    assert "facebook/dinov2-small" in code, "the example uses the default model"
    corpus = tmp_path / "my-photos"
    make_corpus(corpus, 24)
    shutil.copy(corpus / "a" / "img0001.jpg", corpus / "cat.jpg")
    code = code.replace("facebook/dinov2-small", str(tiny_model_dir))
    # workers=0: no decode processes on the shared test machine (same results, see the pipeline tests)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "RETRIEVAL_WORKERS": "0", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert "25 images indexed" in out.stdout
    assert (tmp_path / "dedup-report" / "report.html").exists()
    assert (tmp_path / "my-dataset" / "images.parquet").exists()


def test_the_export_readers_example_runs(tmp_path: Path, tiny_model_dir: Path) -> None:
    import retrieval

    make_corpus(tmp_path / "photos", 6)
    index = retrieval.Index.create(tmp_path / "idx", model=str(tiny_model_dir), workers=0)
    index.update(tmp_path / "photos", progress=False)
    index.export(tmp_path / "my-dataset", progress=False)
    index.close()
    namespace: dict = {}
    exec(compile(readme_block("# Export", "docs/export.md"), "docs/export.md", "exec"), namespace)  # noqa: S102 - our own docs
    assert len(namespace["frame"]) == 6 and namespace["vectors"].shape == (6, 32)
