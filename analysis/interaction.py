"""Does the effect of warmdown depend on bits? OLS F-test, mixed model, TOST.

Claim 2 of the study: the bits x warmdown interaction is negligible for fp16,
int8 and int6. Three views of it:

- OLS `val_bpb ~ C(bits) * C(warmdown) + C(size) * C(warmdown) + C(lr_mult) + C(seed)`
  with a type-II ANOVA; the `C(bits):C(warmdown)` row is the F-test.
- The same fixed effects with seed as a random intercept (`mixedlm`), and a
  Wald chi-square test of the bits x warmdown coefficients, as a check.
- TOST equivalence: for each pair of warmdowns and each intN against fp16,
  the difference of differences from the OLS fit is within +-margin when
  both one-sided tests reject. At alpha 0.05 that is the same as its 90%
  interval lying inside +-margin.
"""

from __future__ import annotations

import itertools
import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import statsmodels.formula.api as smf
from scipy import stats
from statsmodels.stats.anova import anova_lm

from .data import AXES, NotSupported, format_levels, varying

logger = logging.getLogger(__name__)

INTERACTION_TERM = "C(bits):C(warmdown)"


@dataclass
class MixedCheck:
    """Bits x warmdown test in a mixed model with a random intercept per seed.

    Attributes
    ----------
    formula : str
        Fixed-effects formula (the OLS one without C(seed)).
    chi2 : float
        Wald statistic of all bits x warmdown coefficients being zero.
    df : int
        Number of those coefficients.
    p_value : float
        Upper tail of chi-square(df) at chi2.
    seed_variance : float
        Estimated variance of the seed intercepts.
    converged : bool
        Whether the optimiser reported convergence.
    warnings : list of str
        Warnings statsmodels raised during the fit.
    """

    formula: str
    chi2: float
    df: int
    p_value: float
    seed_variance: float
    converged: bool
    warnings: list = field(default_factory=list)

    def summary(self) -> str:
        """Return the test in one line, with the seed variance and any fit warnings."""
        text = (f"chi2({self.df}) = {self.chi2:.2f}, p = {self.p_value:.3g}, seed variance "
                f"{self.seed_variance:.3g}, {'converged' if self.converged else 'NOT converged'}")
        if self.warnings:
            text += f"; statsmodels warned: {'; '.join(self.warnings)}"
        return text


@dataclass
class BitsBySizeCheck:
    """The F-test refitted with the C(bits):C(size) term that the study's formula leaves out.

    The quantisation penalty changes with size (claim 4), so without this term
    the bits x size effect sits in the residual and makes the study's F-test
    conservative. In a balanced grid the bits:warmdown sum of squares is the
    same in both fits; only the residual mean square changes.

    Attributes
    ----------
    formula : str
    f_value, f_pvalue : float
        The C(bits):C(warmdown) F-test in the extended fit.
    bits_by_size_f, bits_by_size_pvalue : float
        The F-test of the added C(bits):C(size) term.
    """

    formula: str
    f_value: float
    f_pvalue: float
    bits_by_size_f: float
    bits_by_size_pvalue: float


@dataclass
class Interaction:
    """Bits x warmdown interaction: F-test, mixed-model check and TOST equivalence.

    Attributes
    ----------
    formula : str
        The OLS formula fitted.
    dropped : list of str
        Terms left out of the study formula because their factor has one level,
        for example "C(lr_mult): one level (1.0)".
    n_cells : int
        Cells in the fit.
    anova : pandas.DataFrame
        statsmodels' type-II ANOVA table.
    f_value, f_pvalue : float
        The F statistic and p-value of the C(bits):C(warmdown) row.
    df_num : float
        Numerator degrees of freedom of that F-test.
    df_resid : float
        Residual degrees of freedom of the OLS fit.
    mixed : MixedCheck or NotSupported
        The mixed-model check.
    bits_by_size : BitsBySizeCheck or NotSupported
        The F-test refitted with a C(bits):C(size) term.
    tost : pandas.DataFrame
        One row per quantised bits and warmdown pair (warmdown_a < warmdown_b):
        contrast ((intN at b - intN at a) - (fp16 at b - fp16 at a), in bpb), se,
        ci90_low, ci90_high, p_lower, p_upper (the two one-sided p-values),
        p_tost (their maximum), equivalent (p_tost < alpha).
    margin : float
        Equivalence margin in bpb.
    alpha : float
        Level of each one-sided test.
    ols : statsmodels RegressionResults
        The fitted OLS model, for further inspection.
    notes : list of str
    """

    formula: str
    dropped: list
    n_cells: int
    anova: pd.DataFrame
    f_value: float
    f_pvalue: float
    df_num: float
    df_resid: float
    mixed: MixedCheck | NotSupported
    bits_by_size: BitsBySizeCheck | NotSupported
    tost: pd.DataFrame
    margin: float
    alpha: float
    ols: object = field(repr=False, default=None)
    notes: list = field(default_factory=list)

    def all_equivalent(self) -> bool:
        """Return whether every TOST contrast is within the margin."""
        return bool(len(self.tost)) and bool(self.tost["equivalent"].all())


def build_formula(cells: pd.DataFrame, response: str = "val_bpb", with_seed: bool = True) -> tuple[str, list[str]]:
    """Return the study's interaction formula for `cells` and the terms dropped from it.

    A term is dropped when its factor has a single level in `cells`, since it
    would be collinear with the intercept. The phase 5 axes (optimizer, shape,
    steps_mult) enter as `C(axis) * C(warmdown)` only when they vary.
    """
    terms = ["C(bits) * C(warmdown)"]
    dropped = []
    candidates = [("size", "C(size) * C(warmdown)"), ("lr_mult", "C(lr_mult)")]
    if with_seed:
        candidates.append(("seed", "C(seed)"))
    candidates += [(axis, f"C({axis}) * C(warmdown)") for axis in AXES]
    for column, term in candidates:
        if varying(cells, column):
            terms.append(term)
        elif column in ("size", "lr_mult", "seed"):
            levels = format_levels(cells[column].unique()) if column in cells.columns else ""
            dropped.append(f"{term}: one level ({levels or 'column absent'})")
    return f"{response} ~ " + " + ".join(terms), dropped


def fit_interaction(
    cells: pd.DataFrame, margin: float = 0.005, alpha: float = 0.05, mixed: bool = True
) -> Interaction | NotSupported:
    """Test the bits x warmdown interaction on one grid of done cells.

    Parameters
    ----------
    cells : pandas.DataFrame
        Done cells of one grid (phase 2 "main", or one phase 5 block).
    margin : float
        TOST equivalence margin in bpb.
    alpha : float
        Level of the F-test report and of each one-sided TOST test.
    mixed : bool
        Whether to fit the mixed-model check (the slowest step).
    """
    if margin <= 0:
        raise ValueError(f"invalid margin {margin!r}; expected a positive value in bpb")
    reason = _unsupported_reason(cells)
    if reason:
        return NotSupported(reason)

    formula, dropped = build_formula(cells)
    ols, anova = fit_anova(cells, formula)
    if isinstance(ols, NotSupported):
        return ols
    row = anova.loc[INTERACTION_TERM]
    tost = _tost_contrasts(ols, cells, margin, alpha)
    check = fit_mixed_check(cells) if mixed else NotSupported("mixed model not requested")
    return Interaction(
        formula=formula, dropped=dropped, n_cells=len(cells), anova=anova,
        f_value=float(row["F"]), f_pvalue=float(row["PR(>F)"]), df_num=float(row["df"]),
        df_resid=float(ols.df_resid), mixed=check, bits_by_size=fit_bits_by_size_check(cells, formula),
        tost=tost, margin=margin, alpha=alpha, ols=ols,
    )


def fit_anova(cells: pd.DataFrame, formula: str):
    """Fit OLS and its type-II ANOVA; return (results, anova) or (NotSupported, None)."""
    ols = smf.ols(formula, data=cells).fit()
    exog = ols.model.exog
    rank = int(ols.model.rank)
    if rank < exog.shape[1]:
        return NotSupported(
            f"the design is rank-deficient (rank {rank} of {exog.shape[1]} columns) because some "
            "factor combinations are missing"
        ), None
    if ols.df_resid < 1:
        return NotSupported(
            f"no residual degrees of freedom ({len(cells)} cells for {exog.shape[1]} model columns); "
            "the F-test needs more seeds or more cells"
        ), None
    return ols, anova_lm(ols, typ=2)


def fit_bits_by_size_check(cells: pd.DataFrame, formula: str) -> BitsBySizeCheck | NotSupported:
    """Refit `formula` plus C(bits):C(size) and return both F-tests of interest."""
    if not varying(cells, "size"):
        return NotSupported("one size only, so there is no bits x size term to add")
    extended = formula + " + C(bits):C(size)"
    ols, anova = fit_anova(cells, extended)
    if isinstance(ols, NotSupported):
        return ols
    return BitsBySizeCheck(
        formula=extended,
        f_value=float(anova.loc[INTERACTION_TERM, "F"]),
        f_pvalue=float(anova.loc[INTERACTION_TERM, "PR(>F)"]),
        bits_by_size_f=float(anova.loc["C(bits):C(size)", "F"]),
        bits_by_size_pvalue=float(anova.loc["C(bits):C(size)", "PR(>F)"]),
    )


def _unsupported_reason(cells: pd.DataFrame) -> str:
    if cells.empty:
        return "no done cells"
    bits = sorted(cells["bits"].unique())
    warmdowns = sorted(cells["warmdown"].unique())
    if len(bits) < 2:
        return f"needs at least 2 bit-widths, found {format_levels(bits)}"
    if len(warmdowns) < 2:
        return f"needs at least 2 warmdowns, found {format_levels(warmdowns)}"
    combos = set(zip(cells["bits"], cells["warmdown"]))
    absent = [f"{b} wd{w:g}" for b in bits for w in warmdowns if (b, w) not in combos]
    if absent:
        return f"no cells for {', '.join(absent)}, so the interaction is not estimable"
    return ""


def _tost_contrasts(ols, cells: pd.DataFrame, margin: float, alpha: float) -> pd.DataFrame:
    """Return the TOST table of difference-of-differences contrasts from the OLS fit."""
    bits_levels = sorted(cells["bits"].unique())
    if "fp16" not in bits_levels:
        return pd.DataFrame()
    warmdowns = sorted(cells["warmdown"].unique())
    # The bits x warmdown contrast does not depend on the levels of the other
    # factors (no other term crosses bits with warmdown), so any row serves as a base.
    base = cells.iloc[[0]]
    grid = pd.concat(
        [base.assign(bits=b, warmdown=w) for b in bits_levels for w in warmdowns], ignore_index=True
    )
    design = _design_rows(ols, cells, grid)
    index = {(b, w): i for i, (b, w) in enumerate(itertools.product(bits_levels, warmdowns))}

    params = ols.params.to_numpy()
    cov = ols.cov_params().to_numpy()
    df = ols.df_resid
    t_crit = stats.t.ppf(1 - alpha, df)
    rows = []
    for bits in bits_levels:
        if bits == "fp16":
            continue
        for low, high in itertools.combinations(warmdowns, 2):
            weights = (design[index[(bits, high)]] - design[index[(bits, low)]]
                       - design[index[("fp16", high)]] + design[index[("fp16", low)]])

            contrast = float(weights @ params)
            se = float(np.sqrt(weights @ cov @ weights))
            p_lower = float(stats.t.sf((contrast + margin) / se, df))
            p_upper = float(stats.t.cdf((contrast - margin) / se, df))
            rows.append({
                "bits": bits, "warmdown_a": low, "warmdown_b": high, "contrast": contrast, "se": se,
                "ci90_low": contrast - t_crit * se, "ci90_high": contrast + t_crit * se,
                "p_lower": p_lower, "p_upper": p_upper, "p_tost": max(p_lower, p_upper),
                "equivalent": max(p_lower, p_upper) < alpha,
            })
    return pd.DataFrame(rows)


def _design_rows(ols, cells: pd.DataFrame, grid: pd.DataFrame) -> np.ndarray:
    """Return the OLS design-matrix rows of `grid`, whichever formula engine statsmodels uses.

    The grid rows are appended to the data and the formula is rebuilt on the
    union, so the factor levels and columns are those of the fit. Only the
    design matrix of that model is used, never a fit of it.
    """
    combined = pd.concat([cells, grid], ignore_index=True)
    model = smf.ols(ols.model.formula, data=combined)
    if list(model.exog_names) != list(ols.model.exog_names):
        raise RuntimeError(
            f"design columns changed when adding contrast rows: {model.exog_names} "
            f"instead of {ols.model.exog_names}"
        )
    return np.asarray(model.exog[len(cells):])


def fit_mixed_check(cells: pd.DataFrame, min_seeds: int = 3) -> MixedCheck | NotSupported:
    """Fit the fixed effects with a random intercept per seed and Wald-test bits x warmdown."""
    n_seeds = cells["seed"].nunique()
    if n_seeds < min_seeds:
        return NotSupported(
            f"the mixed model needs at least {min_seeds} seeds to estimate a seed variance, found {n_seeds}"
        )
    formula, _ = build_formula(cells, with_seed=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = smf.mixedlm(formula, data=cells, groups=cells["seed"]).fit(reml=True)
        except (np.linalg.LinAlgError, ValueError) as error:
            logger.warning("mixed model fit failed: %s", error)
            return NotSupported(f"the mixed model fit failed: {error}")
    names = [n for n in result.fe_params.index if n.startswith("C(bits)") and ":C(warmdown)" in n]
    coefficients = result.fe_params[names].to_numpy()
    cov = result.cov_params().loc[names, names].to_numpy()
    chi2 = float(coefficients @ np.linalg.solve(cov, coefficients))
    messages = sorted({str(w.message).splitlines()[0] for w in caught})
    return MixedCheck(
        formula=formula, chi2=chi2, df=len(names), p_value=float(stats.chi2.sf(chi2, len(names))),
        seed_variance=float(result.cov_re.iloc[0, 0]), converged=bool(result.converged),
        warnings=messages,
    )
