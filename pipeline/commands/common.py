"""Arguments and loaders that several commands share."""

from __future__ import annotations

import argparse
import math
from typing import Any

from pipeline.errors import UsageError


def add_workdir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workdir", default=".", metavar="DIR",
        help="directory holding manifests/, results/ and logs/ (default: current directory)",
    )


def add_phase(parser: argparse.ArgumentParser) -> None:
    """Add --phase NAME | --phase-file PATH (exactly one)."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--phase", metavar="NAME", help="packaged phase: micro, 2 or 5")
    group.add_argument("--phase-file", metavar="PATH", help="your own phase spec (TOML)")


def add_phases(parser: argparse.ArgumentParser) -> None:
    """Add --phase NAMES, a comma-separated list of phases."""
    parser.add_argument(
        "--phase", required=True, metavar="NAMES",
        help="phase name, several separated by commas (e.g. 2,5), or all",
    )


def add_cell_options(parser: argparse.ArgumentParser) -> None:
    """Add the options that change which cells a phase has."""
    parser.add_argument(
        "--data", metavar="DIR",
        help="training data for every cell: a directory of .txt files or FineWeb .bin shards, "
        "stdlib-docs, or a data set name such as fineweb10B_sp1024 (read under $QAT_DATA_ROOT); "
        "byte-level text sets the vocabulary to 256 (default: the phase's own data)",
    )
    parser.add_argument(
        "--size-override", metavar="SIZE",
        help="train every cell at this size instead (e.g. tiny1) to try a phase on a small machine",
    )


def load_phase(args: argparse.Namespace) -> Any:
    """Load the phase that --phase/--phase-file and the cell options describe."""
    from pipeline.phases import load_phase as load

    data = None
    if getattr(args, "data", None):
        from jobs.data import DataError, resolve_data

        try:
            data = resolve_data(args.data)
        except DataError as err:
            raise UsageError(str(err)) from None
    return load(
        getattr(args, "phase", None),
        getattr(args, "phase_file", None),
        data=data,
        size_override=getattr(args, "size_override", None),
    )


def phase_names(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise UsageError(f"invalid --phase {value!r}; give a phase name such as micro, 2 or 5")
    return names


def load_tables(args: argparse.Namespace):
    """Return (workdir, collected table, manifest table or None) of the --phase list."""
    import pandas as pd

    from pipeline import manifest as manifest_lib
    from pipeline.workdir import Workdir

    workdir = Workdir.open(args.workdir, create=False)
    names = phase_names(args.phase)
    if names == ["all"]:
        from pipeline.collect import discover_phases

        names = [name for name in discover_phases(workdir) if workdir.table(name).is_file()]
        if not names:
            raise UsageError(
                f"--phase all found no collected table under {str(workdir.root)!r}; "
                "run `python -m pipeline collect --phase all` first"
            )
    tables, manifests = [], []
    for name in names:
        path = workdir.table(name)
        if not path.is_file():
            raise UsageError(
                f"no collected table for phase {name!r} at {str(path)!r}; run "
                f"`python -m pipeline collect --phase {name}` first"
            )
        tables.append(pd.read_parquet(path))
        if workdir.manifest(name).is_file():
            cells = manifest_lib.read(workdir.manifest(name))
            manifests.append(pd.DataFrame([c.to_row() for c in cells]))
    table = pd.concat(tables, ignore_index=True)
    manifest = pd.concat(manifests, ignore_index=True) if manifests else None
    if table.empty:
        raise UsageError(f"phase {args.phase!r} has no finished cells yet; collect again when some are done")
    return workdir, table, manifest


def add_margin(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--margin", type=margin_value, default=0.005, metavar="BPB",
        help="TOST equivalence margin in bits per byte, above 0 (default: 0.005)",
    )


def margin_value(text: str) -> float:
    """Parse --margin: a finite number of bits per byte above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --margin {text!r}; expected a number of bits per byte such as 0.005") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"invalid --margin {text!r}; expected a positive number of bits per byte such as 0.005")
    return value
