"""`bench`: measure training speed, bookkeeping costs and orchestration, and write BENCHMARKS.md.

Run it from the repository root: the benchmark code lives in the `bench`
folder next to `pipeline`, and the collect benchmark is the script
bench/collect.py.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from pipeline.errors import UsageError

HELP = "measure tokens/s, MFU, QAT and bookkeeping overhead and orchestration at study scale; write a Markdown page"

SECTIONS = ("throughput", "qat", "bookkeeping", "orchestration")


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help=HELP, description=HELP)
    parser.add_argument(
        "--out", default="BENCHMARKS.md", metavar="PATH",
        help="Markdown page to write, replaced atomically; sections of an older page that this command "
        "does not make are carried over (default: BENCHMARKS.md)",
    )
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"),
        help="device of the training sections: cpu (sizes tiny1 to 5M, fp32) or cuda "
        "(15M to 100M, bf16 autocast and torch.compile) (default: cpu)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="tiny sizes, a few steps, the micro phase and 20 collect files: checks that every section "
        "runs, in about a minute; the figures mean nothing",
    )
    parser.add_argument(
        "--skip-slurm", action="store_true",
        help="skip the real submission to SLURM and the status measurement that needs it",
    )
    parser.add_argument(
        "--only", metavar="SECTIONS",
        help=f"run only these sections, comma-separated: {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--threads", type=int, metavar="N",
        help="torch threads for the training sections and the matmul peak (default: torch's default, "
        "usually one per core); 1 gives steadier figures on a machine shared with other jobs",
    )
    parser.add_argument(
        "--repeats", type=int, metavar="N",
        help="runs of each orchestration command; the page reports the median (default: 3, or 1 with --quick)",
    )


def parse_sections(value: str | None) -> tuple[str, ...]:
    """Return the sections named by --only, in run order; raise UsageError for an unknown or empty list."""
    if value is None:
        return SECTIONS
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise UsageError(
            f"invalid --only {value!r}; expected one or more of {', '.join(SECTIONS)}, separated by commas"
        )
    return tuple(name for name in SECTIONS if name in names)


def run(args: argparse.Namespace) -> int:
    sections = parse_sections(args.only)
    for name in ("repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"invalid --{name} {value}; expected a whole number >= 1")
    out = Path(args.out)
    if out.exists() and not out.is_file():
        raise UsageError(f"--out {str(out)!r} is not a file; give the path of the Markdown page to write")
    if not out.absolute().parent.is_dir():
        raise UsageError(f"--out {str(out)!r}: folder {str(out.absolute().parent)!r} not found; create it first")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda, but torch finds no CUDA device; run on a GPU node or use --device cpu")
    try:
        from bench.suite import BenchOptions, run_and_write
    except ImportError as err:
        raise UsageError(
            f"the benchmark package cannot be imported ({err}); run the command from the repository root"
        ) from None

    repeats = args.repeats
    if repeats is None:
        repeats = 1 if args.quick else 3
    options = BenchOptions(
        out=out, device=args.device, quick=args.quick, skip_slurm=args.skip_slurm, sections=sections,
        repeats=repeats, threads=args.threads,
    )
    results = run_and_write(options, describe_command(args, sections))
    return 1 if results.errors else 0


def describe_command(args: argparse.Namespace, sections: tuple[str, ...]) -> str:
    """Return the command line that reproduces this run, for the top of the page."""
    words = ["python", "-m", "pipeline", "bench", "--out", args.out]
    if args.device != "cpu":
        words += ["--device", args.device]
    if args.quick:
        words.append("--quick")
    if args.skip_slurm:
        words.append("--skip-slurm")
    if sections != SECTIONS:
        words += ["--only", ",".join(sections)]
    if args.threads is not None:
        words += ["--threads", str(args.threads)]
    if args.repeats is not None:
        words += ["--repeats", str(args.repeats)]
    return shlex.join(words)
