"""One HDF5 file per cell: settings, curves, final metrics, probe, environment, energy.

Layout of `results/<phase>/<cell_id>.h5` (schema version 1):

    /                 attrs: every Cell field, status, data_fingerprint,
                             schema_version, complete (written last)
    /metrics          attrs: val_loss, val_bpb, roundtrip_val_bpb, ptq_val_bpb_int{8,6,4},
                             probe_int{4,6,8} (at warmdown start), steps_done, tokens,
                             wall_s, tokens_per_s, diverged_step, requeues, ...
    /curves           datasets: train_loss, lr (per step); val_step, val_loss, val_bpb
    /probe            datasets: step, int4, int6, int8 (mean grid distance per probe)
    /env              attrs: host, versions, device, git_commit, SLURM ids
    /energy           attrs: see jobs.energy

The file is written under a temporary name and renamed when complete, so a
file at the final path is always whole.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.cell import CELL_FIELDS

SCHEMA_VERSION = 1


def write_result(
    path: Path,
    cell_row: dict[str, Any],
    status: str,
    metrics: dict[str, float],
    curves: dict[str, np.ndarray],
    probe: dict[str, np.ndarray],
    env: dict[str, str],
    energy: dict[str, Any],
    data_fingerprint: str,
) -> None:
    """Write a cell's result file atomically (temporary name, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w", locking=False) as f:
            for key, value in cell_row.items():
                f.attrs[key] = value
            f.attrs["status"] = status
            f.attrs["data_fingerprint"] = data_fingerprint
            f.attrs["schema_version"] = SCHEMA_VERSION
            _attrs(f.create_group("metrics"), metrics)
            group = f.create_group("curves")
            for key, values in curves.items():
                group.create_dataset(key, data=values)
            group = f.create_group("probe")
            for key, values in probe.items():
                group.create_dataset(key, data=values)
            _attrs(f.create_group("env"), env)
            _attrs(f.create_group("energy"), energy)
            f.attrs["complete"] = True
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _attrs(group: h5py.Group, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if value is None:
            value = ""
        elif isinstance(value, str):
            value = str(value)  # str subclasses (torch's TorchVersion) have no HDF5 type
        group.attrs[key] = value


def read_summary(path: Path) -> dict[str, Any]:
    """Return one collected-table row: cell fields, status, metrics, energy and env.

    Raises OSError or KeyError for a file that is unreadable or incomplete.
    """
    with h5py.File(path, "r", locking=False) as f:
        if not bool(f.attrs.get("complete", False)):
            raise KeyError(f"{path} has no completion marker")
        row: dict[str, Any] = {key: _plain(f.attrs[key]) for key in CELL_FIELDS}
        row["status"] = _plain(f.attrs["status"])
        row["data_fingerprint"] = _plain(f.attrs["data_fingerprint"])
        row.update({k: _plain(v) for k, v in f["metrics"].attrs.items()})
        for key in ("energy_kwh", "energy_source", "energy_kwh_modelled", "emissions_kg"):
            if key in f["energy"].attrs:
                row[key] = _plain(f["energy"].attrs[key])
        for key in ("host", "device", "git_commit", "slurm_job_id", "slurm_array_job_id", "slurm_array_task_id"):
            row[key] = _plain(f["env"].attrs.get(key, ""))
    return row


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value
