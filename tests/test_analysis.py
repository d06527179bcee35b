"""Statistics of the analysis: planted effects recovered, cross-checked by hand.

Every table comes from tests.synthetic with a fixed noise seed, so each
assertion is deterministic. Coverage checks allow a few misses out of many
intervals, because a correct 95% interval misses 1 time in 20.
"""

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.data import NotSupported, primary_cells, split_status, validate_table
from analysis.inference import paired_test, ratio_ci
from analysis.interaction import fit_interaction
from analysis.penalty import int4_boundary, penalty_laws, qat_vs_ptq
from analysis.probe import probe_ratios
from analysis.study import analyze, robustness
from analysis.warmdown import best_warmdown, paired_warmdown_tests
from tests.synthetic import PHASE2_SIZES, Planted, make_table, n_params_of


def done_cells(table):
    done, _ = split_status(validate_table(table))
    return done


@pytest.fixture(scope="module")
def full():
    return done_cells(make_table(seed=0))


@pytest.fixture(scope="module")
def primary(full):
    return primary_cells(full)[lambda d: d["phase"] == "2"].reset_index(drop=True)


@pytest.fixture(scope="module")
def interaction(primary):
    return fit_interaction(primary)


# Claim 1: best warmdown ---------------------------------------------------


def test_best_warmdown_finds_planted_best(primary):
    result = best_warmdown(primary, n_boot=500)
    assert len(result.best) == 12
    assert np.allclose(result.best["best_warmdown"], 0.33)
    assert result.best_everywhere() == 0.33
    assert (result.best["share_best"] > 0.9).all()


def test_best_warmdown_intervals_cover_planted_means(primary):
    planted = Planted()
    result = best_warmdown(primary, n_boot=200)
    expected = [
        np.mean([planted.expected_bpb(r["bits"], r["warmdown"], lr, r["size"]) for lr in (0.5, 1.0, 2.0)])
        for _, r in result.means.iterrows()
    ]
    covered = (result.means["ci_low"] <= expected) & (expected <= result.means["ci_high"])
    assert len(covered) == 48
    assert covered.sum() >= 43, result.means[~covered]


def test_bootstrap_shares_repeat_with_seed(primary):
    first = best_warmdown(primary, n_boot=300, rng_seed=7)
    second = best_warmdown(primary, n_boot=300, rng_seed=7)
    pd.testing.assert_frame_equal(first.means, second.means)
    shares = first.means.groupby(["bits", "size"])["share_best"].sum()
    assert np.allclose(shares, 1.0)


def test_bootstrap_shares_split_close_warmdowns():
    # Two warmdowns planted 0.0005 bpb apart with 0.002 noise: neither should win every resample.
    planted = Planted(curvature=0.0, lr_effect={0.5: 0.0, 1.0: 0.0, 2.0: 0.0})
    cells = primary_cells(done_cells(make_table(phases=("2",), seed=3, planted=planted)))
    result = best_warmdown(cells, n_boot=500)
    assert (result.best["share_best"] < 0.99).any()


def test_best_warmdown_rejects_bad_boot_count(primary):
    with pytest.raises(ValueError, match="n_boot"):
        best_warmdown(primary, n_boot=0)


# Claim 2: interaction -----------------------------------------------------


def treatment_design(cells, interaction_terms=True):
    """Return a treatment-coded design matrix built with numpy, independent of patsy."""
    def dummies(column):
        levels = sorted(cells[column].unique())
        return {lvl: (cells[column] == lvl).to_numpy(float) for lvl in levels[1:]}

    bits, wd, size = dummies("bits"), dummies("warmdown"), dummies("size")
    columns = {"intercept": np.ones(len(cells))}
    for name, group in (("bits", bits), ("wd", wd), ("size", size), ("lr", dummies("lr_mult")),
                        ("seed", dummies("seed"))):
        columns.update({(name, lvl): v for lvl, v in group.items()})
    if interaction_terms:
        columns.update({("bits:wd", b, w): bits[b] * wd[w] for b, w in itertools.product(bits, wd)})
    columns.update({("size:wd", s, w): size[s] * wd[w] for s, w in itertools.product(size, wd)})
    return list(columns), np.column_stack(list(columns.values()))


def test_ols_matches_numpy_lstsq(primary, interaction):
    names, design = treatment_design(primary)
    y = primary["val_bpb"].to_numpy()
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    fitted = design @ coef
    assert np.allclose(interaction.ols.fittedvalues.to_numpy(), fitted, atol=1e-10)

    # The int6 contrast between warmdown 0.1 and 0.5 is the int6 x wd0.5 coefficient
    # (0.1 is the reference warmdown), with SE from sigma^2 (X'X)^-1.
    residual = y - fitted
    df = len(y) - design.shape[1]
    sigma2 = residual @ residual / df
    j = names.index(("bits:wd", "int6", 0.5))
    se = np.sqrt(sigma2 * np.linalg.inv(design.T @ design)[j, j])
    row = interaction.tost.query("bits == 'int6' and warmdown_a == 0.1 and warmdown_b == 0.5").iloc[0]
    assert row["contrast"] == pytest.approx(coef[j], abs=1e-10)
    assert row["se"] == pytest.approx(se, rel=1e-8)


def test_anova_f_matches_nested_models(primary, interaction):
    y = primary["val_bpb"].to_numpy()
    _, full_design = treatment_design(primary)
    _, reduced_design = treatment_design(primary, interaction_terms=False)
    rss = [np.sum((y - d @ np.linalg.lstsq(d, y, rcond=None)[0]) ** 2) for d in (full_design, reduced_design)]
    df_num = full_design.shape[1] - reduced_design.shape[1]
    df_den = len(y) - full_design.shape[1]
    f_value = (rss[1] - rss[0]) / df_num / (rss[0] / df_den)
    assert interaction.df_num == df_num
    assert interaction.df_resid == df_den
    assert interaction.f_value == pytest.approx(f_value, rel=1e-8)
    assert interaction.f_pvalue == pytest.approx(stats.f.sf(f_value, df_num, df_den), rel=1e-6)


def test_interaction_formula_matches_study(interaction):
    assert interaction.formula == (
        "val_bpb ~ C(bits) * C(warmdown) + C(size) * C(warmdown) + C(lr_mult) + C(seed)"
    )
    assert interaction.dropped == []
    assert "C(bits):C(warmdown)" in interaction.anova.index


def test_tost_p_values_by_hand(interaction):
    row = interaction.tost.iloc[3]
    df, margin = interaction.df_resid, interaction.margin
    p_lower = stats.t.sf((row["contrast"] + margin) / row["se"], df)
    p_upper = stats.t.cdf((row["contrast"] - margin) / row["se"], df)
    assert row["p_tost"] == pytest.approx(max(p_lower, p_upper), rel=1e-9)
    half = stats.t.ppf(0.95, df) * row["se"]
    assert row["ci90_low"] == pytest.approx(row["contrast"] - half)
    # Equivalence at alpha 0.05 is the same as the 90% interval inside +-margin.
    inside = -margin < row["ci90_low"] and row["ci90_high"] < margin
    assert bool(row["equivalent"]) == inside


def test_tost_equivalent_when_null_and_many_seeds():
    cells = primary_cells(done_cells(make_table(phases=("2",), seed=11, n_seeds=10)))
    result = fit_interaction(cells, mixed=False)
    assert len(result.tost) == 12  # 2 quantised bits x 6 warmdown pairs
    assert result.all_equivalent()


def test_planted_interaction_recovered():
    planted = Planted(interaction={"int8": 0.0, "int6": 0.012, "int4": 0.0})
    cells = primary_cells(done_cells(make_table(phases=("2",), seed=5, planted=planted)))
    result = fit_interaction(cells, mixed=False)
    assert result.f_pvalue < 1e-6
    for _, row in result.tost.iterrows():
        truth = planted.interaction[row["bits"]] * (row["warmdown_b"] - row["warmdown_a"]) / 0.4
        half = stats.t.ppf(0.975, result.df_resid) * row["se"]
        assert row["contrast"] - half <= truth <= row["contrast"] + half, row
    widest = result.tost.query("bits == 'int6' and warmdown_a == 0.1 and warmdown_b == 0.5").iloc[0]
    assert not widest["equivalent"]
    assert widest["ci90_low"] > result.margin  # shown to exceed the margin


def test_mixed_model_agrees_with_ols(interaction):
    mixed = interaction.mixed
    assert mixed.df == 6
    # Seed is a balanced blocking factor, so the random and fixed seed models
    # give nearly the same bits x warmdown test.
    assert mixed.p_value == pytest.approx(interaction.f_pvalue, abs=0.05)
    assert mixed.seed_variance >= 0


def test_bits_by_size_check_finds_penalty_law(interaction):
    check = interaction.bits_by_size
    assert check.bits_by_size_pvalue < 1e-10  # the planted penalty changes with size
    assert check.f_value > interaction.f_value  # a smaller residual makes the F larger


def test_interaction_rejects_bad_margin(primary):
    with pytest.raises(ValueError, match="margin"):
        fit_interaction(primary, margin=0.0)


# Claim 3: paired tests ----------------------------------------------------


@pytest.fixture(scope="module")
def paired(primary):
    return paired_warmdown_tests(primary)


def test_paired_t_matches_scipy(primary, paired):
    cells = primary[(primary["bits"] == "int6") & (primary["size"] == "50M")]
    per_seed = cells.groupby(["warmdown", "seed"])["val_bpb"].mean().unstack("warmdown")
    reference = stats.ttest_rel(per_seed[0.1], per_seed[0.33])
    row = paired.tests.query("bits == 'int6' and size == '50M' and warmdown == 0.1").iloc[0]
    assert row["test"] == "t"
    assert row["statistic"] == pytest.approx(reference.statistic, rel=1e-9)
    assert row["p_value"] == pytest.approx(reference.pvalue, rel=1e-9)
    assert row["favour"] == f"{int((per_seed[0.1] > per_seed[0.33]).sum())}/5"


def test_paired_z_used_from_ten_seeds():
    rng = np.random.default_rng(0)
    differences = rng.normal(0.01, 0.004, 10)
    result = paired_test(differences)
    reference = stats.ttest_1samp(differences, 0.0)
    assert result.test == "z"
    assert result.statistic == pytest.approx(reference.statistic)
    assert result.p_value == pytest.approx(2 * stats.norm.sf(abs(reference.statistic)))
    assert paired_test(differences[:9]).test == "t"


def test_holm_matches_hand_computation(paired):
    p = paired.tests["p_value"].to_numpy()
    order = np.argsort(p)
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    assert np.allclose(paired.tests["p_holm"], adjusted)


def test_paired_differences_cover_planted(paired):
    planted = Planted()
    truth = planted.curvature * (paired.tests["warmdown"] - 0.33) ** 2
    covered = (paired.tests["ci_low"] <= truth) & (truth <= paired.tests["ci_high"])
    assert len(covered) == 36
    assert covered.sum() >= 32
    assert (paired.tests["mean_diff"] > 0).all()


def test_paired_tests_need_reference(primary):
    result = paired_warmdown_tests(primary[primary["warmdown"] != 0.33])
    assert isinstance(result, NotSupported)
    assert "0.33" in result.reason


# Claim 4: penalty law -----------------------------------------------------


@pytest.fixture(scope="module")
def laws(full):
    return penalty_laws(full)


def test_penalty_law_recovers_planted_int6(laws):
    planted = Planted()
    law = laws["int6"]
    assert list(law.fit_sizes["size"]) == list(PHASE2_SIZES)
    assert law.intercept_ci[0] <= planted.penalty_intercept["int6"] <= law.intercept_ci[1]
    assert law.slope_ci[0] <= planted.penalty_slope["int6"] <= law.slope_ci[1]
    assert law.n_held_out == 5
    assert law.hits == 5


def test_penalty_law_recovers_planted_int8(laws):
    planted = Planted()
    law = laws["int8"]
    assert law.slope_ci[0] <= planted.penalty_slope["int8"] <= law.slope_ci[1]
    assert law.n_held_out == 0  # the synthetic "sizes" block has no int8 cells


def test_penalty_per_size_matches_hand_pairing(full, laws):
    main = full[full["block"] == "main"]
    key = ["warmdown", "lr_mult", "size", "seed"]
    merged = main[main["bits"] == "int6"].merge(main[main["bits"] == "fp16"], on=key, suffixes=("_q", "_ref"))
    merged["penalty"] = merged["val_bpb_q"] - merged["val_bpb_ref"]
    per_size = merged.groupby(["size", "seed"])["penalty"].mean().groupby("size").mean()
    fitted = laws["int6"].fit_sizes.set_index("size")["mean"]
    assert np.allclose(fitted[per_size.index], per_size)


def test_wls_prediction_interval_by_hand(laws):
    law = laws["int6"]
    sizes = law.fit_sizes
    x = np.column_stack([np.ones(len(sizes)), np.log(sizes["n_params"])])
    w = sizes["weight"].to_numpy()
    y = sizes["mean"].to_numpy()
    xtwx = x.T @ (w[:, None] * x)
    beta = np.linalg.solve(xtwx, x.T @ (w * y))
    residual = y - x @ beta
    df = len(y) - 2
    scale = np.sum(w * residual ** 2) / df
    cov = scale * np.linalg.inv(xtwx)
    assert beta == pytest.approx([law.intercept, law.slope], rel=1e-9)

    held = law.held_out
    x0 = np.column_stack([np.ones(len(held)), np.log(held["n_params"])])
    predicted = x0 @ beta
    se_fit2 = np.einsum("ij,jk,ik->i", x0, cov, x0)
    half = stats.t.ppf(0.975, df) * np.sqrt(se_fit2 + scale * held["var_mean"].to_numpy())
    assert np.allclose(held["predicted"], predicted)
    assert np.allclose(held["pi_low"], predicted - half)
    assert np.allclose(held["pi_high"], predicted + half)


def test_penalty_law_misses_broken_law():
    # A penalty that jumps at the held-out sizes must fall outside the phase 2 prediction.
    table = make_table(seed=2)
    held = (table["block"] == "sizes") & (table["bits"] == "int6")
    table.loc[held, "val_bpb"] += 0.02
    law = penalty_laws(done_cells(table))["int6"]
    assert law.hits == 0


def test_int4_penalty_fitted_over_own_sizes(full, laws):
    planted = Planted()
    law = laws["int4"]
    assert len(law.fit_sizes) == 8
    assert law.n_held_out == 0
    # Expected penalty per size: int4 minus fp16, averaged over the paired warmdowns 0.1 and 0.33.
    for _, row in law.fit_sizes.iterrows():
        truth = np.mean([planted.expected_bpb("int4", w, 1.0, row["size"])
                         - planted.expected_bpb("fp16", w, 1.0, row["size"]) for w in (0.1, 0.33)])
        assert row["ci_low"] <= truth <= row["ci_high"], row


# Claim 5: int4 boundary ---------------------------------------------------


def test_int4_boundary_at_planted_size(full):
    result = int4_boundary(full)
    sizes = result.sizes.set_index("size")
    assert result.boundary == "50M"
    for size in ("50M", "100M"):
        assert sizes.loc[size, "test"] == "z"
        assert sizes.loc[size, "favour"] == "10/10"
        assert sizes.loc[size, "statistic"] > 6
    assert not sizes.loc[["3M", "5M", "8M", "15M", "20M", "30M"], "significant"].any()
    # Planted advantage 0.02 bpb from 40M parameters up.
    for size in ("50M", "100M"):
        assert sizes.loc[size, "ci_low"] <= 0.02 <= sizes.loc[size, "ci_high"]


def test_int4_boundary_none_when_no_advantage():
    planted = Planted(int4_advantage=0.0)
    result = int4_boundary(done_cells(make_table(phases=("2", "5"), seed=4, planted=planted)))
    assert result.boundary is None


# Claim 6: probe -----------------------------------------------------------


def test_probe_ratio_recovers_planted(full):
    planted = Planted()
    result = probe_ratios(full)
    for bits in ("int8", "int6", "int4"):
        row = result.pooled(bits)
        assert row["ci_low"] <= planted.probe_ratio[bits] <= row["ci_high"], row
    per_size = result.table[result.table["size"] != "all"]
    truth = per_size["bits"].map(planted.probe_ratio)
    covered = (per_size["ci_low"] <= truth) & (truth <= per_size["ci_high"])
    assert covered.mean() >= 0.85


def test_ratio_ci_by_hand():
    x = np.array([1.02, 1.05, 1.03, 1.06, 1.04])
    y = np.array([1.00, 1.01, 0.99, 1.02, 1.00])
    result = ratio_ci(x, y)
    ratio = x.mean() / y.mean()
    se = np.std(x - ratio * y, ddof=1) / (np.sqrt(5) * y.mean())
    assert result.ratio == pytest.approx(ratio)
    assert result.se == pytest.approx(se)
    assert result.ci_high - result.ratio == pytest.approx(stats.t.ppf(0.975, 4) * se)
    exact = ratio_ci(2 * y, y)
    assert exact.ratio == pytest.approx(2.0)
    assert exact.se == pytest.approx(0.0, abs=1e-12)


# Claims 7 and 8 -----------------------------------------------------------


def test_robustness_blocks_keep_best_warmdown(full):
    results = robustness(full, n_boot=200)
    assert set(results) == {"optimiser", "shape", "length"}
    for block, item in results.items():
        assert np.allclose(item.best.best["best_warmdown"], 0.33), block
        assert not isinstance(item.interaction, NotSupported), block
    assert "steps_mult" in results["length"].best.group_by
    assert "C(steps_mult) * C(warmdown)" in results["length"].interaction.formula


def test_qat_vs_ptq_recovers_planted_factor(full):
    planted = Planted()
    table = qat_vs_ptq(full).table
    int6 = table[table["bits"] == "int6"]
    truth = [(planted.ptq_factor["int6"] - 1) * planted.penalty("int6", n_params_of(s)) for s in int6["size"]]
    covered = (int6["gain_ci_low"] <= truth) & (truth <= int6["gain_ci_high"])
    assert covered.sum() >= len(int6) - 1
    assert (table["gain_mean"] > 0).all()


def test_analyze_full_study_agrees():
    result = analyze(make_table(seed=0), n_boot=200)
    verdicts = {f.claim: f.verdict for f in result.findings}
    for claim in ("1 best warmdown", "2 interaction", "3 paired tests", "4 penalty law int6",
                  "5 int4 boundary", "6 probe ratio"):
        assert verdicts[claim] == "agrees", (claim, result.findings)
    assert verdicts["4 penalty law int8"] == "no claim"


def test_analyze_reports_contrary_best_warmdown():
    planted = Planted(best_warmdown=0.5)
    result = analyze(make_table(phases=("2",), seed=1, planted=planted), n_boot=200)
    finding = next(f for f in result.findings if f.claim == "1 best warmdown")
    assert finding.verdict == "differs"
    assert "wd0.5" in finding.text
