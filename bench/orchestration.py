"""Orchestration at study scale: manifest, submit, status and collect for phases 2 and 5.

Every command runs as a user runs it, `python -m pipeline ...` in a fresh
interpreter, so its time includes the interpreter start and the imports.
Scheduler commands are counted by wrapper scripts named `sbatch`, `sacct`,
`squeue` and `scancel`, placed first on PATH, which append their arguments to
a log and run the real command.

The real submission goes to the SLURM test cluster (`tests/slurm/cluster.sh`),
which other users share. The `sbatch` wrapper adds ``--hold``, so no task can
start, and every job submitted is cancelled with `scancel` right after the
`status` measurement: no cell trains.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
STUDY_PHASES = ("2", "5")
QUICK_PHASES = ("micro",)
COUNTED_COMMANDS = ("sbatch", "sacct", "squeue", "scancel")
COMMAND_TIMEOUT_S = 600.0
# Collect runs at these result-file counts: the study (phases 2 and 5) and a
# grid about seven times larger.
COLLECT_COUNTS = (1345, 10000)

Progress = Callable[[str], None]


@dataclass
class CommandTiming:
    """Wall times of one CLI command, repeated, and the scheduler calls of its last run."""

    label: str
    command: str  # as a user types it, with the work folder written $WORKDIR
    cells: int
    seconds: list[float] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=dict)  # scheduler command -> calls in the last run

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")


@dataclass
class SlurmSubmission:
    """The real submission of each phase to the test cluster, and what became of its jobs."""

    max_array_size: int
    submit: list[CommandTiming] = field(default_factory=list)
    status: list[CommandTiming] = field(default_factory=list)
    expected_chunks: dict[str, int] = field(default_factory=dict)  # phase -> arrays: per size, ceil(cells / MaxArraySize)
    job_ids: list[str] = field(default_factory=list)
    cancel_s: float = float("nan")
    states_after_cancel: dict[str, int] = field(default_factory=dict)  # sacct state -> records
    started_tasks: int = -1  # sacct records with a node: tasks that started before scancel
    queued_after_cancel: int = -1  # squeue lines for the submitted jobs after scancel
    data_note: str = ""  # where the data that `submit` checks came from


@dataclass
class CollectSection:
    """The collect benchmark's Markdown, from a fresh run of bench/collect.py or carried from the old page."""

    command: str
    markdown: str = ""
    seconds: float = float("nan")
    error: str = ""  # why a fresh run produced no section


@dataclass
class OrchestrationResult:
    """Every orchestration figure of one run."""

    phases: tuple[str, ...]
    phase_args: dict[str, list[str]]  # phase -> its --phase or --phase-file arguments
    cells: dict[str, int]
    synthetic_reason: str = ""  # why the cells come from a synthetic spec, or ""
    repeats: int = 0
    baselines: list[CommandTiming] = field(default_factory=list)  # interpreter start, with and without torch
    commands: list[CommandTiming] = field(default_factory=list)
    slurm: SlurmSubmission | None = None
    slurm_skipped: str = ""  # why there was no real submission, or ""
    status_available: bool = False
    collect: CollectSection | None = None

    @property
    def total_cells(self) -> int:
        return sum(self.cells.values())


# ---------------------------------------------------------------------------
# Running commands
# ---------------------------------------------------------------------------


def _environment(extra_path: Path | None = None, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra_env or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    if extra_path is not None:
        env["PATH"] = os.pathsep.join([str(extra_path), env.get("PATH", "")])
    return env


def run_python(
    args: list[str], extra_path: Path | None = None, extra_env: dict[str, str] | None = None
) -> tuple[float, subprocess.CompletedProcess]:
    """Run `python ARGS` from the repository and return (wall seconds, completed process).

    Raises
    ------
    RuntimeError
        When the command exits with a non-zero status. The message contains its stderr.
    """
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, *args],
        cwd=REPO, env=_environment(extra_path, extra_env), capture_output=True, text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(
            f"`python {shlex.join(args)}` failed with exit status {completed.returncode}: "
            f"{completed.stderr.strip()[-2000:]}"
        )
    return seconds, completed


def run_pipeline(
    args: list[str], extra_path: Path | None = None, extra_env: dict[str, str] | None = None
) -> tuple[float, subprocess.CompletedProcess]:
    """Run `python -m pipeline ARGS` as `run_python` does."""
    return run_python(["-m", "pipeline", *args], extra_path, extra_env)


def write_wrappers(folder: Path, log: Path, hold: bool = True) -> dict[str, str]:
    """Write counting wrappers for the scheduler commands into `folder`; return name -> real path.

    Each wrapper appends one line, ``NAME ARGS``, to `log` and runs the real
    command with the same arguments. With `hold`, the `sbatch` wrapper adds
    ``--hold`` so that submitted jobs wait until released or cancelled, and
    appends sbatch's output to the log, which holds the job id.

    Raises
    ------
    FileNotFoundError
        When a scheduler command is not on PATH.
    """
    folder.mkdir(parents=True, exist_ok=True)
    real = {}
    for name in COUNTED_COMMANDS:
        path = shutil.which(name)
        if path is None:
            raise FileNotFoundError(f"{name} not found on PATH; start SLURM or pass --skip-slurm")
        real[name] = path
        extra = " --hold" if (hold and name == "sbatch") else ""
        if name == "sbatch":
            body = (
                f'output=$({shlex.quote(path)}{extra} "$@")\n'
                "status=$?\n"
                'printf "%s\\n" "$output"\n'
                f'printf "sbatch-output %s\\n" "$output" >> {shlex.quote(str(log))}\n'
                'exit "$status"\n'
            )
        else:
            body = f'exec {shlex.quote(path)} "$@"\n'
        script = folder / name
        script.write_text(
            "#!/bin/sh\n"
            f"# Log the call to {log.name}, then run the real {name}.\n"
            f'printf "{name} %s\\n" "$*" >> {shlex.quote(str(log))}\n' + body
        )
        script.chmod(0o755)
    return real


def count_calls(log: Path) -> dict[str, int]:
    """Return the number of calls of each counted command in a wrapper log."""
    counts = {name: 0 for name in COUNTED_COMMANDS}
    if not log.exists():
        return counts
    for line in log.read_text().splitlines():
        name = line.split(" ", 1)[0]
        if name in counts:
            counts[name] += 1
    return counts


def submitted_job_ids(log: Path) -> list[str]:
    """Return the job ids that sbatch printed, in order, from a wrapper log."""
    if not log.exists():
        return []
    return re.findall(r"^sbatch-output .*?job (\d+)", log.read_text(), flags=re.MULTILINE)


# ---------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------


def resolve_phases(phases: tuple[str, ...], folder: Path) -> tuple[dict[str, list[str]], dict[str, int], str]:
    """Return (phase -> CLI arguments, phase -> cell count, synthetic reason) for the packaged phases.

    When a packaged phase does not load, both phases are replaced by synthetic
    specs of the same sizes (720 and 625 cells, 1,345 in all) written under
    `folder`, and the reason states why.
    """
    from pipeline.errors import UsageError
    from pipeline.phases import load_phase

    arguments: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    try:
        for phase in phases:
            counts[phase] = len(load_phase(phase).cells)
            arguments[phase] = ["--phase", phase]
    except (UsageError, KeyError, ValueError, OSError) as err:
        reason = f"phase {phase!r} did not load ({err})"
        return _synthetic_phases(folder) + (reason,)
    return arguments, counts, ""


# Two grids of the study's sizes: 3 bits x 4 warmdowns x 3 lr_mults x 4 sizes x
# 5 seeds = 720 cells, and 5 warmdowns x 5 lr_mults x 5 sizes x 5 seeds = 625.
_SYNTHETIC = {
    "synthetic-2": (
        'bits = ["fp16", "int8", "int6"]\nwarmdown = [0.1, 0.2, 0.33, 0.5]\nlr_mult = [0.5, 1.0, 2.0]\n'
        'size = ["15M", "30M", "50M", "100M"]\nseed = [0, 1, 2, 3, 4]\n'
    ),
    "synthetic-5": (
        'bits = ["int4"]\nwarmdown = [0.1, 0.2, 0.33, 0.5, 0.7]\nlr_mult = [0.5, 0.75, 1.0, 1.5, 2.0]\n'
        'size = ["3M", "5M", "8M", "15M", "20M"]\nseed = [0, 1, 2, 3, 4]\n'
    ),
}
_SYNTHETIC_SETTINGS = (
    '[settings]\ndata = "stdlib-docs"\nseq_len = 1024\nbatch_size = 64\ntokens_per_param = 20.0\n'
    "matrix_lr = 0.04\nadam_lr = 0.008\nval_tokens = 1048576\n"
)


def _synthetic_phases(folder: Path) -> tuple[dict[str, list[str]], dict[str, int]]:
    from pipeline.phases import load_phase

    folder.mkdir(parents=True, exist_ok=True)
    arguments, counts = {}, {}
    for name, factors in _SYNTHETIC.items():
        path = folder / f"{name}.toml"
        path.write_text(_SYNTHETIC_SETTINGS + '\n[[block]]\nname = "main"\n[block.factors]\n' + factors)
        counts[name] = len(load_phase(phase_file=path).cells)
        arguments[name] = ["--phase-file", str(path)]
    return arguments, counts


# ---------------------------------------------------------------------------
# Data for the real submission
# ---------------------------------------------------------------------------


def data_environment(phase_args: dict[str, list[str]], folder: Path) -> tuple[dict[str, str], str]:
    """Return (extra environment, note) that let `submit` pass its data check.

    `submit` checks every data set of a phase before it queues anything. When
    the phases name a data set and `$QAT_DATA_ROOT` does not pass that check
    here, a stand-in data root is written under `folder` (`write_stand_in_data`),
    and the note says so.
    """
    from jobs.data import DATA_ROOT_ENV, DATASETS, DataError, check_data
    from pipeline.phases import load_phase

    needed = set()
    for args in phase_args.values():
        phase = load_phase(phase_file=args[1]) if args[0] == "--phase-file" else load_phase(args[1])
        needed |= {(cell.data, cell.vocab_size) for cell in phase.cells if cell.data in DATASETS}
    if not needed:
        return {}, ""
    try:
        for data, vocab_size in sorted(needed):
            check_data(data, vocab_size=vocab_size)
    except DataError as err:
        root = write_stand_in_data(folder, sorted({data for data, _ in needed}))
        note = (
            f"`submit` checks the data before it queues anything, and here {err.args[0].split(';')[0]}. "
            f"So {DATA_ROOT_ENV} named a stand-in in the data set's layout: a BPE tokenizer of its vocabulary "
            "trained on Python sources, and three shards of 20,000 tokens. The data check reads a few blocks "
            "of every shard, so it is likely shorter here than with the real data set's many shards."
        )
        return {DATA_ROOT_ENV: str(root)}, note
    return {}, f"{DATA_ROOT_ENV} from the environment passed the data check."


def write_stand_in_data(folder: Path, names: list[str]) -> Path:
    """Write a data root with each named data set's layout: its tokenizer and three small shards.

    The tokenizer is a SentencePiece BPE model of the data set's vocabulary,
    trained on the source of a few standard-library modules. The shards
    follow the modded-nanogpt format that `jobs.data.read_shard_header` checks.
    """
    import argparse
    import inspect
    import typing

    import numpy as np
    import sentencepiece

    from jobs.data import DATASETS, SHARD_HEADER_INTS, SHARD_MAGIC, SHARD_TOKEN_DTYPE, SHARD_VERSION

    root = folder / "data"
    text = folder / "tokenizer-text.txt"
    folder.mkdir(parents=True, exist_ok=True)
    text.write_text("".join(Path(module.__file__).read_text() for module in (inspect, argparse, typing)))
    for name in names:
        dataset = DATASETS[name]
        model = root / dataset.tokenizer
        model.parent.mkdir(parents=True, exist_ok=True)
        prefix = model.with_suffix("")
        sentencepiece.SentencePieceTrainer.train(
            input=str(text), model_prefix=str(prefix), vocab_size=dataset.vocab_size, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, minloglevel=2,
        )
        shards = root / dataset.shard_dir
        shards.mkdir(parents=True, exist_ok=True)
        tokens = (np.arange(20_000) % dataset.vocab_size).astype(SHARD_TOKEN_DTYPE)
        for shard in ("fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"):
            header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
            header[:3] = (SHARD_MAGIC, SHARD_VERSION, len(tokens))
            (shards / shard).write_bytes(header.tobytes() + tokens.tobytes())
    return root


# ---------------------------------------------------------------------------
# SLURM
# ---------------------------------------------------------------------------


def slurm_unavailable() -> str:
    """Return why no real submission can run here, or "" when a SLURM controller responds."""
    from pipeline.submit import slurm_answers

    missing = [name for name in COUNTED_COMMANDS if shutil.which(name) is None]
    if missing:
        return f"{', '.join(missing)} not on PATH (no SLURM client here)"
    if not slurm_answers():
        return "the SLURM controller did not answer `sinfo`"
    return ""


def max_array_size() -> int:
    """Return slurmctld's MaxArraySize from `scontrol show config` (1001, SLURM's default, if absent)."""
    result = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60)
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", result.stdout, flags=re.MULTILINE)
    return int(match.group(1)) if match else 1001


def expected_chunks(phase_args: list[str], array_limit: int) -> int:
    """Return the array jobs a submission of the phase needs: per size, ceil(cells / MaxArraySize).

    `submit` sends one task per cell on SLURM and gives each size its own
    arrays, because the time limit depends on the size.
    """
    from pipeline.phases import load_phase

    if phase_args[0] == "--phase-file":
        cells = load_phase(phase_file=phase_args[1]).cells
    else:
        cells = load_phase(phase_args[1]).cells
    per_size: dict[str, int] = {}
    for cell in cells:
        per_size[cell.size] = per_size.get(cell.size, 0) + 1
    return sum(math.ceil(count / max(1, array_limit)) for count in per_size.values())


def status_command_available() -> bool:
    """Return whether this checkout's CLI has a `status` command."""
    from pipeline.commands import COMMANDS

    return any(command.__name__.rsplit(".", 1)[-1] == "status" for command in COMMANDS)


def _cancel(job_ids: list[str]) -> float:
    """Cancel jobs with the real scancel and return its wall seconds."""
    if not job_ids:
        return 0.0
    started = time.perf_counter()
    subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=120, check=False)
    return time.perf_counter() - started


def _states_after_cancel(job_ids: list[str], timeout_s: float = 30.0) -> tuple[dict[str, int], int, int]:
    """Return (sacct state -> records, records with a node, squeue lines) for the cancelled jobs.

    sacct keeps the tasks of an array that never started in one record
    without a node ("None assigned"), so a record with a node is a task that
    started. Accounting learns of a submission or a cancellation some
    seconds late, so sacct is asked again until every job has a record and
    none is pending or running, for at most `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        result = subprocess.run(
            ["sacct", "-X", "-n", "--parsable2", "-o", "JobID,State,NodeList", "-j", ",".join(job_ids)],
            capture_output=True, text=True, timeout=120, check=False,
        )
        lines = [line for line in result.stdout.splitlines() if line.count("|") >= 2]
        settled = len(lines) >= len(job_ids) and not any(
            state in line for line in lines for state in ("PENDING", "RUNNING")
        )
        if settled or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    states: dict[str, int] = {}
    started = 0
    for line in lines:
        fields = line.split("|")
        # "CANCELLED by 0" -> "CANCELLED"
        state = (fields[1].split() or ["?"])[0]
        states[state] = states.get(state, 0) + 1
        if fields[2].strip() and fields[2].strip() != "None assigned":
            started += 1
    queue = subprocess.run(
        ["squeue", "-h", "-r", "-j", ",".join(job_ids)], capture_output=True, text=True, timeout=120, check=False
    )
    queued = len(queue.stdout.splitlines()) if queue.returncode == 0 else 0
    return states, started, queued


def submit_to_slurm(
    result: OrchestrationResult, workdir: Path, folder: Path, progress: Progress
) -> SlurmSubmission:
    """Submit every phase for real with held jobs, run `status` on them, then cancel them all.

    The jobs are cancelled even when a command fails part-way.
    """
    log = folder / "scheduler-calls.log"
    wrappers = folder / "bin"
    write_wrappers(wrappers, log, hold=True)
    data_env, submission_data_note = data_environment(result.phase_args, folder / "stand-in")
    submission = SlurmSubmission(max_array_size=max_array_size(), data_note=submission_data_note)
    try:
        for phase, phase_args in result.phase_args.items():
            log.unlink(missing_ok=True)
            args = ["submit", *phase_args, "--cluster", "slurm", "--workdir", str(workdir)]
            seconds, _ = run_pipeline(args, extra_path=wrappers, extra_env=data_env)
            timing = CommandTiming(
                label=f"submit {_phase_label(phase_args)} (real, held jobs)",
                command=_display(args, workdir), cells=result.cells[phase], seconds=[seconds], calls=count_calls(log),
            )
            submission.submit.append(timing)
            submission.job_ids += submitted_job_ids(log)
            submission.expected_chunks[phase] = expected_chunks(phase_args, submission.max_array_size)
            progress(f"orchestration: real submit of phase {phase} took {seconds:.1f} s, {timing.calls['sbatch']} sbatch call(s)")
        if result.status_available:
            for phase in result.phase_args:
                log.unlink(missing_ok=True)
                name = _phase_name(phase, result.phase_args[phase])
                args = ["status", "--phase", name, "--workdir", str(workdir)]
                seconds, _ = run_pipeline(args, extra_path=wrappers)
                submission.status.append(
                    CommandTiming(
                        label=f"status --phase {name} (held jobs pending)", command=_display(args, workdir),
                        cells=result.cells[phase], seconds=[seconds], calls=count_calls(log),
                    )
                )
                progress(f"orchestration: status of phase {phase} took {seconds:.1f} s")
    finally:
        submission.job_ids += [job for job in submitted_job_ids(log) if job not in submission.job_ids]
        submission.cancel_s = _cancel(submission.job_ids)
    if submission.job_ids:
        states, started, queued = _states_after_cancel(submission.job_ids)
        submission.states_after_cancel, submission.started_tasks, submission.queued_after_cancel = states, started, queued
    progress(f"orchestration: cancelled job(s) {', '.join(submission.job_ids) or 'none'}")
    return submission


# ---------------------------------------------------------------------------
# Collect
# ---------------------------------------------------------------------------


def run_collect_benchmark(counts: tuple[int, ...], repeats: int, root: Path, clean: bool) -> CollectSection:
    """Run bench/collect.py in a subprocess and return the Markdown section it prints.

    Its progress lines (stderr) pass through to this process's stderr.
    """
    script = REPO / "bench" / "collect.py"
    args = ["--counts", ",".join(str(c) for c in counts), "--repeats", str(repeats), "--root", str(root)]
    if clean:
        args.append("--clean")
    section = CollectSection(command=shlex.join(["python", "bench/collect.py", *args]))
    if not script.is_file():
        section.error = "bench/collect.py does not exist in this checkout"
        return section
    started = time.perf_counter()
    try:
        completed = subprocess.run(
            [sys.executable, str(script), *args], cwd=REPO, env=_environment(), stdout=subprocess.PIPE,
            stderr=None, text=True, timeout=3 * 3600,
        )
    except subprocess.TimeoutExpired:
        section.error = "bench/collect.py did not finish within 3 hours"
        return section
    section.seconds = time.perf_counter() - started
    if completed.returncode != 0:
        section.error = f"bench/collect.py exited with status {completed.returncode} (its stderr is above)"
        return section
    section.markdown = completed.stdout.strip()
    return section


# ---------------------------------------------------------------------------
# The whole section
# ---------------------------------------------------------------------------


def _phase_label(phase_args: list[str]) -> str:
    if phase_args[0] == "--phase-file":
        return f"--phase-file {Path(phase_args[1]).name}"
    return " ".join(phase_args)


def _phase_name(phase: str, phase_args: list[str]) -> str:
    return Path(phase_args[1]).stem if phase_args[0] == "--phase-file" else phase


def _display(args: list[str], workdir: Path) -> str:
    text = shlex.join(["python", "-m", "pipeline", *args])
    return text.replace(str(workdir), "$WORKDIR")


def _repeat(
    label: str, args: list[str], workdir: Path, cells: int, repeats: int, before=None, module: bool = True
) -> CommandTiming:
    """Time `python -m pipeline ARGS` (or `python ARGS` when not `module`) `repeats` times."""
    if module:
        command = _display(args, workdir)
    else:
        command = shlex.join(["python", *args])
    timing = CommandTiming(label=label, command=command, cells=cells)
    for _ in range(repeats):
        if before is not None:
            before()
        seconds, _ = run_pipeline(args) if module else run_python(args)
        timing.seconds.append(seconds)
    return timing


def measure_orchestration(
    folder: Path,
    *,
    quick: bool,
    repeats: int,
    skip_slurm: bool,
    collect_root: Path,
    progress: Progress,
) -> OrchestrationResult:
    """Time manifest, submit --dry-run, a real held submission, status and collect.

    `folder` receives the work folder, the wrapper scripts and their log. The
    quick mode uses the 36-cell micro phase, one repeat and 20 collect files.
    """
    workdir = folder / "workdir"
    phases = QUICK_PHASES if quick else STUDY_PHASES
    phase_args, cells, synthetic = resolve_phases(phases, folder / "specs")
    result = OrchestrationResult(
        phases=tuple(phase_args), phase_args=phase_args, cells=cells, synthetic_reason=synthetic, repeats=repeats,
        status_available=status_command_available(),
    )

    result.baselines = [
        _repeat("interpreter start and the CLI's parser", ["--help"], workdir, 0, repeats),
        _repeat("interpreter start and `import torch`", ["-c", "import torch"], workdir, 0, repeats, module=False),
    ]
    progress(
        "orchestration: interpreter start takes "
        + " and ".join(f"{t.median_s:.2f} s ({t.command})" for t in result.baselines)
    )
    for phase, args in phase_args.items():
        name = _phase_name(phase, args)
        manifest = workdir / "manifests" / f"{name}.csv"
        timing = _repeat(
            f"manifest {_phase_label(args)}", ["manifest", *args, "--workdir", str(workdir)], workdir, cells[phase],
            repeats, before=lambda path=manifest: path.unlink(missing_ok=True),
        )
        result.commands.append(timing)
        progress(f"orchestration: manifest of phase {phase} ({cells[phase]} cells) takes {timing.median_s:.1f} s")
    for phase, args in phase_args.items():
        timing = _repeat(
            f"submit {_phase_label(args)} --dry-run", ["submit", *args, "--dry-run", "--workdir", str(workdir)],
            workdir, cells[phase], repeats,
        )
        result.commands.append(timing)
        progress(f"orchestration: submit --dry-run of phase {phase} takes {timing.median_s:.1f} s")

    if skip_slurm:
        result.slurm_skipped = "--skip-slurm was given"
    else:
        result.slurm_skipped = slurm_unavailable()
    if not result.slurm_skipped:
        result.slurm = submit_to_slurm(result, workdir, folder, progress)

    counts = (20,) if quick else COLLECT_COUNTS
    progress(f"orchestration: collect benchmark at {', '.join(f'{c:,}' for c in counts)} files")
    result.collect = run_collect_benchmark(counts, repeats, collect_root, clean=quick)
    return result
