"""Checks that the single-node SLURM test cluster runs submitit arrays, records
them in accounting, and that the helpers which change the cluster undo their
changes."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import submitit

from tests import slurm_cluster as cluster_helpers
from tests.slurm_cluster import (
    CLUSTER_SCRIPT,
    ClusterUnavailableError,
    accounting_responds,
    accounting_stopped,
    current_max_array_size,
    sacct_states,
    set_max_array_size,
    wait_idle,
)

# Bound for waits on the scheduler and on accounting; a healthy cluster
# needs a few seconds.
WAIT_TIMEOUT_S = 60.0


def _sbatch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, timeout=30)


def _wait_for_sacct_states(job_id: str, expected: dict[str, str]) -> dict[str, str]:
    """Poll sacct until it shows the expected states, because slurmctld sends
    job records to slurmdbd a moment after the job ends."""
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while True:
        states = sacct_states(job_id)
        if all(states.get(step_id) == state for step_id, state in expected.items()):
            return states
        if time.monotonic() >= deadline:
            return states
        time.sleep(1.0)


def _wait_for_job_state(job_id: str, state: str) -> bool:
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while time.monotonic() < deadline:
        squeue = subprocess.run(
            ["squeue", "--noheader", "--jobs", job_id, "--format=%T"], capture_output=True, text=True, timeout=30
        )
        if squeue.stdout.strip() == state:
            return True
        time.sleep(0.5)
    return False


@pytest.mark.slurm
def test_cluster_status_is_ok(slurm_cluster):
    result = subprocess.run(["bash", str(CLUSTER_SCRIPT), "status"], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr
    assert slurm_cluster.partition
    assert slurm_cluster.nodes


@pytest.mark.slurm
def test_submitit_map_array_is_accounted(slurm_cluster, tmp_workdir: Path):
    # Nested, so that cloudpickle sends the function by value: the job's
    # Python cannot import this test module by name.
    def square_in_task(value: int) -> tuple[int, str | None]:
        import os

        return value * value, os.environ.get("SLURM_ARRAY_TASK_ID")

    executor = submitit.AutoExecutor(folder=tmp_workdir / "submitit", cluster="slurm")
    executor.update_parameters(
        timeout_min=5,
        cpus_per_task=1,
        slurm_partition=slurm_cluster.partition,
        slurm_array_parallelism=2,
    )
    jobs = executor.map_array(square_in_task, [0, 1, 2, 3])
    # job.result() alone would wait forever on a stuck cluster.
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    while not all(job.done() for job in jobs) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not all(job.done() for job in jobs):
        for job in jobs:
            job.cancel(check=False)
        pytest.fail(f"array {jobs[0].job_id} not done after {WAIT_TIMEOUT_S:.0f} s: {[job.state for job in jobs]}")
    results = [job.result() for job in jobs]

    assert [square for square, _ in results] == [0, 1, 4, 9]
    assert [task_id for _, task_id in results] == ["0", "1", "2", "3"]

    array_id = jobs[0].job_id.split("_")[0]
    assert [job.job_id for job in jobs] == [f"{array_id}_{index}" for index in range(4)]

    expected = {f"{array_id}_{index}": "COMPLETED" for index in range(4)}
    states = _wait_for_sacct_states(array_id, expected)
    for task_id in expected:
        assert states.get(task_id) == "COMPLETED", f"sacct -j {array_id} shows {states}"


@pytest.mark.slurm
def test_max_array_size_rejects_then_restores(slurm_cluster, tmp_workdir: Path):
    original_size = current_max_array_size()
    output = f"--output={tmp_workdir}/%A_%a.out"

    with set_max_array_size(4):
        assert current_max_array_size() == 4
        rejected = _sbatch("--array=0-9", "--hold", output, "--wrap=true")
        assert rejected.returncode != 0, f"sbatch accepted --array=0-9 with MaxArraySize=4: {rejected.stdout}"
        assert "Invalid job array specification" in rejected.stderr

    assert current_max_array_size() == original_size
    accepted = _sbatch("--array=0-9", "--hold", output, "--wrap=true")
    assert accepted.returncode == 0, accepted.stderr
    subprocess.run(["scancel", accepted.stdout.strip()], check=True, timeout=30)


def test_max_array_size_rejects_invalid_value():
    # Validation comes before any file or daemon is touched, so no cluster is needed.
    for size in (-1, 4_000_002, 2.5, "4", True):
        with pytest.raises(ValueError, match="MaxArraySize must be an int"):
            with set_max_array_size(size):
                pass


def test_replace_max_array_size_line():
    conf = "ClusterName=x\nmaxarraysize = 1001\nNodeName=n CPUs=2\n"

    replaced = cluster_helpers._replace_max_array_size(conf, 4)
    assert replaced == "ClusterName=x\nMaxArraySize=4\nNodeName=n CPUs=2\n"

    appended = cluster_helpers._replace_max_array_size("ClusterName=x", 4)
    assert appended == "ClusterName=x\nMaxArraySize=4\n"


def test_ensure_cluster_without_root_is_unavailable(monkeypatch):
    monkeypatch.setattr(cluster_helpers, "node_states", lambda: [])
    monkeypatch.setattr(os, "geteuid", lambda: 1000)

    with pytest.raises(ClusterUnavailableError, match="needs root"):
        cluster_helpers.ensure_cluster()


@pytest.mark.slurm
def test_accounting_stopped_then_responds(slurm_cluster):
    assert accounting_responds()

    with accounting_stopped():
        assert not accounting_responds()
        sacct = subprocess.run(["sacct", "-n", "-X"], capture_output=True, text=True, timeout=30)
        assert sacct.returncode != 0

    assert accounting_responds()


@pytest.mark.slurm
def test_wait_idle_times_out_while_busy(slurm_cluster, tmp_workdir: Path):
    wait_idle(WAIT_TIMEOUT_S)

    # --exclusive takes every CPU of the node, so it is allocated, not idle.
    busy = _sbatch("--exclusive", f"--output={tmp_workdir}/busy.out", "--wrap=sleep 60")
    assert busy.returncode == 0, busy.stderr
    job_id = busy.stdout.strip()
    try:
        # A pending job leaves the node idle, so wait_idle would return at once.
        assert _wait_for_job_state(job_id, "RUNNING"), f"job {job_id} did not start within {WAIT_TIMEOUT_S:.0f} s"
        with pytest.raises(TimeoutError, match="not idle"):
            wait_idle(2.0)
    finally:
        subprocess.run(["scancel", job_id], check=True, timeout=30)

    wait_idle(WAIT_TIMEOUT_S)
