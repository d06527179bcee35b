"""Best warmdown per group: means with intervals, a seed bootstrap, paired tests.

Claims 1 and 3 of the study: warmdown 0.33 gives the lowest val_bpb in every
(bits, size), and it beats each other warmdown in paired comparisons by seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from statsmodels.stats.multitest import multipletests

from .data import (
    AXES, NotSupported, format_levels, match_warmdown_pairs, seed_means, size_order, varying,
    warmdown_label,
)
from .inference import mean_ci, paired_test

logger = logging.getLogger(__name__)

STUDY_BEST_WARMDOWN = 0.33
BITS_ORDER = {"fp16": 0, "int8": 1, "int6": 2, "int4": 3}


def group_columns(cells: pd.DataFrame) -> list[str]:
    """Return (bits, size) plus each phase 5 axis that varies in `cells`."""
    return ["bits", "size"] + [a for a in AXES if varying(cells, a)]


def sort_groups(frame: pd.DataFrame, cells: pd.DataFrame, extra: list[str] = ()) -> pd.DataFrame:
    """Sort rows by bits (fp16 first), then size by parameter count, then `extra` columns."""
    if frame.empty:
        return frame
    size_rank = {s: i for i, s in enumerate(size_order(cells))}
    order = frame.assign(
        _bits=frame["bits"].map(BITS_ORDER) if "bits" in frame else 0,
        _size=frame["size"].map(size_rank) if "size" in frame else 0,
    )
    by = ["_bits", "_size"] + [c for c in extra if c in frame.columns]
    return order.sort_values(by, kind="stable").drop(columns=["_bits", "_size"]).reset_index(drop=True)


def describe_group(row, columns: list[str]) -> str:
    """Return a short label such as 'int6 50M' or 'int6 15M steps_mult=3'."""
    parts = [str(row[c]) for c in columns if c in ("bits", "size")]
    parts += [f"{c}={row[c]}" for c in columns if c not in ("bits", "size")]
    return " ".join(parts)


@dataclass
class BestWarmdown:
    """Mean val_bpb per warmdown and how often each warmdown is best, per group.

    Attributes
    ----------
    group_by : list of str
        Grouping columns: bits, size, and any phase 5 axis that varies.
    means : pandas.DataFrame
        One row per group and warmdown: mean, ci_low and ci_high (95% t
        interval over per-seed means), n_seeds, and share_best (share of seed
        bootstrap resamples in which this warmdown has the lowest mean). Each
        seed's value averages its cells over the other factors, such as lr_mult.
    best : pandas.DataFrame
        One row per group: best_warmdown (lowest mean), share_best (its
        bootstrap share), n_seeds.
    n_boot : int
        Bootstrap resamples per group.
    rng_seed : int
        Seed of the bootstrap generator.
    notes : list of str
        Groups with fewer seeds than the fullest group.
    """

    group_by: list
    means: pd.DataFrame
    best: pd.DataFrame
    n_boot: int
    rng_seed: int
    notes: list = field(default_factory=list)

    def best_everywhere(self) -> float | None:
        """Return the warmdown that is best in every group, or None if groups disagree."""
        values = self.best["best_warmdown"].unique()
        return float(values[0]) if len(values) == 1 else None


def best_warmdown(cells: pd.DataFrame, n_boot: int = 2000, rng_seed: int = 0) -> BestWarmdown | NotSupported:
    """Find the best warmdown per (bits, size) with t intervals and a seed bootstrap.

    Parameters
    ----------
    cells : pandas.DataFrame
        Done cells of one grid (for example phase 2 "main").
    n_boot : int
        Bootstrap resamples of seeds per group.
    rng_seed : int
        Seed of numpy's default generator; the same seed gives the same shares.

    Notes
    -----
    A resample draws seeds with replacement and keeps all cells of a drawn
    seed together, so the warmdowns compared within a resample share seeds.
    """
    if n_boot < 1:
        raise ValueError(f"invalid n_boot {n_boot!r}; expected a positive number of resamples")
    if cells.empty:
        return NotSupported("no done cells")
    warmdowns = sorted(cells["warmdown"].unique())
    if len(warmdowns) < 2:
        return NotSupported(f"needs at least 2 warmdowns, found {format_levels(warmdowns)}")

    group_by = group_columns(cells)
    per_seed = seed_means(cells, group_by + ["warmdown"], "val_bpb")
    rng = np.random.default_rng(rng_seed)
    mean_rows, best_rows = [], []
    for key, group in per_seed.groupby(group_by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        labels = dict(zip(group_by, key))
        matrix = group.pivot(index="seed", columns="warmdown", values="val_bpb")
        columns = list(matrix.columns)
        values = matrix.to_numpy()
        shares = _bootstrap_best_shares(values, n_boot, rng)
        for j, warmdown in enumerate(columns):
            summary = mean_ci(values[:, j])
            mean_rows.append({**labels, "warmdown": warmdown, "mean": summary.mean,
                              "ci_low": summary.ci_low, "ci_high": summary.ci_high,
                              "n_seeds": summary.n, "share_best": shares[j]})
        column_means = np.nanmean(values, axis=0)
        j_best = int(np.nanargmin(column_means))
        best_rows.append({**labels, "best_warmdown": columns[j_best], "share_best": shares[j_best],
                          "n_seeds": int(matrix.shape[0])})

    means = sort_groups(pd.DataFrame(mean_rows), cells, ["warmdown"])
    best = sort_groups(pd.DataFrame(best_rows), cells)
    notes = _seed_shortfalls(means, group_by)
    return BestWarmdown(group_by, means, best, n_boot, rng_seed, notes)


def _bootstrap_best_shares(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Return, per column, the share of seed resamples in which it has the lowest mean."""
    n_seeds, n_columns = values.shape
    draws = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    sample = values[draws]  # (n_boot, n_seeds, n_columns)
    present = ~np.isnan(sample)
    counts = present.sum(axis=1)
    sums = np.where(present, sample, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)
    winners = means.argmin(axis=1)
    return np.bincount(winners, minlength=n_columns) / n_boot


def _seed_shortfalls(means: pd.DataFrame, group_by: list[str]) -> list[str]:
    if means.empty:
        return []
    full = int(means["n_seeds"].max())
    short = means[means["n_seeds"] < full]
    return [
        f"{describe_group(row, group_by)} {warmdown_label(row['warmdown'])}: {row['n_seeds']}/{full} seeds"
        for _, row in short.iterrows()
    ]


@dataclass
class PairedTests:
    """Paired comparisons of the reference warmdown against each other warmdown.

    Attributes
    ----------
    reference : float
        The reference warmdown (0.33 in the study).
    group_by : list of str
        Grouping columns of the tests.
    tests : pandas.DataFrame
        One row per group and other warmdown: n_seeds, n_pairs, mean_diff
        (val_bpb at the other warmdown minus at the reference, averaged per seed
        over matched pairs; positive favours the reference), sd, ci_low,
        ci_high, statistic (paired z = mean / (sd / sqrt(n)), equal to the
        paired t), test ("t" below 10 seeds, else "z"), p_value (two-sided),
        p_holm (Holm-adjusted over every row), reject_holm (p_holm < alpha),
        n_favour (seeds favouring the reference) and favour ("10/10").
    alpha : float
        Family-wise error rate of the Holm correction.
    notes : list of str
        Groups without pairs, and similar gaps.
    """

    reference: float
    group_by: list
    tests: pd.DataFrame
    alpha: float
    notes: list = field(default_factory=list)


def paired_warmdown_tests(
    cells: pd.DataFrame,
    reference: float = STUDY_BEST_WARMDOWN,
    others: list[float] | None = None,
    alpha: float = 0.05,
    group_by: list[str] | None = None,
) -> PairedTests | NotSupported:
    """Test the reference warmdown against each other warmdown, paired by seed.

    Two cells form a pair when every setting but warmdown matches, and phase
    and block match too (so lr_mult, seed and the phase 5 axes are held fixed).
    Each seed contributes the mean difference over its pairs, and the test
    runs over seeds. Holm's method corrects all rows together.
    """
    if cells.empty:
        return NotSupported("no done cells")
    if not np.isclose(cells["warmdown"], reference).any():
        found = format_levels(cells["warmdown"].unique())
        return NotSupported(f"no cells at the reference warmdown {reference:g}; found {found}")
    group_by = group_by or group_columns(cells)
    available = sorted(w for w in cells["warmdown"].unique() if not np.isclose(w, reference))
    others = available if others is None else [w for w in others if any(np.isclose(w, available))]
    if not others:
        return NotSupported(f"no warmdown other than {reference:g} to compare with")

    rows, notes = [], []
    pairs_by_other = {}
    for other in others:
        pairs = match_warmdown_pairs(cells, reference, other)
        pairs["diff"] = pairs["val_bpb_other"] - pairs["val_bpb_ref"]
        pairs_by_other[other] = {
            key if isinstance(key, tuple) else (key,): group
            for key, group in pairs.groupby(group_by, sort=False)
        }
    for key, _ in cells.groupby(group_by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        labels = dict(zip(group_by, key))
        for other in others:
            pairs = pairs_by_other[other].get(key)
            if pairs is None:
                notes.append(f"{describe_group(labels, group_by)} {warmdown_label(other)}: no pairs")
                continue
            per_seed = pairs.groupby("seed")["diff"].mean()
            result = paired_test(per_seed.to_numpy())
            rows.append({
                **labels, "warmdown": other, "reference": reference, "n_seeds": result.n,
                "n_pairs": len(pairs), "mean_diff": result.mean, "sd": result.sd,
                "ci_low": result.ci_low, "ci_high": result.ci_high, "statistic": result.statistic,
                "test": result.test, "p_value": result.p_value, "n_favour": result.n_positive,
                "favour": f"{result.n_positive}/{result.n}",
            })
    if not rows:
        return NotSupported("no pair of cells differs only in warmdown")
    tests = pd.DataFrame(rows)
    tests["p_holm"] = np.nan
    tests["reject_holm"] = False
    testable = tests["p_value"].notna()
    if testable.any():
        reject, p_holm, _, _ = multipletests(tests.loc[testable, "p_value"], alpha=alpha, method="holm")
        tests.loc[testable, "p_holm"] = p_holm
        tests.loc[testable, "reject_holm"] = reject
    untestable = tests[~testable]
    notes += [f"{describe_group(r, group_by)} {warmdown_label(r['warmdown'])}: fewer than 2 seeds, no test"
              for _, r in untestable.iterrows()]
    tests = sort_groups(tests, cells, ["warmdown"])
    return PairedTests(reference, group_by, tests, alpha, notes)
