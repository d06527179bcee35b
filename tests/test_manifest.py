"""The manifest CSV: byte-identical reruns, ids independent of row order, round trip."""

import csv
import random

import pytest

from pipeline import manifest
from pipeline.cell import Cell
from pipeline.errors import UsageError
from pipeline.phases import load_phase


def test_two_renders_byte_identical():
    cells = load_phase("micro").cells
    assert manifest.render(cells) == manifest.render(load_phase("micro").cells)


def test_write_reports_unchanged(tmp_path):
    cells = load_phase("micro").cells
    path = tmp_path / "m.csv"
    assert manifest.write(path, cells) is True
    before = path.stat().st_mtime_ns
    assert manifest.write(path, cells) is False
    assert path.stat().st_mtime_ns == before


def test_round_trip(tmp_path):
    cells = load_phase("micro").cells
    path = tmp_path / "m.csv"
    manifest.write(path, cells)
    assert manifest.read(path) == list(cells)
    assert [c.cell_id for c in manifest.read(path)] == [c.cell_id for c in cells]


def test_reordered_rows_keep_ids(tmp_path):
    cells = load_phase("micro").cells
    path = tmp_path / "m.csv"
    manifest.write(path, cells)
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    random.Random(0).shuffle(rows)
    for row in rows:
        rebuilt = Cell.from_row({**row, "cell_id": ""})
        assert rebuilt.cell_id == row["cell_id"]


def test_edited_row_detected(tmp_path):
    cells = load_phase("micro").cells
    path = tmp_path / "m.csv"
    manifest.write(path, cells)
    text = path.read_text().splitlines()
    text[1] = text[1].replace(",0.1,", ",0.2,", 1)
    path.write_text("\n".join(text) + "\n")
    with pytest.raises(UsageError, match="line 2"):
        manifest.read(path)


def test_missing_manifest_says_what_to_run(tmp_path):
    with pytest.raises(UsageError, match="manifest --phase"):
        manifest.read(tmp_path / "none.csv")


def test_manifest_mode_follows_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        path = tmp_path / "m.csv"
        manifest.write(path, load_phase("micro").cells)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
