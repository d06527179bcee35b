"""Validate the collected table, split it by status, and match cells into pairs.

Every analysis reads cells through these helpers, so they all agree on which
cells are done, which two cells form a pair, and how seeds are averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.cell import BITS, CELL_FIELDS, LABEL_FIELDS

REQUIRED_COLUMNS = (
    "cell_id", "phase", "block", "bits", "warmdown", "size", "seed", "status", "val_bpb",
)
STATUSES = ("done", "diverged")
QUANTISED_BITS = tuple(b for b in BITS if b != "fp16")

# Blocks of phase 5. Every other block (phase 2 "main", the micro grid, user
# phases) forms the primary grid that claims 1 to 4 are computed on.
PHASE5_BLOCKS = ("optimiser", "shape", "length", "sizes", "int4", "int4-reference", "probe")
ROBUSTNESS_BLOCKS = ("optimiser", "shape", "length")
HELD_OUT_BLOCK = "sizes"

# Settings that define a training run; two cells are a pair when they agree on
# all of them except the one factor being compared.
SETTINGS = tuple(f for f in CELL_FIELDS if f not in LABEL_FIELDS and f != "cell_id")

# Phase 5 axes: constant in phase 2, so a model term for one is added only
# when the data has more than one level of it.
AXES = ("optimizer", "shape", "steps_mult")


class NotSupported:
    """Result of an analysis that lacks the cells it needs.

    Attributes
    ----------
    reason : str
        Why the analysis cannot be computed, naming the missing cells or factor levels.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __str__(self) -> str:
        return f"not supported: {self.reason}"

    def __repr__(self) -> str:
        return f"NotSupported({self.reason!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NotSupported) and other.reason == self.reason

    __hash__ = None  # mutable attribute, so instances are not hashable


def validate_table(table: pd.DataFrame) -> pd.DataFrame:
    """Check the collected table and return a copy with normalised column types.

    Raises
    ------
    ValueError
        When a required column is missing, or a status or bits value is unknown.
    """
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"expected a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(
            f"result table is missing columns {missing}; it needs {list(REQUIRED_COLUMNS)}. "
            "Build it with `python -m pipeline collect`."
        )
    table = table.reset_index(drop=True).copy()
    for column in ("phase", "block", "bits", "size", "status", "cell_id"):
        table[column] = table[column].astype(str)
    bad_status = sorted(set(table["status"]) - set(STATUSES))
    if bad_status:
        raise ValueError(
            f"invalid status values {bad_status}; expected one of {list(STATUSES)}. "
            "Collect only finished cells."
        )
    bad_bits = sorted(set(table["bits"]) - set(BITS))
    if bad_bits:
        raise ValueError(f"invalid bits values {bad_bits}; expected one of {list(BITS)}")
    table["warmdown"] = table["warmdown"].astype(float)
    table["seed"] = table["seed"].astype(int)
    table["val_bpb"] = table["val_bpb"].astype(float)
    if "lr_mult" in table.columns:
        table["lr_mult"] = table["lr_mult"].astype(float)
    for column in ("optimizer", "shape"):
        if column in table.columns:
            table[column] = table[column].astype(str)
    return table


def split_status(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (done, diverged) cells; a done cell without a val_bpb counts as neither."""
    diverged = table[table["status"] == "diverged"]
    done = table[(table["status"] == "done") & table["val_bpb"].notna()]
    return done.reset_index(drop=True), diverged.reset_index(drop=True)


def primary_cells(done: pd.DataFrame) -> pd.DataFrame:
    """Return the cells outside phase 5 blocks: phase 2, the micro grid, user phases."""
    return done[~done["block"].isin(PHASE5_BLOCKS)].reset_index(drop=True)


def settings_columns(table: pd.DataFrame, exclude: tuple[str, ...] = ()) -> list[str]:
    """Return the cell settings present in the table, less `exclude`."""
    return [c for c in SETTINGS if c in table.columns and c not in exclude]


def varying(table: pd.DataFrame, column: str) -> bool:
    """Return whether a column exists and has more than one distinct value."""
    return column in table.columns and table[column].nunique(dropna=False) > 1


def size_order(table: pd.DataFrame) -> list[str]:
    """Return the size labels sorted by parameter count (by label when n_params is absent)."""
    sizes = table["size"].unique().tolist()
    if "n_params" in table.columns:
        medians = table.groupby("size")["n_params"].median()
        return sorted(sizes, key=lambda s: (medians.get(s, np.inf), s))
    return sorted(sizes, key=_label_magnitude)


def _label_magnitude(label: str) -> tuple[float, str]:
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}
    try:
        return float(label[:-1]) * scale[label[-1].upper()], label
    except (KeyError, ValueError, IndexError):
        return np.inf, label


def pair_keys(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    """Return one uint64 hash per row of `columns`, so rows that agree on all of them share a key.

    Hashing the settings once is much faster than grouping or merging on two
    dozen columns; pandas' row hash is deterministic for equal values.
    """
    if frame.empty:
        return pd.Series(dtype="uint64", index=frame.index)
    return pd.util.hash_pandas_object(frame[columns], index=False)


def _collapse(frame: pd.DataFrame, by: list[str], values: list[str]) -> pd.DataFrame:
    """Average `values` over rows that share `by`, keeping the first of the other columns."""
    if not frame.duplicated(by).any():
        return frame
    others = [c for c in frame.columns if c not in by and c not in values]
    grouped = frame.groupby(by, sort=False, dropna=False)
    return pd.concat([grouped[others].first(), grouped[values].mean()], axis=1).reset_index()


def match_bits_pairs(done: pd.DataFrame, bits: str, values: tuple[str, ...] = ("val_bpb",)) -> pd.DataFrame:
    """Pair each `bits` cell with the fp16 cell of identical settings.

    Cells with the same settings in several blocks (the same cell_id) are
    averaged on each side first. The result has the settings, the block of the
    quantised cell, and each value column twice, with suffixes "_q" (quantised)
    and "_ref" (fp16).
    """
    key = settings_columns(done, exclude=("bits",))
    present = [v for v in values if v in done.columns]
    quantised = done.loc[done["bits"] == bits, key + ["block"] + present]
    reference = done.loc[done["bits"] == "fp16", key + present]
    if quantised.empty or reference.empty:
        return pd.DataFrame(columns=key + ["block"] + [f"{v}_q" for v in present] + [f"{v}_ref" for v in present])
    quantised = quantised.assign(_key=pair_keys(quantised, key))
    reference = reference.assign(_key=pair_keys(reference, key))[["_key"] + present]
    quantised = _collapse(quantised, ["_key", "block"], present)
    reference = _collapse(reference, ["_key"], present)
    pairs = quantised.merge(reference, on="_key", suffixes=("_q", "_ref"))
    return pairs.drop(columns="_key")


def match_warmdown_pairs(cells: pd.DataFrame, reference: float, other: float) -> pd.DataFrame:
    """Pair cells at warmdown `other` with the cell at `reference` of otherwise identical settings.

    The pair also shares phase and block. Columns: the settings (less
    warmdown), phase, block, val_bpb_other, val_bpb_ref.
    """
    key = settings_columns(cells, exclude=("warmdown",)) + ["phase", "block"]
    ref = cells.loc[np.isclose(cells["warmdown"], reference), key + ["val_bpb"]]
    oth = cells.loc[np.isclose(cells["warmdown"], other), key + ["val_bpb"]]
    ref = _collapse(ref.assign(_key=pair_keys(ref, key)), ["_key"], ["val_bpb"])
    oth = _collapse(oth.assign(_key=pair_keys(oth, key)), ["_key"], ["val_bpb"])
    pairs = oth.merge(ref[["_key", "val_bpb"]], on="_key", suffixes=("_other", "_ref"))
    return pairs.drop(columns="_key")


def seed_means(frame: pd.DataFrame, by: list[str], value: str) -> pd.DataFrame:
    """Average `value` over everything but `by` and seed: one row per (by..., seed).

    Seeds are the independent replicates, so confidence intervals are taken
    over these per-seed means.
    """
    return frame.groupby(list(by) + ["seed"], dropna=False, as_index=False)[value].mean()


def format_levels(values) -> str:
    """Return sorted factor levels as plain text, e.g. "0.1, 0.33, 0.5"."""
    return ", ".join(f"{v:g}" if isinstance(v, (float, np.floating)) else str(v) for v in sorted(values))


def warmdown_label(warmdown: float) -> str:
    """Return a warmdown as a percentage label, e.g. 0.33 -> 'wd33'."""
    return f"wd{round(100 * warmdown):d}"


@dataclass
class Coverage:
    """Cells of the table compared with the manifest.

    Attributes
    ----------
    n_cells : int
        Rows in the table (done and diverged).
    n_done, n_diverged : int
        Cells done with a val_bpb, and cells that diverged.
    diverged : pandas.DataFrame
        The diverged cells (id, phase, block, bits, warmdown, lr_mult, size, seed,
        diverged_step); every analysis excludes them.
    has_manifest : bool
        Whether a manifest was given; without one the missing cells are unknown.
    n_expected, n_missing : int
        Cells in the manifest, and manifest cells absent from the table (0 without a manifest).
    groups : pandas.DataFrame
        Per (phase, block, bits, size): expected, done, diverged and missing
        cells, and expected and complete seeds (a seed is complete when all its
        cells are done).
    lines : list of str
        One line per group with missing cells, e.g. "phase 2 main int6 50M: 48/60 cells, 3/5 seeds complete".
    """

    n_cells: int
    n_done: int
    n_diverged: int
    diverged: pd.DataFrame
    has_manifest: bool
    n_expected: int
    n_missing: int
    groups: pd.DataFrame
    lines: list


def check_coverage(table: pd.DataFrame, manifest: pd.DataFrame | None) -> Coverage:
    """Compare the table with the manifest and list the diverged and missing cells."""
    done, diverged = split_status(table)
    listed = [c for c in ("cell_id", "phase", "block", "bits", "warmdown", "lr_mult", "size",
                          "seed", "diverged_step") if c in diverged.columns]
    diverged_view = diverged[listed].reset_index(drop=True)
    if manifest is None:
        return Coverage(len(table), len(done), len(diverged), diverged_view, False, 0, 0,
                        pd.DataFrame(), [])

    missing_columns = [c for c in ("cell_id", "phase", "block", "bits", "size", "seed")
                       if c not in manifest.columns]
    if missing_columns:
        raise ValueError(
            f"manifest is missing columns {missing_columns}; pass the manifest that "
            "`python -m pipeline plan` wrote for these phases"
        )
    manifest = manifest.copy()
    for column in ("cell_id", "phase", "block", "bits", "size"):
        manifest[column] = manifest[column].astype(str)
    key = ["phase", "block", "cell_id"]
    done_keys = set(map(tuple, done[key].to_numpy()))
    diverged_keys = set(map(tuple, diverged[key].to_numpy()))
    manifest_keys = [tuple(row) for row in manifest[key].to_numpy()]
    manifest["state"] = "missing"
    manifest.loc[[k in diverged_keys for k in manifest_keys], "state"] = "diverged"
    manifest.loc[[k in done_keys for k in manifest_keys], "state"] = "done"

    rows = []
    lines = []
    for (phase, block, bits, size), group in manifest.groupby(["phase", "block", "bits", "size"], sort=False):
        counts = group["state"].value_counts()
        seed_state = group.groupby("seed")["state"].agg(lambda s: bool((s == "done").all()))
        row = {
            "phase": phase, "block": block, "bits": bits, "size": size,
            "expected": len(group), "done": int(counts.get("done", 0)),
            "diverged": int(counts.get("diverged", 0)), "missing": int(counts.get("missing", 0)),
            "seeds_expected": int(seed_state.size), "seeds_complete": int(seed_state.sum()),
        }
        rows.append(row)
        if row["missing"]:
            lines.append(
                f"phase {phase} {block} {bits} {size}: {row['done']}/{row['expected']} cells done, "
                f"{row['seeds_complete']}/{row['seeds_expected']} seeds complete"
            )
    groups = pd.DataFrame(rows)
    n_missing = int((manifest["state"] == "missing").sum())
    return Coverage(len(table), len(done), len(diverged), diverged_view, True, len(manifest),
                    n_missing, groups, lines)
