"""Command line: `python -m pipeline COMMAND [options]`.

Every command reads and writes under `--workdir` (default: the current
directory). Bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline.commands import COMMANDS
from pipeline.errors import UsageError


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit with 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def build_parser() -> Parser:
    parser = Parser(prog="python -m pipeline", description="Run and analyse a factorial QAT study on SLURM.")
    parser.add_argument(
        "--log-level", default=os.environ.get("QAT_LOG_LEVEL", "WARNING"),
        help="logging level: DEBUG, INFO, WARNING, ERROR (default: WARNING, or $QAT_LOG_LEVEL)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = str(args.log_level).upper()
    if not isinstance(logging.getLevelName(level), int):
        sys.stderr.write(f"error: invalid --log-level {args.log_level!r}; expected DEBUG, INFO, WARNING or ERROR\n")
        return 2
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    runners = {command.__name__.rsplit(".", 1)[-1]: command.run for command in COMMANDS}
    try:
        return runners[args.command](args)
    except UsageError as err:
        sys.stderr.write(f"error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`... | head`): stop quietly, and point
        # stdout at /dev/null so Python's exit flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
