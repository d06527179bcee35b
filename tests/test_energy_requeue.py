"""Energy on the real SLURM test cluster: a cell requeued twice reports the sum of its attempts."""

import math
import subprocess

import h5py
import pandas as pd
import pytest

from tests.helpers import run_cli, tiny_phase
from tests.test_cluster_ops import cancel_jobs, checkpoint_step, job_state, latest_entries, slurm_submit, wait_for

pytestmark = pytest.mark.slurm

STEPS = 6000  # long enough to be signalled twice mid-run on a tiny cell


def requeue(job_id: str) -> None:
    """Send USR2 to a running array task, wait for its requeue and release it at once."""
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    wait_for(lambda: job_state(job_id) == "PENDING", what="requeue")
    # A requeued job waits about two minutes (BeginTime); start it now.
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=30)


def test_requeued_twice_sums_attempts(slurm_cluster, tmp_workdir):
    spec = tiny_phase(tmp_workdir / "energy.toml", steps=STEPS, bits=("int6",), warmdown=(0.5,))
    workdir = tmp_workdir / "wd"
    slurm_submit(spec, workdir)
    (cell_id, entry), = latest_entries(workdir, "energy").items()
    checkpoint = workdir / "checkpoints" / "energy" / f"{cell_id}.pt"
    result_path = workdir / "results" / "energy" / f"{cell_id}.h5"
    try:
        wait_for(lambda: checkpoint_step(checkpoint) >= 20, what="first checkpoints")
        requeue(entry.job_id)
        first = checkpoint_step(checkpoint)
        wait_for(lambda: checkpoint_step(checkpoint) >= first + 20, what="checkpoints after the first requeue")
        requeue(entry.job_id)
        wait_for(result_path.exists, what="result")
    finally:
        cancel_jobs(workdir, "energy")

    with h5py.File(result_path, "r") as f:
        energy = dict(f["energy"].attrs)
        requeues = int(f["metrics"].attrs["requeues"])
    assert requeues == 2
    assert int(energy["attempts"]) == 3
    assert int(energy["codecarbon_attempts"]) == 3
    assert energy["energy_source"] == "codecarbon"
    assert energy["energy_kwh"] > 0
    assert energy["energy_kwh"] == pytest.approx(energy["codecarbon_kwh"])
    # Each attempt trained for a while, so the summed duration exceeds any one attempt's start-up.
    assert energy["codecarbon_duration_s"] > 0

    collected = run_cli("collect", "--phase", "energy", "--workdir", str(workdir))
    assert collected.returncode == 0, collected.stderr
    table = pd.read_parquet(workdir / "results" / "energy.parquet")
    for column in ("energy_kwh", "energy_source", "energy_kwh_modelled", "emissions_kg", "energy_kwh_slurm"):
        assert column in table.columns
    assert math.isclose(table["energy_kwh"].iloc[0], energy["energy_kwh"])
