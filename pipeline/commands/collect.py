"""`collect`: gather the result files of phases into results/<phase>.parquet.

Prints one summary line on stdout, for cron mail. Exit status:

  0  the run completed. Bad files do not change this: they are quarantined
     and counted in the summary.
  0  with "another collect is running; skipped", under --no-wait, when
     another collect holds the lock. Two overlapping nightly runs are not a
     failure, and a non-zero status would alert someone for nothing.
  1  a phase could not be collected, or a file could not be read or moved
     (permission or I/O errors).
  2  invalid arguments.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.commands import common

HELP = "gather result files into results/<phase>.parquet, reading only new or changed ones"


def register(subparsers) -> None:
    parser = subparsers.add_parser("collect", help=HELP, description=HELP)
    common.add_workdir(parser)
    parser.add_argument(
        "--phase", required=True, metavar="NAMES",
        help="phase name, several separated by commas (e.g. 2,5), or all: "
        "every phase with a manifest or a results folder under the workdir",
    )
    parser.add_argument(
        "--no-wait", action="store_true",
        help="when another collect holds the lock, print \"another collect is running; skipped\" "
        "and exit 0 instead of waiting",
    )
    parser.add_argument(
        "--jobs", type=int, metavar="N",
        help="processes that read result files (default: the CPUs available, at most 4)",
    )


def run(args: argparse.Namespace) -> int:
    from pipeline.collect import collect, default_jobs, lock_path, resolve_phases
    from pipeline.errors import UsageError
    from pipeline.lock import LockBusyError
    from pipeline.workdir import Workdir

    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"invalid --jobs {args.jobs}; expected a whole number >= 1")
    workdir = Workdir.open(args.workdir, create=False)
    phases = resolve_phases(workdir, args.phase)
    jobs = args.jobs if args.jobs is not None else default_jobs()
    try:
        report = collect(workdir, phases, wait=not args.no_wait, jobs=jobs)
    except LockBusyError as busy:
        print(f"another collect is running; skipped (lock {busy.path} held by {busy.holder})")
        return 0
    except OSError as err:
        sys.stderr.write(
            f"error: cannot take the collect lock {str(lock_path(workdir))!r}: {err}; "
            "check that the results folder exists and is writable\n"
        )
        return 1
    print(report.summary_line())
    return 1 if report.failed else 0
