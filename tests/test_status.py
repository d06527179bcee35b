"""`status`: the state of every cell from result files, the ledger, quarantine and the scheduler.

Stand-in `sacct` and `squeue` scripts (tests.test_cluster_ops.FakeSlurm)
print what each test sets, so these tests run without a cluster. The SLURM
tests in test_cluster_ops check the same against the real one.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

from pipeline import ledger, manifest, status
from pipeline.phases import load_phase
from pipeline.status import SchedulerQuery, parse_states, phase_status
from pipeline.workdir import Workdir
from tests.helpers import run_cli, tiny_phase
from tests.test_cluster_ops import fake_slurm, write_result  # noqa: F401 (fake_slurm is a fixture)


@pytest.fixture
def phase(tmp_path):
    """A workdir with the manifest of a 9-cell phase in two blocks, and its cells."""
    spec = tmp_path / "st.toml"
    tiny_phase(spec, bits=("fp16", "int8", "int6"), warmdown=(0.1, 0.5, 0.9))
    cells = list(load_phase(None, spec).cells)
    cells = [c if i < 6 else c.replace(block="extra") for i, c in enumerate(cells)]
    workdir = Workdir.open(tmp_path / "wd")
    manifest.write(workdir.manifest("st"), cells)
    return workdir, cells


def submitted(workdir: Workdir, cells, job_ids, cluster="slurm", attempt=1) -> None:
    entries = [
        ledger.Entry(cell.cell_id, job_id, cluster, str(workdir.logs("st") / "%j"), 1.0, attempt)
        for cell, job_id in zip(cells, job_ids)
    ]
    ledger.append(ledger.path_for(workdir.results("st")), entries)


def states_of(result: status.PhaseStatus) -> list[str]:
    return [item.state for item in result.cells]


def test_parse_states():
    text = (
        "12_0|COMPLETED|0:0\n"
        "12_0.batch|COMPLETED|0:0\n"
        "12_1|CANCELLED by 0|0:15\n"
        "12_[2-4,7%2]|PENDING|0:0\n"
        "13|TIMEOUT|0:0\n"
        "14|RUNNING+|0:0\n"
        "\n"
        "garbage\n"
    )
    assert parse_states(text) == {
        "12_0": "COMPLETED",
        "12_1": "CANCELLED",
        "12_2": "PENDING",
        "12_3": "PENDING",
        "12_4": "PENDING",
        "12_7": "PENDING",
        "13": "TIMEOUT",
        "14": "RUNNING",
    }


def test_every_state(phase, fake_slurm):
    workdir, cells = phase
    write_result(workdir.root, "st", cells[0].cell_id, "done")
    write_result(workdir.root, "st", cells[1].cell_id, "diverged")
    submitted(workdir, cells[:8], ["40_0", "40_1", "40_2", "40_3", "40_4", "40_5", "40_6", "41"])
    fake_slurm.set_sacct(
        "40_0|COMPLETED|0:0\n40_1|COMPLETED|0:0\n40_2|RUNNING|0:0\n40_3|TIMEOUT|0:0\n"
        "40_4|FAILED|1:0\n40_[5-6%2]|PENDING|0:0\n41|COMPLETED|0:0\n"
    )

    result = phase_status(workdir, "st", cells)

    assert states_of(result) == [
        "done", "diverged", "running", "timed-out", "failed", "pending", "pending", "failed", "never-submitted",
    ]
    assert result.counts() == {
        "done": 1, "running": 1, "pending": 2, "failed": 2, "timed-out": 1, "diverged": 1, "never-submitted": 1,
    }
    assert result.counts("extra") == {
        "done": 0, "running": 0, "pending": 1, "failed": 1, "timed-out": 0, "diverged": 0, "never-submitted": 1,
    }
    assert result.cells[7].detail == "job 41 ended COMPLETED without a result"
    assert result.warnings == []
    (call,) = fake_slurm.calls("sacct")
    assert "-j 40,41 " in call
    assert fake_slurm.calls("squeue") == []


def test_sacct_missing_job_asks_squeue(phase, fake_slurm):
    workdir, cells = phase
    submitted(workdir, cells[:3], ["50_0", "50_1", "51"])
    fake_slurm.set_sacct("50_0|RUNNING|0:0\n")
    fake_slurm.set_squeue("50_1|PENDING\n")

    result = phase_status(workdir, "st", cells[:3])

    assert states_of(result) == ["running", "pending", "failed"]
    assert "not found by sacct or squeue" in result.cells[2].detail
    (call,) = fake_slurm.calls("squeue")
    assert "-j 50,51 " in call


def test_accounting_down_uses_squeue_and_warns_once(phase, fake_slurm, caplog):
    workdir, cells = phase
    write_result(workdir.root, "st", cells[0].cell_id, "done")
    submitted(workdir, cells[:4], ["60_0", "60_1", "60_2", "60_3"])
    fake_slurm.set_sacct(None)
    fake_slurm.set_squeue("60_1|RUNNING\n60_2|PENDING\n")
    caplog.set_level(logging.WARNING, logger="pipeline.status")
    query = SchedulerQuery()

    first = phase_status(workdir, "st", cells[:5], query)
    second = phase_status(workdir, "st", cells[:5], query)

    for result in (first, second):
        assert states_of(result) == ["done", "running", "pending", "failed", "never-submitted"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert warnings[0].startswith("sacct failed (sacct: error: Slurm accounting storage is disabled)")
    assert "counts as failed, even one that timed out" in warnings[0]
    assert "squeue (accounting down)" in first.cells[3].detail
    assert len(fake_slurm.calls("sacct")) == 2


def test_quarantined_cell(phase, fake_slurm):
    workdir, cells = phase
    folder = workdir.results("st") / "quarantine"
    folder.mkdir(parents=True)
    for cell in cells[:2]:
        (folder / f"{cell.cell_id}.h5").write_bytes(b"bad")
        (folder / f"{cell.cell_id}.reason.txt").write_text("curves/train_loss has 3 steps, expected 12\nmore\n")
    (folder / f"{cells[2].cell_id}.2.h5").write_bytes(b"bad")
    (folder / f"{cells[2].cell_id}.2.reason.txt").write_text("second quarantine\n")
    # Cell 1 was resubmitted after its quarantine and runs again.
    submitted(workdir, cells[1:2], ["70_0"], attempt=2)
    fake_slurm.set_sacct("70_0|RUNNING|0:0\n")

    result = phase_status(workdir, "st", cells[:4])

    assert states_of(result) == ["failed", "running", "failed", "never-submitted"]
    assert result.cells[0].detail == "quarantined: curves/train_loss has 3 steps, expected 12"
    assert result.cells[2].detail == "quarantined: second quarantine"


def test_unreadable_result_is_failed(phase, fake_slurm):
    workdir, cells = phase
    path = workdir.result("st", cells[0].cell_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not hdf5")

    result = phase_status(workdir, "st", cells[:1])

    assert states_of(result) == ["failed"]
    assert "unreadable" in result.cells[0].detail
    assert fake_slurm.calls("sacct") == []


def test_local_pid_running_then_failed(phase, fake_slurm):
    workdir, cells = phase
    # The command line names submitit, as the local executor's processes do.
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "submitit"])
    try:
        submitted(workdir, cells[:2], [str(process.pid), "999999999"], cluster="local")
        running = phase_status(workdir, "st", cells[:2])
    finally:
        process.kill()
        process.wait()
    ended = phase_status(workdir, "st", cells[:2])

    assert states_of(running) == ["running", "failed"]
    assert running.cells[0].job_state == "pid alive"
    assert states_of(ended) == ["failed", "failed"]
    assert fake_slurm.calls("sacct") == []


def test_pid_of_other_program_is_not_running():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not status.pid_alive(str(process.pid))
    finally:
        process.kill()
        process.wait()
    assert not status.pid_alive("not-a-pid")


def test_format_table_and_bar(phase, fake_slurm):
    workdir, cells = phase
    for cell in cells[:3]:
        write_result(workdir.root, "st", cell.cell_id, "done")
    write_result(workdir.root, "st", cells[6].cell_id, "diverged")

    text = status.format_table(phase_status(workdir, "st", cells))

    lines = text.splitlines()
    assert lines[0] == "phase st: 9 cells in 2 block(s), 4 finished"
    assert lines[1].split() == ["block", "cells", *status.STATES, "progress"]
    assert lines[2].split()[:9] == ["main", "6", "3", "0", "0", "0", "0", "0", "3"]
    assert lines[2].endswith("[############............]   50%")
    assert lines[3].split()[:9] == ["extra", "3", "0", "0", "0", "0", "0", "1", "2"]
    assert lines[4].split()[:9] == ["all", "9", "3", "0", "0", "0", "0", "1", "5"]
    assert status.progress_bar(0, 0, width=4) == "[####]  100%"


def test_cli_status_one_sacct_call(phase, fake_slurm):
    workdir, cells = phase
    submitted(workdir, cells, [f"80_{i}" for i in range(len(cells))])
    fake_slurm.set_sacct("".join(f"80_{i}|FAILED|1:0\n" for i in range(len(cells))))

    result = run_cli("status", "--phase", "st", "--workdir", str(workdir.root), env={"PATH": fake_slurm.path})

    assert result.returncode == 0, result.stderr
    assert len(fake_slurm.calls("sacct")) == 1
    assert result.stdout.splitlines()[-1].split()[:9] == ["all", "9", "0", "0", "0", "9", "0", "0", "0"]


def test_cli_status_lists_cells_with_logs(phase, fake_slurm):
    workdir, cells = phase
    submitted(workdir, cells[:2], ["90_0", "90_1"])
    fake_slurm.set_sacct("90_0|TIMEOUT|0:0\n90_1|OUT_OF_MEMORY|0:125\n")

    timed_out = run_cli("status", "--phase", "st", "--cells", "timed-out", "--workdir", str(workdir.root), env={"PATH": fake_slurm.path})
    failed = run_cli("status", "--phase", "st", "--cells", "failed", "--workdir", str(workdir.root), env={"PATH": fake_slurm.path})
    never = run_cli("status", "--phase", "st", "--cells", "never-submitted", "--workdir", str(workdir.root), env={"PATH": fake_slurm.path})
    running = run_cli("status", "--phase", "st", "--cells", "running", "--workdir", str(workdir.root), env={"PATH": fake_slurm.path})

    (line,) = timed_out.stdout.splitlines()
    assert line.startswith(f"{cells[0].cell_id}  main  bits=fp16  warmdown=0.1")
    assert f"job 90_0 TIMEOUT, attempt 1  log {workdir.logs('st')}/90_0/90_0_0_log.err" in line
    assert "ended OUT_OF_MEMORY without a result" in failed.stdout
    assert len(never.stdout.splitlines()) == 7
    assert running.stdout.strip() == "phase st: no cells are running"


def test_cli_status_watch_warns_once(phase, fake_slurm):
    workdir, cells = phase
    submitted(workdir, cells[:1], ["95_0"])
    fake_slurm.set_sacct(None)
    # squeue shows the task running on the first poll only.
    squeue = fake_slurm.bin / "squeue"
    squeue.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        echo "squeue $*" >> {fake_slurm.state}/calls.log
        if [ ! -f {fake_slurm.state}/polled ]; then touch {fake_slurm.state}/polled; echo "95_0|RUNNING"; fi
    """))

    result = run_cli(
        "status", "--phase", "st", "--watch", "0.1", "--workdir", str(workdir.root), env={"PATH": fake_slurm.path},
    )

    assert result.returncode == 0, result.stderr
    assert len(fake_slurm.calls("sacct")) == 2
    warnings = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1 and "sacct failed" in warnings[0]
    assert result.stdout.count("phase st: 9 cells") == 2


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--phase", "missing"], "no manifest for phase 'missing'"),
        (["--phase", "st", "--cells", "lost"], "invalid choice: 'lost'"),
        (["--phase", "st", "--watch", "0"], "invalid --watch 0"),
    ],
)
def test_cli_status_bad_input(phase, args, needle):
    workdir, _ = phase
    result = run_cli("status", *args, "--workdir", str(workdir.root))
    assert result.returncode == 2
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
