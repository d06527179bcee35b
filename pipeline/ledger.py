"""The submission ledger: which SLURM job ran which cell, one JSON line per cell.

`results/<phase>/ledger.jsonl` is append-only. Each record goes out in one
`write` of a whole line under an exclusive lock, so a crash leaves at most a
torn last line, which `read` skips. `status` and `resubmit` read it from any
later shell, without the process that submitted.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One cell's submission: which job runs it, where it logs, and which attempt it is."""

    cell_id: str
    # submitit's id: "<array job>_<index>" for an array task on SLURM, "<job>"
    # for a single-task SLURM job, the pid of the task's process locally.
    job_id: str
    cluster: str
    log_folder: str  # submitit's folder, with "%j" standing for the job id
    submitted_at: float  # Unix time
    attempt: int  # 1 for the first submission of the cell, 2 for its first resubmission...

    @property
    def array_job_id(self) -> str:
        """The SLURM job id without the array index ("123" for "123_4")."""
        return self.job_id.split("_", 1)[0]

    @property
    def array_index(self) -> int | None:
        """The array index (4 for "123_4"), or None for a job outside an array."""
        _, _, index = self.job_id.partition("_")
        return int(index) if index else None

    def log_paths(self) -> tuple[Path, Path]:
        """Return (stdout, stderr) of the task that runs this cell, in submitit's layout.

        That is `<log_folder with %j = job id>/<job id>_0_log.out` (and `.err`);
        for an array task the job id is "<array job>_<index>".
        """
        from submitit.core.utils import JobPaths

        paths = JobPaths(self.log_folder, job_id=self.job_id, task_id=0)
        return paths.stdout, paths.stderr


def path_for(results_dir: Path) -> Path:
    """Return the ledger of the phase whose results live in `results_dir`."""
    return results_dir / "ledger.jsonl"


def append(path: Path, entries: list[Entry]) -> None:
    """Append entries durably: one locked write, then fsync."""
    if not entries:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(asdict(entry), sort_keys=True) + "\n" for entry in entries)
    with open(path, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read(path: Path) -> list[Entry]:
    """Return every whole record; a torn or foreign line is skipped with a warning."""
    if not path.is_file():
        return []
    entries = []
    skipped = 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                entries.append(Entry(**json.loads(line)))
            except (ValueError, TypeError):
                skipped += 1
    if skipped:
        log.warning("ledger %s: skipped %d unreadable line(s)", path, skipped)
    return entries


def latest(entries: list[Entry]) -> dict[str, Entry]:
    """Return the newest entry of every cell."""
    newest: dict[str, Entry] = {}
    for entry in entries:
        newest[entry.cell_id] = entry
    return newest


def new_entries(
    cell_ids: list[str], job_id: str, cluster: str, log_folder: str, previous: dict[str, Entry]
) -> list[Entry]:
    """Return entries for cells that `job_id` runs, each one attempt after its `previous` entry."""
    now = time.time()
    return [
        Entry(
            cell_id=cell_id,
            job_id=job_id,
            cluster=cluster,
            log_folder=log_folder,
            submitted_at=now,
            attempt=previous[cell_id].attempt + 1 if cell_id in previous else 1,
        )
        for cell_id in cell_ids
    ]
