"""Energy that SLURM accounting recorded for finished jobs (sacct's ConsumedEnergyRaw).

SLURM fills ConsumedEnergyRaw, in joules, only when the cluster runs an
energy plugin (``AcctGatherEnergyType`` other than acct_gather_energy/none).
Without one, sacct prints 0 or an empty field, which means "not recorded",
never zero energy, and the functions here return None for it.

All job ids go to one sacct call. sacct stops at the first id it cannot
parse ("sacct: fatal: Bad job/step specified"), so ids that are not SLURM
job ids are left out of the call and get None.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterable

from pipeline.ledger import Entry

log = logging.getLogger(__name__)

JOULES_PER_KWH = 3.6e6
# SLURM prints NO_VAL64 (2**64 - 2) and its neighbours when it has no value;
# no real job reaches 2**63 J.
_UNSET_FLOOR = 2**63
# "123", an array task "123_4", or a heterogeneous job component "123+1".
_JOB_ID = re.compile(r"^\d+(?:_\d+)?(?:\+\d+)?$")
SACCT_TIMEOUT_S = 60.0


def parse_consumed_energy(text: str) -> dict[str, float | None]:
    """Parse sacct output into kWh per job, or None where SLURM recorded no energy.

    Parameters
    ----------
    text
        Output of ``sacct -j IDS -o JobID,ConsumedEnergyRaw --parsable2 -n``
        (with or without ``--duplicates``).

    Returns
    -------
    dict
        One key per job or array task, as sacct prints it ("123", "123_4").
        Step lines ("123_4.batch", "123_4.0") are left out, because the
        job's own line already includes them. A job listed more than once (each
        run of a requeued job, with ``--duplicates``) gets the sum of its
        runs, or None when any run has no energy recorded.
    """
    runs: dict[str, list[float | None]] = defaultdict(list)
    skipped = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) != 2:
            skipped += 1
            continue
        job_id, raw = fields[0].strip(), fields[1].strip()
        if "." in job_id:
            continue
        runs[job_id].append(_joules(raw))
    if skipped:
        log.warning("sacct output: skipped %d line(s) without exactly two '|'-separated fields", skipped)
    energy: dict[str, float | None] = {}
    for job_id, values in runs.items():
        energy[job_id] = None if any(value is None for value in values) else sum(values) / JOULES_PER_KWH
    return energy


def _joules(raw: str) -> float | None:
    """Return joules from one ConsumedEnergyRaw field, or None when it contains no value."""
    try:
        joules = int(raw)
    except ValueError:
        return None
    if joules <= 0 or joules >= _UNSET_FLOOR:
        return None
    return float(joules)


def _query_ids(job_ids: list[str]) -> list[str]:
    """Return the ids to pass to sacct: an array's id in place of two or more of its tasks.

    ``sacct -j 123`` lists every task of array 123, so this keeps the
    argument short (Linux caps one argument at 128 KiB) for large phases.
    """
    tasks: dict[str, list[str]] = defaultdict(list)
    for job_id in job_ids:
        tasks[job_id.split("_", 1)[0] if "_" in job_id else job_id].append(job_id)
    query = []
    for array_id, members in tasks.items():
        if len(members) > 1 and all("_" in member for member in members):
            query.append(array_id)
        else:
            query.extend(members)
    return list(dict.fromkeys(query))


def consumed_energy_kwh(
    job_ids: Iterable[str], *, sacct: str = "sacct", timeout_s: float = SACCT_TIMEOUT_S
) -> dict[str, float | None]:
    """Return the energy SLURM recorded for each job, in kWh, from one sacct call.

    Parameters
    ----------
    job_ids
        SLURM job ids as the ledger stores them ("123" or "123_4").
    sacct
        The sacct command to run.
    timeout_s
        Seconds to wait for sacct.

    Returns
    -------
    dict
        Every requested id, with its kWh or None: energy not recorded (0 or
        empty), job unknown to accounting, id not a SLURM job id, or sacct
        missing or failing. A failed call is logged as a warning, not
        raised, so collecting results never stops for accounting.
    """
    requested = list(dict.fromkeys(job_ids))
    energy: dict[str, float | None] = {job_id: None for job_id in requested}
    valid = [job_id for job_id in requested if _JOB_ID.match(job_id)]
    if len(valid) < len(requested):
        invalid = [job_id for job_id in requested if not _JOB_ID.match(job_id)]
        log.warning(
            "%d job id(s) are not SLURM job ids and get no energy, for example %s",
            len(invalid), ", ".join(invalid[:5]),
        )
    if not valid:
        return energy
    if shutil.which(sacct) is None:
        log.warning("%s not found on PATH; SLURM energy of %d job(s) is unknown", sacct, len(valid))
        return energy
    # --duplicates lists each run of a requeued job, so all of its runs are summed.
    command = [
        sacct, "-j", ",".join(_query_ids(valid)), "-o", "JobID,ConsumedEnergyRaw", "--parsable2", "-n", "--duplicates",
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        log.warning("sacct timed out after %.0f s; SLURM energy of %d job(s) is unknown", timeout_s, len(valid))
        return energy
    if result.returncode != 0:
        log.warning(
            "sacct failed with exit code %d (%s); SLURM energy of %d job(s) is unknown",
            result.returncode, result.stderr.strip()[:200], len(valid),
        )
        return energy
    parsed = parse_consumed_energy(result.stdout)
    for job_id in valid:
        energy[job_id] = parsed.get(job_id)
    return energy


def cell_energy_kwh(
    entries: Iterable[Entry], *, sacct: str = "sacct", timeout_s: float = SACCT_TIMEOUT_S
) -> dict[str, float | None]:
    """Return the SLURM energy of each cell in the ledger, in kWh, from one sacct call.

    A cell's figure is the sum over every job that ran it, which is each
    submission and resubmission in the ledger. It is None when any of those
    jobs has no energy recorded or ran on a cluster other than SLURM. It is
    also None when a job ran another cell too, because SLURM measures a job,
    not a cell.
    """
    entries = list(entries)
    cells_per_job: dict[str, set[str]] = defaultdict(set)
    jobs_per_cell: dict[str, list[str]] = defaultdict(list)
    not_slurm: set[str] = set()
    for entry in entries:
        if entry.cluster != "slurm":
            not_slurm.add(entry.cell_id)
            continue
        cells_per_job[entry.job_id].add(entry.cell_id)
        if entry.job_id not in jobs_per_cell[entry.cell_id]:
            jobs_per_cell[entry.cell_id].append(entry.job_id)

    job_energy = consumed_energy_kwh(cells_per_job, sacct=sacct, timeout_s=timeout_s) if cells_per_job else {}
    energy: dict[str, float | None] = {cell_id: None for cell_id in not_slurm}
    for cell_id, job_ids in jobs_per_cell.items():
        values = [job_energy.get(job_id) for job_id in job_ids]
        shared = any(len(cells_per_job[job_id]) > 1 for job_id in job_ids)
        if cell_id in not_slurm or shared or any(value is None for value in values):
            energy[cell_id] = None
        else:
            energy[cell_id] = sum(values)
    return energy
