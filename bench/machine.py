"""The machine a benchmark runs on, timers that wait for the device, and the matmul peak.

Every ratio on the benchmark page divides two figures taken in the same run,
because the machines this runs on are often shared: another user's job can
slow a 2-core machine several-fold for a minute and then leave.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

# Matmul sizes and dtypes for the peak. fp32 on CPU, because training runs in
# fp32 there; bf16 on CUDA, because training runs under bf16 autocast there.
# A 2048 product is 17 GFLOP, short enough on CPU to measure before every round.
CPU_PEAK_SIZE = 2048
CUDA_PEAK_SIZE = 8192


@dataclass(frozen=True)
class Machine:
    """Hardware and software of one benchmark run, for the top of the page."""

    cpu_model: str
    logical_cpus: int  # os.cpu_count()
    usable_cpus: int  # CPUs this process may run on (its affinity mask)
    torch_threads: int  # torch.get_num_threads(): the threads of every CPU figure
    ram_gib: float
    gpu: str  # device name, or "" when the run used no GPU
    torch_version: str
    python_version: str
    system: str  # kernel name and release
    git_commit: str  # "+dirty" when the tree had uncommitted changes
    started_utc: str  # ISO 8601, seconds
    load_average: tuple[float, float, float]  # 1, 5 and 15 minute load average at the start


def describe_machine(device: torch.device) -> Machine:
    """Return the machine description, with the load average at this moment."""
    from jobs.provenance import git_commit

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return Machine(
        cpu_model=_cpu_model(),
        logical_cpus=os.cpu_count() or 1,
        usable_cpus=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        torch_threads=torch.get_num_threads(),
        ram_gib=_ram_gib(),
        gpu=gpu,
        torch_version=torch.__version__,
        python_version=platform.python_version(),
        system=f"{platform.system()} {platform.release()}",
        git_commit=git_commit() or "unknown (not a git checkout)",
        started_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        load_average=load_average(),
    )


def load_average() -> tuple[float, float, float]:
    """Return the 1, 5 and 15 minute load average, or NaNs where the OS has none."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return (float("nan"),) * 3
    return (one, five, fifteen)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (OSError, ValueError, AttributeError):
        return float("nan")


# ---------------------------------------------------------------------------
# Timers
# ---------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait until the device has finished its queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Elapsed wall-clock and process CPU seconds of one timed block."""

    wall_s: float = 0.0
    # CPU seconds of every thread of this process. Another user's load on a
    # shared machine stretches wall time, so a CPU-time ratio is a cross-check
    # of a wall-time ratio. CPU time misses waits such as fsync and GPU
    # kernels, and it counts threads that spin while waiting for each other.
    cpu_s: float = 0.0


@contextmanager
def timed(device: torch.device) -> Iterator[Timing]:
    """Time the block, waiting for the device before the start and before the stop."""
    timing = Timing()
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield timing
    finally:
        synchronize(device)
        timing.wall_s = time.perf_counter() - wall
        timing.cpu_s = time.process_time() - cpu


# ---------------------------------------------------------------------------
# Matmul peak
# ---------------------------------------------------------------------------


@dataclass
class PeakSamples:
    """Matmul throughput samples, each the median of a few timed `torch.mm` calls."""

    size: int
    dtype: str
    flops_per_s: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.flops_per_s) if self.flops_per_s else float("nan")


def peak_operands(device: torch.device, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return two random square matrices for the peak: fp32 on CPU, bf16 on CUDA."""
    if device.type == "cuda":
        size = size or CUDA_PEAK_SIZE
        dtype = torch.bfloat16
    else:
        size = size or CPU_PEAK_SIZE
        dtype = torch.float32
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    return a, b


def matmul_flops_per_s(a: torch.Tensor, b: torch.Tensor, repeats: int = 3) -> float:
    """Return the median FLOP/s of `repeats` timed ``torch.mm(a, b)`` calls after one warm-up call.

    Counts ``2 * m * k * n`` FLOPs per call, one multiply and one add per
    term. The product runs with torch's current thread count, the same as
    training in this process.
    """
    if repeats < 1:
        raise ValueError(f"invalid repeats {repeats!r}; expected at least 1")
    m, k = a.shape
    n = b.shape[1]
    flops = 2.0 * m * k * n
    torch.mm(a, b)
    seconds = []
    for _ in range(repeats):
        with timed(a.device) as timing:
            torch.mm(a, b)
        seconds.append(timing.wall_s)
    return flops / statistics.median(seconds)
