"""Small estimators shared by the analyses: t intervals, paired tests, ratios.

Each takes one value per seed, because seeds are the independent replicates
of the study; cells of one seed share data order and initialisation.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import stats

# Below this many seeds a paired test takes its p-value from Student's t, and
# from it on from the normal (z) distribution. The study reports paired z for
# its 10-seed int4 cells.
MIN_SEEDS_FOR_Z = 10


class MeanCI(NamedTuple):
    """Mean of per-seed values with a Student-t confidence interval.

    Attributes
    ----------
    mean : float
    ci_low, ci_high : float
        Interval bounds; NaN with fewer than 2 values.
    n : int
        Number of values (seeds).
    sd : float
        Sample standard deviation (ddof=1); NaN with fewer than 2 values.
    """

    mean: float
    ci_low: float
    ci_high: float
    n: int
    sd: float


def mean_ci(values, alpha: float = 0.05) -> MeanCI:
    """Return the mean of `values` with its two-sided (1 - alpha) t interval."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    n = values.size
    if n == 0:
        return MeanCI(np.nan, np.nan, np.nan, 0, np.nan)
    mean = float(values.mean())
    if n < 2:
        return MeanCI(mean, np.nan, np.nan, n, np.nan)
    sd = float(values.std(ddof=1))
    half = stats.t.ppf(1 - alpha / 2, n - 1) * sd / np.sqrt(n)
    return MeanCI(mean, mean - half, mean + half, n, sd)


class PairedTest(NamedTuple):
    """Paired test of per-seed differences against zero.

    Attributes
    ----------
    mean : float
        Mean difference.
    sd : float
        Standard deviation of the differences (ddof=1).
    n : int
        Number of seeds.
    statistic : float
        mean / (sd / sqrt(n)): the paired z, which equals the paired t statistic.
    test : str
        "t" when n < MIN_SEEDS_FOR_Z (p-value from Student's t, n - 1 df), else "z"
        (p-value from the standard normal).
    p_value : float
        Two-sided p-value of `statistic` under `test`.
    ci_low, ci_high : float
        95% t interval of the mean difference.
    n_positive : int
        Seeds whose difference is above zero.
    """

    mean: float
    sd: float
    n: int
    statistic: float
    test: str
    p_value: float
    ci_low: float
    ci_high: float
    n_positive: int


def paired_test(differences, alpha: float = 0.05) -> PairedTest:
    """Test whether per-seed paired differences have mean zero."""
    differences = np.asarray(differences, dtype=float)
    differences = differences[~np.isnan(differences)]
    summary = mean_ci(differences, alpha)
    n = summary.n
    n_positive = int((differences > 0).sum())
    test = "t" if n < MIN_SEEDS_FOR_Z else "z"
    if n < 2:
        return PairedTest(summary.mean, np.nan, n, np.nan, test, np.nan, np.nan, np.nan, n_positive)
    se = summary.sd / np.sqrt(n)
    if se == 0:
        statistic = np.inf * np.sign(summary.mean) if summary.mean else np.nan
    else:
        statistic = summary.mean / se
    if np.isnan(statistic):
        p_value = np.nan
    elif test == "t":
        p_value = float(2 * stats.t.sf(abs(statistic), n - 1))
    else:
        p_value = float(2 * stats.norm.sf(abs(statistic)))
    return PairedTest(summary.mean, summary.sd, n, float(statistic), test, p_value,
                      summary.ci_low, summary.ci_high, n_positive)


class RatioCI(NamedTuple):
    """Ratio of two means over paired per-seed values, with a delta-method interval.

    Attributes
    ----------
    ratio : float
        mean(x) / mean(y).
    ci_low, ci_high : float
        ratio -+ t(1 - alpha/2, n - 1) * se.
    se : float
        Delta-method standard error: sd(x_s - ratio * y_s) / (sqrt(n) * mean(y)).
    n : int
        Number of seeds with both values.
    """

    ratio: float
    ci_low: float
    ci_high: float
    se: float
    n: int


def ratio_ci(x, y, alpha: float = 0.05) -> RatioCI:
    """Return mean(x) / mean(y) with a delta-method t interval over paired seeds."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n = x.size
    if n == 0 or y.mean() == 0:
        return RatioCI(np.nan, np.nan, np.nan, np.nan, n)
    ratio = float(x.mean() / y.mean())
    if n < 2:
        return RatioCI(ratio, np.nan, np.nan, np.nan, n)
    # Linearise the ratio around its estimate: x_s - ratio * y_s has mean 0
    # and carries the sampling variance of the ratio (scaled by mean(y)).
    residual = x - ratio * y
    se = float(residual.std(ddof=1) / (np.sqrt(n) * abs(y.mean())))
    half = stats.t.ppf(1 - alpha / 2, n - 1) * se
    return RatioCI(ratio, ratio - half, ratio + half, se, n)
