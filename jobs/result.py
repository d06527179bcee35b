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
from h5py import h5a, h5s, h5t

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


ENERGY_COLUMNS = ("energy_kwh", "energy_source", "energy_kwh_modelled", "emissions_kg")
ENV_COLUMNS = ("host", "device", "git_commit", "slurm_job_id", "slurm_array_job_id", "slurm_array_task_id")


def read_summary(path: Path) -> dict[str, Any]:
    """Return one collected-table row: cell fields, status, metrics, energy and env.

    The file is opened read-only with HDF5 file locking off (`locking=False`),
    so it reads on NFS and Lustre mounts without POSIX locks and never blocks
    on a writer's lock. Other HDF5 tools do the same when the environment has
    `HDF5_USE_FILE_LOCKING=FALSE`.

    Raises
    ------
    KeyError
        When the file has no completion marker, or lacks a cell field, a
        status, or one of the groups metrics, energy and env.
    OSError
        When HDF5 cannot open or read the file (truncated, zero bytes, not HDF5).
    """
    with h5py.File(path, "r", locking=False) as f:
        if not bool(f.attrs.get("complete", False)):
            raise KeyError(f"{path} has no completion marker (attribute 'complete')")
        root = _read_attrs(f, CELL_FIELDS + ("status", "data_fingerprint"))
        row: dict[str, Any] = dict(root)
        row.update(_read_attrs(f["metrics"]))
        energy = f["energy"]
        row.update(_read_attrs(energy, tuple(k for k in ENERGY_COLUMNS if k in energy.attrs)))
        env = f["env"]
        present = _read_attrs(env, tuple(k for k in ENV_COLUMNS if k in env.attrs))
        row.update({key: present.get(key, "") for key in ENV_COLUMNS})
    return row


def _read_attrs(obj: h5py.HLObject, names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Return the attributes `names` of `obj` (all of them when None) as Python values.

    Raises KeyError naming the attribute when one of `names` is missing.
    """
    oid = obj.id
    if names is None:
        names = tuple(obj.attrs.keys())
    values = {}
    for key in names:
        name = key.encode()
        if not h5a.exists(oid, name):
            raise KeyError(f"attribute {key!r} missing from {obj.name!r} in {obj.file.filename}")
        values[key] = _read_attr(h5a.open(oid, name))
    return values


def _read_attr(attr: h5a.AttrID) -> Any:
    """Return one attribute's value as a Python object (None for an empty attribute).

    A scalar float or signed integer, most of a result file's attributes, is
    read straight into a native float64 or int64. That skips h5py's type
    translation on every read, so `read_summary` took 1.48 instead of 1.99 ms
    of CPU per file (h5py 3.16, HDF5 2.0, see BENCHMARKS.md), which matters
    because `collect` reads some 60 attributes from each of thousands of files.
    Every other attribute (strings, booleans, arrays) takes h5py's general path.
    """
    space_type = attr.get_space().get_simple_extent_type()
    if space_type == h5s.NULL:
        return None
    file_type = attr.get_type()
    type_class = file_type.get_class()
    if space_type == h5s.SCALAR:
        if type_class == h5t.FLOAT:
            buffer = np.empty((), np.float64)
            attr.read(buffer, mtype=h5t.NATIVE_DOUBLE)
            return buffer.item()
        if type_class == h5t.INTEGER and file_type.get_sign() == h5t.SGN_2:
            buffer = np.empty((), np.int64)
            attr.read(buffer, mtype=h5t.NATIVE_INT64)
            return buffer.item()
    buffer = np.empty(attr.shape, dtype=attr.dtype)
    attr.read(buffer)
    return _plain(buffer[()])


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [_plain(item) for item in value.tolist()]
    return value
