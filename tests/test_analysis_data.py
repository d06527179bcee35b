"""Partial, diverged and small tables: the analysis reports what is missing or unsupported."""

import numpy as np
import pandas as pd
import pytest

import analysis
from analysis.data import NotSupported, check_coverage, match_bits_pairs, validate_table
from analysis.interaction import fit_interaction
from tests.synthetic import Planted, make_manifest, make_table


def finding(result, claim):
    return next(f for f in result.findings if f.claim == claim)


@pytest.fixture(scope="module")
def micro():
    return analysis.analyze(make_table(phases=("micro",), seed=0), n_boot=200)


def test_micro_grid_runs(micro):
    assert micro.primary_phase == "micro"
    assert micro.best_warmdown.best_everywhere() == 0.33
    assert micro.interaction.dropped == ["C(lr_mult): one level (1)"]
    assert "C(lr_mult)" not in micro.interaction.formula
    assert isinstance(micro.paired.tests, type(micro.best_warmdown.means))


def test_micro_grid_names_unsupported(micro):
    for bits in ("int8", "int6"):
        law = micro.penalty_laws[bits]
        assert isinstance(law, NotSupported)
        assert "tiny1, tiny2" in law.reason
    assert "no done int4 cells" in micro.int4.reason
    assert "no optimiser, shape, length block" in micro.robustness.reason
    assert "at least 3 seeds" in micro.interaction.mixed.reason
    verdicts = {f.claim: f.verdict for f in micro.findings}
    for claim in ("4 penalty law int6", "5 int4 boundary", "7 robustness"):
        assert verdicts[claim] == "not supported"


def test_micro_text_summary(micro):
    text = analysis.format_text(micro)
    assert "C(bits):C(warmdown)" in text  # the statsmodels ANOVA table
    assert "Best warmdown per group" in text
    assert "[not supported] 5 int4 boundary: no done int4 cells" in text
    assert "dropped C(lr_mult): one level (1)" in text
    assert text.count("\n  [") == len(micro.findings)


def test_four_cell_grid_runs():
    # The smallest grid a user can collect: fp16/int6 x warmdown 0.1/0.5, one size, one seed.
    table = make_table(phases=("micro",), seed=0)
    table = table[table["bits"].isin(["fp16", "int6"]) & table["warmdown"].isin([0.1, 0.5])
                  & (table["size"] == "tiny1") & (table["seed"] == 0)]
    result = analysis.analyze(table, n_boot=100)
    assert "no residual degrees of freedom" in result.interaction.reason
    assert result.paired.reason == "no cells at the reference warmdown 0.33; found 0.1, 0.5"
    assert "sizes with fewer than 2 seeds: tiny1" in result.penalty_laws["int6"].reason
    assert finding(result, "1 best warmdown").verdict == "inconclusive"
    assert finding(result, "6 probe ratio").verdict == "inconclusive"
    assert "[not supported] 2 interaction" in analysis.format_text(result)


def test_missing_cells_reported_with_manifest():
    table = make_table(phases=("2",), seed=0)
    dropped = (table["bits"] == "int6") & (table["size"] == "50M") & table["seed"].isin([3, 4])
    result = analysis.analyze(table[~dropped], manifest=make_manifest(("2",)), n_boot=200)
    coverage = result.coverage
    assert coverage.n_missing == 24
    assert coverage.lines == ["phase 2 main int6 50M: 36/60 cells done, 3/5 seeds complete"]
    assert "int6 50M wd10: 3/5 seeds" in result.best_warmdown.notes
    row = result.best_warmdown.best.query("bits == 'int6' and size == '50M'").iloc[0]
    assert row["n_seeds"] == 3
    assert not isinstance(result.interaction, NotSupported)
    assert "phase 2 main int6 50M: 36/60 cells done" in analysis.format_text(result)


def test_missing_cells_unknown_without_manifest():
    coverage = check_coverage(validate_table(make_table(phases=("micro",))), None)
    assert not coverage.has_manifest
    assert coverage.lines == []


def test_diverged_cells_listed_and_excluded():
    table = make_table(phases=("2",), seed=0, planted=Planted(diverged=7))
    result = analysis.analyze(table, n_boot=200)
    assert result.coverage.n_diverged == 7
    assert len(result.coverage.diverged) == 7
    assert (result.coverage.diverged["diverged_step"] > 0).all()
    assert result.interaction.n_cells == 720 - 7
    text = analysis.format_text(result)
    assert "7 diverged (excluded from every analysis)" in text
    assert text.count("cell_id=") == 7


def test_diverged_cell_with_value_still_excluded():
    table = make_table(phases=("micro",), seed=0)
    table.loc[0, "status"] = "diverged"  # keeps its val_bpb, as a run that blew up late might
    result = analysis.analyze(table, n_boot=100)
    assert result.interaction.n_cells == 35


def test_rank_deficient_grid_not_supported():
    table = make_table(phases=("2",), seed=0)
    table = table[~((table["bits"] == "int6") & (table["warmdown"] == 0.2))]
    cells = validate_table(table)
    result = fit_interaction(cells)
    assert isinstance(result, NotSupported)
    assert "int6 wd0.2" in result.reason


def test_phase5_only_has_no_primary_grid():
    result = analysis.analyze(make_table(phases=("5",), seed=0), n_boot=100)
    assert result.primary_phase is None
    for item in (result.best_warmdown, result.interaction, result.paired):
        assert isinstance(item, NotSupported)
        assert "outside the phase 5 blocks" in item.reason
    assert result.int4.boundary == "50M"
    assert isinstance(result.penalty_laws["int6"], NotSupported)


def test_two_primary_phases_keep_phase2():
    table = make_table(phases=("2", "micro"), seed=0)
    result = analysis.analyze(table, n_boot=100)
    assert result.primary_phase == "2"
    assert result.notes == ["primary grid is phase 2; left out of claims 1-4: phases micro"]
    assert set(result.best_warmdown.best["size"]) == {"15M", "30M", "50M", "100M"}


def test_table_missing_column_rejected():
    table = make_table(phases=("micro",)).drop(columns=["val_bpb"])
    with pytest.raises(ValueError, match="missing columns \\['val_bpb'\\]"):
        analysis.analyze(table)


@pytest.mark.parametrize("column, value, needle", [
    ("status", "failed", "invalid status values \\['failed'\\]"),
    ("bits", "int3", "invalid bits values \\['int3'\\]"),
])
def test_table_bad_values_rejected(column, value, needle):
    table = make_table(phases=("micro",))
    table.loc[3, column] = value
    with pytest.raises(ValueError, match=needle):
        analysis.analyze(table)


def test_manifest_missing_column_rejected():
    manifest = make_manifest(("micro",)).drop(columns=["cell_id"])
    with pytest.raises(ValueError, match="manifest is missing columns"):
        analysis.analyze(make_table(phases=("micro",)), manifest=manifest)


def test_bits_pairs_average_duplicate_cells():
    table = validate_table(make_table(phases=("micro",), seed=0))
    twin = table[table["bits"] == "fp16"].assign(block="copy", val_bpb=lambda d: d["val_bpb"] + 0.01)
    doubled = validate_table(pd.concat([table, twin], ignore_index=True))
    pairs = match_bits_pairs(doubled, "int6")
    single = match_bits_pairs(table, "int6")
    assert len(pairs) == len(single) == 12
    assert np.allclose(pairs["val_bpb_ref"].to_numpy(), single["val_bpb_ref"].to_numpy() + 0.005)


def test_energy_sums_match_table():
    table = make_table(phases=("2", "5"), seed=0, planted=Planted(diverged=3))
    result = analysis.analyze(table, n_boot=100)
    energy = result.energy
    assert energy.total_kwh == pytest.approx(table["energy_kwh"].sum())
    assert energy.by_phase.set_index("phase")["kwh"].to_dict() == pytest.approx(
        table.groupby("phase")["energy_kwh"].sum().to_dict())
    assert energy.by_phase["cells"].sum() == len(table)  # diverged cells used energy too
    assert energy.by_cell_group["mean_val_bpb"].notna().all()


def test_energy_absent_not_supported():
    table = make_table(phases=("micro",)).drop(columns=["energy_kwh"])
    result = analysis.analyze(table, n_boot=100)
    assert isinstance(result.energy, NotSupported)
    assert finding(result, "8 energy").verdict == "not supported"
