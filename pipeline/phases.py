"""Phases as data: a TOML spec is a union of named blocks, each a grid of factors.

A phase file has a `[settings]` table shared by every block and one or more
`[[block]]` entries. `settings_from = "NAME"` at the top starts the settings
from those of the packaged phase NAME, so phases that share a setup state it
once. Each block has a `name`, optional `settings` that
override the phase's, and `factors`: a table mapping factor names to level
lists (their cartesian product), or an array of such tables whose grids are
joined. A numeric setting may also be a table keyed by size label, with an
optional "default" entry, for values that depend on the model size (the batch
size, say). Derived fields (model dimensions, parameter count, steps, the
evaluation and probe intervals) are computed here, in one place, so every cell
spells them out in the manifest.
"""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cell import BITS, OPTIMIZERS, SHAPES, Cell
from pipeline.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SPEC_DIR = Path(__file__).parent / "specs"

FACTORS = ("bits", "warmdown", "shape", "lr_mult", "size", "seed", "optimizer", "steps_mult")

# Settings a phase or block may fix; factors may be fixed too.
SETTINGS = FACTORS + (
    "data",
    "vocab_size",
    "seq_len",
    "batch_size",
    "steps",  # fixed base steps; otherwise tokens_per_param sets the length
    "tokens_per_param",
    "warmup_fraction",
    "matrix_lr",
    "adam_lr",
    "weight_decay",
    "evals",  # validation evaluations per run
    "val_tokens",
    "probe_every",  # steps between probes; 0 probes only at the warmdown start
    "probes",  # probes per run instead of probe_every; 0 probes only at the warmdown start
)

# Settings that may be a table keyed by size label (plus an optional default).
SIZE_TABLE_SETTINGS = (
    "seq_len",
    "batch_size",
    "steps",
    "tokens_per_param",
    "warmup_fraction",
    "matrix_lr",
    "adam_lr",
    "weight_decay",
    "evals",
    "val_tokens",
    "probe_every",
    "probes",
)
DEFAULT_KEY = "default"

DEFAULTS: dict[str, Any] = {
    "shape": "linear",
    "lr_mult": 1.0,
    "optimizer": "muon",
    "steps_mult": 1,
    "data": "stdlib-docs",
    "tokens_per_param": 20.0,
    "warmup_fraction": 0.02,
    "weight_decay": 0.0,
    "evals": 8,
}

# Two ways to set the probe interval; a table that sets one replaces the other.
PROBE_SETTINGS = ("probe_every", "probes")

TOP_LEVEL_KEYS = ("description", "settings_from", "settings", "block")


@dataclass(frozen=True)
class Phase:
    """A loaded phase: its name, description and the cells of every block."""

    name: str
    description: str
    cells: tuple[Cell, ...]
    blocks: tuple[str, ...]


def available_phases() -> list[str]:
    return sorted(p.stem for p in SPEC_DIR.glob("*.toml"))


def spec_path(phase: str) -> Path:
    """Return the packaged spec file of a phase name, or raise UsageError."""
    path = SPEC_DIR / f"{phase}.toml"
    if not path.is_file():
        raise UsageError(
            f"unknown phase {phase!r}; available phases: {', '.join(available_phases())} "
            "(or give your own spec with --phase-file PATH)"
        )
    return path


def load_phase(
    phase: str | None = None,
    phase_file: str | Path | None = None,
    data: str | None = None,
    size_override: str | None = None,
) -> Phase:
    """Load a phase spec and expand it into cells.

    Parameters
    ----------
    phase
        Name of a packaged phase ("micro", "2", "5").
    phase_file
        Path to a user's TOML spec; the phase is named after the file stem.
    data
        Canonical data string (see jobs.data.resolve_data) replacing the
        spec's data source in every cell. The vocabulary follows the new
        data: 256 for byte-level text, the tokenizer's size for shards, so a
        spec written for a 1024-token data set trains on the embedded corpus
        with a 256-row embedding.
    size_override
        Size label replacing every cell's size, for trying a phase's blocks
        at a size the machine can train. Size tables in the spec must have an
        entry (or a default) for it. Cells that then differ only in size are
        kept once, under the first block that produces them.
    """
    if phase_file is not None:
        path = Path(phase_file)
        if not path.is_file():
            raise UsageError(f"phase file {str(path)!r} not found; check the path given to --phase-file")
        name = path.stem
    elif phase is not None:
        path = spec_path(phase)
        name = phase
    else:
        raise UsageError("no phase given; pass --phase NAME or --phase-file PATH")
    spec = _read_spec(path)
    return expand_spec(name, spec, data=data, size_override=size_override)


def _read_spec(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"phase file {str(path)!r} is not valid TOML: {err}") from None


def expand_spec(
    name: str,
    spec: dict[str, Any],
    data: str | None = None,
    size_override: str | None = None,
) -> Phase:
    """Validate a parsed spec and return its cells, in block then grid order."""
    from jobs.model import SIZES

    unknown_top = set(spec) - set(TOP_LEVEL_KEYS)
    if unknown_top:
        raise UsageError(
            f"phase {name!r}: unknown top-level key(s) {sorted(unknown_top)}; "
            f"allowed: {', '.join(TOP_LEVEL_KEYS)}"
        )
    base = dict(DEFAULTS)
    if "settings_from" in spec:
        _merge_settings(base, _inherited_settings(name, spec["settings_from"]))
    _merge_settings(base, _checked_settings(name, "settings", spec.get("settings", {})))
    blocks = spec.get("block", [])
    if not blocks:
        raise UsageError(f"phase {name!r} has no [[block]] entries; add at least one")
    if size_override is not None and size_override not in SIZES:
        raise UsageError(
            f"invalid --size-override {size_override!r}; allowed sizes: {', '.join(SIZES)}"
        )
    override_vocab = None
    if data is not None:
        override_vocab = _data_vocab(name, "--data", data)

    cells: list[Cell] = []
    owner: dict[str, str] = {}
    block_names: list[str] = []
    for block in blocks:
        block_name = block.get("name")
        if not block_name:
            raise UsageError(f"phase {name!r}: a [[block]] has no name; give each block a name")
        unknown = set(block) - {"name", "settings", "factors"}
        if unknown:
            raise UsageError(
                f"phase {name!r}, block {block_name!r}: unknown key(s) {sorted(unknown)}; "
                "allowed: name, settings, factors"
            )
        settings = dict(base)
        _merge_settings(settings, _checked_settings(name, block_name, block.get("settings", {})))
        grids = block.get("factors", {})
        grids = grids if isinstance(grids, list) else [grids]
        if block_name not in block_names:
            block_names.append(block_name)
        for grid in grids:
            for values in _grid(name, block_name, grid, SIZES):
                merged = dict(settings)
                merged.update(values)
                if data is not None:
                    merged["data"] = data
                    merged["vocab_size"] = override_vocab
                if size_override is not None:
                    merged["size"] = size_override
                cell = build_cell(name, block_name, merged)
                if size_override is not None and cell.cell_id in owner:
                    continue  # the override merges cells that differed only in size
                if cell.cell_id in owner:
                    raise UsageError(
                        f"phase {name!r}: block {block_name!r} produces the same cell as block "
                        f"{owner[cell.cell_id]!r} ({_describe(values)}); remove it from one block"
                    )
                owner[cell.cell_id] = block_name
                cells.append(cell)
    description = str(spec.get("description", ""))
    return Phase(name=name, description=description, cells=tuple(cells), blocks=tuple(block_names))


def _inherited_settings(phase: str, parent: Any) -> dict[str, Any]:
    """Return the checked [settings] of the packaged phase that `settings_from` names."""
    if not isinstance(parent, str) or not (SPEC_DIR / f"{parent}.toml").is_file():
        raise UsageError(
            f"phase {phase!r}: settings_from {parent!r} is not a packaged phase; "
            f"available phases: {', '.join(available_phases())}"
        )
    spec = _read_spec(spec_path(parent))
    if "settings_from" in spec:
        raise UsageError(
            f"phase {phase!r}: settings_from {parent!r} names a phase that has settings_from itself; "
            "name the phase at the start of the chain"
        )
    return _checked_settings(parent, "settings", spec.get("settings", {}))


def _merge_settings(settings: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Apply `overrides` to `settings` in place; setting one probe interval drops the other."""
    if any(key in overrides for key in PROBE_SETTINGS):
        for key in PROBE_SETTINGS:
            settings.pop(key, None)
    settings.update(overrides)


def _checked_settings(phase: str, where: str, settings: dict[str, Any]) -> dict[str, Any]:
    from jobs.model import SIZES

    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise UsageError(
            f"phase {phase!r}, {where}: unknown setting(s) {sorted(unknown)}; "
            f"allowed: {', '.join(SETTINGS)}"
        )
    if all(key in settings for key in PROBE_SETTINGS):
        raise UsageError(
            f"phase {phase!r}, {where}: both probe_every and probes are set; keep one "
            "(probes sets the interval from the run length)"
        )
    for key, value in settings.items():
        if not isinstance(value, dict):
            continue
        if key not in SIZE_TABLE_SETTINGS:
            raise UsageError(
                f"phase {phase!r}, {where}: setting {key!r} is a table, but only "
                f"{', '.join(SIZE_TABLE_SETTINGS)} may be given per size; give one value"
            )
        for size, level in value.items():
            if size != DEFAULT_KEY and size not in SIZES:
                raise UsageError(
                    f"phase {phase!r}, {where}: invalid size {size!r} in the table of {key!r}; "
                    f"allowed: {', '.join(SIZES)} and {DEFAULT_KEY!r}"
                )
            if isinstance(level, bool) or not isinstance(level, (int, float)):
                raise UsageError(
                    f"phase {phase!r}, {where}: {key!r} for size {size!r} is {level!r}; expected a number"
                )
    return dict(settings)


def _for_size(phase: str, block: str, values: dict[str, Any], size: str) -> dict[str, Any]:
    """Return the settings with every size table replaced by its value for `size`."""
    resolved = dict(values)
    for key, value in values.items():
        if not isinstance(value, dict):
            continue
        if size in value:
            resolved[key] = value[size]
        elif DEFAULT_KEY in value:
            resolved[key] = value[DEFAULT_KEY]
        else:
            raise UsageError(
                f"phase {phase!r}, block {block!r}: setting {key!r} has no value for size {size!r}; "
                f'add "{size}" = ... or {DEFAULT_KEY} = ... to its table'
            )
    return resolved


def _grid(phase: str, block: str, factors: dict[str, Any], sizes: dict) -> list[dict[str, Any]]:
    """Return the cartesian product of one factor table, validating every level."""
    if not factors:
        raise UsageError(f"phase {phase!r}, block {block!r}: no factors; list at least one factor")
    allowed = {
        "bits": BITS,
        "shape": SHAPES,
        "optimizer": OPTIMIZERS,
        "size": tuple(sizes),
    }
    names = list(factors)
    for factor in names:
        levels = factors[factor]
        if factor not in FACTORS:
            raise UsageError(
                f"phase {phase!r}, block {block!r}: unknown factor {factor!r}; "
                f"allowed factors: {', '.join(FACTORS)}"
            )
        if not isinstance(levels, list) or not levels:
            raise UsageError(
                f"phase {phase!r}, block {block!r}: factor {factor!r} needs a non-empty list of levels"
            )
        for level in levels:
            if factor in allowed and level not in allowed[factor]:
                raise UsageError(
                    f"phase {phase!r}, block {block!r}: invalid {factor} level {level!r}; "
                    f"allowed: {', '.join(map(str, allowed[factor]))}"
                )
            if factor == "warmdown" and not (
                isinstance(level, (int, float)) and 0.0 <= level <= 1.0
            ):
                raise UsageError(
                    f"phase {phase!r}, block {block!r}: invalid warmdown level {level!r}; "
                    "expected a fraction between 0 and 1"
                )
        if len(set(map(repr, levels))) != len(levels):
            raise UsageError(
                f"phase {phase!r}, block {block!r}: factor {factor!r} repeats a level in {levels}"
            )
    return [dict(zip(names, combo)) for combo in itertools.product(*(factors[n] for n in names))]


def build_cell(phase: str, block: str, values: dict[str, Any]) -> Cell:
    """Derive every field of a cell from its factor levels and settings.

    The length rule: base steps = tokens_per_param x parameters / tokens per
    step, rounded to whole steps (unless `steps` fixes them), then multiplied
    by steps_mult. The warmup is a fraction of the base steps and the
    warmdown a fraction of the total. Evaluations and probes are spread over
    the total: eval_every = steps // evals, and probe_every = steps // probes
    when `probes` is set.
    """
    from jobs.model import SIZES, count_params

    size = values["size"]
    values = _for_size(phase, block, values, size)
    for key in ("seq_len", "batch_size", "matrix_lr", "adam_lr", "val_tokens"):
        if key not in values:
            raise UsageError(f"phase {phase!r}, block {block!r}: missing setting {key!r}")
    n_layer, n_embd, n_head = SIZES[size]
    data = str(values["data"])
    vocab_size = _vocab_size(phase, block, data, values.get("vocab_size"))
    n_params = count_params(n_layer, n_embd, vocab_size)
    tokens_per_step = int(values["batch_size"]) * int(values["seq_len"])
    if "steps" in values:
        base_steps = int(values["steps"])
        tokens_per_param = round(base_steps * tokens_per_step / n_params, 3)
    else:
        tokens_per_param = float(values["tokens_per_param"])
        base_steps = max(1, round(tokens_per_param * n_params / tokens_per_step))
    steps_mult = int(values["steps_mult"])
    steps = base_steps * steps_mult
    warmup_steps = max(1, math.ceil(float(values["warmup_fraction"]) * base_steps))
    probe_every = int(values.get("probe_every", 0))
    if "probes" in values:
        probes = int(values["probes"])
        if probes < 0:
            raise UsageError(
                f"phase {phase!r}, block {block!r}: invalid probes {probes}; expected 0 or more"
            )
        probe_every = max(1, steps // probes) if probes > 0 else 0
    try:
        return Cell(
            phase=phase,
            block=block,
            bits=str(values["bits"]),
            warmdown=float(values["warmdown"]),
            shape=str(values["shape"]),
            lr_mult=float(values["lr_mult"]),
            size=str(size),
            seed=int(values["seed"]),
            optimizer=str(values["optimizer"]),
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            vocab_size=vocab_size,
            seq_len=int(values["seq_len"]),
            batch_size=int(values["batch_size"]),
            n_params=n_params,
            tokens_per_param=tokens_per_param,
            steps_mult=steps_mult,
            steps=steps,
            warmup_steps=warmup_steps,
            matrix_lr=float(values["matrix_lr"]),
            adam_lr=float(values["adam_lr"]),
            weight_decay=float(values["weight_decay"]),
            eval_every=max(1, steps // int(values["evals"])),
            val_tokens=int(values["val_tokens"]),
            probe_every=probe_every,
            data=data,
        )
    except (KeyError, ValueError) as err:
        raise UsageError(f"phase {phase!r}, block {block!r}: {err}") from None


def _vocab_size(phase: str, block: str, data: str, given: Any) -> int:
    """Return the spec's vocab_size, checked against the data, or the data's own vocabulary.

    The check needs no file for byte-level data and data set names, so it
    runs for them only. Shards given by path are checked by
    jobs.data.check_data and again when a cell opens them.
    """
    from jobs.data import SHARDS_PREFIX

    if given is None:
        return _data_vocab(phase, f"block {block!r}", data)
    vocab_size = int(given)
    if not data.startswith(SHARDS_PREFIX):
        needed = _data_vocab(phase, f"block {block!r}", data)
        if vocab_size < needed:
            raise UsageError(
                f"phase {phase!r}, block {block!r}: vocab_size {vocab_size} is smaller than the "
                f"{needed} tokens of data {data!r}; set vocab_size to at least {needed}"
            )
    return vocab_size


def _data_vocab(phase: str, where: str, data: str) -> int:
    from jobs.data import DataError, data_vocab_size

    try:
        return data_vocab_size(data)
    except DataError as err:
        raise UsageError(f"phase {phase!r}, {where}: {err}") from None


def _describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())
