"""Shared helpers for tests: run the CLI as a user would, and write small phase specs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TINY_SETTINGS = """
[settings]
seq_len = 32
batch_size = 4
steps = {steps}
matrix_lr = 0.02
adam_lr = 0.008
val_tokens = 2048
evals = 2
"""


def tiny_phase(path: Path, steps: int = 12, bits=("fp16", "int6"), warmdown=(0.1, 0.5), seeds=(0,)) -> Path:
    """Write a phase spec of tiny cells that train in about a second each."""
    factors = (
        f"bits = {list(bits)!r}\nwarmdown = {list(warmdown)!r}\n"
        f'size = ["tiny1"]\nseed = {list(seeds)!r}\n'
    ).replace("'", '"')
    path.write_text(TINY_SETTINGS.format(steps=steps) + '\n[[block]]\nname = "main"\n[block.factors]\n' + factors)
    return path


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `python -m pipeline ARGS` in a subprocess and return the completed process."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
