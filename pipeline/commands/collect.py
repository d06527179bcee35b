"""`collect`: gather the result files of phases into results/<phase>.parquet."""

from __future__ import annotations

import argparse

from pipeline.commands import common
from pipeline.errors import UsageError

HELP = "gather result files into results/<phase>.parquet"


def register(subparsers) -> None:
    parser = subparsers.add_parser("collect", help=HELP, description=HELP)
    common.add_workdir(parser)
    common.add_phases(parser)


def run(args: argparse.Namespace) -> int:
    from pipeline.collect import collect_phase
    from pipeline.workdir import Workdir

    workdir = Workdir.open(args.workdir, create=False)
    names = common.phase_names(args.phase)
    for name in names:
        if not workdir.results(name).is_dir() and not workdir.manifest(name).is_file():
            raise UsageError(
                f"phase {name!r} has no results or manifest under {str(workdir.root)!r}; "
                "check --phase and --workdir"
            )
    for name in names:
        collected = collect_phase(workdir, name)
        unreadable = f"; {len(collected.unreadable)} unreadable" if collected.unreadable else ""
        print(f"phase {name}: collected {len(collected.table)} cells into {workdir.table(name)}{unreadable}")
    return 0
