"""Dispatch cells through submitit: SLURM array jobs, or local processes.

A task is a list of cells run one after another on one allocation. On SLURM
the tasks of one size go out as array jobs of at most MaxArraySize tasks each
(submitit's `map_array` submits one array whatever its length, so the split
happens here). Every cell that `sbatch` accepted gets a ledger entry right
after its array is accepted, and only then.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import submitit

from jobs.run import CellTask, RunOptions
from pipeline import ledger
from pipeline.cell import Cell
from pipeline.errors import UsageError
from pipeline.profile import Profile
from pipeline.workdir import Workdir

log = logging.getLogger(__name__)

CLUSTERS = ("auto", "slurm", "local", "debug")
LOCAL_TIMEOUT_MIN = 7 * 24 * 60
# SLURM's own default MaxArraySize, assumed when `scontrol` cannot tell.
DEFAULT_MAX_ARRAY_SIZE = 1001
# Substrings (lower case) of sbatch errors that a retry cannot fix: a bad
# partition, account, QOS or array specification, or a policy limit.
PERMANENT_SBATCH_ERRORS = ("invalid", "unrecognized", "not available", "violates", "not allowed")


@dataclass(frozen=True)
class Retry:
    """Retry policy for a failed `sbatch`: the number of attempts and the first delay.

    Attempt n + 1 waits `backoff_s * 2 ** (n - 1)` seconds: 2, 4, 8, 16 s by
    default, about half a minute in all. That is meant to outlast a burst of
    socket time-outs on a busy controller, not a long outage.
    """

    attempts: int = 5
    backoff_s: float = 2.0


@dataclass
class Chunk:
    """One array job: tasks whose cells share a size, at most MaxArraySize of them."""

    size: str
    tasks: list[list[Cell]]
    time_min: int  # the array's time limit: the longest task's cells, one after another

    @property
    def cell_count(self) -> int:
        return sum(len(task) for task in self.tasks)


@dataclass
class Submission:
    """Record of one `submit` call: the jobs, their cells, the log folder and the rejected arrays."""

    cluster: str
    log_folder: Path
    jobs: list[Any] = field(default_factory=list)  # submitit.Job objects
    tasks: list[list[Cell]] = field(default_factory=list)
    chunks: list[Chunk] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one line per array sbatch did not accept

    @property
    def cell_count(self) -> int:
        return sum(len(task) for task in self.tasks)


class SbatchError(RuntimeError):
    """`sbatch` rejected an array, after any retries.

    `message` is sbatch's own error text; `permanent` is True when a retry
    cannot fix it (an invalid partition or account, say).
    """

    def __init__(self, text: str, message: str = "", permanent: bool = False) -> None:
        super().__init__(text)
        self.message = message or text
        self.permanent = permanent


def resolve_cluster(cluster: str) -> str:
    if cluster not in CLUSTERS:
        raise UsageError(f"invalid --cluster {cluster!r}; expected one of {', '.join(CLUSTERS)}")
    if cluster == "auto":
        if shutil.which("sbatch") and slurm_answers():
            return "slurm"
        if shutil.which("sbatch"):
            log.warning("sbatch is on PATH but the SLURM controller does not respond to sinfo; running locally (use --cluster slurm to insist)")
        return "local"
    if cluster == "slurm" and not shutil.which("sbatch"):
        raise UsageError("--cluster slurm needs `sbatch` on PATH; run on a SLURM login node or use --cluster local")
    return cluster


def slurm_answers(timeout_s: float = 15.0) -> bool:
    """Return whether `sinfo` succeeds within `timeout_s`, that is, whether a SLURM controller responds."""
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


# ---------------------------------------------------------------------- planning


def max_array_size(runner: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> tuple[int, str]:
    """Return (MaxArraySize, where it came from) from one `scontrol show config` call.

    Array indices run from 0 to MaxArraySize - 1, so an array has at most
    MaxArraySize tasks. When scontrol fails, SLURM's default is assumed.
    """
    try:
        result = runner(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return DEFAULT_MAX_ARRAY_SIZE, f"scontrol failed ({err}); assuming SLURM's default"
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)\s*$", result.stdout or "", flags=re.MULTILINE)
    if result.returncode != 0 or match is None:
        problem = (result.stderr or "").strip().splitlines()[:1] or ["no MaxArraySize line"]
        return DEFAULT_MAX_ARRAY_SIZE, f"scontrol show config failed ({problem[0]}); assuming SLURM's default"
    return int(match.group(1)), "from scontrol show config"


def plan(
    cells: list[Cell],
    cells_per_task: int,
    profile: Profile | None = None,
    array_limit: int = DEFAULT_MAX_ARRAY_SIZE,
) -> list[Chunk]:
    """Group cells by size, pack them into tasks, and split the tasks into arrays.

    Each size gets its own arrays because the time limit depends on the size.
    An array gets at most `array_limit` tasks (MaxArraySize). A limit of 0
    means arrays are disabled, so every task becomes a job of its own.
    """
    profile = profile or Profile()
    per_array = max(1, array_limit)
    by_size: dict[str, list[Cell]] = {}
    for cell in cells:
        by_size.setdefault(cell.size, []).append(cell)
    chunks = []
    for size, sized in by_size.items():
        tasks = pack(sized, cells_per_task)
        for start in range(0, len(tasks), per_array):
            part = tasks[start : start + per_array]
            longest = max(len(task) for task in part)
            chunks.append(Chunk(size=size, tasks=part, time_min=profile.time_limit(size) * longest))
    return chunks


def job_name(phase: str) -> str:
    """Return the SLURM job name of a phase, with anything but [A-Za-z0-9_.-] replaced by '_'."""
    return "qat-" + re.sub(r"[^A-Za-z0-9_.\-]", "_", phase)


def _mem(mem_gb: float) -> str:
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"


def sbatch_parameters(
    phase: str,
    chunk: Chunk,
    profile: Profile | None = None,
    max_parallel: int | None = None,
    dependency: str | None = None,
) -> dict[str, Any]:
    """Return the parameters of submitit's SlurmExecutor for one array.

    Every value reaches the job script as a quoted `#SBATCH` option, except
    the profile's setup lines, which are shell. `dependency` (such as
    "afterany:123") joins any dependency the profile sets.
    """
    profile = profile or Profile()
    parameters: dict[str, Any] = {
        "job_name": job_name(phase),
        "time": chunk.time_min,
        "cpus_per_task": profile.cpus_per_task,
        # USR2 this long before the time limit: time to checkpoint and requeue.
        "signal_delay_s": profile.signal_delay_s,
        # submitit's default limits an array to 256 running tasks; without
        # --max-parallel, every task of the array may run at once.
        "array_parallelism": max_parallel or len(chunk.tasks),
    }
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(profile, key)
        if value is not None:
            parameters[key] = value
    if profile.gpus_per_task:
        parameters["gpus_per_task"] = profile.gpus_per_task
    if profile.mem_gb is not None:
        parameters["mem"] = _mem(profile.mem_gb)
    if profile.setup:
        parameters["setup"] = list(profile.setup)
    extra: dict[str, Any] = dict(profile.sbatch)
    if dependency:
        extra["dependency"] = f"{extra['dependency']},{dependency}" if "dependency" in extra else dependency
    if extra:
        parameters["additional_parameters"] = extra
    return parameters


def submitit_command(folder: Path) -> str:
    """Return the command line submitit's SlurmExecutor puts in the job script.

    NOTE: this mirrors `SlurmExecutor._submitit_command_str` of submitit 1.5.4,
    because that executor cannot be built without `srun` on PATH. The SLURM
    tests compare the rendered script with the one submitit writes.
    """
    return " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def render_sbatch(folder: Path, parameters: dict[str, Any], task_count: int) -> str:
    """Return the job script that submitit would submit for an array of `task_count` tasks."""
    from submitit.slurm.slurm import _make_sbatch_string

    # submitit sends a single task as a plain job, without --array.
    map_count = task_count if task_count > 1 else None
    return _make_sbatch_string(command=submitit_command(folder), folder=folder, map_count=map_count, **parameters)


# ---------------------------------------------------------------------- submission


def make_executor(
    cluster: str, folder: Path, slurm_parameters: dict[str, Any] | None = None
) -> submitit.Executor:
    """Build the submitit executor for `cluster` with its parameters."""
    if cluster == "slurm":
        executor = submitit.SlurmExecutor(folder=folder)
        executor.update_parameters(**(slurm_parameters or {}))
        return executor
    if cluster == "local":
        executor = submitit.AutoExecutor(folder=folder, cluster="local")
        # submitit's local default is a few minutes, after which it sends USR2.
        executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
        return executor
    return submitit.AutoExecutor(folder=folder, cluster="debug")


def submit(
    workdir: Workdir,
    cells: list[Cell],
    cluster: str,
    options: RunOptions,
    cells_per_task: int | None = None,
    max_parallel: int | None = None,
    profile: Profile | None = None,
    retry: Retry = Retry(),
) -> Submission:
    """Submit `cells` (already filtered to unfinished ones) and record each in the ledger.

    On SLURM, arrays go out one after another. An array that sbatch rejects
    (after retries) stops the submission and is listed in `errors`. Its cells
    and those of later arrays get no ledger entry, so `resubmit` sends them.
    With `max_parallel` and several arrays, each array waits for the one
    before (`--dependency=afterany`), so no more than `max_parallel` tasks run
    at once in all. Locally, cells are packed into one task per CPU, because
    submitit's local executor starts every task at once.
    """
    phase = cells[0].phase if cells else "none"
    log_folder = workdir.logs(phase) / "%j"
    submission = Submission(cluster=cluster, log_folder=log_folder)
    if not cells:
        return submission
    ledger_path = ledger.path_for(workdir.results(phase))
    previous = ledger.latest(ledger.read(ledger_path))
    function = CellTask(options)

    if cluster != "slurm":
        cpus = os.cpu_count() or 1
        # submitit's local executor starts every task at once, so there are
        # never more tasks than CPUs, whatever --cells-per-task requests.
        per_cpu = -(-len(cells) // cpus)
        tasks = pack(cells, max(cells_per_task or per_cpu, per_cpu))
        if cluster == "local":
            # Each local task gets an equal share of the CPUs instead of all of them.
            os.environ["QAT_CPUS_PER_TASK"] = str(max(1, cpus // len(tasks)))
        jobs = make_executor(cluster, log_folder).map_array(function, tasks)
        _record(ledger_path, jobs, tasks, cluster, log_folder, previous)
        submission.jobs, submission.tasks = list(jobs), tasks
        return submission

    if "\n" in str(log_folder):
        raise UsageError(f"--workdir {str(workdir.root)!r} contains a line break; use a path without one")
    started = time.time()
    array_limit, source = max_array_size()
    submission.chunks = plan(cells, cells_per_task or 1, profile, array_limit)
    log.info("MaxArraySize %d (%s): %d array(s)", array_limit, source, len(submission.chunks))
    dependency = None
    for number, chunk in enumerate(submission.chunks, start=1):
        parameters = sbatch_parameters(phase, chunk, profile, max_parallel, dependency)
        executor = make_executor("slurm", log_folder, parameters)
        description = f"array {number}/{len(submission.chunks)} ({len(chunk.tasks)} task(s), {chunk.cell_count} cell(s))"
        try:
            jobs = call_sbatch(lambda: executor.map_array(function, chunk.tasks), description, retry)
        except SbatchError as err:
            if number == 1 and err.permanent:
                # Nothing was queued and a retry cannot help (an invalid partition,
                # say): bad input, reported as one line with nothing left behind.
                _remove_unsubmitted_files(workdir.logs(phase), started)
                raise UsageError(f"sbatch rejected the submission of phase {phase!r}: {err.message}") from None
            skipped = sum(c.cell_count for c in submission.chunks[number - 1 :])
            submission.errors.append(f"{description} was not submitted: {err}; {skipped} cell(s) left unsubmitted")
            log.error("%s was not submitted: %s", description, err)
            break
        _record(ledger_path, jobs, chunk.tasks, cluster, log_folder, previous)
        submission.jobs += list(jobs)
        submission.tasks += chunk.tasks
        if max_parallel and len(submission.chunks) > 1:
            dependency = f"afterany:{str(jobs[0].job_id).split('_', 1)[0]}"
    return submission


def _remove_unsubmitted_files(folder: Path, since: float) -> None:
    """Remove the pickles and script submitit wrote for a submission that sbatch rejected."""
    for pattern in ("*.pkl", ".submission_file_*.sh"):
        for path in folder.glob(pattern):
            try:
                if path.stat().st_mtime >= since - 1:
                    path.unlink()
            except OSError as err:
                log.warning("could not remove %s: %s", path, err)


def call_sbatch(submit_once: Callable[[], Any], description: str, retry: Retry = Retry()) -> Any:
    """Call `submit_once` (which runs sbatch), retrying transient failures with exponential backoff.

    Raises
    ------
    SbatchError
        When sbatch fails with an error that a retry cannot fix, or still
        fails after `retry.attempts` attempts.
    """
    for attempt in range(1, retry.attempts + 1):
        # submitit prints sbatch's stderr itself; the log lines below carry it instead.
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                return submit_once()
            except submitit.core.utils.FailedJobError as err:
                message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())[:500]
        if any(word in message.lower() for word in PERMANENT_SBATCH_ERRORS):
            raise SbatchError(f"sbatch rejected it: {message}", message=message, permanent=True)
        if attempt == retry.attempts:
            raise SbatchError(f"sbatch failed {retry.attempts} times, last with: {message}", message=message)
        delay = retry.backoff_s * 2 ** (attempt - 1)
        log.warning(
            "sbatch failed for %s (%s); retry %d of %d in %.0f s",
            description, message, attempt, retry.attempts - 1, delay,
        )
        time.sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")


def _record(
    path: Path, jobs: list[Any], tasks: list[list[Cell]], cluster: str, log_folder: Path,
    previous: dict[str, ledger.Entry],
) -> None:
    entries = []
    for job, task in zip(jobs, tasks):
        entries += ledger.new_entries([c.cell_id for c in task], str(job.job_id), cluster, str(log_folder), previous)
    ledger.append(path, entries)


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
