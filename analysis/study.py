"""Run every analysis of the study on a collected table.

`analyze` is the entry point. It validates the table, sets diverged cells
aside, runs claims 1 to 8 on whatever cells are done, and adds one finding
per claim (see `analysis.findings`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pandas as pd

from .data import (
    PHASE5_BLOCKS, ROBUSTNESS_BLOCKS, Coverage, NotSupported, check_coverage, primary_cells,
    split_status, validate_table,
)
from .energy import EnergySummary, energy_summary
from .findings import build_findings
from .interaction import Interaction, fit_interaction
from .penalty import Int4Boundary, PenaltyLaw, QatVsPtq, int4_boundary, penalty_laws, qat_vs_ptq
from .probe import ProbeRatios, probe_ratios
from .warmdown import BestWarmdown, PairedTests, best_warmdown, paired_warmdown_tests

logger = logging.getLogger(__name__)


@dataclass
class Robustness:
    """Claims 1 and 2 repeated within one phase 5 block.

    Attributes
    ----------
    block : str
    n_cells : int
        Done cells in the block.
    best : BestWarmdown or NotSupported
    interaction : Interaction or NotSupported
    """

    block: str
    n_cells: int
    best: BestWarmdown | NotSupported
    interaction: Interaction | NotSupported


@dataclass
class Analysis:
    """Every result of the study's analysis on one table.

    Each analysis field contains its result dataclass, or a NotSupported whose
    reason names the missing cells.

    Attributes
    ----------
    phases : list of str
        Phases in the table.
    primary_phase : str or None
        The phase whose non-phase-5 cells form the primary grid (claims 1-4).
    margin : float
        TOST equivalence margin in bpb.
    coverage : Coverage
        Done, diverged and missing cells.
    best_warmdown : BestWarmdown or NotSupported
        Claim 1, on the primary grid.
    interaction : Interaction or NotSupported
        Claim 2, on the primary grid.
    paired : PairedTests or NotSupported
        Claim 3, on the primary grid.
    penalty_laws : dict
        Claim 4: bits -> PenaltyLaw or NotSupported, for int8, int6, int4.
    int4 : Int4Boundary or NotSupported
        Claim 5.
    probe : ProbeRatios or NotSupported
        Claim 6.
    robustness : dict or NotSupported
        Claim 7: block -> Robustness for the optimiser, shape and length blocks present.
    qat_vs_ptq : QatVsPtq or NotSupported
        Claim 8, first half.
    energy : EnergySummary or NotSupported
        Claim 8, second half.
    findings : list of Finding
        One per claim, from `analysis.findings.build_findings`.
    notes : list of str
    """

    phases: list
    primary_phase: str | None
    margin: float
    coverage: Coverage
    best_warmdown: BestWarmdown | NotSupported
    interaction: Interaction | NotSupported
    paired: PairedTests | NotSupported
    penalty_laws: dict[str, PenaltyLaw | NotSupported]
    int4: Int4Boundary | NotSupported
    probe: ProbeRatios | NotSupported
    robustness: dict[str, Robustness] | NotSupported
    qat_vs_ptq: QatVsPtq | NotSupported
    energy: EnergySummary | NotSupported
    findings: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def choose_primary(done: pd.DataFrame) -> tuple[pd.DataFrame, str | None, list[str]]:
    """Return the primary grid, its phase, and notes on primary phases left out.

    Seeds of different phases are different runs, so only one phase forms the
    grid: phase "2" when present, else the phase with the most cells.
    """
    primary = primary_cells(done)
    if primary.empty:
        return primary, None, []
    counts = primary["phase"].value_counts()
    phase = "2" if "2" in counts.index else str(counts.index[0])
    others = sorted(p for p in counts.index if p != phase)
    notes = []
    if others:
        notes.append(f"primary grid is phase {phase}; left out of claims 1-4: phases {', '.join(others)}")
    return primary[primary["phase"] == phase].reset_index(drop=True), phase, notes


def robustness(
    done: pd.DataFrame, margin: float = 0.005, n_boot: int = 2000, rng_seed: int = 0, alpha: float = 0.05
) -> dict[str, Robustness] | NotSupported:
    """Repeat the best-warmdown and interaction analyses within each robustness block."""
    blocks = [b for b in ROBUSTNESS_BLOCKS if (done["block"] == b).any()]
    if not blocks:
        return NotSupported(f"no {', '.join(ROBUSTNESS_BLOCKS)} block in the table")
    results = {}
    for block in blocks:
        cells = done[done["block"] == block].reset_index(drop=True)
        logger.info("robustness block %s: %d cells", block, len(cells))
        results[block] = Robustness(
            block, len(cells), best_warmdown(cells, n_boot=n_boot, rng_seed=rng_seed),
            fit_interaction(cells, margin=margin, alpha=alpha),
        )
    return results


def analyze(
    table: pd.DataFrame,
    manifest: pd.DataFrame | None = None,
    margin: float = 0.005,
    n_boot: int = 2000,
    rng_seed: int = 0,
    alpha: float = 0.05,
) -> Analysis:
    """Recompute the study's claims on whatever cells of `table` are done.

    Parameters
    ----------
    table : pandas.DataFrame
        Collected results, one row per cell (phases concatenated).
    manifest : pandas.DataFrame, optional
        Every planned cell of the same phases, to report the missing ones.
    margin : float
        TOST equivalence margin for the interaction, in bpb.
    n_boot : int
        Seed bootstrap resamples for the best-warmdown shares.
    rng_seed : int
        Seed of the bootstrap generator.
    alpha : float
        Significance level of the tests.
    """
    table = validate_table(table)
    coverage = check_coverage(table, manifest)
    done, _ = split_status(table)
    primary, primary_phase, notes = choose_primary(done)
    scope = pd.concat([primary, done[done["block"].isin(PHASE5_BLOCKS)]], ignore_index=True)
    logger.info("analysing %d done cells (%d in the primary grid)", len(scope), len(primary))

    no_primary = NotSupported("no cells outside the phase 5 blocks (phase 2 or micro grid)")
    logger.info("claim 1: best warmdown")
    best = best_warmdown(primary, n_boot=n_boot, rng_seed=rng_seed) if len(primary) else no_primary
    logger.info("claim 2: interaction")
    interaction = fit_interaction(primary, margin=margin, alpha=alpha) if len(primary) else no_primary
    logger.info("claim 3: paired tests")
    paired = paired_warmdown_tests(primary, alpha=alpha) if len(primary) else no_primary
    logger.info("claims 4-6: penalty law, int4 boundary, probe")
    laws = penalty_laws(scope, alpha=alpha) if len(scope) else {
        b: NotSupported("no done cells") for b in ("int8", "int6", "int4")
    }
    int4 = int4_boundary(scope, alpha=alpha) if len(scope) else NotSupported("no done cells")
    probe = probe_ratios(scope, alpha=alpha) if len(scope) else NotSupported("no done cells")
    logger.info("claim 7: robustness blocks")
    robust = robustness(scope, margin, n_boot, rng_seed, alpha) if len(scope) else NotSupported("no done cells")
    logger.info("claim 8: PTQ and energy")
    ptq = qat_vs_ptq(scope) if len(scope) else NotSupported("no done cells")
    energy = energy_summary(table)

    result = Analysis(
        phases=sorted(table["phase"].unique()), primary_phase=primary_phase, margin=margin,
        coverage=coverage, best_warmdown=best, interaction=interaction, paired=paired,
        penalty_laws=laws, int4=int4, probe=probe, robustness=robust, qat_vs_ptq=ptq,
        energy=energy, notes=notes,
    )
    result.findings = build_findings(result)
    return result
