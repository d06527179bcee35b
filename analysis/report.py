"""Write the analysis as a self-contained folder: report.md, summary.txt and PNG figures.

The folder is built next to its destination under a temporary name and then
renamed into place, so a reader never sees a half-written folder. Replacing
an existing report takes two renames, and between them the destination is
briefly absent.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from . import figures
from .data import NotSupported, validate_table
from .study import Analysis, analyze
from .text import format_coverage, format_text

logger = logging.getLogger(__name__)

REPORT_NAME = "report.md"

# (file name, title, drawing function, whether it also takes the table)
FIGURES = (
    ("warmdown.png", "val_bpb against warmdown", figures.plot_warmdown, False),
    ("penalty_law.png", "Penalty law", figures.plot_penalty_law, False),
    ("int4_boundary.png", "INT4 boundary", figures.plot_int4_boundary, False),
    ("probe_ratio.png", "Grid-distance probe", figures.plot_probe, False),
    ("qat_vs_ptq.png", "QAT against PTQ", figures.plot_qat_vs_ptq, False),
    ("energy.png", "Energy by phase, bits and size", figures.plot_energy, False),
    ("energy_vs_bpb.png", "Energy against val_bpb", figures.plot_energy_vs_bpb, True),
)


def markdown_table(frame: pd.DataFrame, digits: int = 4) -> str:
    """Return a DataFrame as a GitHub-flavoured Markdown table."""
    if frame is None or frame.empty:
        return "(no rows)\n"

    def cell(value) -> str:
        if isinstance(value, (bool, np.bool_)):
            return "yes" if value else "no"
        if isinstance(value, (float, np.floating)):
            if np.isnan(value):
                return ""
            if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** -digits):
                return f"{value:.{digits - 1}e}"
            return f"{value:.{digits}f}"
        return str(value)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body]) + "\n"


def _section(title: str, figure: str | None, drawn: dict, tables: list[tuple[str, pd.DataFrame]] = (),
             result=None) -> list[str]:
    lines = [f"## {title}", ""]
    if isinstance(result, NotSupported):
        lines += [f"{result}", ""]
    if figure:
        outcome = drawn[figure]
        if isinstance(outcome, NotSupported):
            lines += [f"Figure not drawn, {outcome}", ""]
        else:
            lines += [f"![{title}]({figure})", ""]
    for caption, frame in tables:
        lines += [f"**{caption}**", "", markdown_table(frame)]
    return lines


def render_markdown(result: Analysis, drawn: dict) -> str:
    """Return report.md for an analysis and the outcome of each figure."""
    lines = ["# QAT warmdown study: analysis report", ""]
    lines += [f"Phases: {', '.join(result.phases)}. TOST margin: {result.margin:g} bpb.", ""]
    lines += ["## Findings", ""]
    lines += [f"- **{f.claim}** [{f.verdict}]: {f.text}" for f in result.findings]
    lines += ["", "## Cells", "", "```", *format_coverage(result), "```", ""]
    if result.coverage.has_manifest and len(result.coverage.groups):
        groups = result.coverage.groups
        lines += [markdown_table(groups[groups["missing"] > 0]) if (groups["missing"] > 0).any()
                  else "Every planned cell is in the table.\n"]

    best = result.best_warmdown
    tables = [] if isinstance(best, NotSupported) else [("Best warmdown per group", best.best),
                                                         ("Mean val_bpb per warmdown", best.means)]
    lines += _section("Claim 1: best warmdown", "warmdown.png", drawn, tables, best)

    interaction = result.interaction
    lines += ["## Claim 2: bits x warmdown interaction", ""]
    if isinstance(interaction, NotSupported):
        lines += [str(interaction), ""]
    else:
        lines += [f"`{interaction.formula}`", ""]
        lines += [f"Dropped: {term}" for term in interaction.dropped]
        lines += ["", "```", interaction.anova.to_string(), "```", ""]
        mixed = interaction.mixed
        if isinstance(mixed, NotSupported):
            lines += [f"Mixed model, seed as random intercept: {mixed}", ""]
        else:
            lines += [f"Mixed model, seed as random intercept, `{mixed.formula}`: {mixed.summary()}", ""]
        lines += ["**TOST contrasts (difference of differences, bpb)**", "", markdown_table(interaction.tost)]

    paired = result.paired
    lines += _section("Claim 3: paired tests against warmdown 0.33", None, drawn,
                      [] if isinstance(paired, NotSupported) else [("Paired tests", paired.tests)], paired)

    tables, notes = [], []
    for bits, law in result.penalty_laws.items():
        if isinstance(law, NotSupported):
            notes.append(f"{bits}: {law}")
            continue
        tables.append((f"{bits}: fitted sizes ({law.fit_source})", law.fit_sizes.drop(columns=["log_n_params"])))
        if law.n_held_out:
            tables.append((f"{bits}: held-out sizes ({law.held_out_source})",
                           law.held_out.drop(columns=["log_n_params"])))
    lines += _section("Claim 4: penalty law", "penalty_law.png", drawn, tables)
    lines += [f"- {note}" for note in notes] + [""] * bool(notes)

    int4 = result.int4
    lines += _section("Claim 5: INT4 boundary", "int4_boundary.png", drawn,
                      [] if isinstance(int4, NotSupported) else [("INT4 by size", int4.sizes)], int4)

    probe = result.probe
    lines += _section("Claim 6: grid-distance probe", "probe_ratio.png", drawn,
                      [] if isinstance(probe, NotSupported) else [(f"Ratios ({probe.method})", probe.table)], probe)

    lines += ["## Claim 7: robustness across phase 5 axes", ""]
    if isinstance(result.robustness, NotSupported):
        lines += [str(result.robustness), ""]
    else:
        for block, item in result.robustness.items():
            lines += [f"### Block {block} ({item.n_cells} cells)", ""]
            if isinstance(item.best, NotSupported):
                lines += [f"Best warmdown: {item.best}", ""]
            else:
                lines += [markdown_table(item.best.best)]
            if isinstance(item.interaction, NotSupported):
                lines += [f"Interaction: {item.interaction}", ""]
            else:
                lines += [f"`{item.interaction.formula}`", "", "```", item.interaction.anova.to_string(), "```", ""]

    comparison = result.qat_vs_ptq
    lines += _section("Claim 8: QAT against post-training quantisation", "qat_vs_ptq.png", drawn,
                      [] if isinstance(comparison, NotSupported) else [("Penalties", comparison.table)], comparison)
    energy = result.energy
    tables = [] if isinstance(energy, NotSupported) else [
        ("By phase", energy.by_phase), ("By bits", energy.by_bits), ("By size", energy.by_size),
        ("By phase, bits and size, with mean val_bpb", energy.by_cell_group),
    ]
    lines += _section("Claim 8: energy", "energy.png", drawn, tables, energy)
    lines += _section("Energy against val_bpb", "energy_vs_bpb.png", drawn)
    return "\n".join(lines) + "\n"


def _check_destination(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"report destination {out_dir} is a file; pass a folder path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / REPORT_NAME).exists():
        raise ValueError(
            f"report destination {out_dir} is a non-empty folder without {REPORT_NAME}; "
            "pass a new folder or a previous report folder, which is replaced"
        )
    if out_dir == out_dir.parent:
        raise ValueError(f"invalid report destination {out_dir}; pass a folder below the file system root")


def _swap_into_place(built: Path, out_dir: Path) -> None:
    """Rename `built` to `out_dir`, replacing a previous report folder."""
    if not out_dir.exists():
        os.rename(built, out_dir)
        return
    # rename() cannot replace a non-empty folder, so move the old one aside first.
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, old)
    try:
        os.rename(built, out_dir)
    except OSError:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_report(
    table: pd.DataFrame,
    out_dir,
    manifest: pd.DataFrame | None = None,
    margin: float = 0.005,
    n_boot: int = 2000,
    rng_seed: int = 0,
) -> Path:
    """Analyse `table` and write report.md, summary.txt and PNG figures into `out_dir`.

    Parameters
    ----------
    table : pandas.DataFrame
        Collected results, one row per cell.
    out_dir : str or os.PathLike
        Destination folder. It must be absent, empty, or a previous report
        folder (one holding report.md), which is replaced whole.
    manifest : pandas.DataFrame, optional
        Every planned cell, to list the missing ones.
    margin : float
        TOST equivalence margin in bpb.
    n_boot, rng_seed : int
        Seed bootstrap resamples and generator seed for the best-warmdown shares.

    Returns
    -------
    pathlib.Path
        The report folder.

    Raises
    ------
    ValueError
        When `out_dir` is a file or a non-empty folder that is not a report.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    _check_destination(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    table = validate_table(table)
    logger.info("analysing %d cells for the report", len(table))
    result = analyze(table, manifest=manifest, margin=margin, n_boot=n_boot, rng_seed=rng_seed)

    built = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        drawn = {}
        for name, title, draw, needs_table in FIGURES:
            logger.info("drawing %s", name)
            args = (result, table, built / name) if needs_table else (result, built / name)
            drawn[name] = draw(*args)
        (built / REPORT_NAME).write_text(render_markdown(result, drawn), encoding="utf-8")
        (built / "summary.txt").write_text(format_text(result), encoding="utf-8")
        # mkdtemp makes the folder private to its owner, but a report is meant to be shared.
        os.chmod(built, 0o755)
        _swap_into_place(built, out_dir)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
    logger.info("report written to %s", out_dir)
    return out_dir
