"""Provenance recorded at the start of every run: where, with what, by which job."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from pathlib import Path

import torch

_REPO = Path(__file__).resolve().parent.parent

# SLURM variables worth keeping with a result; empty strings when not under SLURM.
SLURM_VARIABLES = {
    "slurm_job_id": "SLURM_JOB_ID",
    "slurm_array_job_id": "SLURM_ARRAY_JOB_ID",
    "slurm_array_task_id": "SLURM_ARRAY_TASK_ID",
    "slurm_restart_count": "SLURM_RESTART_COUNT",
    "slurm_node": "SLURMD_NODENAME",
    "slurm_partition": "SLURM_JOB_PARTITION",
}


def git_commit() -> str:
    """Return the commit of the code that runs, with '+dirty' for local edits, or ''."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(_REPO), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(_REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("+dirty" if dirty else "")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def collect(device: torch.device) -> dict[str, str]:
    """Return host, software versions, device, git commit and SLURM ids as strings."""
    import numpy

    info = {
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch_version": torch.__version__,
        "numpy_version": numpy.__version__,
        "device": describe_device(device),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "git_commit": git_commit(),
    }
    for key, variable in SLURM_VARIABLES.items():
        info[key] = os.environ.get(variable, "")
    return info
