"""Run the benchmark sections in order and write the page."""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from bench import orchestration, page, training
from bench.machine import Machine, describe_machine, load_average

SECTIONS = ("throughput", "qat", "bookkeeping", "orchestration")
DEVICES = ("cpu", "cuda")
# Kept between runs, because writing 11,345 result files takes minutes.
COLLECT_ROOT = Path(tempfile.gettempdir()) / "qat-bench-collect"


@dataclass(frozen=True)
class BenchOptions:
    """Options of one `python -m pipeline bench` run."""

    out: Path
    device: str = "cpu"
    quick: bool = False
    skip_slurm: bool = False
    sections: tuple[str, ...] = SECTIONS
    repeats: int = 3  # repeats of each orchestration command
    threads: int | None = None  # torch threads of the training sections; None keeps torch's default

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"invalid device {self.device!r}; expected one of {', '.join(DEVICES)}")
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown or not self.sections:
            raise ValueError(
                f"invalid sections {list(self.sections)!r}; expected one or more of {', '.join(SECTIONS)}"
            )
        if self.repeats < 1:
            raise ValueError(f"invalid repeats {self.repeats!r}; expected at least 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"invalid threads {self.threads!r}; expected at least 1")


@dataclass
class BenchResults:
    """Everything one run measured, and the errors of sections that failed."""

    options: BenchOptions
    command: str
    machine: Machine
    plan: training.TrainingPlan
    throughput: list[training.ThroughputResult] | None = None
    qat: list[training.QatResult] | None = None
    bookkeeping: training.BookkeepingResult | None = None
    orchestration: orchestration.OrchestrationResult | None = None
    errors: dict[str, str] = field(default_factory=dict)  # section -> error message
    study: dict[str, int] = field(default_factory=dict)  # training.study_tokens(), for comparisons
    wall_s: float = 0.0
    load_average_end: tuple[float, float, float] = (float("nan"),) * 3


def print_progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def run_benchmarks(
    options: BenchOptions, command: str, progress: Callable[[str], None] = print_progress
) -> BenchResults:
    """Run the chosen sections and return their results; a failed section is recorded, not raised.

    Raises
    ------
    RuntimeError
        When `options.device` is "cuda" and torch finds no CUDA device.
    """
    if options.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was given but torch finds no CUDA device; use --device cpu")
    device = torch.device(options.device)
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    started = time.perf_counter()
    results = BenchResults(
        options=options, command=command, machine=describe_machine(device),
        plan=training.plan_for(device, options.quick), study=training.study_tokens(),
    )
    progress(f"machine: {results.machine.cpu_model}, {results.machine.torch_threads} torch threads, "
             f"load average {results.machine.load_average[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="qat-bench-") as scratch:
        folder = Path(scratch)
        cache = folder / "cache"
        steps: dict[str, Callable[[], None]] = {
            "throughput": lambda: setattr(
                results, "throughput", training.measure_throughput(results.plan, device, cache, progress)
            ),
            "qat": lambda: setattr(results, "qat", training.measure_qat(results.plan, device, cache, progress)),
            "bookkeeping": lambda: setattr(
                results, "bookkeeping", training.measure_bookkeeping(results.plan, device, cache, progress)
            ),
            "orchestration": lambda: setattr(
                results, "orchestration",
                orchestration.measure_orchestration(
                    folder / "orchestration", quick=options.quick, repeats=options.repeats,
                    skip_slurm=options.skip_slurm,
                    collect_root=folder / "collect" if options.quick else COLLECT_ROOT, progress=progress,
                ),
            ),
        }
        for section in SECTIONS:
            if section not in options.sections:
                continue
            progress(f"section {section}")
            try:
                steps[section]()
            except Exception as err:  # one failed section must not lose the others' figures
                results.errors[section] = f"{type(err).__name__}: {err}"
                progress(f"section {section} failed: {results.errors[section]}")
                traceback.print_exc(file=sys.stderr)
    results.wall_s = time.perf_counter() - started
    results.load_average_end = load_average()
    return results


def run_and_write(options: BenchOptions, command: str) -> BenchResults:
    """Run the benchmarks and write the page to `options.out`, keeping sections of the old page it does not make."""
    results = run_benchmarks(options, command)
    previous = options.out.read_text() if options.out.is_file() else ""
    page.write_page(options.out, page.render(results, previous))
    print_progress(f"wrote {options.out}")
    return results
