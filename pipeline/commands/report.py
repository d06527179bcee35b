"""`report`: write a folder with a Markdown report and its figures."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.commands import common

HELP = "write a report folder with figures"


def register(subparsers) -> None:
    parser = subparsers.add_parser("report", help=HELP, description=HELP)
    common.add_workdir(parser)
    common.add_phases(parser)
    parser.add_argument("--out", metavar="DIR", help="report folder (default: <workdir>/report)")
    common.add_margin(parser)


def run(args: argparse.Namespace) -> int:
    import analysis

    workdir, table, manifest = common.load_tables(args)
    out = Path(args.out) if args.out else workdir.root / "report"
    path = analysis.write_report(table, out, manifest=manifest, margin=args.margin)
    print(f"report written to {path}")
    return 0
