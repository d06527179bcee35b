"""`manifest`: write manifests/<phase>.csv, one row per cell."""

from __future__ import annotations

import argparse

from pipeline.commands import common

HELP = "write manifests/<phase>.csv, one row per cell"


def register(subparsers) -> None:
    parser = subparsers.add_parser("manifest", help=HELP, description=HELP)
    common.add_workdir(parser)
    common.add_phase(parser)
    common.add_cell_options(parser)


def run(args: argparse.Namespace) -> int:
    from pipeline import manifest
    from pipeline.workdir import Workdir

    phase = common.load_phase(args)
    workdir = Workdir.open(args.workdir)
    path = workdir.manifest(phase.name)
    changed = manifest.write(path, phase.cells)
    note = "" if changed else " (unchanged)"
    print(f"{path}: {len(phase.cells)} cells in {len(phase.blocks)} block(s){note}")
    return 0
