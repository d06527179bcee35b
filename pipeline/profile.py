"""Cluster profiles: a TOML file with the sbatch settings of one cluster.

`submit --profile PATH` and `resubmit --profile PATH` read it. Every value
becomes an sbatch option that submitit writes as a quoted `#SBATCH` line, so
no value is pasted into shell text, with one exception: `setup` lines run in
the job script before the training step (module loads, environment
activation). They are shell by nature and trusted input, like the sbatch
script they end up in. `sbatch/example-profile.toml` documents every key.

Validation is strict, because a typo in a profile otherwise surfaces hours
later as a pending job or a wrong partition. An unknown key, a wrong type or
a bad value is a UsageError that names the file, the key and the fix.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.model import SIZES
from pipeline.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_TIME_MINUTES = 60
DEFAULT_SIGNAL_DELAY_S = 90
DEFAULT_COUNTRY = "USA"

# SLURM names of partitions, accounts and QOS: letters, digits, '_', '.', '-'.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
# Feature names joined by SLURM's constraint operators: & (and), | (or),
# [] (matching or), * (count), ',' and ':'. No quotes, spaces, ';' or '$'.
CONSTRAINT_PATTERN = re.compile(r"[A-Za-z0-9_.\-&|,*\[\]:]+")
# Values of extra sbatch options: what option values need (paths, lists,
# addresses, gres specs, dependency lists, comments) and no shell syntax.
OPTION_VALUE_PATTERN = re.compile(r"[A-Za-z0-9_.,:=@%+/\-\[\]* ]+")
OPTION_NAME_PATTERN = re.compile(r"[a-z][a-z0-9\-]*")
COUNTRY_PATTERN = re.compile(r"[A-Z]{3}")

# sbatch options the pipeline sets itself, or that a profile key sets, so the
# `sbatch` table may not set them: {option: what to use instead}.
RESERVED_OPTIONS = {
    "partition": "the partition key",
    "account": "the account key",
    "qos": "the qos key",
    "constraint": "the constraint key",
    "gpus-per-task": "the gpus_per_task key",
    "cpus-per-task": "the cpus_per_task key",
    "mem": "the mem_gb key",
    "time": "the time_minutes table",
    "signal": "the signal_delay_s key",
    "array": "--max-parallel (the pipeline builds the array)",
    "job-name": "nothing: the pipeline names jobs qat-<phase>",
    "output": "nothing: submitit writes logs under <workdir>/logs/<phase>",
    "error": "nothing: submitit writes logs under <workdir>/logs/<phase>",
    "open-mode": "nothing: submitit appends to its logs across requeues",
    "wrap": "nothing: the pipeline writes the job script",
    "parsable": "nothing: the pipeline reads sbatch's output",
}


@dataclass(frozen=True)
class Profile:
    """The sbatch settings of one cluster, validated; None means "cluster default"."""

    path: str = ""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    gpus_per_task: int | None = None
    cpus_per_task: int = 1
    mem_gb: float | None = None
    time_minutes: dict[str, int] = field(default_factory=lambda: {"default": DEFAULT_TIME_MINUTES})
    setup: tuple[str, ...] = ()
    sbatch: dict[str, str | int | float | bool] = field(default_factory=dict)
    country: str | None = None
    signal_delay_s: int = DEFAULT_SIGNAL_DELAY_S
    tflops: float | None = None  # sustained training throughput of one task, TFLOP/s
    gpu_watts: float | None = None  # mean power of one GPU while training, W

    def time_limit(self, size: str) -> int:
        """Return the time limit in minutes for one cell of `size`."""
        return self.time_minutes.get(size, self.time_minutes["default"])


KEYS = (
    "partition", "account", "qos", "constraint", "gpus_per_task", "cpus_per_task", "mem_gb",
    "time_minutes", "setup", "sbatch", "country", "signal_delay_s", "tflops", "gpu_watts",
)


def load_profile(path: str | Path) -> Profile:
    """Read and validate the profile at `path`.

    Raises
    ------
    UsageError
        For a missing file, invalid TOML, an unknown key, a value of the wrong
        type or a value outside its allowed set. The message names the key.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"profile {str(path)!r} not found; check the path given to --profile")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"profile {str(path)!r} is not valid TOML: {err}") from None
    return parse_profile(raw, str(path))


def parse_profile(raw: dict[str, Any], where: str = "<profile>") -> Profile:
    """Validate a parsed profile table and return it as a Profile."""
    check = _Checker(where)
    for key in raw:
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise check.error(key, f"is not a profile key{hint}; allowed keys: {', '.join(KEYS)}")

    values: dict[str, Any] = {"path": where}
    for key in ("partition", "account", "qos"):
        if key in raw:
            values[key] = check.matching(key, raw[key], NAME_PATTERN, "letters, digits, '_', '.' and '-'")
    if "constraint" in raw:
        values["constraint"] = check.matching(
            "constraint", raw["constraint"], CONSTRAINT_PATTERN,
            "feature names joined by &, |, ',', ':', * and []",
        )
    if "gpus_per_task" in raw:
        values["gpus_per_task"] = check.integer("gpus_per_task", raw["gpus_per_task"], minimum=0)
    if "cpus_per_task" in raw:
        values["cpus_per_task"] = check.integer("cpus_per_task", raw["cpus_per_task"], minimum=1)
    if "mem_gb" in raw:
        values["mem_gb"] = check.positive("mem_gb", raw["mem_gb"])
    if "time_minutes" in raw:
        values["time_minutes"] = check.time_table(raw["time_minutes"])
    if "setup" in raw:
        values["setup"] = check.setup_lines(raw["setup"])
    if "sbatch" in raw:
        values["sbatch"] = check.sbatch_table(raw["sbatch"])
    if "country" in raw:
        values["country"] = check.matching(
            "country", raw["country"], COUNTRY_PATTERN, "an ISO 3166 alpha-3 code in capitals, such as USA or DEU"
        )
    if "signal_delay_s" in raw:
        values["signal_delay_s"] = check.integer("signal_delay_s", raw["signal_delay_s"], minimum=1)
    for key in ("tflops", "gpu_watts"):
        if key in raw:
            values[key] = check.positive(key, raw[key])

    profile = Profile(**values)
    shortest = min(profile.time_minutes.values())
    if profile.signal_delay_s >= shortest * 60:
        raise check.error(
            "signal_delay_s",
            f"{profile.signal_delay_s} s reaches past the shortest time limit ({shortest} min), so jobs "
            "would checkpoint and requeue as soon as they start; lower it or raise time_minutes",
        )
    return profile


class _Checker:
    """Type and value checks that raise one UsageError line naming the profile and key."""

    def __init__(self, where: str) -> None:
        self.where = where

    def error(self, key: str, problem: str) -> UsageError:
        return UsageError(f"profile {self.where!r}: {key} {problem}")

    def _type_error(self, key: str, value: Any, expected: str) -> UsageError:
        return self.error(key, f"must be {expected}, got {value!r} ({type(value).__name__})")

    def string(self, key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self._type_error(key, value, "a string")
        if not value:
            raise self.error(key, "is empty; remove the key to use the cluster's default")
        return value

    def matching(self, key: str, value: Any, pattern: re.Pattern, allowed: str) -> str:
        value = self.string(key, value)
        if not pattern.fullmatch(value):
            raise self.error(key, f"{value!r} contains characters outside {allowed}")
        return value

    def integer(self, key: str, value: Any, minimum: int) -> int:
        # bool is an int in Python; `true` is never a count.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._type_error(key, value, "a whole number")
        if value < minimum:
            raise self.error(key, f"{value} is below {minimum}")
        return value

    def positive(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._type_error(key, value, "a number")
        if not value > 0:
            raise self.error(key, f"{value} must be above 0")
        return float(value)

    def time_table(self, value: Any) -> dict[str, int]:
        if not isinstance(value, dict):
            raise self._type_error("time_minutes", value, 'a table of size = minutes, such as { default = 60, "100M" = 240 }')
        table = {"default": DEFAULT_TIME_MINUTES}
        for size, minutes in value.items():
            if size != "default" and size not in SIZES:
                raise self.error(
                    f"time_minutes.{size}", f"is not a size; use 'default' or one of {', '.join(SIZES)}"
                )
            table[size] = self.integer(f"time_minutes.{size}", minutes, minimum=1)
        return table

    def setup_lines(self, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self._type_error("setup", value, 'a list of shell lines, such as ["module load cuda"]')
        lines = []
        for number, line in enumerate(value):
            key = f"setup[{number}]"
            line = self.string(key, line)
            if any(char in line for char in "\n\r\0"):
                raise self.error(key, f"{line!r} contains a line break; give each command as its own entry")
            lines.append(line)
        return tuple(lines)

    def sbatch_table(self, value: Any) -> dict[str, str | int | float | bool]:
        if not isinstance(value, dict):
            raise self._type_error("sbatch", value, 'a table of option = value, such as { mail-type = "FAIL" }')
        options: dict[str, str | int | float | bool] = {}
        for name, option in value.items():
            key = f"sbatch.{name}"
            if not OPTION_NAME_PATTERN.fullmatch(name):
                raise self.error(key, "is not an sbatch option name; use the long name in lower case, such as mail-type")
            if name in RESERVED_OPTIONS:
                raise self.error(key, f"is set by the pipeline; use {RESERVED_OPTIONS[name]}")
            if option is True:
                options[name] = True
            elif option is False:
                raise self.error(key, "is false; remove the option instead")
            elif isinstance(option, (int, float)):
                options[name] = option
            elif not isinstance(option, str):
                raise self._type_error(key, option, "a string, a number or true")
            else:
                options[name] = self.matching(
                    key, option, OPTION_VALUE_PATTERN,
                    "letters, digits, spaces and _ . , : = @ % + / - [ ] *",
                )
        return options
