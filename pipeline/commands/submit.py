"""`submit`: send every cell without a result to SLURM (or local processes)."""

from __future__ import annotations

import argparse
import sys

from pipeline.commands import common
from pipeline.errors import UsageError

HELP = "submit every cell without a result as an array job"


def register(subparsers) -> None:
    parser = subparsers.add_parser("submit", help=HELP, description=HELP)
    common.add_workdir(parser)
    common.add_phase(parser)
    common.add_cell_options(parser)
    parser.add_argument(
        "--cluster", default="auto", choices=("auto", "slurm", "local", "debug"),
        help="where to run: slurm when a SLURM controller answers, else local processes (default: auto)",
    )
    parser.add_argument("--wait", action="store_true", help="block until every job ends, with a progress bar")
    parser.add_argument("--dry-run", action="store_true", help="list the cells that would be submitted; submit nothing")
    parser.add_argument("--cells-per-task", type=int, metavar="K", help="run K cells one after another in each array task")
    parser.add_argument("--max-parallel", type=int, metavar="N", help="run at most N array tasks at once (sbatch --array=...%%N)")
    parser.add_argument(
        "--checkpoint-minutes", type=float, default=10.0, metavar="MIN",
        help="minutes between checkpoints of a running cell (default: 10)",
    )
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep a cell's checkpoint after its result is written")
    parser.add_argument("--country", default="USA", metavar="ISO3", help="country of the grid, for emissions (default: USA)")


def run(args: argparse.Namespace) -> int:
    from jobs.run import RunOptions
    from pipeline import manifest, submit
    from pipeline.workdir import Workdir

    phase = common.load_phase(args)
    for name in ("cells_per_task", "max_parallel"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"invalid --{name.replace('_', '-')} {value}; expected a whole number >= 1")
    if args.checkpoint_minutes <= 0:
        raise UsageError(f"invalid --checkpoint-minutes {args.checkpoint_minutes}; expected a positive number")
    workdir = Workdir.open(args.workdir, create=not args.dry_run)
    todo = submit.unfinished(workdir, phase.cells)
    if args.dry_run:
        print(f"phase {phase.name}: {len(phase.cells)} cells, {len(phase.cells) - len(todo)} done, {len(todo)} to submit")
        for cell in todo:
            print(
                f"  {cell.cell_id}  {cell.block:<14} {cell.bits:<5} warmdown={cell.warmdown:<5} "
                f"lr_mult={cell.lr_mult:<4} size={cell.size:<6} seed={cell.seed} steps={cell.steps}"
            )
        return 0

    cluster = submit.resolve_cluster(args.cluster)
    manifest.write(workdir.manifest(phase.name), phase.cells)
    if not todo:
        print(f"phase {phase.name}: all {len(phase.cells)} cells are done; submitted 0 cells")
        return 0
    options = RunOptions(
        workdir=str(workdir.root),
        checkpoint_every_s=args.checkpoint_minutes * 60.0,
        keep_checkpoint=args.keep_checkpoints,
        country=args.country,
    )
    submission = submit.submit(workdir, todo, cluster, options, args.cells_per_task, args.max_parallel)
    job_ids = sorted({str(job.job_id).split("_")[0] for job in submission.jobs})
    print(
        f"phase {phase.name}: submitted {submission.cell_count} cells in {len(submission.jobs)} task(s) "
        f"on {cluster}; job id(s) {', '.join(job_ids)}; logs in {submission.log_folder.parent}"
    )
    if not args.wait:
        return 0
    errors = submit.wait(workdir, submission)
    done = len(phase.cells) - len(submit.unfinished(workdir, phase.cells))
    print(f"phase {phase.name}: {done}/{len(phase.cells)} cells have results")
    for line in errors:
        print(line, file=sys.stderr)
    return 1 if errors else 0
