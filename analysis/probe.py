"""Grid-distance probe: do QAT weights sit closer to their grid than fp16 weights?

`probe_intN` is the mean distance of the block weights to the nearest intN
grid point when the warmdown begins, in grid steps (about 0.25 for weights
spread uniformly between grid points). Claim 6 of the study: for int6 the
ratio of QAT weights to fp16 weights is about 1.04.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from .data import QUANTISED_BITS, NotSupported, match_bits_pairs, size_order
from .inference import ratio_ci

CI_METHOD = (
    "delta method over per-seed means (mean of intN over mean of fp16 pairs per seed), "
    "t quantile with n_seeds - 1 df"
)


@dataclass
class ProbeRatios:
    """Ratio of mean grid distance, intN-QAT cells over their fp16 pairs.

    Attributes
    ----------
    table : pandas.DataFrame
        Per (bits, size), plus one row per bits with size "all" pooling every
        size: n_seeds, n_pairs, mean_q (probe_<bits> of the QAT cells), mean_ref
        (probe_<bits> of the paired fp16 cells), ratio, ci_low, ci_high, se.
    method : str
        How the interval is computed.
    notes : list of str
    """

    table: pd.DataFrame
    method: str
    notes: list = field(default_factory=list)

    def pooled(self, bits: str):
        """Return the pooled row of `bits` as a Series, or None."""
        rows = self.table[(self.table["bits"] == bits) & (self.table["size"] == "all")]
        return rows.iloc[0] if len(rows) else None


def probe_ratios(done: pd.DataFrame, alpha: float = 0.05) -> ProbeRatios | NotSupported:
    """Compute the probe ratio per (bits, size) and pooled per bits, with delta-method intervals.

    Each QAT cell is paired with the fp16 cell of identical settings. Both
    are read in the same column (`probe_int6` for int6), so the ratio compares
    the two weight sets against the same grid.
    """
    rows, notes = [], []
    for bits in QUANTISED_BITS:
        column = f"probe_{bits}"
        if not (done["bits"] == bits).any():
            continue
        if column not in done.columns or done[column].isna().all():
            notes.append(f"no {column} values")
            continue
        pairs = match_bits_pairs(done, bits, (column,)).dropna(subset=[f"{column}_q", f"{column}_ref"])
        if pairs.empty:
            notes.append(f"no {bits} cell with a {column} value pairs with an fp16 cell")
            continue
        groups = [(size, pairs[pairs["size"] == size]) for size in size_order(pairs)] + [("all", pairs)]
        for size, group in groups:
            per_seed = group.groupby("seed")[[f"{column}_q", f"{column}_ref"]].mean()
            result = ratio_ci(per_seed[f"{column}_q"], per_seed[f"{column}_ref"], alpha)
            rows.append({
                "bits": bits, "size": size, "n_seeds": result.n, "n_pairs": len(group),
                "mean_q": float(per_seed[f"{column}_q"].mean()),
                "mean_ref": float(per_seed[f"{column}_ref"].mean()),
                "ratio": result.ratio, "ci_low": result.ci_low, "ci_high": result.ci_high, "se": result.se,
            })
    if not rows:
        return NotSupported("; ".join(notes) or "no quantised cell pairs with an fp16 cell")
    return ProbeRatios(pd.DataFrame(rows), CI_METHOD, notes)
