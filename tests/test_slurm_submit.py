"""The walking skeleton on a real SLURM: submit through submitit, one array job, results."""

import math

import h5py
import pandas as pd
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

    collected = run_cli("collect", "--phase", "skeleton", "--workdir", str(workdir))
    assert collected.returncode == 0, collected.stderr
    table = pd.read_parquet(workdir / "results" / "skeleton.parquet")
    assert len(table) == 6
    assert table["val_bpb"].notna().all()
    # The test cluster has no energy plugin: sacct reports 0, which means "not recorded".
    assert "energy_kwh_slurm" in table.columns
    assert table["energy_kwh_slurm"].isna().all()
    assert (table["energy_source"] != "").all()

    again = run_cli("submit", "--phase-file", str(spec), "--cluster", "slurm", "--workdir", str(workdir))
    assert again.returncode == 0
    assert "submitted 0 cells" in again.stdout


def test_invalid_partition_one_line(slurm_cluster, tmp_workdir):
    spec = tiny_phase(tmp_workdir / "badpart.toml", steps=4, bits=("fp16",), warmdown=(0.1,))
    profile = tmp_workdir / "profile.toml"
    profile.write_text('partition = "nosuchpartition"\n[time_minutes]\ndefault = 5\n')
    workdir = tmp_workdir / "wd"
    result = run_cli(
        "submit", "--phase-file", str(spec), "--cluster", "slurm", "--profile", str(profile),
        "--workdir", str(workdir),
    )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "nosuchpartition" in lines[0] or "partition" in lines[0]
    assert not (workdir / "results" / "badpart" / "ledger.jsonl").exists()
    leftovers = list((workdir / "logs" / "badpart").glob("*.pkl")) if (workdir / "logs" / "badpart").exists() else []
    assert leftovers == []
