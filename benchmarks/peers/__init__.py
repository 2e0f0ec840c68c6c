"""Peer tools (autofaiss, imagededup, cleanvision) in their own virtualenvs, never in the project's.

Each peer has a requirements file here; `ensure_env(name)` creates `.bench-envs/<name>/` on first use
(or when its requirements file changed) and returns that environment's python. Peer code then runs
as a subprocess of that python (`run_json`), so its pins (numpy 1.x, an old faiss, torchvision)
never meet the project's.

Usage: python -m benchmarks.peers [NAME ...]   # set up environments ahead of a benchmark run
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
REPO = HERE.parent.parent
ENVS = REPO / ".bench-envs"


class PeerUnavailable(RuntimeError):
    """A peer environment could not be set up or its run failed: the benchmark records why and goes on."""


def requirement_files() -> dict[str, Path]:
    return {p.name.removesuffix("-requirements.txt"): p for p in sorted(HERE.glob("*-requirements.txt"))}


def ensure_env(name: str) -> Path:
    """The python of the peer environment `name`, installed from `<name>-requirements.txt` if needed."""
    req = requirement_files().get(name)
    if req is None:
        raise PeerUnavailable(f"no requirements file for peer {name!r} in {HERE}")
    env = ENVS / name
    python = env / "bin" / "python"
    stamp = env / ".requirements.sha256"
    digest = hashlib.sha256(req.read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text() == digest:
        return python
    print(f"setting up peer environment {env} from {req.name} (one time)", flush=True)
    t = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-r", str(req)], check=True)
    except subprocess.CalledProcessError as exc:
        raise PeerUnavailable(f"installing {req.name} failed: {exc}") from exc
    stamp.write_text(digest)
    print(f"peer environment {name} ready in {time.perf_counter() - t:.0f} s", flush=True)
    return python


def run_json(name: str, script: Path, args: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Run `script` with the peer's python; its last stdout line is a JSON object, returned here.

    The peer's resource use is its own process's (peak RSS from its own getrusage), so it never
    mixes with ours.
    """
    python = ensure_env(name)
    try:
        proc = subprocess.run([str(python), str(script), *args], capture_output=True, text=True, timeout=timeout, check=False,
                              cwd=REPO)
    except subprocess.TimeoutExpired as exc:
        raise PeerUnavailable(f"{name}: {script.name} did not finish in {timeout:.0f} s") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise PeerUnavailable(f"{name}: {script.name} exited {proc.returncode}: {' | '.join(tail)}")
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        raise PeerUnavailable(f"{name}: {script.name} printed no JSON result")
    return json.loads(lines[-1])


def main() -> int:
    names = sys.argv[1:] or list(requirement_files())
    failed = 0
    for name in names:
        try:
            print(f"{name}: {ensure_env(name)}")
        except PeerUnavailable as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0
