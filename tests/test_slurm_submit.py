"""The walking skeleton on a real SLURM: submit through submitit, one array job, results."""

import math

import h5py
import pytest

from tests.helpers import run_cli, tiny_phase

pytestmark = pytest.mark.slurm


def test_submit_wait_on_slurm(slurm_cluster, tmp_workdir):
    spec = tiny_phase(tmp_workdir / "skeleton.toml", steps=20, bits=("fp16", "int8", "int6"), warmdown=(0.1, 0.5))
    workdir = tmp_workdir / "wd"
    result = run_cli("submit", "--phase-file", str(spec), "--cluster", "slurm", "--wait", "--workdir", str(workdir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "submitted 6 cells" in result.stdout

    files = sorted((workdir / "results" / "skeleton").glob("*.h5"))
    assert len(files) == 6
    array_ids = set()
    for path in files:
        with h5py.File(path, "r") as f:
            assert math.isfinite(f["metrics"].attrs["val_bpb"])
            array_ids.add(f["env"].attrs["slurm_array_job_id"])
            assert f["env"].attrs["slurm_array_task_id"] != ""
    assert len(array_ids) == 1
    assert "" not in array_ids

    again = run_cli("submit", "--phase-file", str(spec), "--cluster", "slurm", "--workdir", str(workdir))
    assert again.returncode == 0
    assert "submitted 0 cells" in again.stdout
