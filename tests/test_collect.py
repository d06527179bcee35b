"""`collect`: incremental tables, the lock, quarantine of bad files, the summary line, the nightly script."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from jobs.result import read_summary, write_result
from pipeline import collect as collect_lib
from pipeline import lock as lock_lib
from pipeline import manifest as manifest_lib
from pipeline.lock import ExclusiveLock, LockBusyError
from pipeline.phases import load_phase
from pipeline.workdir import Workdir
from tests.helpers import REPO, run_cli

CELLS = load_phase("micro").cells
PHASE = "micro"
STEPS = 40


def write_cell(folder: Path, cell, name: str | None = None, val_bpb: float = 2.5, **changes) -> Path:
    """Write a result file for `cell` as a job would, with `changes` applied to its attributes."""
    row = {**cell.to_row(), **changes}
    path = folder / (name or f"{cell.cell_id}.h5")
    loss = 3.0 + np.exp(-np.arange(STEPS) / 10.0)
    write_result(
        path,
        row,
        "done",
        {"val_loss": val_bpb * np.log(2), "val_bpb": val_bpb, "steps_done": float(STEPS)},
        {"train_loss": loss.astype(np.float32), "lr": np.linspace(1, 0, STEPS, dtype=np.float32)},
        {"step": np.array([30]), "int4": np.array([0.1])},
        {"host": "node1", "device": "cpu", "git_commit": "abc"},
        {"energy_kwh": 0.001, "energy_source": "codecarbon"},
        "fingerprint",
    )
    return path


@pytest.fixture
def study(tmp_path):
    """A workdir with the micro manifest and result files for its first five cells."""
    workdir = Workdir(tmp_path / "wd")
    manifest_lib.write(workdir.manifest(PHASE), CELLS)
    for cell in CELLS[:5]:
        write_cell(workdir.results(PHASE), cell)
    return workdir


def run(workdir: Workdir, **kwargs) -> collect_lib.CollectReport:
    return collect_lib.collect(workdir, [PHASE], **kwargs)


def table(workdir: Workdir) -> pd.DataFrame:
    return pd.read_parquet(workdir.table(PHASE))


@pytest.fixture
def reads(monkeypatch):
    """Count the result files that collect opens with h5py."""
    opened: list[str] = []
    original = collect_lib.read_summary

    def counting(path):
        opened.append(Path(path).name)
        return original(path)

    monkeypatch.setattr(collect_lib, "read_summary", counting)
    return opened


# -- incremental behaviour -------------------------------------------------------


def test_cold_run_collects_every_file(study):
    report = run(study)
    assert report.summary_line() == "collected 5 new cells; phase micro 5/36; 0 quarantined"
    assert not report.failed
    frame = table(study)
    assert sorted(frame["cell_id"]) == sorted(c.cell_id for c in CELLS[:5])
    assert list(frame["cell_id"]) == sorted(frame["cell_id"])
    assert frame["val_bpb"].tolist() == [2.5] * 5
    assert set(frame["host"]) == {"node1"}
    assert collect_lib.index_path(study, PHASE).is_file()


def test_second_run_reads_and_writes_nothing(study, reads):
    run(study)
    table_file, index_file = study.table(PHASE), collect_lib.index_path(study, PHASE)
    before = (table_file.read_bytes(), table_file.stat().st_mtime_ns, index_file.stat().st_mtime_ns)
    reads.clear()
    report = run(study)
    assert reads == []
    assert report.summary_line() == "collected 0 new cells; phase micro 5/36; 0 quarantined"
    assert not report.phases[0].table_written
    assert table_file.read_bytes() == before[0]
    assert table_file.stat().st_mtime_ns == before[1]
    assert index_file.stat().st_mtime_ns == before[2]


def test_changed_file_is_read_again(study, reads):
    run(study)
    reads.clear()
    time.sleep(0.01)  # a distinct mtime_ns even on coarse clocks
    write_cell(study.results(PHASE), CELLS[2], val_bpb=1.25)
    report = run(study)
    assert reads == [f"{CELLS[2].cell_id}.h5"]
    assert report.phases[0].updated == 1
    assert report.phases[0].new == 0
    assert report.summary_line() == "collected 0 new cells, 1 updated; phase micro 5/36; 0 quarantined"
    frame = table(study).set_index("cell_id")
    assert frame.loc[CELLS[2].cell_id, "val_bpb"] == 1.25


def test_touched_file_is_hashed_not_read(study, reads):
    run(study)
    table_before = study.table(PHASE).stat().st_mtime_ns
    path = study.result(PHASE, CELLS[0].cell_id)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    reads.clear()
    report = run(study)
    assert reads == []
    assert not report.phases[0].table_written
    assert study.table(PHASE).stat().st_mtime_ns == table_before
    index = json.loads(collect_lib.index_path(study, PHASE).read_text())
    assert index["files"][path.name]["mtime_ns"] == stat.st_mtime_ns + 5_000_000_000


def test_removed_file_leaves_table(study):
    run(study)
    study.result(PHASE, CELLS[1].cell_id).unlink()
    report = run(study)
    assert report.phases[0].removed == 1
    assert report.summary_line() == "collected 0 new cells, 1 removed; phase micro 4/36; 0 quarantined"
    assert CELLS[1].cell_id not in set(table(study)["cell_id"])


def test_incremental_table_equals_cold_table(study):
    run(study)
    write_cell(study.results(PHASE), CELLS[7])
    study.result(PHASE, CELLS[0].cell_id).unlink()
    time.sleep(0.01)
    write_cell(study.results(PHASE), CELLS[3], val_bpb=1.5)
    run(study)
    incremental = study.table(PHASE).read_bytes()
    study.table(PHASE).unlink()
    collect_lib.index_path(study, PHASE).unlink()
    run(study)
    assert study.table(PHASE).read_bytes() == incremental


def test_deleted_table_is_rebuilt_without_reading(study, reads):
    run(study)
    first = study.table(PHASE).read_bytes()
    study.table(PHASE).unlink()
    reads.clear()
    report = run(study)
    assert reads == []
    assert report.phases[0].table_written
    assert study.table(PHASE).read_bytes() == first


def test_corrupt_index_means_full_read(study, reads):
    run(study)
    collect_lib.index_path(study, PHASE).write_text("{not json")
    reads.clear()
    run(study)
    assert len(reads) == 5
    assert len(table(study)) == 5


def test_parallel_read_matches_serial(study, monkeypatch):
    run(study, jobs=1)
    serial = study.table(PHASE).read_bytes()
    study.table(PHASE).unlink()
    collect_lib.index_path(study, PHASE).unlink()
    monkeypatch.setattr(collect_lib, "PARALLEL_MIN_FILES", 1)
    run(study, jobs=2)
    assert study.table(PHASE).read_bytes() == serial


def test_read_summary_matches_h5py_attrs(tmp_path):
    """The fast attribute reader returns what h5py's own `attrs` returns, type for type."""
    path = write_cell(tmp_path, CELLS[0])
    with h5py.File(path, "r+") as f:
        metrics = f["metrics"].attrs
        metrics["half"] = np.float32(0.1)
        metrics["small"] = np.int8(-3)
        metrics["unsigned"] = np.uint64(2**63 + 5)
        metrics["missing"] = float("nan")
        metrics["flag"] = True
        metrics["curve"] = np.array([1.5, 2.5])
        metrics["label"] = "ok"
        metrics["fixed"] = np.bytes_(b"abc")
    row = read_summary(path)
    with h5py.File(path, "r") as f:
        expected = {key: value for key, value in f["metrics"].attrs.items()}
    assert row["half"] == float(np.float32(0.1))
    assert row["small"] == -3
    assert row["unsigned"] == 2**63 + 5
    assert np.isnan(row["missing"])
    assert row["flag"] is True
    assert row["curve"] == [1.5, 2.5]
    assert row["label"] == "ok"
    assert row["fixed"] == "abc"
    for key in ("val_bpb", "steps_done", "half", "small", "unsigned"):
        assert type(row[key]) is type(expected[key].item()), key
        assert row[key] == expected[key], key
    for field in ("seed", "n_params", "warmdown", "bits", "cell_id"):
        assert row[field] == getattr(CELLS[0], field), field
        assert type(row[field]) is type(getattr(CELLS[0], field)), field


# -- bad files ---------------------------------------------------------------------


def assert_quarantined(workdir: Workdir, name: str, needle: str, report) -> None:
    folder = collect_lib.quarantine_dir(workdir, PHASE)
    stem = name[: -len(".h5")]
    assert not (workdir.results(PHASE) / name).exists()
    assert (folder / name).is_file()
    reason = (folder / f"{stem}.reason.txt").read_text()
    assert needle in reason.splitlines()[0]
    assert report.phases[0].quarantined[0][0] == folder / name
    assert "1 quarantined" in report.summary_line()
    assert not report.failed


def test_truncated_file_quarantined(study):
    path = study.result(PHASE, CELLS[0].cell_id)
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])
    report = run(study)
    assert_quarantined(study, path.name, "unreadable result file", report)
    assert CELLS[0].cell_id not in set(table(study)["cell_id"])
    assert len(table(study)) == 4


def test_zero_byte_file_quarantined(study):
    path = study.result(PHASE, CELLS[0].cell_id)
    path.write_bytes(b"")
    report = run(study)
    assert_quarantined(study, path.name, "unreadable result file", report)
    assert len(table(study)) == 4


def test_file_without_completion_marker_quarantined(study):
    path = study.result(PHASE, CELLS[0].cell_id)
    with h5py.File(path, "r+") as f:
        del f.attrs["complete"]
    report = run(study)
    assert_quarantined(study, path.name, "no completion marker", report)
    assert len(table(study)) == 4


def test_settings_disagreeing_with_manifest_quarantined(study):
    cell = CELLS[0]
    write_cell(study.results(PHASE), cell, warmdown=0.2)
    report = run(study)
    assert_quarantined(
        study, f"{cell.cell_id}.h5",
        f"warmdown is 0.2 in the file but {cell.warmdown!r} in the manifest", report,
    )
    assert cell.cell_id not in set(table(study)["cell_id"])


def test_cell_missing_from_manifest_quarantined(study):
    stranger = CELLS[0].replace(seed=99)
    write_cell(study.results(PHASE), stranger)
    report = run(study)
    assert_quarantined(study, f"{stranger.cell_id}.h5", "is not in the manifest", report)
    assert len(table(study)) == 5


def test_duplicate_cell_id_quarantined(study):
    original = study.result(PHASE, CELLS[0].cell_id)
    shutil.copy(original, study.results(PHASE) / "copy-of-cell.h5")
    report = run(study)
    assert_quarantined(study, "copy-of-cell.h5", f"{original.name} also claims this cell", report)
    frame = table(study)
    assert list(frame["cell_id"]).count(CELLS[0].cell_id) == 1
    assert len(frame) == 5


def test_accepted_file_quarantined_after_manifest_change(study):
    run(study)
    manifest_lib.write(study.manifest(PHASE), CELLS[1:])
    report = run(study)
    assert_quarantined(study, f"{CELLS[0].cell_id}.h5", "is not in the manifest", report)
    assert report.summary_line() == "collected 0 new cells; phase micro 4/35; 1 quarantined"


def test_second_quarantine_keeps_first(study):
    path = study.result(PHASE, CELLS[0].cell_id)
    path.write_bytes(b"")
    run(study)
    path.write_bytes(b"not hdf5 either")
    run(study)
    folder = collect_lib.quarantine_dir(study, PHASE)
    assert (folder / path.name).read_bytes() == b""
    assert (folder / f"{CELLS[0].cell_id}.2.h5").read_bytes() == b"not hdf5 either"
    reasons = collect_lib.read_quarantine(study, PHASE)
    assert set(reasons) == {CELLS[0].cell_id, f"{CELLS[0].cell_id}.2"}


def test_file_replaced_after_read_not_quarantined(study, monkeypatch):
    path = study.result(PHASE, CELLS[0].cell_id)
    path.write_bytes(b"")
    original = collect_lib.read_rows

    def read_then_replace(paths, jobs=1):
        rows = original(paths, jobs)
        write_cell(study.results(PHASE), CELLS[0])  # a job renames a good result over the bad one
        return rows

    monkeypatch.setattr(collect_lib, "read_rows", read_then_replace)
    report = run(study)
    assert report.phases[0].quarantined == []
    assert path.stat().st_size > 0
    monkeypatch.setattr(collect_lib, "read_rows", original)
    report = run(study)
    assert report.summary_line() == "collected 1 new cell; phase micro 5/36; 0 quarantined"


def test_temporary_files_ignored(study):
    folder = study.results(PHASE)
    (folder / f".{CELLS[6].cell_id}.h5.4242.tmp").write_bytes(b"half written")
    (folder / "ledger.jsonl").write_text("{}\n")
    report = run(study)
    assert report.summary_line() == "collected 5 new cells; phase micro 5/36; 0 quarantined"
    assert (folder / f".{CELLS[6].cell_id}.h5.4242.tmp").exists()
    assert not collect_lib.quarantine_dir(study, PHASE).exists()


def test_unreadable_file_left_in_place(study, monkeypatch):
    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(collect_lib, "file_hash", denied)
    report = run(study)
    assert report.failed
    assert "5 unreadable (left in place, see log)" in report.summary_line()
    assert all(study.result(PHASE, c.cell_id).exists() for c in CELLS[:5])
    assert not collect_lib.quarantine_dir(study, PHASE).exists()


def test_invalid_manifest_fails_only_its_phase(study):
    other = Workdir(study.root)
    write_cell(other.results("extra"), CELLS[0], phase="extra")
    study.manifest(PHASE).write_text("cell_id,phase\nabc,micro\n")
    report = collect_lib.collect(study, ["extra", PHASE])
    assert report.failed
    assert report.summary_line() == "collected 1 new cell; phase extra 1, phase micro not collected; 0 quarantined"
    assert not study.table(PHASE).exists()


def test_phase_without_manifest_checks_phase_attribute(study):
    folder = study.results("extra")
    write_cell(folder, CELLS[0], phase="extra")
    write_cell(folder, CELLS[1])  # its phase attribute is micro
    report = collect_lib.collect(study, ["extra"])
    assert report.summary_line() == "collected 1 new cell; phase extra 1; 1 quarantined"
    reason = report.phases[0].quarantined[0][1]
    assert "phase attribute 'micro' does not match the results folder 'extra'" in reason


# -- phases and the command line ------------------------------------------------------


def test_phase_all_finds_manifests_and_results(study):
    write_cell(study.results("extra"), CELLS[0], phase="extra")
    (study.root / "results" / "extra" / "quarantine").mkdir()
    assert collect_lib.discover_phases(study) == ["extra", "micro"]
    assert collect_lib.resolve_phases(study, "all") == ["extra", "micro"]
    assert collect_lib.resolve_phases(study, "micro, extra") == ["micro", "extra"]


def test_cli_summary_and_bad_phase(study):
    result = run_cli("collect", "--phase", "all", "--workdir", str(study.root))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "collected 5 new cells; phase micro 5/36; 0 quarantined\n"
    result = run_cli("collect", "--phase", "micro,nope", "--workdir", str(study.root))
    assert result.returncode == 2
    assert "phase 'nope' has no results or manifest" in result.stderr


def test_cli_quarantine_warns_and_exits_zero(study):
    study.result(PHASE, CELLS[0].cell_id).write_bytes(b"")
    result = run_cli("collect", "--phase", "micro", "--workdir", str(study.root))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "collected 4 new cells; phase micro 4/36; 1 quarantined\n"
    assert "quarantined" in result.stderr


# -- the lock -------------------------------------------------------------------------


def test_no_wait_skips_while_locked(study):
    with ExclusiveLock(collect_lib.lock_path(study)):
        result = run_cli("collect", "--phase", "micro", "--no-wait", "--workdir", str(study.root))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("another collect is running; skipped")
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in result.stdout
    assert not study.table(PHASE).exists()


def test_wait_logs_notice_then_runs(study, caplog):
    held = ExclusiveLock(collect_lib.lock_path(study))
    held.acquire()
    releaser = threading.Timer(0.6, held.release)
    releaser.start()
    with caplog.at_level(logging.WARNING, logger="pipeline.lock"):
        report = run(study, notice_after_s=0.1)
    releaser.join()
    assert any("waiting for" in r.getMessage() and f"pid {os.getpid()}" in r.getMessage() for r in caplog.records)
    assert report.phases[0].cells == 5


def test_two_processes_at_once(study):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "pipeline", "collect", "--phase", "micro", "--workdir", str(study.root)]
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs = [process.communicate(timeout=120) for process in (first, second)]
    assert first.returncode == 0, outputs[0][1]
    assert second.returncode == 0, outputs[1][1]
    summaries = sorted(out for out, _ in outputs)
    assert summaries == [
        "collected 0 new cells; phase micro 5/36; 0 quarantined\n",
        "collected 5 new cells; phase micro 5/36; 0 quarantined\n",
    ]
    frame = table(study)
    assert len(frame) == 5
    assert frame["cell_id"].is_unique


def test_kill_during_table_write_keeps_previous(study):
    run(study)
    table_file = study.table(PHASE)
    index_file = collect_lib.index_path(study, PHASE)
    before = (table_file.read_bytes(), index_file.read_bytes())
    write_cell(study.results(PHASE), CELLS[8])
    marker = study.root / "writing"
    # A collect whose table write stops halfway, with the temporary file on disk.
    script = f"""
import os, sys, time
from pathlib import Path
import pipeline.collect as c
def stalled(path, payload):
    tmp = path.with_name("." + path.name + ".killed.tmp")
    tmp.write_bytes(payload[: len(payload) // 2])
    Path({str(marker)!r}).touch()
    time.sleep(60)
c.atomic_write_bytes = stalled
from pipeline.cli import main
sys.exit(main(["collect", "--phase", "micro", "--workdir", {str(study.root)!r}]))
"""
    process = subprocess.Popen(
        [sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), process.communicate()
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    assert table_file.read_bytes() == before[0]
    assert index_file.read_bytes() == before[1]
    assert len(pd.read_parquet(table_file)) == 5

    report = run(study)
    assert report.summary_line() == "collected 1 new cell; phase micro 6/36; 0 quarantined"
    assert not list((study.root / "results").glob(".*.tmp"))


def test_kill_with_workers_frees_lock(study):
    started = study.root / "worker-pids"
    started.mkdir()
    # A collect whose forked readers hang, each leaving its pid in `started`.
    script = f"""
import os, sys, time
from pathlib import Path
import pipeline.collect as c
def hang(path):
    (Path({str(started)!r}) / str(os.getpid())).touch()
    time.sleep(120)
c._read_row = hang
c.PARALLEL_MIN_FILES = 1
from pipeline.cli import main
sys.exit(main(["collect", "--phase", "micro", "--jobs", "2", "--workdir", {str(study.root)!r}]))
"""
    process = subprocess.Popen(
        [sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while len(list(started.iterdir())) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = [int(p.name) for p in started.iterdir()]
    assert len(workers) == 2, process.communicate()
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)

    # The workers inherited the flock's file description; they must not keep it.
    ExclusiveLock(collect_lib.lock_path(study), wait=False).acquire()
    deadline = time.monotonic() + 10
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in workers if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)]
    assert alive == []


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def test_failed_index_write_heals_next_run(study, monkeypatch):
    run(study)
    write_cell(study.results(PHASE), CELLS[8])
    original = collect_lib.atomic_write_bytes

    def fail_on_index(path, payload):
        if path.name.endswith(".index.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        original(path, payload)

    monkeypatch.setattr(collect_lib, "atomic_write_bytes", fail_on_index)
    report = run(study)
    assert report.failed
    assert "phase micro not collected" in report.summary_line()
    monkeypatch.setattr(collect_lib, "atomic_write_bytes", original)
    report = run(study)
    assert report.summary_line() == "collected 1 new cell; phase micro 6/36; 0 quarantined"
    assert len(table(study)) == 6


def no_flock(monkeypatch):
    def flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(lock_lib.fcntl, "flock", flock)


def test_lock_falls_back_without_flock(study, monkeypatch, caplog):
    no_flock(monkeypatch)
    seen = {}
    original = collect_lib.collect_phase

    def spy(workdir, phase, jobs=1):
        owner = collect_lib.lock_path(workdir).with_name(".collect.lock.owner")
        seen["owner"] = json.loads(owner.read_text())
        return original(workdir, phase, jobs=jobs)

    monkeypatch.setattr(collect_lib, "collect_phase", spy)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        report = run(study)
    assert report.phases[0].cells == 5
    assert seen["owner"]["pid"] == os.getpid()
    assert seen["owner"]["host"] == socket.gethostname()
    assert any("falls back to the owner file" in r.getMessage() for r in caplog.records)
    assert any("held with owner file" in r.getMessage() for r in caplog.records)
    assert not (study.root / "results" / ".collect.lock.owner").exists()


def write_owner(path: Path, host: str, pid: int, age_s: float = 0.0) -> Path:
    owner = path.with_name(path.name + ".owner")
    owner.parent.mkdir(parents=True, exist_ok=True)
    owner.write_text(json.dumps({"host": host, "pid": pid, "started": time.time() - age_s, "token": "t"}))
    if age_s:
        then = time.time() - age_s
        os.utime(owner, (then, then))
    return owner


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize(
    "host, pid, age_s, busy",
    [
        ("this", "live", 0.0, True),
        ("this", "dead", 0.0, False),
        ("other-host.invalid", "live", 0.0, True),
        ("other-host.invalid", "live", 3600.0, False),
    ],
    ids=["live-holder", "dead-holder", "other-host-fresh", "other-host-stale"],
)
def test_owner_file_stale_rule(tmp_path, monkeypatch, host, pid, age_s, busy):
    no_flock(monkeypatch)
    path = tmp_path / ".collect.lock"
    owner = write_owner(
        path, socket.gethostname() if host == "this" else host,
        os.getpid() if pid == "live" else dead_pid(), age_s,
    )
    lock = ExclusiveLock(path, wait=False, stale_after_s=600.0)
    if busy:
        with pytest.raises(LockBusyError):
            lock.acquire()
        assert owner.exists()
    else:
        lock.acquire()
        assert lock.mechanism == lock_lib.OWNER_FILE
        assert json.loads(owner.read_text())["token"] != "t"
        lock.release()
        assert not owner.exists()


def test_flock_holder_honours_live_owner_file(tmp_path):
    path = tmp_path / ".collect.lock"
    write_owner(path, "other-host.invalid", 1)
    with pytest.raises(LockBusyError, match="pid 1 on host other-host.invalid"):
        ExclusiveLock(path, wait=False).acquire()


def test_owner_file_heartbeat(tmp_path, monkeypatch):
    no_flock(monkeypatch)
    lock = ExclusiveLock(tmp_path / ".collect.lock", heartbeat_s=0.05, stale_after_s=1.0)
    with lock:
        old = time.time() - 100
        os.utime(lock.owner_path, (old, old))
        time.sleep(0.3)
        assert time.time() - lock.owner_path.stat().st_mtime < 5


# -- the nightly script ----------------------------------------------------------------


def nightly(study: Workdir, **env) -> subprocess.CompletedProcess:
    variables = {
        **os.environ, "QAT_WORKDIR": str(study.root), "QAT_VENV": str(Path(sys.executable).parent.parent),
        "QAT_REPORT_PHASES": "none", **env,
    }
    return subprocess.run(
        ["bash", str(REPO / "sbatch" / "nightly-aggregate.sbatch")],
        env=variables, capture_output=True, text=True, timeout=120,
    )


def test_nightly_script_collects_and_logs(study):
    result = nightly(study)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "collected 5 new cells; phase micro 5/36; 0 quarantined",
        "report skipped: QAT_REPORT_PHASES=none",
    ]
    log = (study.root / "logs" / "nightly" / "collect.log").read_text()
    assert "nightly aggregate on" in log
    assert "with flock" in log
    assert len(table(study)) == 5


def test_nightly_script_rotates_log(study):
    for _ in range(4):
        assert nightly(study, QAT_LOG_MAX_BYTES="1", QAT_LOG_KEEP="2").returncode == 0
    names = sorted(p.name for p in (study.root / "logs" / "nightly").iterdir())
    assert names == ["collect.log", "collect.log.1", "collect.log.2"]


def test_nightly_script_failed_collect(tmp_path):
    empty = Workdir(tmp_path / "empty")
    empty.root.mkdir()
    result = nightly(empty)
    assert result.returncode == 2
    lines = result.stdout.splitlines()
    assert lines[0] == f"collect failed with exit status 2; the end of {empty.root}/logs/nightly/collect.log:"
    assert "--phase all found no manifests/*.csv" in result.stdout


def test_nightly_script_missing_venv(study, tmp_path):
    result = nightly(study, QAT_VENV=str(tmp_path / "no-venv"))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"nightly-aggregate: error: no Python at {tmp_path / 'no-venv'}/bin/python; set QAT_VENV to "
        f"the project's virtual environment (`make setup` creates {REPO}/.venv)"
    )
    assert not study.table(PHASE).exists()
