"""The walking skeleton end to end without SLURM: manifest, submit, train, collect, analyse."""

import h5py
import math

import pandas as pd
import pytest

from tests.helpers import run_cli, tiny_phase


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny phase submitted with submitit's local executor and waited for."""
    root = tmp_path_factory.mktemp("e2e")
    spec = tiny_phase(root / "tiny.toml")
    workdir = root / "wd"
    result = run_cli("submit", "--phase-file", str(spec), "--cluster", "local", "--wait", "--workdir", str(workdir))
    assert result.returncode == 0, result.stdout + result.stderr
    return spec, workdir, result


def test_every_cell_has_a_result(finished):
    _, workdir, result = finished
    files = sorted((workdir / "results" / "tiny").glob("*.h5"))
    assert len(files) == 4
    assert "4/4 cells have results" in result.stdout


def test_result_file_contents(finished):
    _, workdir, _ = finished
    path = sorted((workdir / "results" / "tiny").glob("*.h5"))[0]
    with h5py.File(path, "r") as f:
        assert f.attrs["complete"]
        assert f.attrs["status"] == "done"
        assert math.isfinite(f["metrics"].attrs["val_bpb"])
        assert f["curves/train_loss"].shape == (12,)
        assert f["curves/lr"][-1] == pytest.approx(0.0, abs=1e-6) or f["curves/lr"][-1] < 0.2
        assert f["env"].attrs["torch_version"]
        assert "energy_kwh" in f["energy"].attrs
        assert f.attrs["cell_id"] == path.stem


def test_second_submit_submits_nothing(finished):
    spec, workdir, _ = finished
    result = run_cli("submit", "--phase-file", str(spec), "--cluster", "local", "--workdir", str(workdir))
    assert result.returncode == 0
    assert "submitted 0 cells" in result.stdout


def test_collect_and_analyze(finished):
    _, workdir, _ = finished
    result = run_cli("collect", "--phase", "tiny", "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr
    table = pd.read_parquet(workdir / "results" / "tiny.parquet")
    assert len(table) == 4
    assert table["val_bpb"].notna().all()
    assert set(table["bits"]) == {"fp16", "int6"}
    int6 = table[table["bits"] == "int6"]
    assert (int6["roundtrip_val_bpb"] - int6["val_bpb"]).abs().max() < 1e-4
    fp16 = table[table["bits"] == "fp16"]
    assert fp16["ptq_val_bpb_int4"].notna().all()
