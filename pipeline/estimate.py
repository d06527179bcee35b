"""Estimates of compute time and energy per block, for `submit --dry-run`.

Two sources, the first that applies to a cell wins:

- measured: the median training tokens/s (and kWh per token) of finished
  cells of the phase with the same size and bits, or the same size;
- profile: the cell's training FLOPs (`jobs.model.flops_per_token` times its
  tokens) over the profile's `tflops`, with `gpu_watts` per GPU for energy.

Both leave out start-up and the evaluations, so they are lower bounds of the
wall time; they are estimates, for sizing a request, not measurements.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass

import h5py

from jobs.model import GPTConfig, flops_per_token
from pipeline.cell import Cell
from pipeline.profile import Profile
from pipeline.workdir import Workdir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rate:
    """Measured speed and energy of finished cells of one kind."""

    tokens_per_s: float
    kwh_per_token: float | None  # None when no finished cell has a measured energy
    cells: int


@dataclass(frozen=True)
class BlockEstimate:
    """Estimated cost of the cells of one block that are still to run."""

    block: str
    cells: int
    tokens: float
    task_hours: float | None  # None when some cell has no source
    gpu_hours: float | None  # task hours times GPUs per task; None without GPUs
    energy_kwh: float | None
    source: str  # "measured", "profile", "measured+profile", or why there is none


def cell_flops(cell: Cell) -> float:
    """Return the training FLOPs of a whole cell (forward plus backward, every step)."""
    config = GPTConfig(
        n_layer=cell.n_layer, n_head=cell.n_head, n_embd=cell.n_embd,
        vocab_size=cell.vocab_size, seq_len=cell.seq_len,
    )
    return flops_per_token(config) * cell.steps * cell.tokens_per_step


def measured_rates(workdir: Workdir, phase: str) -> dict[tuple[str, str], Rate]:
    """Return {(size, bits): Rate} and {(size, ""): Rate} from the finished cells of `phase`."""
    speeds: dict[tuple[str, str], list[float]] = {}
    energies: dict[tuple[str, str], list[float]] = {}
    for path in sorted(workdir.results(phase).glob("*.h5")):
        try:
            with h5py.File(path, "r", locking=False) as f:
                if _text(f.attrs["status"]) != "done":
                    continue
                size, bits = _text(f.attrs["size"]), _text(f.attrs["bits"])
                tokens_per_s = float(f["metrics"].attrs["tokens_per_s"])
                tokens = float(f["metrics"].attrs["tokens"])
                kwh = float(f["energy"].attrs.get("energy_kwh", math.nan))
        except (OSError, KeyError, ValueError) as err:
            log.info("estimate: skipping %s (%s)", path, err)
            continue
        if not tokens_per_s > 0:
            continue
        for key in ((size, bits), (size, "")):
            speeds.setdefault(key, []).append(tokens_per_s)
            if math.isfinite(kwh) and tokens > 0:
                energies.setdefault(key, []).append(kwh / tokens)
    return {
        key: Rate(
            tokens_per_s=statistics.median(values),
            kwh_per_token=statistics.median(energies[key]) if key in energies else None,
            cells=len(values),
        )
        for key, values in speeds.items()
    }


def estimate(cells: list[Cell], profile: Profile | None, rates: dict[tuple[str, str], Rate]) -> list[BlockEstimate]:
    """Return one estimate per block of `cells`, in order of first appearance."""
    profile = profile or Profile()
    gpus = profile.gpus_per_task or 0
    blocks: dict[str, list[Cell]] = {}
    for cell in cells:
        blocks.setdefault(cell.block, []).append(cell)

    estimates = []
    for block, members in blocks.items():
        hours = 0.0
        energy: float | None = 0.0
        sources = set()
        missing = 0
        for cell in members:
            tokens = cell.steps * cell.tokens_per_step
            rate = rates.get((cell.size, cell.bits)) or rates.get((cell.size, ""))
            if rate is not None:
                cell_hours = tokens / rate.tokens_per_s / 3600.0
                cell_energy = tokens * rate.kwh_per_token if rate.kwh_per_token is not None else None
                sources.add("measured")
            elif profile.tflops:
                cell_hours = cell_flops(cell) / (profile.tflops * 1e12) / 3600.0
                cell_energy = None
                sources.add("profile")
            else:
                missing += 1
                continue
            if cell_energy is None and profile.gpu_watts and gpus:
                cell_energy = cell_hours * gpus * profile.gpu_watts / 1000.0
            hours += cell_hours
            energy = None if energy is None or cell_energy is None else energy + cell_energy
        tokens = float(sum(c.steps * c.tokens_per_step for c in members))
        if missing:
            source = f"no estimate for {missing} cell(s): set tflops in the profile or let a few cells of each size finish"
            estimates.append(BlockEstimate(block, len(members), tokens, None, None, None, source))
            continue
        estimates.append(
            BlockEstimate(
                block=block,
                cells=len(members),
                tokens=tokens,
                task_hours=hours,
                gpu_hours=hours * gpus if gpus else None,
                energy_kwh=energy,
                source="+".join(sorted(sources)),
            )
        )
    return estimates


def format_estimates(estimates: list[BlockEstimate]) -> str:
    """Return a table of the estimates, one row per block and a total."""
    header = ["block", "cells", "tokens", "task-hours", "GPU-hours", "kWh", "source"]
    rows = []
    for item in estimates:
        rows.append([
            item.block, str(item.cells), f"{item.tokens:.3g}", _number(item.task_hours),
            _number(item.gpu_hours), _number(item.energy_kwh), item.source,
        ])
    if len(estimates) > 1:
        rows.append([
            "all", str(sum(e.cells for e in estimates)), f"{sum(e.tokens for e in estimates):.3g}",
            _number(_total(e.task_hours for e in estimates)), _number(_total(e.gpu_hours for e in estimates)),
            _number(_total(e.energy_kwh for e in estimates)), "",
        ])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [value.rjust(width) for value, width in zip(row[1:-1], widths[1:])]
        lines.append("  ".join(cells + [row[-1]]).rstrip())
    return "\n".join(lines)


def _total(values) -> float | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
