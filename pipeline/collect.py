"""Collect the per-cell HDF5 files of a phase into one table (parquet)."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from jobs.result import read_summary
from pipeline.workdir import Workdir, atomic_write_bytes

log = logging.getLogger(__name__)


@dataclass
class Collected:
    phase: str
    table: pd.DataFrame
    unreadable: list[tuple[Path, str]] = field(default_factory=list)


def collect_phase(workdir: Workdir, phase: str) -> Collected:
    """Read every result file of `phase` and write `results/<phase>.parquet` atomically."""
    rows = []
    unreadable = []
    for path in sorted(workdir.results(phase).glob("*.h5")):
        try:
            rows.append(read_summary(path))
        except (OSError, KeyError) as err:
            unreadable.append((path, str(err)))
            log.warning("skipping unreadable result %s: %s", path, err)
    table = pd.DataFrame(rows)
    if not table.empty:
        table = table.sort_values("cell_id", kind="stable").reset_index(drop=True)
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    atomic_write_bytes(workdir.table(phase), buffer.getvalue())
    return Collected(phase=phase, table=table, unreadable=unreadable)


def read_table(workdir: Workdir, phase: str) -> pd.DataFrame:
    return pd.read_parquet(workdir.table(phase))
