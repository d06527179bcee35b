"""The state of every cell of a phase, from result files, the ledger and the scheduler.

A cell is in exactly one state:

    done             its result file has status "done"
    diverged         its result file has status "diverged"
    running          no result; its task runs (SLURM), or its process lives (local)
    pending          no result; its task waits in the queue (requeued tasks too)
    timed-out        no result; SLURM ended its task at the time limit
    failed           no result; its task ended any other way, its result was
                     quarantined by the collector, or it is unreadable
    never-submitted  no result and no ledger entry

Result files decide first, then a live job (a quarantined cell that was
resubmitted and runs again counts as running), then quarantine, then the
job's final state. SLURM states come from one `sacct` call for every job of
the ledger. When accounting does not respond, `squeue` tells running and
pending tasks apart from finished ones; a finished task without a result then
counts as failed, because only accounting knows a time-out.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import h5py

from pipeline import ledger
from pipeline.cell import Cell
from pipeline.workdir import Workdir

log = logging.getLogger(__name__)

DONE = "done"
RUNNING = "running"
PENDING = "pending"
FAILED = "failed"
TIMED_OUT = "timed-out"
DIVERGED = "diverged"
NEVER_SUBMITTED = "never-submitted"
STATES = (DONE, RUNNING, PENDING, FAILED, TIMED_OUT, DIVERGED, NEVER_SUBMITTED)
FINISHED = (DONE, DIVERGED)

QUARANTINE_DIR = "quarantine"

# SLURM job states (sacct and squeue spell them the same) grouped by what they
# mean for a cell without a result. Any other state, COMPLETED included,
# means the task ended without writing the result: failed.
SLURM_RUNNING = frozenset(
    {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "STOPPED", "RESIZING"}
)
SLURM_PENDING = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT"})
SLURM_TIMED_OUT = frozenset({"TIMEOUT"})

SCHEDULER_TIMEOUT_S = 60.0

# sacct shows the not yet started tasks of an array as one record:
# "123_[4-7,9%2]" (indices 4 to 7 and 9, at most 2 running at once).
_COMPRESSED_ARRAY = re.compile(r"^(\d+)_\[([0-9,\-]+)(?:%\d+)?\]$")

Runner = Callable[..., subprocess.CompletedProcess]


@dataclass(frozen=True)
class CellStatus:
    """The state of one cell and what it was derived from."""

    cell: Cell
    state: str  # one of STATES
    entry: ledger.Entry | None  # the cell's latest submission, if any
    job_state: str = ""  # the scheduler's word for the job ("RUNNING", "TIMEOUT", "pid alive"), if asked
    detail: str = ""  # why a cell without a live job counts as failed, when known


@dataclass
class PhaseStatus:
    """Every cell of a phase with its state, plus the notes of the scheduler query."""

    phase: str
    cells: list[CellStatus]
    warnings: list[str] = field(default_factory=list)

    @property
    def blocks(self) -> list[str]:
        """Block names in manifest order."""
        return list(dict.fromkeys(status.cell.block for status in self.cells))

    def counts(self, block: str | None = None) -> dict[str, int]:
        """Return {state: number of cells} for one block, or for the phase when block is None."""
        counted = Counter(s.state for s in self.cells if block is None or s.cell.block == block)
        return {state: counted.get(state, 0) for state in STATES}

    def in_state(self, state: str) -> list[CellStatus]:
        return [s for s in self.cells if s.state == state]


class SchedulerQuery:
    """Query SLURM for job states: one `sacct` call, plus `squeue` where sacct fails or lags.

    One instance serves every poll of a `status --watch`, so the warning that
    accounting is down is logged once, not per poll.

    Parameters
    ----------
    runner
        `subprocess.run` or a stand-in with its signature, for tests.
    """

    def __init__(self, runner: Runner = subprocess.run) -> None:
        self.runner = runner
        self.warned = False
        self.warnings: list[str] = []

    def states(self, job_ids: Iterable[str]) -> tuple[dict[str, str], bool]:
        """Return ({job id or array task id: state}, whether sacct succeeded).

        `job_ids` are ledger job ids ("123_4" or "123"). The keys of the
        returned map use the same spelling.
        """
        requested = sorted(set(job_ids))
        if not requested:
            return {}, True
        base_ids = _base_ids(requested)
        accounted = self._sacct(base_ids)
        if accounted is None:
            queued = self._squeue(base_ids)
            return {job_id: queued[job_id] for job_id in requested if job_id in queued}, False
        missing = [job_id for job_id in requested if job_id not in accounted]
        if missing:
            # Accounting can lag behind a submission by a moment; the queue cannot.
            queued = self._squeue(_base_ids(missing))
            accounted.update({job_id: queued[job_id] for job_id in missing if job_id in queued})
        return {job_id: accounted[job_id] for job_id in requested if job_id in accounted}, True

    def _run(self, args: list[str]) -> subprocess.CompletedProcess | str:
        """Run a SLURM client; return the completed process, or why it could not run."""
        if shutil.which(args[0]) is None:
            return f"{args[0]} not found on PATH"
        try:
            return self.runner(args, capture_output=True, text=True, timeout=SCHEDULER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"{args[0]} timed out after {SCHEDULER_TIMEOUT_S:.0f} s"
        except OSError as err:
            return f"{args[0]} could not run: {err}"

    def _sacct(self, base_ids: list[str]) -> dict[str, str] | None:
        args = ["sacct", "-X", "-j", ",".join(base_ids), "-o", "JobID,State,ExitCode", "--parsable2", "-n"]
        result = self._run(args)
        if isinstance(result, str) or result.returncode != 0:
            reason = result if isinstance(result, str) else _first_line(result.stderr or result.stdout)
            self._warn(
                f"sacct failed ({reason}); states come from squeue and result files, "
                "so a finished task without a result counts as failed, even one that timed out"
            )
            return None
        return parse_sacct(result.stdout)

    def _squeue(self, base_ids: list[str]) -> dict[str, str]:
        args = ["squeue", "-h", "-r", "-j", ",".join(base_ids), "-o", "%i|%T"]
        result = self._run(args)
        if isinstance(result, str):
            self._warn(f"{result}; tasks without a result count as failed")
            return {}
        if result.returncode != 0:
            # squeue rejects a lone id that has left the queue; nothing of it is queued.
            if "Invalid job id" in (result.stderr or ""):
                return {}
            self._warn(f"squeue failed ({_first_line(result.stderr)}); tasks without a result count as failed")
            return {}
        return parse_states(result.stdout)

    def _warn(self, message: str) -> None:
        if not self.warned:
            log.warning(message)
            self.warnings.append(message)
        self.warned = True


def _base_ids(job_ids: Iterable[str]) -> list[str]:
    """Return the job ids without array indices, once each, in numeric order."""
    return sorted({job_id.split("_", 1)[0] for job_id in job_ids}, key=lambda base: (len(base), base))


def _first_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[0] if lines else "no output"


def parse_states(text: str) -> dict[str, str]:
    """Parse `JobID|State[|...]` lines into {job id: state}.

    Compressed pending records ("123_[4-7]") expand to one id per index; a
    state with a reason ("CANCELLED by 0") keeps its first word.
    """
    states: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0]:
            continue
        job_id, state = parts[0], parts[1].split(" ", 1)[0].rstrip("+")
        if "." in job_id:  # a job step, not the job
            continue
        compressed = _COMPRESSED_ARRAY.match(job_id)
        if compressed:
            base, ranges = compressed.groups()
            for index in _expand_ranges(ranges):
                states[f"{base}_{index}"] = state
        else:
            states[job_id] = state
    return states


parse_sacct = parse_states


def _expand_ranges(ranges: str) -> list[int]:
    indices = []
    for part in ranges.split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        indices.extend(range(int(first), int(last or first) + 1))
    return indices


def read_result_status(path: Path) -> str:
    """Return the status attribute ("done" or "diverged") of a result file.

    Raises OSError or KeyError when the file cannot be read or has no status.
    """
    with h5py.File(path, "r", locking=False) as f:
        value = f.attrs["status"]
    return value.decode() if isinstance(value, bytes) else str(value)


def read_quarantine(workdir: Workdir, phase: str) -> dict[str, str]:
    """Return {cell_id: first line of the reason} of the quarantined result files of `phase`.

    The collector moves a bad `<cell_id>.h5` to `results/<phase>/quarantine/`
    beside `<cell_id>.reason.txt`; a second quarantine of the same cell gets
    the stem `<cell_id>.2`.
    """
    reasons: dict[str, str] = {}
    folder = workdir.results(phase) / QUARANTINE_DIR
    for note in sorted(folder.glob("*.reason.txt")):
        cell_id = note.name.split(".", 1)[0]
        try:
            lines = note.read_text(errors="replace").splitlines()
        except OSError as err:
            lines = [f"reason unreadable: {err}"]
        reasons[cell_id] = lines[0] if lines else "quarantined (no reason given)"
    return reasons


def pid_alive(pid: str) -> bool:
    """Return whether the local task with this pid still runs submitit.

    Checking the command line guards against a recycled pid; where /proc is
    missing, a live pid is taken at its word.
    """
    try:
        number = int(pid)
        os.kill(number, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass  # it exists but belongs to someone else
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        return b"submitit" in cmdline.read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return True


def phase_status(
    workdir: Workdir, phase: str, cells: list[Cell] | tuple[Cell, ...], query: SchedulerQuery | None = None
) -> PhaseStatus:
    """Work out the state of every cell of `phase`.

    Parameters
    ----------
    workdir, phase
        Where the result files, the quarantine and the ledger are.
    cells
        The phase's cells (from its manifest), in the order to report them.
    query
        The scheduler query to use; pass the same one across polls so its
        warning appears once.
    """
    query = query or SchedulerQuery()
    latest = ledger.latest(ledger.read(ledger.path_for(workdir.results(phase))))
    quarantined = read_quarantine(workdir, phase)

    results: dict[str, tuple[str | None, str]] = {}
    for cell in cells:
        path = workdir.result(phase, cell.cell_id)
        if not path.exists():
            continue
        try:
            results[cell.cell_id] = (read_result_status(path), "")
        except (OSError, KeyError) as err:
            results[cell.cell_id] = (None, f"result {path} unreadable: {err}")

    unfinished = [c for c in cells if results.get(c.cell_id, (None, ""))[0] is None and c.cell_id in latest]
    slurm_ids = [latest[c.cell_id].job_id for c in unfinished if latest[c.cell_id].cluster == "slurm"]
    job_states, accounted = query.states(slurm_ids)

    statuses = []
    for cell in cells:
        entry = latest.get(cell.cell_id)
        status, unreadable = results.get(cell.cell_id, (None, ""))
        if status in FINISHED:
            statuses.append(CellStatus(cell, status, entry))
            continue
        if status is not None:
            unreadable = f"result has unknown status {status!r}"
        statuses.append(_unfinished_status(cell, entry, job_states, accounted, quarantined, unreadable))
    return PhaseStatus(phase, statuses, warnings=list(query.warnings))


def _unfinished_status(
    cell: Cell,
    entry: ledger.Entry | None,
    job_states: dict[str, str],
    accounted: bool,
    quarantined: dict[str, str],
    unreadable: str,
) -> CellStatus:
    """Return the state of a cell without a finished result."""
    if entry is None:
        if cell.cell_id in quarantined:
            return CellStatus(cell, FAILED, None, detail=f"quarantined: {quarantined[cell.cell_id]}")
        if unreadable:
            return CellStatus(cell, FAILED, None, detail=unreadable)
        return CellStatus(cell, NEVER_SUBMITTED, None)

    if entry.cluster == "slurm":
        job_state = job_states.get(entry.job_id, "")
        if job_state in SLURM_RUNNING:
            return CellStatus(cell, RUNNING, entry, job_state)
        if job_state in SLURM_PENDING:
            return CellStatus(cell, PENDING, entry, job_state)
    elif entry.cluster == "local" and pid_alive(entry.job_id):
        return CellStatus(cell, RUNNING, entry, "pid alive")
    else:
        job_state = "pid gone" if entry.cluster == "local" else "ended with its submitting process"

    if cell.cell_id in quarantined:
        return CellStatus(cell, FAILED, entry, job_state, f"quarantined: {quarantined[cell.cell_id]}")
    if unreadable:
        return CellStatus(cell, FAILED, entry, job_state, unreadable)
    if entry.cluster == "slurm":
        if job_state in SLURM_TIMED_OUT:
            return CellStatus(cell, TIMED_OUT, entry, job_state)
        if not job_state:
            source = "sacct or squeue" if accounted else "squeue (accounting down)"
            return CellStatus(cell, FAILED, entry, "", f"job {entry.job_id} not found by {source}, and no result")
        return CellStatus(cell, FAILED, entry, job_state, f"job {entry.job_id} ended {job_state} without a result")
    return CellStatus(cell, FAILED, entry, job_state, f"job {entry.job_id} ({entry.cluster}) ended without a result")


# ---------------------------------------------------------------------- report


def progress_bar(finished: int, total: int, width: int = 24) -> str:
    """Return a text bar such as `[#########...............]  38%`."""
    fraction = finished / total if total else 1.0
    filled = int(round(fraction * width))
    return f"[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:4.0f}%"


def format_table(status: PhaseStatus) -> str:
    """Return the counts per block and for the phase, with a progress bar each."""
    header = ["block", "cells", *STATES, "progress"]
    rows = []
    for block in [*status.blocks, None]:
        counts = status.counts(block)
        total = sum(counts.values())
        finished = counts[DONE] + counts[DIVERGED]
        rows.append([block or "all", str(total), *(str(counts[s]) for s in STATES), progress_bar(finished, total)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [value.rjust(width) for value, width in zip(row[1:-1], widths[1:-1])]
        lines.append("  ".join(cells + [row[-1]]))
    total = len(status.cells)
    finished = sum(1 for s in status.cells if s.state in FINISHED)
    head = f"phase {status.phase}: {total} cells in {len(status.blocks)} block(s), {finished} finished"
    return "\n".join([head, *lines])


def format_cells(status: PhaseStatus, state: str) -> str:
    """Return one line per cell in `state`: its settings, job, attempt and log or reason."""
    lines = []
    for item in status.in_state(state):
        cell = item.cell
        parts = [
            cell.cell_id,
            cell.block,
            f"bits={cell.bits}",
            f"warmdown={cell.warmdown}",
            f"lr_mult={cell.lr_mult}",
            f"size={cell.size}",
            f"seed={cell.seed}",
        ]
        if item.entry is not None:
            job = f"job {item.entry.job_id}"
            if item.job_state:
                job += f" {item.job_state}"
            parts.append(f"{job}, attempt {item.entry.attempt}")
            parts.append(f"log {item.entry.log_paths()[1]}")
        if item.detail:
            parts.append(item.detail)
        lines.append("  ".join(parts))
    if not lines:
        return f"phase {status.phase}: no cells are {state}"
    return "\n".join(lines)
