"""Quantisation penalty: its log-size law, the int4 boundary, and QAT against PTQ.

The penalty of a quantised cell is its val_bpb minus that of the fp16 cell
with identical settings (same warmdown, lr_mult, seed, size and phase 5 axes).

Claim 4: the int6 penalty is log-linear in parameter count, and the fit on
the phase 2 sizes predicts 5/5 held-out sizes of the phase 5 "sizes" block.
Claim 5: at int4, warmdown 0.33 beats 0.1 decisively at 50M and 100M (paired z
about 12-15, 10/10 seeds), with noise below.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import statsmodels.api as sm

from .data import (
    HELD_OUT_BLOCK, PHASE5_BLOCKS, QUANTISED_BITS, NotSupported, match_bits_pairs, seed_means,
    size_order,
)
from .inference import mean_ci
from .warmdown import STUDY_BEST_WARMDOWN, paired_warmdown_tests

logger = logging.getLogger(__name__)

# The smallest variance of a per-size mean used as a WLS weight, in bpb^2. A
# size whose seeds agree exactly would otherwise get an infinite weight.
MIN_MEAN_VARIANCE = 1e-12


def penalty_pairs(done: pd.DataFrame, bits: str, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """Return matched (bits, fp16) pairs with a `penalty` column in bpb."""
    pairs = match_bits_pairs(done, bits, ("val_bpb",) + tuple(extra))
    pairs["penalty"] = pairs["val_bpb_q"] - pairs["val_bpb_ref"]
    return pairs


def summarise_by_size(pairs: pd.DataFrame, value: str = "penalty") -> pd.DataFrame:
    """Return per-size mean, 95% t interval and variance of the mean over per-seed means."""
    per_seed = seed_means(pairs, ["size"], value)
    n_params = pairs.groupby("size")["n_params"].median() if "n_params" in pairs else None
    rows = []
    for size, group in per_seed.groupby("size", sort=False):
        summary = mean_ci(group[value].to_numpy())
        var_mean = summary.sd ** 2 / summary.n if summary.n > 1 else np.nan
        rows.append({
            "size": size,
            "n_params": float(n_params[size]) if n_params is not None else np.nan,
            "mean": summary.mean, "ci_low": summary.ci_low, "ci_high": summary.ci_high,
            "sd": summary.sd, "n_seeds": summary.n, "var_mean": var_mean,
        })
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame["log_n_params"] = np.log(frame["n_params"])
    return frame.sort_values("n_params").reset_index(drop=True)


@dataclass
class PenaltyLaw:
    """Weighted fit of penalty ~ a + b * ln(n_params), with held-out predictions.

    Attributes
    ----------
    bits : str
    fit_sizes : pandas.DataFrame
        Per fitted size: n_params, log_n_params, mean penalty, ci_low, ci_high,
        sd and n_seeds of the per-seed means, var_mean (sd^2 / n_seeds) and
        weight (1 / var_mean).
    intercept, slope : float
        a and b, in bpb and bpb per unit of ln(n_params).
    intercept_ci, slope_ci : tuple of float
        95% t intervals, with the WLS scale estimated from the residuals.
    df_resid : float
        Residual degrees of freedom (fitted sizes - 2).
    scale : float
        Estimated residual scale; about 1 when the per-size means scatter around
        the line only as much as their seed variance predicts.
    held_out : pandas.DataFrame
        Per held-out size: n_params, mean penalty, var_mean, n_seeds, predicted,
        pi_low, pi_high (95% prediction interval for a mean of that size, with
        the size's own var_mean as the new-observation variance, scaled by the
        fit's scale), within (mean inside the interval).
    hits : int
        Held-out sizes inside their prediction interval.
    fit_source, held_out_source : str
        Which cells were fitted and which were held out, in words.
    fit : statsmodels RegressionResults
        The WLS fit.
    notes : list of str
    """

    bits: str
    fit_sizes: pd.DataFrame
    intercept: float
    slope: float
    intercept_ci: tuple
    slope_ci: tuple
    df_resid: float
    scale: float
    held_out: pd.DataFrame
    hits: int
    fit_source: str
    held_out_source: str
    fit: object = field(repr=False, default=None)
    notes: list = field(default_factory=list)

    @property
    def n_held_out(self) -> int:
        """Number of held-out sizes with a prediction."""
        return len(self.held_out)

    def predict(self, n_params) -> np.ndarray:
        """Return the fitted penalty at the given parameter counts."""
        return self.intercept + self.slope * np.log(np.asarray(n_params, dtype=float))


def fit_penalty_law(
    fit_pairs: pd.DataFrame, held_out_pairs: pd.DataFrame, bits: str,
    fit_source: str, held_out_source: str, alpha: float = 0.05,
) -> PenaltyLaw | NotSupported:
    """Fit the log-size penalty law by WLS on per-size means and predict held-out sizes.

    Parameters
    ----------
    fit_pairs, held_out_pairs : pandas.DataFrame
        Output of `penalty_pairs` for the fitted and the held-out cells.
    bits : str
        The quantised bit-width, for messages.
    fit_source, held_out_source : str
        Descriptions of the two cell sets, stored in the result.
    alpha : float
        1 - coverage of the intervals.

    Notes
    -----
    Each fitted size is weighted by 1 / var_mean, the variance of its mean over
    seeds. The WLS scale is still estimated from the residuals (statsmodels'
    default), so the intervals widen when the means scatter more around the
    line than their seed variance predicts. The prediction interval for a
    held-out mean is predicted -+ t(df_resid) * sqrt(se_fit^2 + scale * var_mean_new).

    With 4 fitted sizes the scale has 2 degrees of freedom, so the intervals of
    all held-out sizes widen or narrow together. On 100 synthetic data sets
    whose planted law is exactly log-linear (tests/synthetic.py), 96% of held-out means fell
    inside their interval, but all 5 did so in only 89% of the data sets.
    """
    notes = []
    sizes = summarise_by_size(fit_pairs)
    if sizes.empty:
        return NotSupported(f"no {bits} cell has an fp16 cell with identical settings to pair with")
    if sizes["n_params"].isna().any():
        return NotSupported("the table has no n_params column, which the log-size fit needs")
    few = sizes[sizes["n_seeds"] < 2]
    if len(few):
        notes.append(f"left out of the fit, fewer than 2 seeds: {', '.join(few['size'])}")
    sizes = sizes[sizes["n_seeds"] >= 2].reset_index(drop=True)
    if len(sizes) < 3:
        found = ", ".join(sizes["size"]) or "none"
        reason = f"the {bits} penalty fit needs at least 3 sizes with 2 or more seeds, found {len(sizes)} ({found})"
        if len(few):
            reason += f"; sizes with fewer than 2 seeds: {', '.join(few['size'])}"
        return NotSupported(reason)
    floored = sizes["var_mean"] < MIN_MEAN_VARIANCE
    if floored.any():
        notes.append(f"seed variance of the mean floored at {MIN_MEAN_VARIANCE:g} for: {', '.join(sizes.loc[floored, 'size'])}")
    sizes["var_mean"] = sizes["var_mean"].clip(lower=MIN_MEAN_VARIANCE)
    sizes["weight"] = 1.0 / sizes["var_mean"]

    exog = sm.add_constant(sizes["log_n_params"].to_numpy(), has_constant="add")
    fit = sm.WLS(sizes["mean"].to_numpy(), exog, weights=sizes["weight"].to_numpy()).fit()
    ci = fit.conf_int(alpha)

    held_out = summarise_by_size(held_out_pairs)
    if not held_out.empty:
        held_out = held_out[~held_out["size"].isin(sizes["size"])].reset_index(drop=True)
    if not held_out.empty:
        held_out, held_notes = _predict_held_out(fit, sizes, held_out, alpha)
        notes += held_notes
    hits = int(held_out["within"].sum()) if not held_out.empty else 0
    return PenaltyLaw(
        bits=bits, fit_sizes=sizes, intercept=float(fit.params[0]), slope=float(fit.params[1]),
        intercept_ci=(float(ci[0][0]), float(ci[0][1])), slope_ci=(float(ci[1][0]), float(ci[1][1])),
        df_resid=float(fit.df_resid), scale=float(fit.scale), held_out=held_out, hits=hits,
        fit_source=fit_source, held_out_source=held_out_source, fit=fit, notes=notes,
    )


def _predict_held_out(fit, sizes: pd.DataFrame, held_out: pd.DataFrame, alpha: float):
    notes = []
    var_mean = held_out["var_mean"].to_numpy(dtype=float)
    missing = np.isnan(var_mean)
    if missing.any():
        # One seed gives no variance; borrow the fitted sizes' pooled per-seed variance.
        pooled = float(np.mean(sizes["sd"] ** 2))
        var_mean[missing] = pooled / held_out.loc[missing, "n_seeds"].clip(lower=1).to_numpy()
        notes.append(
            "held-out sizes with 1 seed use the pooled seed variance of the fitted sizes: "
            + ", ".join(held_out.loc[missing, "size"])
        )
    var_mean = np.clip(var_mean, MIN_MEAN_VARIANCE, None)
    exog = sm.add_constant(held_out["log_n_params"].to_numpy(), has_constant="add")
    frame = fit.get_prediction(exog, weights=1.0 / var_mean).summary_frame(alpha=alpha)
    held_out = held_out.assign(
        var_mean=var_mean,
        predicted=frame["mean"].to_numpy(),
        pi_low=frame["obs_ci_lower"].to_numpy(),
        pi_high=frame["obs_ci_upper"].to_numpy(),
    )
    held_out["within"] = (held_out["mean"] >= held_out["pi_low"]) & (held_out["mean"] <= held_out["pi_high"])
    return held_out, notes


def penalty_laws(done: pd.DataFrame, alpha: float = 0.05) -> dict:
    """Fit the penalty law for int8 and int6 (phase 2 fit, "sizes" block held out) and int4.

    int8 and int6 are fitted on the primary grid (every block outside phase 5)
    and predict the sizes of the "sizes" block that the fit lacks. int4 is
    fitted over all its own sizes, pairing every int4 cell with whichever fp16
    cell has identical settings (the "int4-reference" block, phase 2, the
    "sizes" block), so it has no held-out sizes.

    Returns
    -------
    dict
        bits -> PenaltyLaw or NotSupported, for "int8", "int6" and "int4".
    """
    laws = {}
    for bits in ("int8", "int6"):
        if not (done["bits"] == bits).any():
            laws[bits] = NotSupported(f"no done {bits} cells")
            continue
        pairs = penalty_pairs(done, bits)
        fit_pairs = pairs[~pairs["block"].isin(PHASE5_BLOCKS)]
        held_pairs = pairs[pairs["block"] == HELD_OUT_BLOCK]
        laws[bits] = fit_penalty_law(
            fit_pairs, held_pairs, bits,
            fit_source="primary grid (phase 2 or other non-phase-5 blocks)",
            held_out_source=f'block "{HELD_OUT_BLOCK}"', alpha=alpha,
        )
    if (done["bits"] == "int4").any():
        pairs = penalty_pairs(done, "int4")
        laws["int4"] = fit_penalty_law(
            pairs, pairs.iloc[0:0], "int4",
            fit_source="every int4 cell with an fp16 cell of identical settings",
            held_out_source="none (int4 is fitted over its own sizes)", alpha=alpha,
        )
    else:
        laws["int4"] = NotSupported("no done int4 cells")
    return laws


@dataclass
class Int4Boundary:
    """The int4 size from which warmdown 0.33 beats 0.1, with the per-size tests.

    Attributes
    ----------
    sizes : pandas.DataFrame
        Per int4 size (ordered by n_params): n_params, n_seeds, mean_diff
        (val_bpb at warmdown 0.1 minus at 0.33; positive favours 0.33), ci_low,
        ci_high, statistic (paired z), test, p_value, p_holm (Holm over the int4
        sizes), significant (p_holm < alpha and mean_diff > 0), favour ("10/10"),
        and the int4 penalty against fp16: penalty_mean, penalty_ci_low,
        penalty_ci_high, penalty_n_seeds (NaN where no fp16 cell matches).
    boundary : str or None
        The smallest size from which 0.33 wins significantly at that size and
        every larger one; None when the largest size is not significant.
    reference, other : float
        The two warmdowns compared.
    notes : list of str
    """

    sizes: pd.DataFrame
    boundary: str | None
    reference: float
    other: float
    notes: list = field(default_factory=list)


def int4_boundary(
    done: pd.DataFrame, reference: float = STUDY_BEST_WARMDOWN, other: float = 0.1, alpha: float = 0.05
) -> Int4Boundary | NotSupported:
    """Run the int4 paired test of `reference` against `other` warmdown per size, with penalties."""
    int4 = done[done["bits"] == "int4"]
    if int4.empty:
        return NotSupported("no done int4 cells")
    tests = paired_warmdown_tests(int4, reference, [other], alpha=alpha, group_by=["size"])
    if isinstance(tests, NotSupported):
        return NotSupported(f"int4 paired test: {tests.reason}")
    table = tests.tests.drop(columns=["warmdown", "reference"])
    n_params = int4.groupby("size")["n_params"].median() if "n_params" in int4 else None
    table["n_params"] = table["size"].map(n_params) if n_params is not None else np.nan
    table["significant"] = table["reject_holm"] & (table["mean_diff"] > 0)

    penalty = summarise_by_size(penalty_pairs(done, "int4"))
    if penalty.empty:
        penalty = pd.DataFrame(columns=["size", "mean", "ci_low", "ci_high", "n_seeds"])
    penalty = penalty[["size", "mean", "ci_low", "ci_high", "n_seeds"]].rename(columns={
        "mean": "penalty_mean", "ci_low": "penalty_ci_low", "ci_high": "penalty_ci_high",
        "n_seeds": "penalty_n_seeds",
    })
    table = table.merge(penalty, on="size", how="left")
    order = {s: i for i, s in enumerate(size_order(int4))}
    table = table.sort_values("size", key=lambda s: s.map(order)).reset_index(drop=True)

    boundary = None
    for i in range(len(table) - 1, -1, -1):
        if not table.loc[i, "significant"]:
            break
        boundary = table.loc[i, "size"]
    notes = list(tests.notes)
    unpaired = table[table["penalty_n_seeds"].isna()]
    if len(unpaired):
        notes.append(f"no fp16 cell to pair with for the int4 penalty at: {', '.join(unpaired['size'])}")
    return Int4Boundary(table, boundary, reference, other, notes)


@dataclass
class QatVsPtq:
    """QAT penalty against post-training quantisation (PTQ) penalty.

    Attributes
    ----------
    table : pandas.DataFrame
        Per (bits, size): n_seeds, qat_mean, qat_ci_low, qat_ci_high (the QAT
        cell's val_bpb minus its fp16 pair's), ptq_mean, ptq_ci_low, ptq_ci_high
        (the fp16 cell's ptq_val_bpb_<bits> minus its val_bpb), gain_mean,
        gain_ci_low, gain_ci_high (PTQ minus QAT penalty, paired by seed;
        positive means QAT loses less), and ratio (ptq_mean / qat_mean).
    notes : list of str
    """

    table: pd.DataFrame
    notes: list = field(default_factory=list)


def qat_vs_ptq(done: pd.DataFrame) -> QatVsPtq | NotSupported:
    """Compare, per (bits, size), the QAT penalty with the PTQ penalty of the paired fp16 cells."""
    rows, notes = [], []
    for bits in QUANTISED_BITS:
        column = f"ptq_val_bpb_{bits}"
        if not (done["bits"] == bits).any():
            continue
        if column not in done.columns:
            notes.append(f"no {column} column, so no PTQ comparison for {bits}")
            continue
        pairs = penalty_pairs(done, bits, extra=(column,))
        pairs["ptq"] = pairs[f"{column}_ref"] - pairs["val_bpb_ref"]
        pairs["gain"] = pairs["ptq"] - pairs["penalty"]
        pairs = pairs[pairs["ptq"].notna()]
        if pairs.empty:
            notes.append(f"no fp16 cell with {column} pairs with a {bits} cell")
            continue
        for size in size_order(pairs):
            group = pairs[pairs["size"] == size]
            per_seed = group.groupby("seed")[["penalty", "ptq", "gain"]].mean()
            qat, ptq, gain = (mean_ci(per_seed[c].to_numpy()) for c in ("penalty", "ptq", "gain"))
            rows.append({
                "bits": bits, "size": size, "n_seeds": qat.n,
                "qat_mean": qat.mean, "qat_ci_low": qat.ci_low, "qat_ci_high": qat.ci_high,
                "ptq_mean": ptq.mean, "ptq_ci_low": ptq.ci_low, "ptq_ci_high": ptq.ci_high,
                "gain_mean": gain.mean, "gain_ci_low": gain.ci_low, "gain_ci_high": gain.ci_high,
                "ratio": ptq.mean / qat.mean if qat.mean else np.nan,
            })
    if not rows:
        reason = "; ".join(notes) or "no quantised cell pairs with an fp16 cell"
        return NotSupported(reason)
    return QatVsPtq(pd.DataFrame(rows), notes)
