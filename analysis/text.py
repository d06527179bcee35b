"""Plain-text summary of an Analysis, for the terminal."""

from __future__ import annotations

import pandas as pd

from .data import NotSupported
from .study import Analysis

MAX_LISTED = 20  # maximum number of missing or diverged cells printed in full


def _frame(frame: pd.DataFrame, float_format: str = "{:.4f}") -> str:
    return frame.to_string(index=False, float_format=float_format.format)


def _listed(lines: list[str], indent: str = "  ") -> list[str]:
    listed = [indent + line for line in lines[:MAX_LISTED]]
    if len(lines) > MAX_LISTED:
        listed.append(f"{indent}... and {len(lines) - MAX_LISTED} more")
    return listed


def format_coverage(result: Analysis) -> list[str]:
    """Return the lines on done, diverged and missing cells."""
    coverage = result.coverage
    lines = [
        f"Cells: {coverage.n_cells} in the table, {coverage.n_done} done, "
        f"{coverage.n_diverged} diverged (excluded from every analysis)"
    ]
    if coverage.has_manifest:
        lines.append(f"Manifest: {coverage.n_expected} cells planned, {coverage.n_missing} missing")
        lines += _listed(coverage.lines)
    else:
        lines.append("Manifest: not given, so missing cells are unknown")
    if coverage.n_diverged:
        diverged = [
            " ".join(f"{c}={row[c]}" for c in coverage.diverged.columns)
            for _, row in coverage.diverged.iterrows()
        ]
        lines.append("Diverged cells:")
        lines += _listed(diverged)
    lines += [f"Note: {note}" for note in result.notes]
    return lines


def format_text(result: Analysis) -> str:
    """Return a readable plain-text summary: coverage, findings, ANOVA and best warmdown.

    Each finding line starts with its verdict against the study: [agrees],
    [differs], [inconclusive] (the data can neither confirm nor contradict
    it), [no claim] (the study gives no number to compare) or [not supported]
    (the table lacks the cells the analysis needs).
    """
    lines = [f"QAT warmdown study: phases {', '.join(result.phases)}"
             + (f" (primary grid: phase {result.primary_phase})" if result.primary_phase else "")]
    lines += format_coverage(result)

    lines += ["", "Findings"]
    for finding in result.findings:
        lines.append(f"  [{finding.verdict}] {finding.claim}: {finding.text}")

    lines += ["", "ANOVA (type II), primary grid"]
    if isinstance(result.interaction, NotSupported):
        lines.append(f"  {result.interaction}")
    else:
        lines.append(f"  {result.interaction.formula}")
        for term in result.interaction.dropped:
            lines.append(f"  dropped {term}")
        lines.append(result.interaction.anova.to_string())

    lines += ["", "Best warmdown per group (mean val_bpb over seeds, 95% t CI, bootstrap share best)"]
    best = result.best_warmdown
    if isinstance(best, NotSupported):
        lines.append(f"  {best}")
    else:
        lines.append(_frame(best.best, "{:.3f}"))
        lines.append("")
        lines.append(_frame(best.means))
        lines += [f"  missing seeds: {note}" for note in best.notes[:MAX_LISTED]]
        if len(best.notes) > MAX_LISTED:
            lines.append(f"  ... and {len(best.notes) - MAX_LISTED} more")

    lines += ["", "Penalty law fits"]
    for bits, law in result.penalty_laws.items():
        if isinstance(law, NotSupported):
            lines.append(f"  {bits}: {law}")
            continue
        lines.append(f"  {bits}: {law.fit_source}")
        lines.append(_frame(law.fit_sizes[["size", "n_params", "mean", "ci_low", "ci_high", "n_seeds"]]))
        if law.n_held_out:
            lines.append(f"  {bits} held out ({law.held_out_source}):")
            lines.append(_frame(law.held_out[["size", "n_params", "mean", "predicted", "pi_low", "pi_high", "within"]]))
        lines += [f"  note: {note}" for note in law.notes]
    return "\n".join(lines) + "\n"
