"""`submit`: send every cell without a result to SLURM (or local processes).

The options and the dry-run report here are shared with `resubmit`.
"""

from __future__ import annotations

import argparse
import shutil
import sys

from pipeline.commands import common
from pipeline.errors import UsageError

HELP = "submit every cell without a result as array jobs"


def register(subparsers) -> None:
    parser = subparsers.add_parser("submit", help=HELP, description=HELP)
    common.add_workdir(parser)
    common.add_phase(parser)
    common.add_cell_options(parser)
    add_dispatch_options(parser)


def add_dispatch_options(parser: argparse.ArgumentParser) -> None:
    """Add the options of `submit` and `resubmit` that set where and how cells run."""
    parser.add_argument(
        "--cluster", default="auto", choices=("auto", "slurm", "local", "debug"),
        help="where to run: slurm when a SLURM controller responds, else local processes (default: auto)",
    )

    parser.add_argument(
        "--profile", metavar="PATH",
        help="cluster profile (TOML): partition, account, time limits, setup lines... "
        "(see sbatch/example-profile.toml)",
    )
    parser.add_argument("--wait", action="store_true", help="block until every job ends, with a progress bar")
    parser.add_argument(
        "--dry-run", action="store_true",
        help="print the cells, the arrays, the first array's sbatch script and an estimate; submit nothing",
    )

    parser.add_argument("--cells-per-task", type=int, metavar="K", help="run K cells one after another in each array task")
    parser.add_argument(
        "--max-parallel", type=int, metavar="N",
        help="run at most N array tasks at once (sbatch --array=...%%N; several arrays run one after another)",
    )
    # Default: a checkpoint of a 100M cell (0.8 GB of weights and optimiser
    # state) took 1.7-3.0 s with jobs.checkpoint.save_checkpoint on a 2-core
    # VM's virtio disk. So one every 10 minutes costs at most 0.5% of the run
    # time, and 350M (3.5x the bytes, about 10 s by extrapolation) stays below
    # 2%. Cluster filesystems differ: the log line "checkpoint at step N in
    # X s" shows the real figure.
    parser.add_argument(
        "--checkpoint-minutes", type=float, default=10.0, metavar="MIN",
        help="minutes between checkpoints of a running cell (default: 10)",
    )
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep a cell's checkpoint after its result is written")
    parser.add_argument(
        "--country", metavar="ISO3",
        help="country of the grid, for emissions (default: the profile's country, else USA)",
    )


def run(args: argparse.Namespace) -> int:
    from pipeline import manifest, submit
    from pipeline.workdir import Workdir

    phase = common.load_phase(args)
    profile = check_dispatch_options(args)
    check_phase_data(phase.cells, warn_only=args.dry_run)
    workdir = Workdir.open(args.workdir, create=not args.dry_run)
    todo = submit.unfinished(workdir, phase.cells)
    busy = live_cells(workdir, phase.name, todo)
    todo = [cell for cell in todo if cell.cell_id not in busy]
    skipped = f", {len(busy)} running or pending (left alone)" if busy else ""
    summary = (
        f"phase {phase.name}: {len(phase.cells)} cells, {len(phase.cells) - len(todo) - len(busy)} done"
        f"{skipped}, {len(todo)} to submit"
    )
    if args.dry_run:
        print(summary)
        print_dry_run(args, workdir, phase.name, todo, profile)
        return 0

    cluster = submit.resolve_cluster(args.cluster)
    manifest.write(workdir.manifest(phase.name), phase.cells)
    if not todo:
        print(f"phase {phase.name}: all {len(phase.cells)} cells are done, running or pending; submitted 0 cells")
        return 0
    print(summary)
    return dispatch(args, workdir, phase.name, phase.cells, todo, cluster, profile)


def check_dispatch_options(args: argparse.Namespace):
    """Validate the numeric options and load --profile; return the profile or None."""
    from pipeline.profile import load_profile

    for name in ("cells_per_task", "max_parallel"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"invalid --{name.replace('_', '-')} {value}; expected a whole number >= 1")
    if not args.checkpoint_minutes > 0:
        raise UsageError(f"invalid --checkpoint-minutes {args.checkpoint_minutes}; expected a positive number")
    if args.country is not None and not (len(args.country) == 3 and args.country.isalpha() and args.country.isupper()):
        raise UsageError(f"invalid --country {args.country!r}; expected an ISO 3166 alpha-3 code such as USA or DEU")
    return load_profile(args.profile) if args.profile else None


def check_phase_data(cells, warn_only: bool = False) -> None:
    """Check each data source of the cells on this node, so a bad shard fails before anything is queued.

    With `warn_only` (a dry run, which queues nothing) a problem is printed
    as a warning line instead, so a plan can be read before the data exists.
    """
    from jobs.data import DataError, check_data

    for data, vocab_size in sorted({(cell.data, cell.vocab_size) for cell in cells}):
        try:
            check_data(data, vocab_size=vocab_size)
        except DataError as err:
            if not warn_only:
                raise UsageError(str(err)) from None
            print(f"warning: {err}", file=sys.stderr)


def live_cells(workdir, phase: str, cells) -> set[str]:
    """Return the ids of `cells` whose latest submission is running or pending.

    Asks the scheduler only when some cell has a ledger entry.
    """
    from pipeline import ledger, status

    latest = ledger.latest(ledger.read(ledger.path_for(workdir.results(phase))))
    submitted = [cell for cell in cells if cell.cell_id in latest]
    if not submitted:
        return set()
    states = status.phase_status(workdir, phase, submitted)
    return {item.cell.cell_id for item in states.cells if item.state in (status.RUNNING, status.PENDING)}


def dispatch(args, workdir, phase_name: str, all_cells, todo, cluster: str, profile) -> int:
    """Submit `todo`, print the job ids, and with --wait block until they end."""
    from jobs.run import RunOptions
    from pipeline import submit
    from pipeline.profile import DEFAULT_COUNTRY

    country = args.country or (profile.country if profile and profile.country else DEFAULT_COUNTRY)
    options = RunOptions(
        workdir=str(workdir.root),
        checkpoint_every_s=args.checkpoint_minutes * 60.0,
        keep_checkpoint=args.keep_checkpoints,
        country=country,
    )
    submission = submit.submit(
        workdir, todo, cluster, options, args.cells_per_task, args.max_parallel, profile=profile
    )
    job_ids = sorted({str(job.job_id).split("_")[0] for job in submission.jobs}, key=lambda j: (len(j), j))
    arrays = f" in {len(submission.chunks)} array(s)" if submission.chunks else ""
    print(
        f"phase {phase_name}: submitted {submission.cell_count} cells in {len(submission.jobs)} task(s){arrays} "
        f"on {cluster}; job id(s) {', '.join(job_ids) or 'none'}; logs in {submission.log_folder.parent}"
    )
    for line in submission.errors:
        print(f"error: {line}", file=sys.stderr)
    if not args.wait or not submission.jobs:
        return 1 if submission.errors else 0
    errors = submit.wait(workdir, submission)
    done = len(all_cells) - len(submit.unfinished(workdir, all_cells))
    print(f"phase {phase_name}: {done}/{len(all_cells)} cells have results")
    for line in errors:
        print(line, file=sys.stderr)
    return 1 if errors or submission.errors else 0


def print_dry_run(args, workdir, phase_name: str, todo, profile) -> None:
    """Print the cells, the arrays, the first array's sbatch script and a cost estimate."""
    from pipeline import estimate, submit

    for cell in todo:
        print(
            f"  {cell.cell_id}  {cell.block:<14} {cell.bits:<5} warmdown={cell.warmdown:<5} "
            f"lr_mult={cell.lr_mult:<4} size={cell.size:<6} seed={cell.seed} steps={cell.steps}"
        )
    if not todo:
        return
    if args.cluster == "slurm" or (args.cluster == "auto" and shutil.which("sbatch")):
        array_limit, source = submit.max_array_size() if shutil.which("scontrol") else (
            submit.DEFAULT_MAX_ARRAY_SIZE, "scontrol not on PATH; assuming SLURM's default"
        )
        chunks = submit.plan(todo, args.cells_per_task or 1, profile, array_limit)
        print(f"arrays on slurm (MaxArraySize {array_limit}, {source}):")
        for number, chunk in enumerate(chunks, start=1):
            longest = max(len(task) for task in chunk.tasks)
            running = min(args.max_parallel or len(chunk.tasks), len(chunk.tasks))
            print(
                f"  array {number}: size {chunk.size}, {len(chunk.tasks)} task(s) of up to {longest} cell(s), "
                f"time limit {chunk.time_min} min, at most {running} running"
            )
        if args.max_parallel and len(chunks) > 1:
            print("  each array after the first starts when the one before has ended (--dependency=afterany)")
        log_folder = workdir.logs(phase_name) / "%j"
        parameters = submit.sbatch_parameters(phase_name, chunks[0], profile, args.max_parallel)
        print("sbatch script of array 1 (not submitted):")
        for line in submit.render_sbatch(log_folder, parameters, len(chunks[0].tasks)).splitlines():
            print(f"  | {line}")
    else:
        cluster = "local" if args.cluster == "auto" else args.cluster
        print(f"{cluster}: tasks run as processes on this machine; no sbatch script")
    rates = estimate.measured_rates(workdir, phase_name)
    print(
        "estimate per block (measured tokens/s of finished cells of the same size, else the profile's "
        "tflops; start-up and evaluations not included):"
    )
    for line in estimate.format_estimates(estimate.estimate(todo, profile, rates)).splitlines():
        print(f"  {line}")
