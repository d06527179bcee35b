"""`resubmit`: submit the failed, timed-out and never-submitted cells of a phase again.

Done, running and pending cells are left alone; diverged ones only with
--include-diverged. A resubmitted cell resumes from its checkpoint, which
lives at a path of its own, and its ledger entry counts one more attempt.
"""

from __future__ import annotations

import argparse
import sys
import time

from pipeline.commands import common
from pipeline.commands.status import load_cells
from pipeline.commands.submit import (
    add_dispatch_options,
    check_dispatch_options,
    check_phase_data,
    dispatch,
    print_dry_run,
)

HELP = "submit the failed, timed-out and never-submitted cells of a phase again"
DESCRIPTION = (
    f"{HELP}. Done, running and pending cells are left alone; diverged ones only with "
    "--include-diverged. Resubmitted cells resume from their checkpoints."
)

# Diverged results move here on --include-diverged, out of the collector's way.
SUPERSEDED_DIR = "superseded"


def register(subparsers) -> None:
    parser = subparsers.add_parser("resubmit", help=HELP, description=DESCRIPTION)
    common.add_workdir(parser)
    parser.add_argument("--phase", required=True, metavar="NAME", help="phase name, as in manifests/<NAME>.csv")
    parser.add_argument(
        "--include-diverged", action="store_true",
        help="also retrain diverged cells; their result files move to results/<phase>/superseded/",
    )
    add_dispatch_options(parser)


def run(args: argparse.Namespace) -> int:
    from pipeline import status, submit
    from pipeline.workdir import Workdir

    profile = check_dispatch_options(args)
    workdir = Workdir.open(args.workdir, create=False)
    cells = load_cells(workdir, args.phase)
    check_phase_data(cells)
    current = status.phase_status(workdir, args.phase, cells)
    selected_states = [status.FAILED, status.TIMED_OUT, status.NEVER_SUBMITTED]
    if args.include_diverged:
        selected_states.append(status.DIVERGED)
    counts = current.counts()
    todo = [item.cell for item in current.cells if item.state in selected_states]

    selected = ", ".join(f"{counts[state]} {state}" for state in selected_states)
    other_states = [status.DONE, status.RUNNING, status.PENDING] + ([] if args.include_diverged else [status.DIVERGED])
    left_alone = ", ".join(f"{counts[state]} {state}" for state in other_states)
    hint = " (pass --include-diverged to retrain them)" if counts[status.DIVERGED] and not args.include_diverged else ""
    print(f"phase {args.phase}: {len(todo)} to resubmit ({selected}); left alone: {left_alone}{hint}")
    if args.dry_run:
        print_dry_run(args, workdir, args.phase, todo, profile)
        return 0
    if not todo:
        return 0

    cluster = submit.resolve_cluster(args.cluster)
    if args.include_diverged:
        move_aside(workdir, args.phase, [item.cell for item in current.in_state(status.DIVERGED)])
    return dispatch(args, workdir, args.phase, cells, todo, cluster, profile)


def move_aside(workdir, phase: str, cells) -> None:
    """Move the result files of `cells` to results/<phase>/superseded/, keeping any earlier copy."""
    folder = workdir.results(phase) / SUPERSEDED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for cell in cells:
        source = workdir.result(phase, cell.cell_id)
        target = folder / f"{cell.cell_id}.{stamp}.h5"
        source.replace(target)
        print(f"moved diverged result {source} to {target}", file=sys.stderr)
