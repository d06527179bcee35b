"""`analyze`: fit the regressions and print each of the study's findings."""

from __future__ import annotations

import argparse

from pipeline.commands import common

HELP = "fit the regressions and print the study's results"


def register(subparsers) -> None:
    parser = subparsers.add_parser("analyze", help=HELP, description=HELP)
    common.add_workdir(parser)
    common.add_phases(parser)
    common.add_margin(parser)


def run(args: argparse.Namespace) -> int:
    import analysis

    _, table, manifest = common.load_tables(args)
    result = analysis.analyze(table, manifest, margin=args.margin)
    print(analysis.format_text(result))
    return 0
