"""Synthetic result tables with planted effects, for testing the analysis.

`make_table` returns a table shaped like the one `collect` writes: one row per
cell, every cell setting from `pipeline.cell.Cell`, then status, metrics and
energy. The metrics follow a known model, so a test can check that each
analysis recovers what was planted:

    val_bpb = base(size) + curvature * (warmdown - best_warmdown)**2
              + lr_effect[lr_mult] + penalty(bits, size) + interaction(bits, warmdown)
              + int4_boundary_term(size, warmdown) + seed_effect(seed) + noise

with penalty(bits, size) = intercept[bits] + slope[bits] * ln(n_params), zero
for fp16. Phase 2 and phase 5 follow the study's design (720 and 625 cells);
phase "micro" is the 36-cell CPU demo grid.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline.cell import Cell

# label -> (n_layer, n_embd, vocab_size): shapes whose parameter count
# 12 * n_layer * n_embd**2 + vocab_size * n_embd lands near the label.
SIZE_SHAPES = {
    "tiny1": (2, 64, 2048),
    "tiny2": (2, 128, 2048),
    "3M": (3, 192, 8192),
    "5M": (2, 320, 8192),
    "8M": (8, 256, 8192),
    "15M": (10, 320, 8192),
    "20M": (5, 512, 8192),
    "30M": (11, 448, 8192),
    "50M": (9, 640, 8192),
    "100M": (16, 704, 8192),
    "175M": (24, 768, 8192),
    "250M": (17, 1088, 8192),
    "350M": (13, 1472, 8192),
}

PHASE2_SIZES = ("15M", "30M", "50M", "100M")
HELD_OUT_SIZES = ("5M", "8M", "175M", "250M", "350M")
INT4_SIZES = ("3M", "5M", "8M", "15M", "20M", "30M", "50M", "100M")
WARMDOWNS = (0.1, 0.2, 0.33, 0.5)
LR_MULTS = (0.5, 1.0, 2.0)
QAT_BITS = ("fp16", "int8", "int6")

SEQ_LEN = 1024
BATCH_SIZE = 64
TOKENS_PER_PARAM = 20.0
# Synthetic hardware: sustained FLOP/s and board power, for energy and speed.
FLOPS_PER_S = 4e14
POWER_KW = 0.7


def n_params_of(size: str) -> int:
    """Return the exact parameter count of a synthetic size label."""
    n_layer, n_embd, vocab = SIZE_SHAPES[size]
    return 12 * n_layer * n_embd * n_embd + vocab * n_embd


@dataclass(frozen=True)
class Planted:
    """Effects planted in a synthetic table; every analysis should recover them.

    Attributes
    ----------
    best_warmdown : float
        Warmdown with the lowest expected val_bpb for every bits and size.
    curvature : float
        val_bpb added per squared unit of distance from `best_warmdown`.
    penalty_intercept, penalty_slope : dict
        Quantisation penalty law per bit-width: intercept + slope * ln(n_params), in bpb.
    interaction : dict
        Per bit-width, the difference-of-differences (intN minus fp16) between
        warmdown 0.5 and 0.1, in bpb. The extra term is linear in warmdown, so
        the contrast between warmdowns a and b is interaction * (b - a) / 0.4.
    lr_effect : dict
        val_bpb added per lr_mult.
    int4_boundary_n_params, int4_advantage : float
        At or above this parameter count, int4 cells at warmdown 0.1 are worse
        than at 0.33 by `int4_advantage`. Below it the two are equal in expectation.
    probe_ratio : dict
        Mean grid distance of intN-QAT weights over that of fp16 weights, per bit-width.
    ptq_factor : dict
        Post-training quantisation penalty of an fp16 cell over the QAT penalty.
    noise_sd, int4_noise_sd, seed_sd, probe_sd : float
        Per-cell noise, per-cell noise of int4 cells, per-seed shift shared by
        all cells of a seed, and per-cell noise of the probe, in their own units.
    diverged : int
        Number of cells, drawn at random, marked as diverged with NaN metrics.
    """

    best_warmdown: float = 0.33
    curvature: float = 0.19
    penalty_intercept: dict = field(
        default_factory=lambda: {"int8": 0.020, "int6": 0.080, "int4": 0.300}
    )
    penalty_slope: dict = field(
        default_factory=lambda: {"int8": -0.001, "int6": -0.004, "int4": -0.014}
    )
    interaction: dict = field(default_factory=lambda: {"int8": 0.0, "int6": 0.0, "int4": 0.0})
    lr_effect: dict = field(default_factory=lambda: {0.5: 0.004, 1.0: 0.0, 2.0: 0.006})
    int4_boundary_n_params: float = 40e6
    int4_advantage: float = 0.02
    probe_ratio: dict = field(default_factory=lambda: {"int8": 1.01, "int6": 1.04, "int4": 1.10})
    ptq_factor: dict = field(default_factory=lambda: {"int8": 1.5, "int6": 2.5, "int4": 4.0})
    noise_sd: float = 0.002
    int4_noise_sd: float = 0.0033
    seed_sd: float = 0.003
    probe_sd: float = 0.003
    diverged: int = 0

    def penalty(self, bits: str, n_params: float) -> float:
        """Return the expected quantisation penalty in bpb (0 for fp16)."""
        if bits == "fp16":
            return 0.0
        return self.penalty_intercept[bits] + self.penalty_slope[bits] * math.log(n_params)

    def expected_bpb(self, bits: str, warmdown: float, lr_mult: float, size: str) -> float:
        """Return the expected val_bpb of a cell, averaged over seeds."""
        n_params = n_params_of(size)
        value = 3.0 - 0.08 * math.log(n_params)
        value += self.curvature * (warmdown - self.best_warmdown) ** 2
        value += self.lr_effect.get(lr_mult, 0.0)
        value += self.penalty(bits, n_params)
        if bits != "fp16":
            value += self.interaction.get(bits, 0.0) * (warmdown - 0.1) / 0.4
        if bits == "int4" and math.isclose(warmdown, 0.1):
            # Cancel the warmdown curve at 0.1 and add the planted advantage, so
            # wd 0.1 minus wd 0.33 is exactly the advantage (0 below the boundary).
            gap = self.curvature * ((0.1 - self.best_warmdown) ** 2 - (0.33 - self.best_warmdown) ** 2)
            advantage = self.int4_advantage if n_params >= self.int4_boundary_n_params else 0.0
            value += advantage - gap
        return value


def _grid(**factors) -> list[dict]:
    rows = [{}]
    for name, levels in factors.items():
        rows = [dict(row, **{name: level}) for row in rows for level in levels]
    return rows


def _phase2_design(n_seeds: int) -> list[dict]:
    return [
        dict(row, block="main")
        for row in _grid(
            bits=QAT_BITS, warmdown=WARMDOWNS, lr_mult=LR_MULTS, size=PHASE2_SIZES,
            seed=range(n_seeds),
        )
    ]


def _phase5_design(n_seeds: int) -> list[dict]:
    seeds = range(n_seeds)
    design = []
    for row in _grid(bits=QAT_BITS, warmdown=WARMDOWNS, size=("15M", "30M"), seed=seeds):
        design.append(dict(row, block="optimiser", optimizer="adamw"))
    for row in _grid(bits=QAT_BITS, warmdown=WARMDOWNS, size=("15M", "30M"), seed=seeds):
        design.append(dict(row, block="shape", shape="cosine"))
    for row in _grid(bits=QAT_BITS, warmdown=(0.1, 0.33, 0.5), steps_mult=(3, 9), seed=seeds):
        design.append(dict(row, block="length", size="15M"))
    for row in _grid(size=HELD_OUT_SIZES, bits=("fp16", "int6"), warmdown=(0.1, 0.33), seed=seeds):
        design.append(dict(row, block="sizes"))
    for size in INT4_SIZES:
        # The two largest int4 sizes get twice the seeds, as in the study.
        size_seeds = range(2 * n_seeds) if size in ("50M", "100M") else seeds
        for row in _grid(warmdown=(0.1, 0.33), seed=size_seeds):
            design.append(dict(row, block="int4", bits="int4", size=size))
    for row in _grid(size=("3M", "20M"), warmdown=(0.1, 0.33), seed=seeds):
        design.append(dict(row, block="int4-reference", bits="fp16"))
    for row in _grid(bits=("fp16", "int6", "int4"), size=("8M", "15M", "30M", "50M", "100M"), seed=seeds):
        design.append(dict(row, block="probe", warmdown=0.33, probe_every=100))
    return design


def _micro_design() -> list[dict]:
    rows = _grid(bits=QAT_BITS, warmdown=(0.1, 0.33, 0.5), size=("tiny1", "tiny2"), seed=(0, 1))
    return [dict(row, block="main") for row in rows]


def _make_cell(phase: str, spec: dict) -> Cell:
    size = spec["size"]
    n_layer, n_embd, vocab = SIZE_SHAPES[size]
    n_params = n_params_of(size)
    steps_mult = spec.get("steps_mult", 1)
    micro = phase == "micro"
    steps = 240 if micro else max(
        1, round(TOKENS_PER_PARAM * n_params * steps_mult / (SEQ_LEN * BATCH_SIZE))
    )
    return Cell(
        phase=phase,
        block=spec["block"],
        bits=spec["bits"],
        warmdown=float(spec["warmdown"]),
        shape=spec.get("shape", "linear"),
        lr_mult=float(spec.get("lr_mult", 1.0)),
        size=size,
        seed=int(spec["seed"]),
        optimizer=spec.get("optimizer", "muon"),
        n_layer=n_layer,
        n_head=max(1, n_embd // 64),
        n_embd=n_embd,
        vocab_size=vocab,
        seq_len=128 if micro else SEQ_LEN,
        batch_size=16 if micro else BATCH_SIZE,
        n_params=n_params,
        tokens_per_param=TOKENS_PER_PARAM,
        steps_mult=steps_mult,
        steps=steps,
        warmup_steps=max(1, steps // 50),
        matrix_lr=0.02,
        adam_lr=0.008,
        weight_decay=0.0,
        eval_every=max(1, steps // 6),
        val_tokens=65536 if micro else 1 << 21,
        probe_every=spec.get("probe_every", 0),
        data="stdlib-docs" if micro else "shards:/data/fineweb",
    )


@functools.lru_cache(maxsize=16)
def _design_rows(phase: str, n_seeds: int) -> tuple[dict, ...]:
    if phase == "2":
        design = _phase2_design(n_seeds)
    elif phase == "5":
        design = _phase5_design(n_seeds)
    elif phase == "micro":
        design = _micro_design()
    else:
        raise ValueError(f"invalid synthetic phase {phase!r}; expected '2', '5' or 'micro'")
    return tuple(_make_cell(phase, spec).to_row() for spec in design)


def make_manifest(phases=("2", "5"), n_seeds: int = 5) -> pd.DataFrame:
    """Return the manifest (cell settings only, one row per cell) of the synthetic phases."""
    rows = [row for phase in phases for row in _design_rows(str(phase), n_seeds)]
    return pd.DataFrame(rows)


def make_table(
    phases=("2", "5"), seed: int = 0, planted: Planted | None = None, n_seeds: int = 5
) -> pd.DataFrame:
    """Generate a complete synthetic result table with planted effects.

    Parameters
    ----------
    phases : sequence of str
        Any of "2", "5" and "micro".
    seed : int
        Seed of the noise; the same seed gives the same table.
    planted : Planted, optional
        Effects to plant; the defaults have no bits x warmdown interaction
        outside the int4 boundary.
    n_seeds : int
        Training seeds per design point (the int4 block doubles it at 50M
        and 100M). The micro grid always has 2.
    """
    planted = planted or Planted()
    rng = np.random.default_rng(seed)
    table = make_manifest(phases, n_seeds)
    n = len(table)

    # One shift per (phase, seed), shared by every cell trained with that seed.
    seed_keys = table["phase"] + ":" + table["seed"].astype(str)
    unique_keys = seed_keys.unique()
    shifts = dict(zip(unique_keys, rng.normal(0.0, planted.seed_sd, len(unique_keys))))
    seed_shift = seed_keys.map(shifts).to_numpy()

    expected = np.array([
        planted.expected_bpb(b, w, lr, s)
        for b, w, lr, s in zip(table["bits"], table["warmdown"], table["lr_mult"], table["size"])
    ])
    noise_sd = np.where(table["bits"] == "int4", planted.int4_noise_sd, planted.noise_sd)
    val_bpb = expected + seed_shift + rng.normal(0.0, 1.0, n) * noise_sd

    table["status"] = "done"
    table["diverged_step"] = -1
    table["val_bpb"] = val_bpb
    # 4.2 bytes per token: loss in nats per token from bits per byte.
    table["val_loss"] = val_bpb * math.log(2) * 4.2
    fp16 = (table["bits"] == "fp16").to_numpy()
    table["roundtrip_val_bpb"] = np.where(fp16, np.nan, val_bpb + rng.normal(0.0, 1e-4, n))

    for bits in ("int8", "int6", "int4"):
        qat_penalty = np.array([planted.penalty(bits, p) for p in table["n_params"]])
        ptq = val_bpb + planted.ptq_factor[bits] * qat_penalty + rng.normal(0.0, planted.noise_sd / 2, n)
        table[f"ptq_val_bpb_{bits}"] = np.where(fp16, ptq, np.nan)

    for bits in ("int4", "int6", "int8"):
        ratio = np.where(table["bits"] == bits, planted.probe_ratio[bits], 1.0)
        table[f"probe_{bits}"] = 0.25 * ratio + rng.normal(0.0, planted.probe_sd, n)

    tokens = table["steps"] * table["seq_len"] * table["batch_size"]
    flops = 6.0 * table["n_params"] * tokens
    table["tokens"] = tokens
    table["tokens_per_s"] = FLOPS_PER_S / (6.0 * table["n_params"]) * rng.uniform(0.9, 1.1, n)
    table["wall_s"] = tokens / table["tokens_per_s"]
    modelled = flops / FLOPS_PER_S / 3600.0 * POWER_KW
    table["energy_kwh"] = modelled * rng.uniform(0.85, 1.15, n)
    table["energy_source"] = "nvml"
    table["energy_kwh_modelled"] = modelled
    table["emissions_kg"] = table["energy_kwh"] * 0.35

    if planted.diverged:
        picked = rng.choice(n, size=planted.diverged, replace=False)
        metrics = ["val_loss", "val_bpb", "roundtrip_val_bpb", "ptq_val_bpb_int8",
                   "ptq_val_bpb_int6", "ptq_val_bpb_int4"]
        table.loc[picked, "status"] = "diverged"
        table.loc[picked, "diverged_step"] = (table.loc[picked, "steps"] // 2).to_numpy()
        table.loc[picked, metrics] = np.nan
    return table
