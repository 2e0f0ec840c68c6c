"""Shared benchmark plumbing: environment facts, JSON results, a ViT-S/14-shaped model."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def environment() -> dict[str, Any]:
    import faiss
    import numpy
    import PIL
    import torch
    import transformers

    try:
        if os.environ.get("BENCH_COMMIT"):  # a copy of the tree whose .git is not the source's (a lent GPU machine)
            raise OSError
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
        # Code that differs from the commit (results are not ignored: a fresh result file is expected)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results", ":(exclude)README.md", ":(exclude)docs"],
                               capture_output=True, text=True, cwd=Path(__file__).parent.parent, check=True).stdout
        if dirty.strip():
            commit += "-dirty"
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("BENCH_COMMIT") or "unknown"
    return {
        "commit": commit,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "transformers": transformers.__version__,
        "faiss": faiss.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def save_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "env": environment(), **data}
    path.write_text(json.dumps(data, indent=2))
    return path


# DINOv2 shapes (hidden size, heads, MLP size); 12 layers, patch 14 each.
SHAPES = {"vits14": (384, 6, 1536), "vitb14": (768, 12, 3072),
          # one layer, 32 wide: the search role's placeholder where only the copy role is measured
          "tiny": (32, 2, 64)}


def dinov2_dir(root: Path, shape: str = "vits14") -> Path:
    """A DINOv2-shaped checkpoint (ViT-S/14 or ViT-B/14) with random weights (speed only: no semantics)."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    hidden, heads, mlp = SHAPES[shape]
    path = root / f"dinov2-{shape}-random"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        config = Dinov2Config(hidden_size=hidden, num_hidden_layers=1 if shape == "tiny" else 12, num_attention_heads=heads,
                              intermediate_size=mlp, patch_size=14, image_size=518)
        Dinov2Model(config).save_pretrained(path)
        BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
                          image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return path


def vit_s14_dir(root: Path) -> Path:
    """A DINOv2 ViT-S/14-shaped checkpoint with random weights (speed only: no semantics)."""
    return dinov2_dir(root, "vits14")
