"""PNG figures of the analysis, drawn with matplotlib's object API and the Agg canvas.

No pyplot: figures never reach a display or the global backend, so the
functions are safe on a headless node. Each function saves one PNG and
returns its path, or returns a NotSupported when the analysis behind it lacks data.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from scipy import stats

from .data import NotSupported
from .findings import STUDY_PROBE_RATIO_INT6
from .study import Analysis
from .warmdown import BITS_ORDER, STUDY_BEST_WARMDOWN

COLOURS = {"fp16": "#1f77b4", "int8": "#2ca02c", "int6": "#ff7f0e", "int4": "#d62728"}
DPI = 110


def _new_figure(n_panels: int, panel_width: float = 4.0, height: float = 3.4, max_columns: int = 4):
    columns = min(n_panels, max_columns)
    rows = math.ceil(n_panels / columns)
    figure = Figure(figsize=(panel_width * columns, height * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for extra in axes[n_panels:]:
        extra.set_visible(False)
    return figure, axes[:n_panels]


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=DPI)
    return path


def _error_bars(frame: pd.DataFrame, centre: str, low: str, high: str) -> np.ndarray:
    lower = (frame[centre] - frame[low]).clip(lower=0).fillna(0).to_numpy()
    upper = (frame[high] - frame[centre]).clip(lower=0).fillna(0).to_numpy()
    return np.vstack([lower, upper])


def plot_warmdown(result: Analysis, path: Path):
    """Plot mean val_bpb against warmdown, one line per bits, one panel per size."""
    best = result.best_warmdown
    if isinstance(best, NotSupported):
        return best
    means = best.means
    sizes = list(dict.fromkeys(means["size"]))
    figure, axes = _new_figure(len(sizes))
    for axis, size in zip(axes, sizes):
        panel = means[means["size"] == size]
        for bits in sorted(panel["bits"].unique(), key=BITS_ORDER.get):
            line = panel[panel["bits"] == bits].sort_values("warmdown")
            axis.errorbar(line["warmdown"], line["mean"], yerr=_error_bars(line, "mean", "ci_low", "ci_high"),
                          marker="o", capsize=3, label=bits, color=COLOURS.get(bits))
        axis.axvline(STUDY_BEST_WARMDOWN, color="grey", linestyle=":", linewidth=1)
        axis.set_title(size)
        axis.set_xlabel("warmdown (fraction of steps)")
        axis.set_ylabel("val_bpb")
    axes[0].legend(title="bits")
    figure.suptitle("val_bpb against warmdown (mean over seeds, 95% CI)")
    return _save(figure, path)


def plot_penalty_law(result: Analysis, path: Path):
    """Plot the penalty against parameter count with the fit, its PI band and held-out sizes."""
    laws = {b: law for b, law in result.penalty_laws.items() if not isinstance(law, NotSupported)}
    if not laws:
        reasons = "; ".join(f"{b}: {law.reason}" for b, law in result.penalty_laws.items())
        return NotSupported(reasons)
    figure, axes = _new_figure(len(laws), panel_width=4.6)
    for axis, (bits, law) in zip(axes, laws.items()):
        fitted = law.fit_sizes
        axis.errorbar(fitted["n_params"], fitted["mean"], yerr=_error_bars(fitted, "mean", "ci_low", "ci_high"),
                      fmt="o", capsize=3, color=COLOURS.get(bits), label="fitted sizes (95% CI)")
        all_n = pd.concat([fitted["n_params"], law.held_out["n_params"] if law.n_held_out else pd.Series(dtype=float)])
        grid = np.geomspace(all_n.min() / 1.3, all_n.max() * 1.3, 100)
        exog = np.column_stack([np.ones_like(grid), np.log(grid)])
        # Band for a new per-size mean with the median seed variance of the fitted sizes.
        typical = float(np.median(fitted["var_mean"]))
        frame = law.fit.get_prediction(exog, weights=np.full(grid.size, 1.0 / typical)).summary_frame(alpha=0.05)
        axis.plot(grid, frame["mean"], color="black", linewidth=1, label="WLS fit")
        axis.fill_between(grid, frame["obs_ci_lower"], frame["obs_ci_upper"], color="grey", alpha=0.25,
                          label="95% PI (median seed variance)")
        if law.n_held_out:
            held_out = law.held_out
            axis.errorbar(held_out["n_params"], held_out["predicted"],
                          yerr=_error_bars(held_out, "predicted", "pi_low", "pi_high"),
                          fmt="none", ecolor="black", capsize=4, label="95% PI at held-out size")
            axis.plot(held_out["n_params"], held_out["mean"], "D", color="white", markeredgecolor=COLOURS.get(bits),
                      label=f"held out ({law.hits}/{law.n_held_out} within)")
        axis.set_xscale("log")
        labelled = pd.concat([fitted[["size", "n_params"]], law.held_out[["size", "n_params"]]
                              if law.n_held_out else fitted.iloc[0:0][["size", "n_params"]]])
        axis.xaxis.set_minor_locator(NullLocator())
        axis.set_xticks(labelled["n_params"].to_numpy(), list(labelled["size"]), fontsize=7, rotation=45)
        axis.set_xlabel("parameters (log scale)")
        axis.set_ylabel(f"{bits} penalty (bpb over fp16)")
        axis.set_title(f"{bits}: b = {law.slope:.4f} per ln(n_params)")
        axis.legend(fontsize=7)
    figure.suptitle("Quantisation penalty against size")
    return _save(figure, path)


def plot_int4_boundary(result: Analysis, path: Path):
    """Plot the int4 paired z (wd33 against wd10) and the int4 penalty by size."""
    int4 = result.int4
    if isinstance(int4, NotSupported):
        return int4
    sizes = int4.sizes
    figure, (left, right) = _new_figure(2, panel_width=5.0)
    positions = np.arange(len(sizes))
    colours = ["#d62728" if s else "#bbbbbb" for s in sizes["significant"]]
    left.bar(positions, sizes["statistic"].fillna(0), color=colours)
    critical = stats.norm.ppf(0.975)
    left.axhline(critical, color="black", linestyle="--", linewidth=1, label=f"|z| = {critical:.2f} (normal 97.5%)")
    left.axhline(-critical, color="black", linestyle="--", linewidth=1)
    left.set_xticks(positions, [f"{s}\n{f}" for s, f in zip(sizes["size"], sizes["favour"])])
    left.set_ylabel(f"paired z, wd{round(100 * int4.other)} minus wd{round(100 * int4.reference)}")
    left.set_title(f"int4: significant (Holm) in red; from {int4.boundary or 'none'}")
    left.legend(fontsize=8)
    has_penalty = sizes["penalty_mean"].notna()
    right.errorbar(positions[has_penalty], sizes.loc[has_penalty, "penalty_mean"],
                   yerr=_error_bars(sizes[has_penalty], "penalty_mean", "penalty_ci_low", "penalty_ci_high"),
                   fmt="o", capsize=3, color=COLOURS["int4"])
    right.set_xticks(positions, list(sizes["size"]))
    right.set_ylabel("int4 penalty (bpb over fp16, 95% CI)")
    right.set_title("int4 penalty by size")
    figure.suptitle("INT4 boundary")
    return _save(figure, path)


def plot_probe(result: Analysis, path: Path):
    """Plot the grid-distance ratio (QAT over fp16) by size for each bits."""
    probe = result.probe
    if isinstance(probe, NotSupported):
        return probe
    table = probe.table[probe.table["size"] != "all"]
    bits_levels = sorted(table["bits"].unique(), key=BITS_ORDER.get)
    figure, axes = _new_figure(len(bits_levels))
    for axis, bits in zip(axes, bits_levels):
        rows = table[table["bits"] == bits].reset_index(drop=True)
        positions = np.arange(len(rows))
        axis.errorbar(positions, rows["ratio"], yerr=_error_bars(rows, "ratio", "ci_low", "ci_high"),
                      fmt="o", capsize=3, color=COLOURS.get(bits))
        axis.axhline(1.0, color="grey", linewidth=1)
        if bits == "int6":
            axis.axhline(STUDY_PROBE_RATIO_INT6, color="black", linestyle=":", linewidth=1, label="study 1.04")
            axis.legend(fontsize=8)
        axis.set_xticks(positions, list(rows["size"]))
        axis.set_title(bits)
        axis.set_ylabel("grid distance, QAT / fp16")
    figure.suptitle("Grid-distance probe at warmdown start (95% CI, delta method over seeds)")
    return _save(figure, path)


def plot_energy(result: Analysis, path: Path):
    """Plot energy sums by phase, by bits and by size."""
    energy = result.energy
    if isinstance(energy, NotSupported):
        return energy
    figure, axes = _new_figure(3, panel_width=4.2)
    for axis, (frame, column) in zip(axes, [(energy.by_phase, "phase"), (energy.by_bits, "bits"),
                                            (energy.by_size, "size")]):
        labels = [str(v) for v in frame[column]]
        axis.bar(labels, frame["kwh"], color=[COLOURS.get(v, "#7f7f7f") for v in labels])
        axis.set_xlabel(column)
        axis.set_ylabel("energy (kWh)")
        axis.tick_params(axis="x", labelrotation=45)
    figure.suptitle(f"Energy: {energy.total_kwh:.3g} kWh in total")
    return _save(figure, path)


def plot_energy_vs_bpb(result: Analysis, table: pd.DataFrame, path: Path):
    """Plot each done cell's energy against its val_bpb, coloured by bits."""
    if isinstance(result.energy, NotSupported):
        return result.energy
    cells = table[(table["status"] == "done") & table["val_bpb"].notna() & table["energy_kwh"].notna()]
    cells = cells[cells["energy_kwh"] > 0]
    if cells.empty:
        return NotSupported("no done cell has a positive energy_kwh")
    figure, (axis,) = _new_figure(1, panel_width=6.0, height=4.2)
    for bits in sorted(cells["bits"].unique(), key=BITS_ORDER.get):
        group = cells[cells["bits"] == bits]
        axis.scatter(group["energy_kwh"], group["val_bpb"], s=10, alpha=0.6, label=bits, color=COLOURS.get(bits))
    axis.set_xscale("log")
    axis.set_xlabel("energy per cell (kWh, log scale)")
    axis.set_ylabel("val_bpb")
    axis.legend(title="bits")
    axis.set_title("Energy against val_bpb, one point per cell")
    return _save(figure, path)


def plot_qat_vs_ptq(result: Analysis, path: Path):
    """Plot the QAT and PTQ penalties by size for each bits."""
    comparison = result.qat_vs_ptq
    if isinstance(comparison, NotSupported):
        return comparison
    table = comparison.table
    bits_levels = sorted(table["bits"].unique(), key=BITS_ORDER.get)
    figure, axes = _new_figure(len(bits_levels))
    for axis, bits in zip(axes, bits_levels):
        rows = table[table["bits"] == bits].reset_index(drop=True)
        positions = np.arange(len(rows))
        axis.errorbar(positions - 0.1, rows["qat_mean"], yerr=_error_bars(rows, "qat_mean", "qat_ci_low", "qat_ci_high"),
                      fmt="o", capsize=3, label="QAT", color=COLOURS.get(bits))
        axis.errorbar(positions + 0.1, rows["ptq_mean"], yerr=_error_bars(rows, "ptq_mean", "ptq_ci_low", "ptq_ci_high"),
                      fmt="s", capsize=3, label="PTQ of fp16", color="black")
        axis.set_xticks(positions, list(rows["size"]))
        axis.set_ylabel("penalty (bpb over fp16)")
        axis.set_title(bits)
        axis.legend(fontsize=8)
    figure.suptitle("QAT penalty against post-training quantisation (95% CI)")
    return _save(figure, path)
