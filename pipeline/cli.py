"""Command line: `python -m pipeline COMMAND --phase NAME [options]`.

Every command reads and writes under `--workdir` (default: the current
directory). Bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline.errors import UsageError

log = logging.getLogger("pipeline")


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit with 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def _add_common(parser: argparse.ArgumentParser, multi_phase: bool = False) -> None:
    parser.add_argument(
        "--workdir", default=".", metavar="DIR",
        help="directory holding manifests/, results/ and logs/ (default: current directory)",
    )
    if multi_phase:
        parser.add_argument(
            "--phase", required=True, metavar="NAMES",
            help="phase name, or several separated by commas (e.g. 2,5)",
        )
    else:
        group = parser.add_mutually_exclusive_group(required=True)
        group.add_argument("--phase", metavar="NAME", help="packaged phase: micro, 2 or 5")
        group.add_argument("--phase-file", metavar="PATH", help="your own phase spec (TOML)")


def _add_cells(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", metavar="DIR",
        help="training data: a directory of .txt files or of FineWeb .bin shards "
        "(default: the phase's source, usually the embedded stdlib-docs corpus)",
    )
    parser.add_argument(
        "--size-override", metavar="SIZE",
        help="train every cell at this size instead (e.g. tiny1) to try a phase on a small machine",
    )


def build_parser() -> Parser:
    parser = Parser(prog="python -m pipeline", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--log-level", default=os.environ.get("QAT_LOG_LEVEL", "WARNING"),
        help="logging level (default: WARNING, or $QAT_LOG_LEVEL)",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = commands.add_parser("manifest", help="write manifests/<phase>.csv, one row per cell")
    _add_common(p)
    _add_cells(p)

    p = commands.add_parser("submit", help="submit every cell without a result")
    _add_common(p)
    _add_cells(p)
    p.add_argument(
        "--cluster", default="auto", choices=("auto", "slurm", "local", "debug"),
        help="where to run: slurm when sbatch is on PATH, else local processes (default: auto)",
    )
    p.add_argument("--wait", action="store_true", help="block until every job ends, with a progress bar")
    p.add_argument("--dry-run", action="store_true", help="list the cells that would be submitted; submit nothing")
    p.add_argument("--cells-per-task", type=int, metavar="K", help="run K cells one after another in each array task")
    p.add_argument("--max-parallel", type=int, metavar="N", help="run at most N array tasks at once (sbatch --array=...%%N)")
    p.add_argument(
        "--checkpoint-minutes", type=float, default=10.0, metavar="MIN",
        help="minutes between checkpoints of a running cell (default: 10)",
    )
    p.add_argument("--keep-checkpoints", action="store_true", help="keep a cell's checkpoint after its result is written")
    p.add_argument("--country", default="USA", metavar="ISO3", help="country of the grid, for emissions (default: USA)")

    p = commands.add_parser("collect", help="gather result files into results/<phase>.parquet")
    _add_common(p, multi_phase=True)

    p = commands.add_parser("analyze", help="fit the regressions and print the study's results")
    _add_common(p, multi_phase=True)
    p.add_argument("--margin", type=float, default=0.005, metavar="BPB", help="TOST equivalence margin in bits per byte (default: 0.005)")

    p = commands.add_parser("report", help="write a report folder with figures")
    _add_common(p, multi_phase=True)
    p.add_argument("--out", metavar="DIR", help="report folder (default: <workdir>/report)")
    p.add_argument("--margin", type=float, default=0.005, metavar="BPB", help="TOST equivalence margin in bits per byte (default: 0.005)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=str(args.log_level).upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return COMMANDS[args.command](args)
    except UsageError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


def _phases(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise UsageError(f"invalid --phase {value!r}; give a phase name such as micro, 2 or 5")
    return names


def _load(args: argparse.Namespace):
    from pipeline.phases import load_phase

    data = None
    if getattr(args, "data", None):
        from jobs.data import DataError, resolve_data

        try:
            data = resolve_data(args.data)
        except DataError as err:
            raise UsageError(str(err)) from None
    return load_phase(args.phase, args.phase_file, data=data, size_override=args.size_override)


def cmd_manifest(args: argparse.Namespace) -> int:
    from pipeline import manifest
    from pipeline.workdir import Workdir

    phase = _load(args)
    workdir = Workdir.open(args.workdir)
    path = workdir.manifest(phase.name)
    changed = manifest.write(path, phase.cells)
    print(f"{path}: {len(phase.cells)} cells in {len(phase.blocks)} block(s){'' if changed else ' (unchanged)'}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from jobs.run import RunOptions
    from pipeline import manifest, submit
    from pipeline.workdir import Workdir

    phase = _load(args)
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
            print(f"  {cell.cell_id}  {cell.block:<14} {cell.bits:<5} warmdown={cell.warmdown:<5} "
                  f"lr_mult={cell.lr_mult:<4} size={cell.size:<6} seed={cell.seed} steps={cell.steps}")
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


def cmd_collect(args: argparse.Namespace) -> int:
    from pipeline.collect import collect_phase
    from pipeline.workdir import Workdir

    workdir = Workdir.open(args.workdir)
    for name in _phases(args.phase):
        if not workdir.results(name).is_dir() and not workdir.manifest(name).is_file():
            raise UsageError(
                f"phase {name!r} has no results or manifest under {str(workdir.root)!r}; "
                "check --phase and --workdir"
            )
        collected = collect_phase(workdir, name)
        print(
            f"phase {name}: collected {len(collected.table)} cells into {workdir.table(name)}"
            + (f"; {len(collected.unreadable)} unreadable" if collected.unreadable else "")
        )
    return 0


def _tables(args: argparse.Namespace):
    import pandas as pd

    from pipeline import manifest as manifest_lib
    from pipeline.workdir import Workdir

    workdir = Workdir.open(args.workdir, create=False)
    tables, manifests = [], []
    for name in _phases(args.phase):
        path = workdir.table(name)
        if not path.is_file():
            raise UsageError(
                f"no collected table for phase {name!r} at {str(path)!r}; run "
                f"`python -m pipeline collect --phase {name}` first"
            )
        tables.append(pd.read_parquet(path))
        if workdir.manifest(name).is_file():
            manifests.append(pd.DataFrame([c.to_row() for c in manifest_lib.read(workdir.manifest(name))]))
    table = pd.concat(tables, ignore_index=True)
    manifest = pd.concat(manifests, ignore_index=True) if manifests else None
    return workdir, table, manifest


def cmd_analyze(args: argparse.Namespace) -> int:
    import analysis

    _, table, manifest = _tables(args)
    if table.empty:
        raise UsageError(f"phase {args.phase!r} has no finished cells yet; collect again when some are done")
    result = analysis.analyze(table, manifest, margin=args.margin)
    print(analysis.format_text(result))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import analysis

    workdir, table, manifest = _tables(args)
    if table.empty:
        raise UsageError(f"phase {args.phase!r} has no finished cells yet; collect again when some are done")
    out = Path(args.out) if args.out else workdir.root / "report"
    path = analysis.write_report(table, out, manifest=manifest, margin=args.margin)
    print(f"report written to {path}")
    return 0


COMMANDS = {
    "manifest": cmd_manifest,
    "submit": cmd_submit,
    "collect": cmd_collect,
    "analyze": cmd_analyze,
    "report": cmd_report,
}
