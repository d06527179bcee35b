"""Collect the per-cell HDF5 files of each phase into one table per phase, incrementally.

Files under `<workdir>/results/`:

    <phase>.parquet          the table: one row per accepted result file, sorted by cell_id
    <phase>.index.json       every accepted file: size, mtime_ns, content hash and its row
    <phase>/quarantine/      bad result files, each beside a <stem>.reason.txt
    .collect.lock            exclusive lock held by a running collect (see pipeline.lock)

A run reads only the result files that are new or changed. A file whose size
and mtime_ns match its index entry is not opened. One whose size or mtime_ns
differs is hashed, and it is read again only when the hash differs too (a
`touch` or a copy that keeps the bytes costs a hash, not a read). A file that
disappeared leaves the table. The table is built from the rows stored in the
index, so an incremental run writes the same bytes as a run from scratch.

The table is written before the index, each under a temporary name and
renamed. A run killed between the two leaves an index that predates the
table, so the next run finds the changed files again and rewrites both. The
index records the table's size and mtime_ns, so a table that was deleted or
edited by hand is rebuilt from the index.

A bad file is quarantined: moved to `<phase>/quarantine/` with the reason in
a text file beside it, and left out of the table. A file is bad when HDF5
cannot read it, when it has no completion marker, when its name is not
`<cell_id>.h5` (a second file claiming a cell), or when its cell settings
disagree with the phase's manifest. The cell then has no result file, so
`submit` and `status` treat it as unfinished.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import logging
import multiprocessing
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from jobs.result import read_summary
from pipeline import manifest as manifest_lib
from pipeline.cell import CELL_FIELDS, Cell
from pipeline.errors import UsageError
from pipeline.lock import ExclusiveLock
from pipeline.workdir import Workdir, atomic_write_bytes

log = logging.getLogger(__name__)

INDEX_SCHEMA = 1
LOCK_NAME = ".collect.lock"
QUARANTINE_DIR = "quarantine"
RESULT_SUFFIX = ".h5"
# Below this many files to read, starting worker processes costs more than it saves.
PARALLEL_MIN_FILES = 64
# Errors that h5py raises for a truncated, corrupt or incomplete file. Anything
# else is a bug in this code and stops the run instead of quarantining files.
READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError)


@dataclass
class PhaseCollected:
    """Outcome of one run for one phase's table.

    Attributes
    ----------
    phase : str
        Phase name.
    cells : int
        Rows in the table after the run.
    expected : int or None
        Cells in the phase's manifest; None when the phase has no manifest.
    new, updated, removed : int
        Rows added, rows re-read because their file changed, and rows dropped
        because their file disappeared.
    quarantined : list of (Path, str)
        Where each bad file was moved, with the reason.
    unreadable : list of (Path, str)
        Files left in place because they could not be read or moved
        (permission or I/O error): a problem of the run, not of the file.
    table_written : bool
        Whether the table file was rewritten.
    error : str or None
        Why the phase could not be collected at all (for example an invalid
        manifest); its table is then left as it was.
    """

    phase: str
    cells: int = 0
    expected: int | None = None
    new: int = 0
    updated: int = 0
    removed: int = 0
    quarantined: list[tuple[Path, str]] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    table_written: bool = False
    error: str | None = None


@dataclass
class CollectReport:
    """The outcome of one `collect` run over several phases."""

    phases: list[PhaseCollected]

    @property
    def failed(self) -> bool:
        """Whether the run itself failed: a phase not collected or a file left unread."""
        return any(p.error is not None or p.unreadable for p in self.phases)

    def summary_line(self) -> str:
        """Return one line for cron mail, e.g.

        "collected 37 new cells; phase 2 720/720, phase 5 512/625; 1 quarantined".
        """
        new = sum(p.new for p in self.phases)
        updated = sum(p.updated for p in self.phases)
        removed = sum(p.removed for p in self.phases)
        head = f"collected {_plural(new, 'new cell')}"
        if updated:
            head += f", {updated} updated"
        if removed:
            head += f", {removed} removed"
        counts = []
        for p in self.phases:
            if p.error is not None:
                counts.append(f"phase {p.phase} not collected")
            elif p.expected is None:
                counts.append(f"phase {p.phase} {p.cells}")
            else:
                counts.append(f"phase {p.phase} {p.cells}/{p.expected}")
        parts = [head, ", ".join(counts), f"{sum(len(p.quarantined) for p in self.phases)} quarantined"]
        unreadable = sum(len(p.unreadable) for p in self.phases)
        if unreadable:
            parts.append(f"{unreadable} unreadable (left in place, see log)")
        return "; ".join(parts)


# -- paths and phases --------------------------------------------------------


def lock_path(workdir: Workdir) -> Path:
    return workdir.root / "results" / LOCK_NAME


def index_path(workdir: Workdir, phase: str) -> Path:
    return workdir.root / "results" / f"{phase}.index.json"


def quarantine_dir(workdir: Workdir, phase: str) -> Path:
    return workdir.results(phase) / QUARANTINE_DIR


def discover_phases(workdir: Workdir) -> list[str]:
    """Return every phase with a manifest or a results folder under `workdir`, sorted."""
    names = {path.stem for path in (workdir.root / "manifests").glob("*.csv")}
    results = workdir.root / "results"
    if results.is_dir():
        names |= {path.name for path in results.iterdir() if path.is_dir() and not path.name.startswith(".")}
    return sorted(names)


def resolve_phases(workdir: Workdir, value: str) -> list[str]:
    """Turn a --phase value ("all" or a comma list) into phase names.

    Raises
    ------
    UsageError
        When the list is empty, "all" finds no phase, or a named phase has
        neither a manifest nor a results folder.
    """
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise UsageError(f"invalid --phase {value!r}; give all, or phase names such as micro or 2,5")
    if names == ["all"]:
        found = discover_phases(workdir)
        if not found:
            raise UsageError(
                f"--phase all found no manifests/*.csv and no results/<phase>/ under "
                f"{str(workdir.root)!r}; check --workdir"
            )
        return found
    for name in names:
        if not workdir.results(name).is_dir() and not workdir.manifest(name).is_file():
            raise UsageError(
                f"phase {name!r} has no results or manifest under {str(workdir.root)!r}; "
                "check --phase and --workdir"
            )
    return names


def default_jobs() -> int:
    """Return the default number of reader processes: the CPUs this process may use, at most 4.

    The cap of 4 leaves the rest of a shared login node to other users; on a
    dedicated node pass --jobs.
    """
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        available = os.cpu_count() or 1
    return max(1, min(4, available))


# -- the run -------------------------------------------------------------------


def collect(
    workdir: Workdir,
    phases: list[str],
    *,
    wait: bool = True,
    jobs: int = 1,
    notice_after_s: float = 5.0,
) -> CollectReport:
    """Collect `phases` under the exclusive collect lock.

    Parameters
    ----------
    workdir
        The study's work directory.
    phases
        Phase names, as returned by `resolve_phases`.
    wait
        Wait for a running collect to finish (True) or raise
        `pipeline.lock.LockBusyError` at once.
    jobs
        Processes that read result files; 1 reads in this process.
    notice_after_s
        Log a warning naming the lock's holder after waiting this long.
    """
    lock = ExclusiveLock(lock_path(workdir), wait=wait, notice_after_s=notice_after_s)
    with lock:
        log.info("collect lock %s held with %s", lock.path, lock.mechanism)
        collected = []
        for phase in phases:
            try:
                collected.append(collect_phase(workdir, phase, jobs=jobs))
            except (UsageError, OSError) as err:
                log.error("phase %s not collected: %s", phase, err)
                collected.append(PhaseCollected(phase=phase, error=str(err)))
    return CollectReport(collected)


def collect_phase(workdir: Workdir, phase: str, jobs: int = 1) -> PhaseCollected:
    """Bring `results/<phase>.parquet` up to date with the phase's result files.

    The caller must hold the collect lock (`collect` does).

    Raises
    ------
    UsageError
        When the phase's manifest exists but is invalid.
    OSError
        When the table or index cannot be written.
    """
    outcome = PhaseCollected(phase=phase)
    manifest = _load_manifest(workdir, phase)
    outcome.expected = None if manifest is None else len(manifest)
    _remove_leftover_temporaries(workdir, phase)

    index_file = index_path(workdir, phase)
    index = _load_index(index_file, phase)
    previous: dict[str, dict[str, Any]] = index["files"]
    folder = workdir.results(phase)
    on_disk = _scan(folder)

    accepted, to_read, touched = _compare(folder, on_disk, previous, outcome)
    read_names, bad = _read_new(folder, to_read, jobs, accepted)
    for name in sorted(accepted):
        reason = _check_row(name, accepted[name]["row"], phase, manifest, on_disk)
        if reason is not None:
            bad[name] = reason
            del accepted[name]
    for name, reason in sorted(bad.items()):
        _quarantine(folder / name, on_disk[name], reason, quarantine_dir(workdir, phase), outcome)

    add_slurm_energy(workdir, phase, [accepted[name]["row"] for name in sorted(read_names) if name in accepted])

    outcome.new = sum(1 for name in read_names if name in accepted and name not in previous)
    outcome.updated = sum(1 for name in read_names if name in accepted and name in previous)
    outcome.removed = sum(1 for name in previous if name not in on_disk)
    outcome.cells = len(accepted)

    table_file = workdir.table(phase)
    rows_changed = set(accepted) != set(previous) or any(name in accepted for name in read_names)
    if rows_changed or not _table_matches(table_file, index.get("table")):
        atomic_write_bytes(table_file, render_table([accepted[name]["row"] for name in accepted]))
        outcome.table_written = True
    if rows_changed or touched or outcome.table_written:
        stat = table_file.stat()
        index = {
            "schema": INDEX_SCHEMA,
            "phase": phase,
            "table": {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns},
            "files": {name: accepted[name] for name in sorted(accepted)},
        }
        atomic_write_bytes(index_file, json.dumps(index, separators=(",", ":")).encode())
    log.info(
        "phase %s: %d cells (%d new, %d updated, %d removed, %d quarantined); table %s",
        phase, outcome.cells, outcome.new, outcome.updated, outcome.removed,
        len(outcome.quarantined), "rewritten" if outcome.table_written else "unchanged",
    )
    return outcome


def add_slurm_energy(workdir: Workdir, phase: str, rows: list[dict[str, Any]]) -> None:
    """Set `energy_kwh_slurm` of newly read rows from SLURM accounting (one sacct call).

    NaN means SLURM recorded no energy for the cell (0 or empty in sacct, a
    cell not run on SLURM, or a job that also ran other cells).
    """
    from pipeline import ledger, slurm_energy

    if not rows:
        return
    cell_ids = {row["cell_id"] for row in rows}
    entries = [
        entry
        for entry in ledger.read(ledger.path_for(workdir.results(phase)))
        if entry.cell_id in cell_ids
    ]
    energy = slurm_energy.cell_energy_kwh(entries) if any(e.cluster == "slurm" for e in entries) else {}
    for row in rows:
        value = energy.get(row["cell_id"])
        row["energy_kwh_slurm"] = float("nan") if value is None else float(value)


def render_table(rows: list[dict[str, Any]]) -> bytes:
    """Return the parquet bytes of `rows`, sorted by cell_id, the same on every run."""
    table = pd.DataFrame(rows)
    if not table.empty:
        table = table.sort_values("cell_id", kind="stable").reset_index(drop=True)
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    return buffer.getvalue()


def read_table(workdir: Workdir, phase: str) -> pd.DataFrame:
    return pd.read_parquet(workdir.table(phase))


def read_quarantine(workdir: Workdir, phase: str) -> dict[str, str]:
    """Return {file stem: reason} of the quarantined files of `phase`.

    The stem is the cell_id for a file named `<cell_id>.h5`; a file
    quarantined twice has stems `<cell_id>`, `<cell_id>.2`, and so on.
    """
    reasons = {}
    for path in sorted(quarantine_dir(workdir, phase).glob("*.reason.txt")):
        lines = path.read_text(encoding="utf-8").splitlines()
        reasons[path.name[: -len(".reason.txt")]] = lines[0] if lines else ""
    return reasons


# -- steps of collect_phase ------------------------------------------------------


def _load_manifest(workdir: Workdir, phase: str) -> dict[str, dict[str, Any]] | None:
    path = workdir.manifest(phase)
    if not path.is_file():
        return None
    return {cell.cell_id: cell.to_row() for cell in manifest_lib.read(path)}


def _load_index(path: Path, phase: str) -> dict[str, Any]:
    """Return the index of the last run, or an empty one (every file is then read)."""
    empty: dict[str, Any] = {"schema": INDEX_SCHEMA, "phase": phase, "table": None, "files": {}}
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return empty
    except (OSError, ValueError) as err:
        log.warning("index %s is unreadable (%s); reading every result file again", path, err)
        return empty
    if not isinstance(index, dict) or index.get("schema") != INDEX_SCHEMA or not isinstance(index.get("files"), dict):
        log.warning("index %s has another layout; reading every result file again", path)
        return empty
    files = {name: entry for name, entry in index["files"].items() if _valid_entry(entry)}
    if len(files) != len(index["files"]):
        log.warning("index %s: %d malformed entries; reading those files again", path, len(index["files"]) - len(files))
    index["files"] = files
    return index


def _valid_entry(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("mtime_ns"), int)
        and isinstance(entry.get("hash"), str)
        and isinstance(entry.get("row"), dict)
    )


def _scan(folder: Path) -> dict[str, os.stat_result]:
    """Return {file name: stat} of the result files in `folder`.

    Hidden names are skipped: jobs write `.<cell_id>.h5.<pid>.tmp` and rename
    it when complete.
    """
    found = {}
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return found
    for entry in entries:
        if entry.name.startswith(".") or not entry.name.endswith(RESULT_SUFFIX):
            continue
        try:
            if entry.is_file():
                found[entry.name] = entry.stat()
        except FileNotFoundError:
            continue  # removed between the listing and the stat
    return found


def _compare(
    folder: Path,
    on_disk: dict[str, os.stat_result],
    previous: dict[str, dict[str, Any]],
    outcome: PhaseCollected,
) -> tuple[dict[str, dict[str, Any]], list[tuple[str, os.stat_result, str]], int]:
    """Split the files into unchanged ones, accepted as they are, and ones to read.

    Returns (accepted entries, [(name, stat, hash)] to read, count of files whose
    size or mtime changed but whose bytes did not).
    """
    accepted: dict[str, dict[str, Any]] = {}
    to_read = []
    touched = 0
    for name, stat in sorted(on_disk.items()):
        entry = previous.get(name)
        if entry is not None and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
            accepted[name] = entry
            continue
        try:
            digest = file_hash(folder / name)
        except FileNotFoundError:
            continue
        except OSError as err:
            log.error("cannot read result file %s: %s; left in place", folder / name, err)
            outcome.unreadable.append((folder / name, str(err)))
            continue
        if entry is not None and entry["hash"] == digest:
            accepted[name] = {**entry, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            touched += 1
            continue
        to_read.append((name, stat, digest))
    return accepted, to_read, touched


def _read_new(
    folder: Path,
    to_read: list[tuple[str, os.stat_result, str]],
    jobs: int,
    accepted: dict[str, dict[str, Any]],
) -> tuple[set[str], dict[str, str]]:
    """Read the files in `to_read` into `accepted`; return (names read, {bad name: reason})."""
    paths = [folder / name for name, _, _ in to_read]
    results = read_rows(paths, jobs)
    read_names = set()
    bad: dict[str, str] = {}
    for (name, stat, digest), (row, error) in zip(to_read, results):
        if error is None:
            accepted[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "hash": digest, "row": row}
            read_names.add(name)
        elif error != VANISHED:
            bad[name] = f"unreadable result file: {error}"
    return read_names, bad


VANISHED = "vanished"


def read_rows(paths: list[Path], jobs: int = 1) -> list[tuple[dict[str, Any] | None, str | None]]:
    """Read the table row of each file: [(row, None)] or [(None, error)], in order.

    The error is VANISHED for a file removed since it was listed. With
    `jobs` > 1 and at least PARALLEL_MIN_FILES files, the files are read by
    forked worker processes. They close their copy of the collect lock's
    descriptor at fork (pipeline.lock), and exit within a second of the
    parent's death, so a killed collect never leaves the lock held.
    """
    if jobs <= 1 or len(paths) < PARALLEL_MIN_FILES:
        return [_read_row(path) for path in paths]
    context = multiprocessing.get_context("fork")
    chunksize = max(1, len(paths) // (jobs * 8))
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_exit_with_parent, initargs=(os.getpid(),)
    ) as pool:
        return list(pool.map(_read_row, paths, chunksize=chunksize))


def _exit_with_parent(parent_pid: int) -> None:
    """Start a thread that ends this worker once its parent is gone.

    Without it, workers orphaned by `kill -9` of collect wait forever for work.
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _read_row(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    try:
        return read_summary(path), None
    except FileNotFoundError:
        return None, VANISHED
    except READ_ERRORS as err:
        return None, f"{type(err).__name__}: {err}"


def file_hash(path: Path) -> str:
    """Return the BLAKE2b-128 hex digest of a file's bytes."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_row(
    name: str,
    row: dict[str, Any],
    phase: str,
    manifest: dict[str, dict[str, Any]] | None,
    on_disk: dict[str, os.stat_result],
) -> str | None:
    """Return why a file's row cannot go into the table, or None when it can."""
    cell_id = row.get("cell_id")
    if name != f"{cell_id}{RESULT_SUFFIX}":
        duplicate = f"{cell_id}{RESULT_SUFFIX}"
        also = f"; {duplicate} also claims this cell" if duplicate in on_disk else ""
        return f"file name {name} does not match its cell_id {cell_id!r}{also}"
    if manifest is None:
        if row.get("phase") != phase:
            return f"phase attribute {row.get('phase')!r} does not match the results folder {phase!r}"
        try:
            Cell.from_row(row)
        except (KeyError, ValueError) as err:
            return f"invalid cell settings: {err}"
        return None
    expected = manifest.get(cell_id)
    if expected is None:
        return f"cell_id {cell_id} is not in the manifest of phase {phase}"
    differences = [
        f"{key} is {row.get(key)!r} in the file but {expected[key]!r} in the manifest"
        for key in CELL_FIELDS
        if row.get(key) != expected[key]
    ]
    if differences:
        return "settings disagree with the manifest: " + "; ".join(differences)
    return None


def _quarantine(path: Path, scanned: os.stat_result, reason: str, folder: Path, outcome: PhaseCollected) -> None:
    """Move a bad file into `folder` beside a `<stem>.reason.txt`, never overwriting one.

    A file replaced since it was scanned (a job renamed a new result over it)
    is left for the next run to judge.
    """
    try:
        current = path.stat()
    except FileNotFoundError:
        return
    if (current.st_ino, current.st_size, current.st_mtime_ns) != (scanned.st_ino, scanned.st_size, scanned.st_mtime_ns):
        log.info("%s changed since it was scanned; it is checked again on the next run", path)
        return
    stem = path.name[: -len(RESULT_SUFFIX)]
    folder.mkdir(parents=True, exist_ok=True)
    number = 1
    while True:
        candidate = stem if number == 1 else f"{stem}.{number}"
        target = folder / f"{candidate}{RESULT_SUFFIX}"
        note = folder / f"{candidate}.reason.txt"
        if not target.exists() and not note.exists():
            break
        number += 1
    text = (
        f"{reason}\n"
        f"file: {path}\n"
        f"quarantined: {time.strftime('%Y-%m-%d %H:%M:%S %z')} by collect on {socket.gethostname()}\n"
    )
    try:
        # The reason first: a crash before the move leaves only a stray note.
        atomic_write_bytes(note, text.encode())
        os.rename(path, target)
    except FileNotFoundError:
        note.unlink(missing_ok=True)
        return
    except OSError as err:
        note.unlink(missing_ok=True)
        log.error("cannot quarantine %s (%s): %s; left in place", path, reason, err)
        outcome.unreadable.append((path, f"{reason}; not moved: {err}"))
        return
    log.warning("quarantined %s -> %s: %s", path, target, reason)
    outcome.quarantined.append((target, reason))


def _table_matches(path: Path, recorded: dict[str, int] | None) -> bool:
    if not recorded:
        return False
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False
    return stat.st_size == recorded.get("size") and stat.st_mtime_ns == recorded.get("mtime_ns")


def _remove_leftover_temporaries(workdir: Workdir, phase: str) -> None:
    """Delete temporary tables and indexes of a collect that was killed mid-write.

    Safe under the collect lock: only collect writes these names.
    """
    results = workdir.root / "results"
    for target in (workdir.table(phase), index_path(workdir, phase)):
        for leftover in results.glob(f".{target.name}.*.tmp"):
            log.info("removing %s, left by an interrupted collect", leftover)
            leftover.unlink(missing_ok=True)


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
