"""One module per CLI command; each has `register(subparsers)` and `run(args) -> int`.

`COMMANDS` lists them in the order `--help` shows. A new command is a new
module here plus one entry in that tuple.
"""

from pipeline.commands import analyze, collect, manifest, report, resubmit, status, submit
from pipeline.commands import bench

COMMANDS = (manifest, submit, status, resubmit, collect, analyze, report, bench)
