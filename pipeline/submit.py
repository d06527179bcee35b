"""Dispatch cells through submitit: SLURM array jobs, or local processes.

A task is a list of cells run one after another on one allocation. Each task
is one element of an array job, so a whole phase goes out in one `sbatch` call.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from jobs.run import CellTask, RunOptions
from pipeline import ledger
from pipeline.cell import Cell
from pipeline.errors import UsageError
from pipeline.workdir import Workdir

log = logging.getLogger(__name__)

CLUSTERS = ("auto", "slurm", "local", "debug")
LOCAL_TIMEOUT_MIN = 7 * 24 * 60


@dataclass
class Submission:
    """What one `submit` call sent: the jobs, their cells and where they log."""

    cluster: str
    log_folder: Path
    jobs: list[Any] = field(default_factory=list)  # submitit.Job objects
    tasks: list[list[Cell]] = field(default_factory=list)

    @property
    def cell_count(self) -> int:
        return sum(len(task) for task in self.tasks)


def resolve_cluster(cluster: str) -> str:
    if cluster not in CLUSTERS:
        raise UsageError(f"invalid --cluster {cluster!r}; expected one of {', '.join(CLUSTERS)}")
    if cluster == "auto":
        if shutil.which("sbatch") and slurm_answers():
            return "slurm"
        if shutil.which("sbatch"):
            log.warning("sbatch is on PATH but the SLURM controller does not answer; running locally")
        return "local"
    if cluster == "slurm" and not shutil.which("sbatch"):
        raise UsageError("--cluster slurm needs `sbatch` on PATH; run on a SLURM login node or use --cluster local")
    return cluster


def slurm_answers(timeout_s: float = 15.0) -> bool:
    """Return whether a SLURM controller answers `sinfo` within `timeout_s`."""
    try:
        result = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def unfinished(workdir: Workdir, cells: list[Cell] | tuple[Cell, ...]) -> list[Cell]:
    """Return the cells without a complete result file."""
    return [cell for cell in cells if not workdir.result(cell.phase, cell.cell_id).exists()]


def pack(cells: list[Cell], cells_per_task: int) -> list[list[Cell]]:
    """Split cells into tasks of at most `cells_per_task` cells, keeping their order."""
    if cells_per_task < 1:
        raise UsageError(f"invalid --cells-per-task {cells_per_task}; expected a whole number >= 1")
    return [cells[i : i + cells_per_task] for i in range(0, len(cells), cells_per_task)]


def make_executor(
    cluster: str, folder: Path, slurm_parameters: dict[str, Any] | None = None
) -> submitit.Executor:
    """Build the submitit executor for `cluster` with its parameters."""
    if cluster == "slurm":
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        executor.update_parameters(**(slurm_parameters or {}))
        return executor
    if cluster == "local":
        executor = submitit.AutoExecutor(folder=folder, cluster="local")
        # submitit's local default is a few minutes, after which it sends USR2.
        executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
        return executor
    return submitit.AutoExecutor(folder=folder, cluster="debug")


def default_slurm_parameters(phase: str, max_parallel: int | None) -> dict[str, Any]:
    parameters: dict[str, Any] = {
        "name": f"qat-{phase}",
        "timeout_min": 60,
        "cpus_per_task": 1,
        "slurm_signal_delay_s": 90,  # USR2 this long before the time limit: time to checkpoint
    }
    if max_parallel:
        parameters["slurm_array_parallelism"] = max_parallel
    return parameters


def submit(
    workdir: Workdir,
    cells: list[Cell],
    cluster: str,
    options: RunOptions,
    cells_per_task: int | None = None,
    max_parallel: int | None = None,
) -> Submission:
    """Submit `cells` (already filtered to unfinished ones) as one array job.

    Locally, cells are packed into one task per CPU, because submitit's local
    executor starts every task at once.
    """
    phase = cells[0].phase if cells else "none"
    log_folder = workdir.logs(phase) / "%j"
    submission = Submission(cluster=cluster, log_folder=log_folder)
    if not cells:
        return submission
    if cells_per_task is None:
        cpus = os.cpu_count() or 1
        cells_per_task = 1 if cluster == "slurm" else -(-len(cells) // cpus)
    tasks = pack(cells, cells_per_task)
    if cluster == "local":
        # Each local task gets an equal share of the CPUs instead of all of them.
        os.environ["QAT_CPUS_PER_TASK"] = str(max(1, (os.cpu_count() or 1) // len(tasks)))
    executor = make_executor(cluster, log_folder, default_slurm_parameters(phase, max_parallel))
    function = CellTask(options)
    previous = ledger.latest(ledger.read(ledger.path_for(workdir.results(phase))))
    jobs = executor.map_array(function, tasks)
    entries = []
    for job, task in zip(jobs, tasks):
        entries += ledger.new_entries(
            [c.cell_id for c in task], str(job.job_id), cluster, str(log_folder), previous
        )
    ledger.append(ledger.path_for(workdir.results(phase)), entries)
    submission.jobs, submission.tasks = list(jobs), tasks
    return submission


def wait(workdir: Workdir, submission: Submission, poll_s: float = 2.0) -> list[str]:
    """Block until every job ends, with a progress bar of finished cells.

    Returns one error line per failed job, with its log paths.
    """
    from tqdm import tqdm

    cells = [cell for task in submission.tasks for cell in task]
    if submission.cluster == "debug":
        for job in submission.jobs:
            try:
                job.result()
            except Exception:  # reported below with the job's error
                pass
    with tqdm(total=len(cells), unit="cell", desc="cells done", dynamic_ncols=True) as bar:
        while True:
            done = sum(workdir.result(c.phase, c.cell_id).exists() for c in cells)
            bar.update(done - bar.n)
            if all(job.done() for job in submission.jobs):
                done = sum(workdir.result(c.phase, c.cell_id).exists() for c in cells)
                bar.update(done - bar.n)
                break
            time.sleep(poll_s)
    errors = []
    for job, task in zip(submission.jobs, submission.tasks):
        exception = job.exception()
        if exception is not None:
            errors.append(
                f"job {job.job_id} (cells {', '.join(c.cell_id for c in task)}) failed: "
                f"{error_line(exception)}; log: {job.paths.stderr}"
            )
    return errors


def error_line(exception: BaseException) -> str:
    """Return the line naming the original error inside a submitit failure message."""
    lines = [line.strip() for line in str(exception).splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b", line):
            return line
    return lines[0] if lines else repr(exception)
