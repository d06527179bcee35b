"""The manifest: one CSV row per cell, every setting spelled out."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from pipeline.cell import CELL_FIELDS, Cell
from pipeline.errors import UsageError
from pipeline.workdir import atomic_write_bytes

COLUMNS = ("cell_id",) + tuple(f for f in CELL_FIELDS if f != "cell_id")


def render(cells: list[Cell] | tuple[Cell, ...]) -> bytes:
    """Return the manifest CSV of `cells` as bytes, in the order given.

    Floats are written by repr, so the file is byte-identical on every run and
    a row read back rebuilds the same cell_id.
    """
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for cell in cells:
        writer.writerow({key: _format(value) for key, value in cell.to_row().items()})
    return buffer.getvalue().encode()


def _format(value: object) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def write(path: Path, cells: list[Cell] | tuple[Cell, ...]) -> bool:
    """Write the manifest atomically; return True when the file changed."""
    payload = render(cells)
    if path.is_file() and path.read_bytes() == payload:
        return False
    atomic_write_bytes(path, payload)
    return True


def read(path: Path) -> list[Cell]:
    """Read a manifest back into cells, checking every cell_id against its row."""
    if not path.is_file():
        raise UsageError(
            f"manifest {str(path)!r} not found; run `python -m pipeline manifest --phase ...` first"
        )
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    cells = []
    for number, row in enumerate(rows, start=2):
        try:
            cells.append(Cell.from_row(row))
        except (KeyError, ValueError) as err:
            raise UsageError(
                f"manifest {str(path)!r}, line {number}: {err}; regenerate it with the manifest command"
            ) from None
    return cells
