"""Training benchmarks: tokens/s and MFU, QAT overhead, and bookkeeping overhead.

Throughput and QAT overhead time `train_step`, which does the work of one
iteration of `Trainer.run` (batch, LR, forward, backward, optimiser steps)
without the evaluation, probe and checkpoint hooks, so the figures are for
training alone. The bookkeeping benchmark runs `Trainer.run` itself, with and
without the hooks, because its figure is the cost of those hooks.

Model FLOPs per token come from `jobs.model.flops_per_token`:
``6 * N + 12 * n_layer * n_embd * seq_len`` with N the parameter count,
embedding included. MFU divides the achieved model FLOP/s by a matmul peak
measured in the same round of the same run (`bench.machine`).
"""

from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from bench.machine import PeakSamples, Timing, matmul_flops_per_s, peak_operands, synchronize, timed
from jobs import data as data_lib
from jobs.model import flops_per_token
from jobs.optim import set_lr
from jobs.quant import fake_quantize
from jobs.schedule import lr_multiplier
from jobs.train import Trainer
from pipeline.cell import BITS, Cell
from pipeline.phases import expand_spec

Progress = Callable[[str], None]

# The data every benchmark trains on: the corpus built from Python's own
# documentation, so the benchmark needs no download.
DATA = "stdlib-docs"
# The study's vocabulary (FineWeb with a 1024-piece SentencePiece model). The
# byte-level corpus uses 256 of the rows, but the head costs what it costs in
# the study. The tiny sizes are defined at 256.
STUDY_VOCAB_SIZE = 1024
TINY_SIZES = ("tiny1", "tiny2")
# Phase 2's default checkpoint interval (RunOptions.checkpoint_every_s).
REALISTIC_CHECKPOINT_S = 600.0
ARMS = ("bare", "realistic", "aggressive")


@dataclass(frozen=True)
class TrainingPlan:
    """Sizes, batch shape, rounds and steps of the three training benchmarks."""

    throughput_sizes: tuple[str, ...]
    qat_sizes: tuple[str, ...]
    bookkeeping_size: str
    seq_len: int
    batch_size: int
    warmup_steps: int  # untimed steps first: allocator, oneDNN or torch.compile warm-up
    rounds: int  # timed rounds of the throughput benchmark, each paired with its own peak measurement
    steps_per_round: int
    qat_rounds: int  # rounds of the QAT benchmark, in which each bit-width runs qat_steps_per_round steps
    qat_steps_per_round: int
    bookkeeping_batch_size: int
    bookkeeping_steps: int  # steps of each Trainer.run
    bookkeeping_probe_every: int
    bookkeeping_rounds: int
    aggressive_checkpoint_s: float

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def plan_for(device: torch.device, quick: bool) -> TrainingPlan:
    """Return the plan for a device: CPU sizes up to 5M, CUDA sizes 15M to 100M, or the quick plan.

    The quick plan trains tiny1 for a handful of steps, so that a test can run
    every section in well under a minute. Its figures mean nothing.
    """
    if quick:
        return TrainingPlan(
            throughput_sizes=("tiny1",), qat_sizes=("tiny1",), bookkeeping_size="tiny1",
            seq_len=64, batch_size=4, warmup_steps=1, rounds=2, steps_per_round=2, qat_rounds=2,
            qat_steps_per_round=2, bookkeeping_batch_size=4, bookkeeping_steps=6, bookkeeping_probe_every=2, bookkeeping_rounds=1,
            aggressive_checkpoint_s=0.0,
        )
    if device.type == "cuda":
        # NOTE: this plan has not run yet: no GPU was available when it was written.
        return TrainingPlan(
            throughput_sizes=("15M", "30M", "50M", "100M"), qat_sizes=("15M", "100M"), bookkeeping_size="15M",
            seq_len=1024, batch_size=32, warmup_steps=5, rounds=5, steps_per_round=10, qat_rounds=5,
            qat_steps_per_round=10, bookkeeping_batch_size=32, bookkeeping_steps=300, bookkeeping_probe_every=30, bookkeeping_rounds=3,
            aggressive_checkpoint_s=2.0,
        )
    # 4,096 tokens per step keeps a 5M step at one to three seconds on one
    # core, and a bookkeeping run of 30 steps at about a quarter of a minute.
    # QAT's overhead is a few percent, so it gets more, shorter rounds.
    return TrainingPlan(
        throughput_sizes=("tiny1", "tiny2", "3M", "5M"), qat_sizes=("tiny2", "5M"), bookkeeping_size="3M",
        seq_len=256, batch_size=16, warmup_steps=2, rounds=5, steps_per_round=3, qat_rounds=8,
        qat_steps_per_round=2, bookkeeping_batch_size=8, bookkeeping_steps=30, bookkeeping_probe_every=10,
        bookkeeping_rounds=4, aggressive_checkpoint_s=5.0,
    )


def study_tokens() -> dict[str, int]:
    """Return token counts of the study's phases 2 and 5 that the page compares with, or {} if they do not load.

    Keys: "min_step" and "max_step", the fewest and most tokens per step in
    phase 2; "probe_5m", the tokens between two probes of a 5M cell of phase
    5's probe block (0 when that block has no 5M cell).
    """
    from pipeline.errors import UsageError
    from pipeline.phases import load_phase

    try:
        main = load_phase("2").cells
        robustness = load_phase("5").cells
    except (UsageError, OSError, ValueError, KeyError):
        return {}
    steps = [cell.tokens_per_step for cell in main]
    probed = [c for c in robustness if c.block == "probe" and c.size == "5M" and c.probe_every > 0]
    return {
        "min_step": min(steps),
        "max_step": max(steps),
        "probe_5m": probed[0].probe_every * probed[0].tokens_per_step if probed else 0,
    }


def bench_cell(
    size: str,
    bits: str,
    *,
    seq_len: int,
    batch_size: int,
    steps: int,
    probe_every: int = 0,
) -> Cell:
    """Build a cell through the phase machinery, as a spec with one block of one cell would.

    Warmdown 0 keeps the LR at its peak after warmup, and one evaluation of
    one sequence keeps the final evaluation of `Trainer.run` short.
    """
    settings = {
        "data": DATA,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "steps": steps,
        "matrix_lr": 0.02,
        "adam_lr": 0.008,
        "val_tokens": seq_len,
        "evals": 1,
        "probe_every": probe_every,
    }
    if size not in TINY_SIZES:
        settings["vocab_size"] = STUDY_VOCAB_SIZE
    spec = {
        "settings": settings,
        "block": [{"name": "bench", "factors": {"bits": [bits], "warmdown": [0.0], "seed": [0], "size": [size]}}],
    }
    return expand_spec("bench", spec).cells[0]


# ---------------------------------------------------------------------------
# One training step
# ---------------------------------------------------------------------------


def train_step(trainer: Trainer, step: int) -> torch.Tensor:
    """Run training step `step` as `Trainer.run` does, without its hooks; return the loss.

    The loss stays on the device, so nothing here waits for the device.
    """
    cell = trainer.cell
    multiplier = lr_multiplier(step, cell.steps, cell.warmup_steps, cell.warmdown, cell.shape)
    x, y = data_lib.get_batch(trainer.corpus.train, cell.batch_size, cell.seq_len, cell.seed, step, trainer.device)
    set_lr(trainer.optimizers, multiplier)
    # NOTE: a private method of Trainer, so that micro-batching on CUDA is timed
    # as it trains; test_train_step_matches_trainer_run catches a drift.
    loss = trainer._forward_backward(x, y)
    for optimizer in trainer.optimizers:
        optimizer.step()
    trainer.model.zero_grad(set_to_none=True)
    trainer.step = step + 1
    return loss


def _phase_times(trainer: Trainer, step: int) -> tuple[float, float, float]:
    """Run one step like `train_step` and return its (forward, backward, optimiser) wall seconds.

    Each phase waits for the device, which costs throughput on a GPU, so these
    steps are separate from the timed rounds. The whole batch goes through one
    forward pass, also where `Trainer` would split it into micro-batches.
    """
    cell = trainer.cell
    device = trainer.device
    multiplier = lr_multiplier(step, cell.steps, cell.warmup_steps, cell.warmdown, cell.shape)
    x, y = data_lib.get_batch(trainer.corpus.train, cell.batch_size, cell.seq_len, cell.seed, step, device)
    set_lr(trainer.optimizers, multiplier)
    with timed(device) as forward:
        with trainer.autocast():
            loss = trainer.forward(x, y)
    with timed(device) as backward:
        loss.backward()
    with timed(device) as optimizer_time:
        for optimizer in trainer.optimizers:
            optimizer.step()
        trainer.model.zero_grad(set_to_none=True)
    trainer.step = step + 1
    return forward.wall_s, backward.wall_s, optimizer_time.wall_s


def muon_flops_per_step(trainer: Trainer) -> float:
    """Count the matmul FLOPs of Muon's Newton-Schulz iterations in one optimiser step.

    ``torch.optim.Muon`` (torch 2.13) runs 5 iterations per matrix, each of
    ``X @ X.T``, ``A @ A`` and ``B @ X`` on the gradient turned so that its
    rows m are no more than its columns n: ``4 * m**2 * n + 2 * m**3`` FLOPs
    per iteration. ``flops_per_token`` does not count this work, so it lowers
    MFU most where there are few tokens per step.
    """
    total = 0.0
    for optimizer in trainer.optimizers:
        if not isinstance(optimizer, torch.optim.Muon):
            continue
        for group in optimizer.param_groups:
            for param in group["params"]:
                rows, cols = sorted(param.shape[:2])
                total += group.get("ns_steps", 5) * (4.0 * rows**2 * cols + 2.0 * rows**3)
    return total


# Kernels that do matrix products: what the peak measures.
_MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")


def _is_matmul(name: str) -> bool:
    return name in _MATMUL_OPS or "scaled_dot_product" in name


def profile_step(trainer: Trainer, top: int = 6) -> tuple[float, list[tuple[str, float]]]:
    """Profile one step; return the matmul share of operator time and the `top` other operators.

    Shares are of the summed self time of all operators (device time on
    CUDA, CPU time otherwise). Attention kernels count as matmuls.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        train_step(trainer, trainer.step)
        synchronize(trainer.device)
    times: dict[str, float] = {}
    for event in profiler.key_averages():
        # On CPU only aten operators count; record_function ranges such as
        # "Optimizer.step#Muon.step" would count their Python overhead as an operator.
        if not cuda and not event.key.startswith("aten::"):
            continue
        spent = event.self_device_time_total if cuda else event.self_cpu_time_total
        if spent > 0:
            times[event.key] = times.get(event.key, 0.0) + float(spent)
    total = sum(times.values()) or 1.0
    matmul = sum(t for name, t in times.items() if _is_matmul(name)) / total
    others = sorted(((name, t / total) for name, t in times.items() if not _is_matmul(name)), key=lambda x: -x[1])
    return matmul, others[:top]


def _timed_steps(trainer: Trainer, count: int) -> Timing:
    with timed(trainer.device) as timing:
        for _ in range(count):
            train_step(trainer, trainer.step)
    return timing


# ---------------------------------------------------------------------------
# Throughput and MFU
# ---------------------------------------------------------------------------


@dataclass
class ThroughputResult:
    """Step times of one size, each round paired with the matmul peak taken just before it."""

    size: str
    n_params: int
    n_layer: int
    n_embd: int
    vocab_size: int
    seq_len: int
    batch_size: int
    flops_per_token: float
    optimizer_flops_per_step: float  # Muon's Newton-Schulz matmuls, outside flops_per_token
    step_s: list[float] = field(default_factory=list)  # mean step time of each round
    peak: PeakSamples | None = None  # one sample per round
    forward_s: float = float("nan")  # medians over the breakdown steps
    backward_s: float = float("nan")
    optimizer_s: float = float("nan")
    matmul_share: float = float("nan")  # of operator time in one profiled step
    top_other_ops: list[tuple[str, float]] = field(default_factory=list)  # (operator, share of operator time)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / statistics.median(self.step_s)

    @property
    def achieved_flops_per_s(self) -> float:
        return self.flops_per_token * self.tokens_per_s

    def mfu_per_round(self) -> list[float]:
        """Return achieved model FLOP/s over the peak of the same round, per round."""
        assert self.peak is not None
        step_flops = self.flops_per_token * self.tokens_per_step
        return [step_flops / s / p for s, p in zip(self.step_s, self.peak.flops_per_s)]

    @property
    def mfu(self) -> float:
        return statistics.median(self.mfu_per_round())


def measure_throughput(
    plan: TrainingPlan, device: torch.device, cache_dir: Path, progress: Progress
) -> list[ThroughputResult]:
    """Time `plan.rounds` rounds of steps per size, each after its own peak measurement.

    Pairing each round with a peak taken seconds before it cancels most of the
    drift that other users' jobs cause on a shared machine.
    """
    a, b = peak_operands(device)
    # Warm-up, the timed rounds, the phase breakdown and one profiled step.
    steps = plan.warmup_steps + (plan.rounds + 1) * plan.steps_per_round + 1
    results = []
    for size in plan.throughput_sizes:
        cell = bench_cell(size, "fp16", seq_len=plan.seq_len, batch_size=plan.batch_size, steps=steps)
        trainer = Trainer(cell, cache_dir=cache_dir, device=device)
        result = ThroughputResult(
            size=size, n_params=cell.n_params, n_layer=cell.n_layer, n_embd=cell.n_embd,
            vocab_size=cell.vocab_size, seq_len=cell.seq_len, batch_size=cell.batch_size,
            flops_per_token=flops_per_token(trainer.config),
            optimizer_flops_per_step=muon_flops_per_step(trainer),
            peak=PeakSamples(size=a.shape[0], dtype=str(a.dtype).removeprefix("torch.")),
        )
        for _ in range(plan.warmup_steps):
            train_step(trainer, trainer.step)
        for number in range(plan.rounds):
            result.peak.flops_per_s.append(matmul_flops_per_s(a, b))
            timing = _timed_steps(trainer, plan.steps_per_round)
            result.step_s.append(timing.wall_s / plan.steps_per_round)
            progress(
                f"throughput {size}: round {number + 1}/{plan.rounds}, {result.step_s[-1]:.3f} s/step, "
                f"peak {result.peak.flops_per_s[-1] / 1e9:.0f} GFLOP/s"
            )
        phases = [_phase_times(trainer, trainer.step) for _ in range(plan.steps_per_round)]
        result.forward_s, result.backward_s, result.optimizer_s = (statistics.median(p) for p in zip(*phases))
        if size == plan.throughput_sizes[-1]:
            result.matmul_share, result.top_other_ops = profile_step(trainer)
        results.append(result)
        del trainer
    return results


# ---------------------------------------------------------------------------
# QAT overhead
# ---------------------------------------------------------------------------


@dataclass
class QatResult:
    """Step times of the four bits at one size, interleaved round by round."""

    size: str
    n_params: int
    tokens_per_step: int
    step_s: dict[str, list[float]] = field(default_factory=dict)  # bits -> mean step time per round
    cpu_s: dict[str, list[float]] = field(default_factory=dict)  # bits -> mean CPU time per step per round
    fake_quantize_s: dict[str, float] = field(default_factory=dict)  # bits -> one pass over all block weights
    quantized_weights: int = 0  # elements of the fake-quantised block weights

    def ratios(self, bits: str, cpu: bool = False) -> list[float]:
        """Return the step time of `bits` over that of fp16 in the same round, per round."""
        times = self.cpu_s if cpu else self.step_s
        return [t / ref for t, ref in zip(times[bits], times["fp16"])]

    def ratio(self, bits: str, cpu: bool = False) -> float:
        return statistics.median(self.ratios(bits, cpu))


def _fake_quantize_seconds(trainer: Trainer, bits: int, repeats: int = 5) -> float:
    """Return the median time of one forward pass of fake quantisation over every block weight.

    That is the work QAT adds to a step: the straight-through backward passes
    the gradient through unchanged.
    """
    weights = [linear.weight for _, linear in trainer.model.quantized_linears()]
    seconds = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            with timed(trainer.device) as timing:
                for weight in weights:
                    fake_quantize(weight, bits)
            seconds.append(timing.wall_s)
    return statistics.median(seconds[1:])


def measure_qat(plan: TrainingPlan, device: torch.device, cache_dir: Path, progress: Progress) -> list[QatResult]:
    """Time fp16, int8, int6 and int4 at each size, rotating their order every round.

    Every round times each bit-width once, so a slow minute on a shared
    machine lands on all four. The ratio to fp16 is taken within the round.
    """
    steps = plan.warmup_steps + plan.qat_rounds * plan.qat_steps_per_round
    results = []
    for size in plan.qat_sizes:
        trainers: dict[str, Trainer] = {}
        for bits in BITS:
            cell = bench_cell(size, bits, seq_len=plan.seq_len, batch_size=plan.batch_size, steps=steps)
            trainers[bits] = Trainer(cell, cache_dir=cache_dir, device=device)
            for _ in range(plan.warmup_steps):
                train_step(trainers[bits], trainers[bits].step)
        cell = trainers["fp16"].cell
        result = QatResult(
            size=size, n_params=cell.n_params, tokens_per_step=cell.tokens_per_step,
            step_s={bits: [] for bits in BITS}, cpu_s={bits: [] for bits in BITS},
        )
        for number in range(plan.qat_rounds):
            order = BITS[number % len(BITS):] + BITS[: number % len(BITS)]
            for bits in order:
                timing = _timed_steps(trainers[bits], plan.qat_steps_per_round)
                result.step_s[bits].append(timing.wall_s / plan.qat_steps_per_round)
                result.cpu_s[bits].append(timing.cpu_s / plan.qat_steps_per_round)
            progress(
                f"qat {size}: round {number + 1}/{plan.qat_rounds}, "
                + ", ".join(f"{bits} {result.step_s[bits][-1]:.3f} s" for bits in BITS)
            )
        for bits in BITS[1:]:
            trainer = trainers[bits]
            result.fake_quantize_s[bits] = _fake_quantize_seconds(trainer, trainer.cell.bit_width)
        result.quantized_weights = sum(
            linear.weight.numel() for _, linear in trainers["int8"].model.quantized_linears()
        )
        results.append(result)
        del trainers
    return results


# ---------------------------------------------------------------------------
# Bookkeeping overhead
# ---------------------------------------------------------------------------


class _InstrumentedTrainer(Trainer):
    """A Trainer that records the wall time of each probe and each checkpoint save."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.probe_seconds: list[float] = []
        self.save_seconds: list[float] = []

    def probe(self) -> None:
        with timed(self.device) as timing:
            super().probe()
        self.probe_seconds.append(timing.wall_s)

    def save(self, path: Path) -> None:
        with timed(self.device) as timing:
            super().save(path)
        self.save_seconds.append(timing.wall_s)


@dataclass
class BookkeepingResult:
    """Whole `Trainer.run` times without and with the bookkeeping hooks, interleaved."""

    size: str
    n_params: int
    steps: int
    tokens_per_step: int
    probe_every: int
    aggressive_checkpoint_s: float
    run: dict[str, list[Timing]] = field(default_factory=dict)  # arm -> one Timing per round
    probes: dict[str, list[int]] = field(default_factory=dict)  # arm -> probes per run
    saves: dict[str, list[int]] = field(default_factory=dict)  # arm -> checkpoint saves per run
    probe_s: list[float] = field(default_factory=list)  # every probe of the bookkept arms
    save_s: list[float] = field(default_factory=list)  # every save (energy snapshot included)
    snapshot_s: list[float] = field(default_factory=list)
    energy_start_s: list[float] = field(default_factory=list)
    energy_stop_s: list[float] = field(default_factory=list)
    first_energy_start_s: float = float("nan")  # the process's first start: codecarbon's import and set-up
    energy_sources: str = ""  # sources that started
    energy_unavailable: str = ""  # sources that did not, with the reason
    checkpoint_bytes: int = 0

    def ratios(self, arm: str, cpu: bool = False) -> list[float]:
        """Return the run time of `arm` over that of the bare run of the same round."""
        pick = (lambda t: t.cpu_s) if cpu else (lambda t: t.wall_s)
        return [pick(t) / pick(ref) for t, ref in zip(self.run[arm], self.run["bare"])]

    def overhead(self, arm: str, cpu: bool = False) -> float:
        return statistics.median(self.ratios(arm, cpu)) - 1.0

    def estimated_overhead(self, run_s: float, checkpoint_s: float, probes: int) -> float:
        """Estimate the bookkeeping share of a longer run from the measured per-event costs.

        The estimate is ``(probes * probe + run_s / checkpoint_s * save +
        energy start + energy stop) / run_s``, with the medians measured here.
        A save includes its energy snapshot. The energy start is the first
        one of the process, because a SLURM task starts a new process.
        """
        median = statistics.median
        probe = median(self.probe_s) if self.probe_s else 0.0
        save = median(self.save_s) if self.save_s else 0.0
        start = self.first_energy_start_s
        if math.isnan(start):
            start = median(self.energy_start_s) if self.energy_start_s else 0.0
        stop = median(self.energy_stop_s) if self.energy_stop_s else 0.0
        return (probes * probe + run_s / checkpoint_s * save + start + stop) / run_s


@dataclass
class _ArmRun:
    """Measurements of one timed `Trainer.run` of an arm."""

    timing: Timing
    probe_s: list[float]
    save_s: list[float]
    snapshot_s: list[float]
    energy_start_s: float | None = None
    energy_stop_s: float | None = None
    energy_sources: str = ""
    energy_unavailable: str = ""
    checkpoint_bytes: int = 0


def _run_arm(
    cell: Cell,
    cache_dir: Path,
    device: torch.device,
    checkpoint_path: Path | None,
    checkpoint_s: float,
    energy: bool,
) -> _ArmRun:
    """Run one `Trainer.run` the way `jobs.run.CellTask` runs a cell, timing it whole."""
    from jobs.energy import EnergyMeter

    trainer = _InstrumentedTrainer(cell, cache_dir=cache_dir, device=device)
    if checkpoint_path is not None:
        checkpoint_path.unlink(missing_ok=True)
    snapshots: list[float] = []
    meter = None
    start = stop = None
    with timed(device) as run:
        if energy:
            meter = EnergyMeter("USA")
            with timed(device) as start:
                meter.start()
            trainer.energy_hook = _timed_snapshot(meter, snapshots)
        trainer.run(checkpoint_path, checkpoint_s)
        if meter is not None:
            with timed(device) as stop:
                meter.stop()
    arm = _ArmRun(run, trainer.probe_seconds, trainer.save_seconds, snapshots)
    if meter is not None:
        arm.energy_start_s, arm.energy_stop_s = start.wall_s, stop.wall_s
        arm.energy_sources = ", ".join(source for source, state in meter.attempt.items() if state.started)
        arm.energy_unavailable = "; ".join(f"{s}: {r}" for s, r in sorted(meter.reasons.items()))
    if checkpoint_path is not None and checkpoint_path.exists():
        arm.checkpoint_bytes = checkpoint_path.stat().st_size
        checkpoint_path.unlink()
    return arm


def _record(result: BookkeepingResult, name: str, arm: _ArmRun) -> None:
    result.run[name].append(arm.timing)
    result.probes[name].append(len(arm.probe_s))
    result.saves[name].append(len(arm.save_s))
    if name == "bare":
        return
    result.probe_s += arm.probe_s
    result.save_s += arm.save_s
    result.snapshot_s += arm.snapshot_s
    result.energy_start_s.append(arm.energy_start_s)
    result.energy_stop_s.append(arm.energy_stop_s)
    result.energy_sources, result.energy_unavailable = arm.energy_sources, arm.energy_unavailable
    result.checkpoint_bytes = arm.checkpoint_bytes


def _timed_snapshot(meter, sink: list[float]) -> Callable[[], dict]:
    def snapshot() -> dict:
        with timed(torch.device("cpu")) as timing:
            totals = meter.snapshot()
        sink.append(timing.wall_s)
        return totals

    return snapshot


def measure_bookkeeping(
    plan: TrainingPlan, device: torch.device, cache_dir: Path, progress: Progress
) -> BookkeepingResult:
    """Time whole runs: bare, with every hook at the default checkpoint interval, and with frequent checkpoints.

    The bare run has no checkpoint file, no energy meter and probe_every 0 (it
    still probes once after the last step, as every run does). The two other
    arms probe every `plan.bookkeeping_probe_every` steps, meter energy and
    save checkpoints every 600 s (so only the save at the end of the loop
    falls in a short run) or every `plan.aggressive_checkpoint_s`. The order
    of the arms rotates every round.
    """
    size = plan.bookkeeping_size
    shape = {"seq_len": plan.seq_len, "batch_size": plan.bookkeeping_batch_size, "steps": plan.bookkeeping_steps}
    bare = bench_cell(size, "fp16", **shape)
    hooked = bench_cell(size, "fp16", probe_every=plan.bookkeeping_probe_every, **shape)
    result = BookkeepingResult(
        size=size, n_params=bare.n_params, steps=bare.steps, tokens_per_step=bare.tokens_per_step,
        probe_every=hooked.probe_every, aggressive_checkpoint_s=plan.aggressive_checkpoint_s,
        run={arm: [] for arm in ARMS}, probes={arm: [] for arm in ARMS}, saves={arm: [] for arm in ARMS},
    )
    with tempfile.TemporaryDirectory(prefix="qat-bench-checkpoints-") as folder:
        path = Path(folder) / "cell.pt"
        # An untimed short run first: the first energy meter of a process
        # imports codecarbon and detects the hardware, and the first run
        # warms the kernels of this shape. Both would land on one arm only.
        warm_up = bench_cell(size, "fp16", probe_every=1, **{**shape, "steps": min(4, plan.bookkeeping_steps)})
        result.first_energy_start_s = _run_arm(warm_up, cache_dir, device, path, 0.0, energy=True).energy_start_s
        arms = {
            "bare": (bare, None, REALISTIC_CHECKPOINT_S),
            "realistic": (hooked, path, REALISTIC_CHECKPOINT_S),
            "aggressive": (hooked, path, plan.aggressive_checkpoint_s),
        }
        for number in range(plan.bookkeeping_rounds):
            order = ARMS[number % len(ARMS):] + ARMS[: number % len(ARMS)]
            for arm in order:
                cell, checkpoint_path, checkpoint_s = arms[arm]
                run = _run_arm(cell, cache_dir, device, checkpoint_path, checkpoint_s, energy=arm != "bare")
                _record(result, arm, run)
            progress(
                f"bookkeeping {size}: round {number + 1}/{plan.bookkeeping_rounds}, "
                + ", ".join(f"{arm} {result.run[arm][-1].wall_s:.1f} s" for arm in ARMS)
            )
    return result
