"""The cell: one training run of the study, fully specified.

A cell is a frozen, picklable dataclass. The manifest writes it as a CSV row,
submitit pickles it to the compute node, and the job stores it whole in the
result file and in every checkpoint, so a cell can be rebuilt from any of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any

BITS = ("fp16", "int8", "int6", "int4")
OPTIMIZERS = ("muon", "adamw")
SHAPES = ("linear", "cosine")

# Labels that name where a cell sits in a study, not how it trains. They are
# left out of the cell_id, so the same settings in two phases share one id.
LABEL_FIELDS = ("phase", "block")


@dataclass(frozen=True)
class Cell:
    """Settings of one training run; every field is written to the manifest."""

    phase: str
    block: str
    bits: str  # one of BITS; fp16 trains without fake quantisation
    warmdown: float  # fraction of the total steps spent decaying the LR to 0
    shape: str  # warmdown shape, one of SHAPES
    lr_mult: float  # multiplies the LR of every parameter group
    size: str  # nominal size label from jobs.model.SIZES
    seed: int
    optimizer: str  # one of OPTIMIZERS
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    seq_len: int
    batch_size: int  # sequences per step
    n_params: int  # exact trainable parameter count
    tokens_per_param: float
    steps_mult: int  # the length block trains 3x or 9x the base steps
    steps: int  # total optimiser steps, after steps_mult
    warmup_steps: int
    matrix_lr: float  # Muon LR for 2-D block weights (before lr_mult)
    adam_lr: float  # Adam LR for embeddings and scalars; AdamW LR for all
    weight_decay: float
    eval_every: int  # steps between validation evaluations
    val_tokens: int  # validation tokens per evaluation
    probe_every: int  # steps between grid-distance probes; 0 = only at warmdown start
    data: str  # "stdlib-docs", a data set name ("fineweb10B_sp1024"), "txt:/abs/dir" or "shards:/abs/dir"
    cell_id: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"invalid bits {self.bits!r}; expected one of {', '.join(BITS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"invalid optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}"
            )
        if self.shape not in SHAPES:
            raise ValueError(f"invalid shape {self.shape!r}; expected one of {', '.join(SHAPES)}")
        if not 0.0 <= self.warmdown <= 1.0:
            raise ValueError(f"invalid warmdown {self.warmdown!r}; expected a fraction in [0, 1]")
        if self.steps < 1:
            raise ValueError(f"invalid steps {self.steps!r}; expected at least 1")
        if not self.cell_id:
            object.__setattr__(self, "cell_id", compute_cell_id(self.settings()))

    @property
    def bit_width(self) -> int | None:
        """Integer bit-width of the fake quantisation, or None for fp16."""
        return None if self.bits == "fp16" else int(self.bits[3:])

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def settings(self) -> dict[str, Any]:
        """Return the fields that define the training run (labels and id left out)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in LABEL_FIELDS and f.name != "cell_id"
        }

    def to_row(self) -> dict[str, Any]:
        """Return every field, cell_id first, in manifest column order."""
        row = {"cell_id": self.cell_id}
        row.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "cell_id"})
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Cell:
        """Rebuild a cell from a manifest row or HDF5 attributes, converting types."""
        kwargs = {}
        for f in fields(cls):
            if f.name not in row:
                if f.name == "cell_id":
                    continue
                raise KeyError(f"missing cell field {f.name!r}")
            kwargs[f.name] = _convert(f.type, row[f.name])
        cell = cls(**kwargs)
        recorded = str(row.get("cell_id", "") or "")
        if recorded and recorded != compute_cell_id(cell.settings()):
            raise ValueError(
                f"cell_id {recorded!r} does not match its settings "
                f"(expected {compute_cell_id(cell.settings())!r})"
            )
        return cell

    def replace(self, **changes: Any) -> Cell:
        """Return a copy with some fields changed and the cell_id recomputed."""
        return dataclasses.replace(self, cell_id="", **changes)


def _convert(type_name: Any, value: Any) -> Any:
    name = type_name if isinstance(type_name, str) else type_name.__name__
    if hasattr(value, "item"):  # numpy scalar from h5py or pandas
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode()
    if name == "int":
        return int(value)
    if name == "float":
        return float(value)
    return str(value)


def compute_cell_id(settings: dict[str, Any]) -> str:
    """Hash the settings into a 12-hex-digit id.

    The hash covers canonical JSON (sorted keys, floats written by repr), so it
    does not depend on dict order, row order, machine or Python version.
    """
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


CELL_FIELDS = tuple(f.name for f in fields(Cell))
