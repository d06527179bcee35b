"""One finding per study claim: the recomputed numbers and a verdict against the study.

The study's reported values sit here as constants, so every agreement check
reads from one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .data import Coverage, NotSupported
from .interaction import Interaction
from .warmdown import STUDY_BEST_WARMDOWN, BestWarmdown

if TYPE_CHECKING:
    from .study import Analysis

# Values the study reports, used by the agreement checks.
STUDY_PROBE_RATIO_INT6 = 1.04
# "About 1.04": a pooled ratio within this distance agrees.
PROBE_RATIO_TOLERANCE = 0.02
STUDY_INT4_BOUNDARY = "50M"


VERDICTS = ("agrees", "differs", "inconclusive", "no claim", "not supported")


@dataclass
class Finding:
    """One line of the findings: a study claim, the recomputed numbers, and a verdict.

    Attributes
    ----------
    claim : str
        Short name of the claim, e.g. "1 best warmdown".
    text : str
        The result with its numbers, or why it cannot be computed.
    verdict : str
        One of VERDICTS. "agrees" and "differs" compare with the study's claim.
        "inconclusive" means the data neither confirm nor contradict it, as
        with an equivalence test that lacks the power to decide. "no claim"
        means the study states nothing to compare with, and "not supported"
        means the table lacks the cells the analysis needs.
    """

    claim: str
    text: str
    verdict: str

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"invalid verdict {self.verdict!r}; expected one of {', '.join(VERDICTS)}")

    @property
    def agrees(self) -> bool | None:
        """Return True or False against the study's claim, None when there is no verdict."""
        return {"agrees": True, "differs": False}.get(self.verdict)


def _verdict(agrees: bool | None) -> str:
    if agrees is None:
        return "no claim"
    return "agrees" if agrees else "differs"


def _not_supported(claim: str, result: NotSupported) -> Finding:
    return Finding(claim, result.reason, "not supported")


def _seeds(n: int) -> str:
    return "1 seed" if n == 1 else f"{n} seeds"


def _fmt_range(values, digits: int = 2) -> str:
    low = f"{float(values.min()):.{digits}f}"
    high = f"{float(values.max()):.{digits}f}"
    if low == high:
        return low
    return f"{low} to {high}"


def _fmt_interval(low: float, high: float, digits: int = 4) -> str:
    return f"[{low:.{digits}f}, {high:.{digits}f}]"


def finding_best(best) -> Finding:
    """Claim 1: warmdown 0.33 is best in every (bits, size)."""
    claim = "1 best warmdown"
    if isinstance(best, NotSupported):
        return _not_supported(claim, best)
    table = best.best
    at_study = np.isclose(table["best_warmdown"], STUDY_BEST_WARMDOWN)
    shares = table.loc[at_study, "share_best"]
    text = (
        f"warmdown {STUDY_BEST_WARMDOWN} is best in {int(at_study.sum())}/{len(table)} groups of "
        f"({', '.join(best.group_by)})"
    )
    if len(shares):
        text += f", bootstrap share {_fmt_range(shares)} over {best.n_boot} seed resamples"
    others = table[~at_study]
    if len(others):
        text += "; elsewhere best: " + ", ".join(
            f"{r['bits']} {r['size']} wd{r['best_warmdown']:g} (share {r['share_best']:.2f})"
            for _, r in others.iterrows()
        )
    if not np.isclose(best.means["warmdown"], STUDY_BEST_WARMDOWN).any():
        return Finding(claim, text + f"; the grid has no warmdown {STUDY_BEST_WARMDOWN}", "inconclusive")
    text += "; study: 0.33 best in every (bits, size)"
    return Finding(claim, text, _verdict(bool(at_study.all())))


def describe_interaction(result: Interaction) -> str:
    """Return the F-test, mixed-model and TOST numbers of an interaction result in one line."""
    text = f"bits x warmdown F({result.df_num:g}, {result.df_resid:g}) = {result.f_value:.2f}, p = {result.f_pvalue:.3g}"
    if not isinstance(result.mixed, NotSupported):
        text += f"; mixed model chi2({result.mixed.df}) = {result.mixed.chi2:.2f}, p = {result.mixed.p_value:.3g}"
    else:
        text += f"; mixed model {result.mixed}"
    if len(result.tost):
        worst = result.tost[["ci90_low", "ci90_high"]].abs().max().max()
        text += (
            f"; TOST: {int(result.tost['equivalent'].sum())}/{len(result.tost)} contrasts within "
            f"+-{result.margin:g} bpb (largest |90% CI bound| {worst:.4f})"
        )
    else:
        text += "; TOST needs fp16 cells"
    return text


def interaction_verdict(result: Interaction) -> str:
    """Return "agrees" when every TOST contrast is within the margin, "differs" when a
    contrast's 90% interval lies wholly beyond it, else "inconclusive"."""
    tost = result.tost
    if not len(tost):
        return "inconclusive"
    if tost["equivalent"].all():
        return "agrees"
    beyond = (tost["ci90_low"] > result.margin) | (tost["ci90_high"] < -result.margin)
    return "differs" if beyond.any() else "inconclusive"


def finding_interaction(result) -> Finding:
    """Claim 2: the bits x warmdown interaction is negligible for fp16, int8, int6."""
    claim = "2 interaction"
    if isinstance(result, NotSupported):
        return _not_supported(claim, result)
    text = describe_interaction(result)
    if result.dropped:
        text += f"; dropped terms: {'; '.join(result.dropped)}"
    if not isinstance(result.bits_by_size, NotSupported):
        check = result.bits_by_size
        text += (
            f"; with C(bits):C(size) added (F = {check.bits_by_size_f:.1f}, p = {check.bits_by_size_pvalue:.3g}) "
            f"the bits x warmdown F = {check.f_value:.2f}, p = {check.f_pvalue:.3g}"
        )
    text += "; study: interaction negligible"
    return Finding(claim, text, interaction_verdict(result))


def finding_paired(paired) -> Finding:
    """Claim 3: warmdown 0.33 beats each other warmdown, paired by seed."""
    claim = "3 paired tests"
    if isinstance(paired, NotSupported):
        return _not_supported(claim, paired)
    tests = paired.tests
    favour = tests["mean_diff"] > 0
    unanimous = tests["n_favour"] == tests["n_seeds"]
    kinds = ", ".join(sorted(tests["test"].unique()))
    low, high = tests["n_seeds"].min(), tests["n_seeds"].max()
    seeds = _seeds(low) if low == high else f"{low}-{high} seeds"
    text = (
        f"wd{round(100 * paired.reference)} has the lower mean in {int(favour.sum())}/{len(tests)} comparisons, "
        f"all seeds agree in {int(unanimous.sum())}, {int(tests['reject_holm'].sum())} significant after Holm "
        f"at {paired.alpha:g} ({kinds} tests, {seeds})"
    )
    losses = tests[~favour]
    if len(losses):
        text += "; worse than: " + ", ".join(
            f"{r['bits']} {r['size']} wd{r['warmdown']:g} ({r['mean_diff']:+.4f})" for _, r in losses.iterrows()
        )
    text += "; study: 0.33 is best"
    return Finding(claim, text, _verdict(bool(favour.all())))


def finding_penalty(bits: str, law) -> Finding:
    """Claim 4: the penalty is log-linear in size; for int6 the fit predicts 5/5 held-out sizes."""
    claim = f"4 penalty law {bits}"
    if isinstance(law, NotSupported):
        return _not_supported(claim, law)
    text = (
        f"penalty = a + b ln(n_params) over {len(law.fit_sizes)} sizes: a = {law.intercept:.4f} "
        f"{_fmt_interval(*law.intercept_ci)}, b = {law.slope:.5f} {_fmt_interval(*law.slope_ci, digits=5)}"
    )
    if law.n_held_out:
        outside = law.held_out[~law.held_out["within"]]
        text += f"; held out: {law.hits}/{law.n_held_out} sizes within the 95% PI"
        if len(outside):
            text += " (outside: " + ", ".join(outside["size"]) + ")"
    else:
        text += f"; held out: {law.held_out_source}" if bits == "int4" else f"; no held-out {bits} sizes"
    if bits != "int6":
        return Finding(claim, text, _verdict(None))
    text += "; study: log-linear, 5/5 held-out sizes predicted"
    if not law.n_held_out:
        return Finding(claim, text, "inconclusive")
    return Finding(claim, text, _verdict(law.hits == law.n_held_out))


def finding_int4(result) -> Finding:
    """Claim 5: at int4, 0.33 beats 0.1 decisively at 50M and 100M, noise below."""
    claim = "5 int4 boundary"
    if isinstance(result, NotSupported):
        return _not_supported(claim, result)
    sizes = result.sizes
    parts = [
        f"{r['size']} z = {r['statistic']:.1f} ({r['test']}, {r['favour']}{', sig.' if r['significant'] else ''})"
        for _, r in sizes.iterrows()
    ]
    boundary = result.boundary or "none"
    text = (f"wd{round(100 * result.reference)} vs wd{round(100 * result.other)} at int4: "
            + "; ".join(parts) + f"; significant from {boundary} upward")
    text += "; study: decisive at 50M and 100M (z about 12-15, 10/10 seeds), noise below"
    if STUDY_INT4_BOUNDARY not in set(sizes["size"]):
        return Finding(claim, text + f"; the data has no {STUDY_INT4_BOUNDARY} int4 cells", "inconclusive")
    return Finding(claim, text, _verdict(result.boundary == STUDY_INT4_BOUNDARY))


def finding_probe(result) -> Finding:
    """Claim 6: the int6 probe ratio is about 1.04."""
    claim = "6 probe ratio"
    if isinstance(result, NotSupported):
        return _not_supported(claim, result)
    pooled = result.table[result.table["size"] == "all"]
    text = "; ".join(
        f"{r['bits']} {r['ratio']:.3f} {_fmt_interval(r['ci_low'], r['ci_high'], 3)} ({_seeds(r['n_seeds'])})"
        for _, r in pooled.iterrows()
    )
    text = f"pooled grid-distance ratio QAT/fp16: {text} (CI: delta method over seeds)"
    row = result.pooled("int6")
    text += f"; study: int6 about {STUDY_PROBE_RATIO_INT6}"
    if row is None:
        return Finding(claim, text + "; no int6 probe values", "inconclusive")
    if row["n_seeds"] < 2:
        return Finding(claim, text + "; one seed gives no interval", "inconclusive")
    return Finding(claim, text, _verdict(bool(abs(row["ratio"] - STUDY_PROBE_RATIO_INT6) <= PROBE_RATIO_TOLERANCE)))


def finding_robustness(results) -> Finding:
    """Claim 7: best warmdown and negligible interaction hold within the phase 5 axes."""
    claim = "7 robustness"
    if isinstance(results, NotSupported):
        return _not_supported(claim, results)
    parts, verdicts = [], []
    for block, item in results.items():
        if isinstance(item.best, BestWarmdown):
            table = item.best.best
            at_study = np.isclose(table["best_warmdown"], STUDY_BEST_WARMDOWN)
            part = f"{block}: 0.33 best in {int(at_study.sum())}/{len(table)}"
            verdicts.append(_verdict(bool(at_study.all())))
        else:
            part = f"{block}: best warmdown {item.best}"
        if isinstance(item.interaction, Interaction):
            tost = item.interaction.tost
            part += f", F p = {item.interaction.f_pvalue:.3g}"
            if len(tost):
                part += f", TOST {int(tost['equivalent'].sum())}/{len(tost)} equivalent"
            verdicts.append(interaction_verdict(item.interaction))
        else:
            part += f", interaction {item.interaction}"
        parts.append(part)
    text = "; ".join(parts) + "; study: the conclusions hold in every block"
    if not verdicts:
        return Finding(claim, text, "inconclusive")
    if "differs" in verdicts:
        return Finding(claim, text, "differs")
    return Finding(claim, text, "agrees" if set(verdicts) == {"agrees"} else "inconclusive")


def finding_ptq(result) -> Finding:
    """Claim 8a: QAT penalty against PTQ penalty (the study states no number)."""
    claim = "8 QAT vs PTQ"
    if isinstance(result, NotSupported):
        return _not_supported(claim, result)
    parts = []
    for bits, group in result.table.groupby("bits", sort=False):
        better = int((group["gain_mean"] > 0).sum())
        parts.append(
            f"{bits}: PTQ/QAT penalty ratio {_fmt_range(group['ratio'])}, "
            f"QAT loses less in {better}/{len(group)} sizes"
        )
    return Finding(claim, "; ".join(parts), _verdict(None))


def finding_energy(result) -> Finding:
    """Claim 8b: energy per phase (the study states no number)."""
    claim = "8 energy"
    if isinstance(result, NotSupported):
        return _not_supported(claim, result)
    phases = ", ".join(f"phase {r['phase']} {r['kwh']:.3g} kWh ({r['cells']} cells)"
                       for _, r in result.by_phase.iterrows())
    text = f"total {result.total_kwh:.3g} kWh: {phases}"
    if not np.isnan(result.total_emissions_kg):
        text += f"; emissions {result.total_emissions_kg:.3g} kg"
    return Finding(claim, text, _verdict(None))


def finding_data(coverage: Coverage) -> Finding:
    """Claim 9: the cells the table contains and lacks."""
    text = f"{coverage.n_done} done cells, {coverage.n_diverged} diverged (excluded)"
    if coverage.has_manifest:
        text += f", {coverage.n_missing}/{coverage.n_expected} manifest cells missing"
    else:
        text += ", missing cells unknown (no manifest)"
    return Finding("9 data", text, "no claim")


def build_findings(result: Analysis) -> list:
    """Return one Finding per claim, in claim order."""
    findings = [
        finding_best(result.best_warmdown),
        finding_interaction(result.interaction),
        finding_paired(result.paired),
    ]
    findings += [finding_penalty(bits, law) for bits, law in result.penalty_laws.items()]
    findings += [
        finding_int4(result.int4),
        finding_probe(result.probe),
        finding_robustness(result.robustness),
        finding_ptq(result.qat_vs_ptq),
        finding_energy(result.energy),
        finding_data(result.coverage),
    ]
    return findings
