"""Benchmark `collect` on synthetic result files, next to a plain h5py-to-pandas loop.

    python bench/collect.py --counts 1345,10000 --root /tmp/qat-bench

For each count N it writes N result files with `jobs.result.write_result`
(once; a later run reuses them) under ROOT/nN/results/bench/, plus the
manifest of those cells, then times, each `--repeats` times:

  plain loop      open every file with h5py, read every attribute into a dict,
                  build a pandas DataFrame and write it as parquet
  cold            `collect` with no table and no index (every file is read)
  nothing new     `collect` again, with every file unchanged
  one changed     `collect` after rewriting one result file

The in-process figures call `pipeline.collect.collect` after the imports;
the CLI figures run `python -m pipeline collect` in a subprocess, interpreter
start and imports included, as cron runs it. The files are in the page cache
in every case (they were just written or read), so the figures are for a warm
cache; a first read from a network filesystem is slower.

It prints a Markdown section (machine, command, table) for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import math
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from jobs.result import write_result  # noqa: E402
from jobs.schedule import lr_multiplier  # noqa: E402
from pipeline import collect as collect_lib  # noqa: E402
from pipeline import manifest as manifest_lib  # noqa: E402
from pipeline.phases import expand_spec  # noqa: E402
from pipeline.workdir import Workdir  # noqa: E402

PHASE = "bench"
EVALS = 8

# A grid of 4 bits x 5 warmdowns x 5 LR multipliers x 5 sizes x 20 seeds =
# 10,000 cells, the largest count benchmarked; smaller counts take a prefix.
SPEC = {
    "settings": {
        "seq_len": 1024, "batch_size": 64, "steps": 300, "matrix_lr": 0.02, "adam_lr": 0.008,
        "val_tokens": 1_048_576, "evals": EVALS, "vocab_size": 8192, "data": "shards:/data/fineweb",
    },
    "block": [{
        "name": "main",
        "factors": {
            "bits": ["fp16", "int8", "int6", "int4"],
            "warmdown": [0.1, 0.2, 0.33, 0.5, 0.7],
            "lr_mult": [0.5, 0.75, 1.0, 1.5, 2.0],
            "size": ["3M", "5M", "8M", "15M", "30M"],
            "seed": list(range(20)),
        },
    }],
}


def make_cells(count: int, steps: int):
    spec = {**SPEC, "settings": {**SPEC["settings"], "steps": steps}}
    cells = expand_spec(PHASE, spec).cells
    if count > len(cells):
        raise SystemExit(f"--counts {count} is larger than the benchmark grid ({len(cells)} cells)")
    return cells[:count]


def write_one(args) -> None:
    """Write one realistic result file: per-step curves, evals, probe, env, energy."""
    folder, cell, number = args
    rng = np.random.default_rng(number)

    steps = cell.steps
    step = np.arange(steps)
    floor = 3.2 + 0.1 * rng.standard_normal()
    train_loss = floor + 7.0 * np.exp(-step / (steps / 6)) + 0.05 * rng.standard_normal(steps)
    lr = np.array([lr_multiplier(s, steps, cell.warmup_steps, cell.warmdown, cell.shape) for s in step])
    val_step = np.linspace(cell.eval_every, steps, EVALS).astype(np.int64)
    val_loss = floor + 7.0 * np.exp(-val_step / (steps / 6)) + 0.02
    val_bpb = val_loss / math.log(2) / 4.2

    metrics = {
        "val_loss": float(val_loss[-1]), "val_bpb": float(val_bpb[-1]),
        "roundtrip_val_bpb": float(val_bpb[-1] + 0.001), "roundtrip_int8_embed_val_bpb": float(val_bpb[-1] + 0.002),
        "ptq_val_bpb_int8": float(val_bpb[-1] + 0.003), "ptq_val_bpb_int6": float(val_bpb[-1] + 0.02),
        "ptq_val_bpb_int4": float(val_bpb[-1] + 0.2),
        "probe_int4": float(rng.random()), "probe_int6": float(rng.random()), "probe_int8": float(rng.random()),
        "steps_done": float(steps), "tokens": float(steps * cell.tokens_per_step), "wall_s": 600.0 + rng.random(),
        "tokens_per_s": 1.0e5, "diverged_step": -1.0, "requeues": 0.0, "train_loss_final": float(train_loss[-1]),
    }

    curves = {
        "train_loss": train_loss.astype(np.float32), "lr": lr.astype(np.float32),
        "val_step": val_step, "val_loss": val_loss, "val_bpb": val_bpb,
    }
    probe = {"step": np.array([steps // 2]), **{f"int{b}": rng.random(1) for b in (4, 6, 8)}}

    env = {
        "host": f"node{number % 16:03d}", "python": "3.11.7", "torch_version": "2.13.0", "numpy_version": "2.4.6",
        "device": "NVIDIA H100 80GB HBM3", "cuda_visible_devices": "0", "git_commit": "0" * 40,
        "slurm_job_id": str(100000 + number), "slurm_array_job_id": "100000", "slurm_array_task_id": str(number),
        "slurm_restart_count": "", "slurm_node": f"node{number % 16:03d}", "slurm_partition": "gpu",
    }
    energy = {
        "energy_kwh_modelled": 0.1, "cpu_kwh": 0.01, "gpu_kwh": 0.08, "ram_kwh": 0.01, "emissions_kg": 0.04,
        "duration_s": 600.0, "energy_kwh": 0.1, "energy_source": "codecarbon", "country_iso_code": "USA",
        "unavailable": "",
    }
    write_result(folder / f"{cell.cell_id}.h5", cell.to_row(), "done", metrics, curves, probe, env, energy, "fp")


def prepare(root: Path, count: int, steps: int, processes: int) -> Workdir:
    """Write the manifest and result files of `count` cells, unless they are already there."""
    workdir = Workdir(root / f"n{count}")
    cells = make_cells(count, steps)
    manifest_lib.write(workdir.manifest(PHASE), cells)
    folder = workdir.results(PHASE)
    folder.mkdir(parents=True, exist_ok=True)
    present = {p.name for p in folder.glob("*.h5")}
    missing = [(folder, cell, i) for i, cell in enumerate(cells) if f"{cell.cell_id}.h5" not in present]
    if missing:
        started = time.perf_counter()
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pool.map(write_one, missing, chunksize=64)
        print(f"wrote {len(missing)} result files in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return workdir


def plain_loop(workdir: Workdir) -> float:
    """Time the obvious script: h5py into dicts, pandas, parquet."""
    started = time.perf_counter()
    rows = []
    for path in sorted(workdir.results(PHASE).glob("*.h5")):
        with h5py.File(path, "r") as f:
            row = dict(f.attrs.items())
            for group in ("metrics", "env", "energy"):
                row.update(f[group].attrs.items())
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.to_parquet(workdir.root / "plain.parquet", index=False)
    return time.perf_counter() - started


def reset(workdir: Workdir) -> None:
    workdir.table(PHASE).unlink(missing_ok=True)
    collect_lib.index_path(workdir, PHASE).unlink(missing_ok=True)


def in_process(workdir: Workdir, jobs: int) -> float:
    started = time.perf_counter()
    report = collect_lib.collect(workdir, [PHASE], jobs=jobs)
    elapsed = time.perf_counter() - started
    if report.failed or report.phases[0].quarantined:
        raise SystemExit(f"collect did not accept every file: {report.summary_line()}")
    return elapsed


def cli(workdir: Workdir, jobs: int) -> float:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "collect", "--phase", PHASE, "--workdir", str(workdir.root),
         "--jobs", str(jobs)],
        cwd=REPO, capture_output=True, text=True, check=False,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"collect failed: {result.stderr}")
    return elapsed


def change_one(workdir: Workdir, cells) -> None:
    write_one((workdir.results(PHASE), cells[0], 10**6 + int(time.time())))


def cpu_seconds() -> float:
    """Return user + system CPU seconds of this process and its finished children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(plan, repeats: int) -> list[tuple[str, list[float], list[float]]]:
    """Run each (label, before, action) of `plan` `repeats` times, round-robin.

    Round-robin spreads the load of other users on a shared machine evenly
    over the measurements. Returns (label, wall seconds, CPU seconds) of each
    action; `before` is not timed.
    """
    times: dict[str, list[float]] = {label: [] for label, _, _ in plan}
    cpu: dict[str, list[float]] = {label: [] for label, _, _ in plan}
    for _ in range(repeats):
        for label, before, action in plan:
            before()
            start_cpu = cpu_seconds()
            times[label].append(action())
            cpu[label].append(cpu_seconds() - start_cpu)
    for label, _, _ in plan:
        print(
            f"  {label}: median {statistics.median(times[label]):.2f} s wall, "
            f"{statistics.median(cpu[label]):.2f} s CPU",
            file=sys.stderr,
        )
    return [(label, times[label], cpu[label]) for label, _, _ in plan]


def machine() -> list[str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kib = next(
            int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
        memory = f"{mem_kib / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        memory = "unknown"
    return [
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: `nproc` = {os.cpu_count()}, CPU {model}, RAM {memory}, {platform.system()} {platform.release()}",
        f"- software: Python {platform.python_version()}, h5py {h5py.__version__} (HDF5 {h5py.version.hdf5_version}), "
        f"pandas {pd.__version__}",
        f"- load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (a machine shared with others)",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1345,10000", help="numbers of result files, comma-separated")
    parser.add_argument("--root", default="/tmp/qat-bench", help="folder for the synthetic workdirs (reused)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per cell: the length of each curve")
    parser.add_argument("--repeats", type=int, default=3, help="timings per measurement (median reported)")
    parser.add_argument("--jobs", default="1,2", help="reader process counts to time, comma-separated")
    parser.add_argument("--clean", action="store_true", help="delete ROOT afterwards")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    job_counts = [int(j) for j in args.jobs.split(",")]
    root = Path(args.root)

    lines = machine()
    command = " ".join(["python bench/collect.py", *(argv if argv is not None else sys.argv[1:])])
    header = ["files", "measurement", "wall s (median)", "wall s (min)", "CPU s (median)", "wall vs plain loop"]
    rows = []
    for count in counts:
        print(f"N = {count}", file=sys.stderr)
        workdir = prepare(root, count, args.steps, processes=max(1, min(4, os.cpu_count() or 1)))
        cells = make_cells(count, args.steps)
        plan = [("plain loop (h5py -> pandas -> parquet)", lambda: None, lambda: plain_loop(workdir))]
        for jobs in job_counts:
            plan.append((f"collect cold, in process, --jobs {jobs}", lambda: reset(workdir),
                         lambda j=jobs: in_process(workdir, j)))
        plan.append(("collect nothing new, in process", lambda: None, lambda: in_process(workdir, 1)))
        plan.append(("collect one changed file, in process", lambda: change_one(workdir, cells),
                     lambda: in_process(workdir, 1)))
        for jobs in job_counts:
            plan.append((f"`python -m pipeline collect` cold, --jobs {jobs}", lambda: reset(workdir),
                         lambda j=jobs: cli(workdir, j)))
        plan.append(("`python -m pipeline collect` nothing new", lambda: None, lambda: cli(workdir, 1)))
        results = measure(plan, args.repeats)
        baseline = statistics.median(results[0][1])
        for label, times, cpu in results:
            median = statistics.median(times)
            rows.append([
                f"{count:,}", label, f"{median:.2f}", f"{min(times):.2f}", f"{statistics.median(cpu):.2f}",
                f"{median / baseline:.2f}x",
            ])

    lines.append(f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    lines.append(f"- result files: {args.steps} steps of train_loss and lr, {EVALS} evaluations, about "
                 f"{_file_size(root, counts[0]) / 1024:.0f} KiB each; page cache warm")
    print("\n".join([f"Command: `{command}`", "", *lines, ""]))
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.clean:
        shutil.rmtree(root)
    return 0


def _file_size(root: Path, count: int) -> float:
    files = list((root / f"n{count}" / "results" / PHASE).glob("*.h5"))[:50]
    return statistics.mean(p.stat().st_size for p in files) if files else float("nan")


if __name__ == "__main__":
    sys.exit(main())
