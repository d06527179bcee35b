"""`status`: count the cells of a phase per state, per block, with a progress bar."""

from __future__ import annotations

import argparse
import time

from pipeline.commands import common
from pipeline.errors import UsageError

HELP = "count the cells of a phase per state (done, running, failed...) and per block"

STATE_CHOICES = ("done", "running", "pending", "failed", "timed-out", "diverged", "never-submitted")


def register(subparsers) -> None:
    parser = subparsers.add_parser("status", help=HELP, description=HELP)
    common.add_workdir(parser)
    parser.add_argument("--phase", required=True, metavar="NAME", help="phase name, as in manifests/<NAME>.csv")
    parser.add_argument(
        "--cells", choices=STATE_CHOICES, metavar="STATE",
        help=f"list the cells in one state with their job and log path; STATE is one of {', '.join(STATE_CHOICES)}",
    )
    parser.add_argument(
        "--watch", type=float, metavar="SECONDS",
        help="print the counts again every SECONDS until no cell is running or pending",
    )


def load_cells(workdir, phase: str):
    """Return the cells of `phase` from its manifest, or raise UsageError naming the fix."""
    from pipeline import manifest

    path = workdir.manifest(phase)
    if not path.is_file():
        raise UsageError(
            f"no manifest for phase {phase!r} at {str(path)!r}; check --phase and --workdir, "
            f"or run `python -m pipeline submit --phase {phase}` first (it writes the manifest)"
        )
    return manifest.read(path)


def run(args: argparse.Namespace) -> int:
    from pipeline import status
    from pipeline.workdir import Workdir

    if args.watch is not None and not args.watch > 0:
        raise UsageError(f"invalid --watch {args.watch}; expected a positive number of seconds")
    workdir = Workdir.open(args.workdir, create=False)
    cells = load_cells(workdir, args.phase)
    query = status.SchedulerQuery()
    while True:
        current = status.phase_status(workdir, args.phase, cells, query)
        if args.cells:
            print(status.format_cells(current, args.cells))
        else:
            print(status.format_table(current))
        counts = current.counts()
        if args.watch is None or counts[status.RUNNING] + counts[status.PENDING] == 0:
            return 0
        time.sleep(args.watch)
        print()
