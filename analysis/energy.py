"""Energy per phase, bits and size, next to the val_bpb it bought."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from .data import NotSupported, size_order


@dataclass
class EnergySummary:
    """Energy used by the cells, grouped several ways.

    Diverged cells count too, since they used energy before they stopped.

    Attributes
    ----------
    total_kwh : float
        Sum over cells with a measured or modelled value.
    total_emissions_kg : float
        Sum of emissions_kg (NaN when the column is absent or empty).
    by_phase, by_bits, by_size : pandas.DataFrame
        Per group: cells, kwh (sum), kwh_per_cell (mean).
    by_cell_group : pandas.DataFrame
        Per (phase, bits, size): cells, kwh, kwh_per_cell and mean_val_bpb
        (over done cells), so the energy sits next to what it bought.
    sources : pandas.Series
        Cells per energy_source value.
    n_without_energy : int
        Cells with no energy_kwh value, left out of the sums.
    notes : list of str
    """

    total_kwh: float
    total_emissions_kg: float
    by_phase: pd.DataFrame
    by_bits: pd.DataFrame
    by_size: pd.DataFrame
    by_cell_group: pd.DataFrame
    sources: pd.Series
    n_without_energy: int
    notes: list = field(default_factory=list)


def _grouped(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    return (
        frame.groupby(by, sort=False)["energy_kwh"]
        .agg(cells="count", kwh="sum", kwh_per_cell="mean")
        .reset_index()
    )


def energy_summary(table: pd.DataFrame) -> EnergySummary | NotSupported:
    """Sum energy per phase, bits and size, and per (phase, bits, size) with mean val_bpb."""
    if "energy_kwh" not in table.columns or table["energy_kwh"].isna().all():
        return NotSupported("no energy_kwh values in the table")
    with_energy = table[table["energy_kwh"].notna()]
    n_without = int(table["energy_kwh"].isna().sum())
    notes = [f"{n_without} cells without energy_kwh left out of the sums"] if n_without else []

    by_cell_group = _grouped(with_energy, ["phase", "bits", "size"])
    done = table[(table["status"] == "done") & table["val_bpb"].notna()]
    bpb = done.groupby(["phase", "bits", "size"])["val_bpb"].mean().rename("mean_val_bpb").reset_index()
    by_cell_group = by_cell_group.merge(bpb, on=["phase", "bits", "size"], how="left")
    order = {s: i for i, s in enumerate(size_order(table))}
    by_size = _grouped(with_energy, ["size"])
    by_size = by_size.sort_values("size", key=lambda s: s.map(order)).reset_index(drop=True)
    by_cell_group = by_cell_group.sort_values(
        ["phase", "bits", "size"], key=lambda s: s.map(order) if s.name == "size" else s
    ).reset_index(drop=True)

    emissions = float(table["emissions_kg"].sum(min_count=1)) if "emissions_kg" in table else float("nan")
    sources = (table["energy_source"].value_counts() if "energy_source" in table
               else pd.Series(dtype=int))
    return EnergySummary(
        total_kwh=float(with_energy["energy_kwh"].sum()), total_emissions_kg=emissions,
        by_phase=_grouped(with_energy, ["phase"]), by_bits=_grouped(with_energy, ["bits"]),
        by_size=by_size, by_cell_group=by_cell_group, sources=sources,
        n_without_energy=n_without, notes=notes,
    )
