"""Cells of phases 2 and 5 trained on a CPU: divergence, export round-trip, PTQ, probe, every block.

The cells come from the study's specs at size tiny1 with byte-level data, then
shrink to a few short steps, so a cell trains in about a second. They run
through jobs.run.CellTask in this process, as a compute node runs them, and
the tests read the HDF5 result file that it writes.
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from jobs.run import CellTask, RunOptions
from jobs.train import DIVERGENCE_FACTOR
from jobs.schedule import lr_multiplier
from pipeline.cell import Cell
from pipeline.phases import expand_spec, load_phase
from pipeline.workdir import Workdir
from tests.helpers import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# Round-trip tolerance: the export stores exactly the weights that fake
# quantisation trains with, so only float summation order may differ.
ROUNDTRIP_TOLERANCE = 1e-4


@dataclass
class Result:
    """What a test reads back from a cell's HDF5 file."""

    status: str
    attrs: dict
    metrics: dict
    probe_step: np.ndarray
    lr: np.ndarray
    train_loss: np.ndarray


def shrink(cell: Cell, base_steps: int = 6) -> Cell:
    """Return the cell with short sequences and few steps, keeping what its block varies.

    Bits, warmdown, shape, optimizer, LRs, weight decay and steps_mult stay; a
    dense probe stays dense (every step).
    """
    steps = base_steps * cell.steps_mult
    return cell.replace(
        seq_len=32,
        batch_size=4,
        steps=steps,
        warmup_steps=1,
        eval_every=max(1, steps // 2),
        val_tokens=256,
        probe_every=1 if cell.probe_every > 0 else 0,
    )


def train(cell: Cell, workdir: Path) -> Result:
    """Train a cell with CellTask as a compute node would and read its result file."""
    status = CellTask(RunOptions(workdir=str(workdir))).run_cell(cell)
    path = Workdir(workdir).result(cell.phase, cell.cell_id)
    with h5py.File(path, "r") as f:
        assert f.attrs["complete"]
        result = Result(
            status=str(f.attrs["status"]),
            attrs={key: f.attrs[key] for key in f.attrs},
            metrics=dict(f["metrics"].attrs),
            probe_step=f["probe/step"][:],
            lr=f["curves/lr"][:],
            train_loss=f["curves/train_loss"][:],
        )
    assert status == result.status
    return result


def assert_probe_in_range(result: Result) -> None:
    for bits in (4, 6, 8):
        value = result.metrics[f"probe_int{bits}"]
        assert 0.0 <= value <= 0.5, (bits, value)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("training")


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> str:
    """A txt: data source of about 340 kB: Python sources that ship with every interpreter."""
    directory = tmp_path_factory.mktemp("text")
    text = "".join(Path(module.__file__).read_text() for module in (inspect, argparse, typing))
    (directory / "sources.txt").write_text(text)
    return f"txt:{directory}"


def phase_cell(phase: str, data: str, **match) -> Cell:
    """Return the first tiny1 cell of a phase whose fields equal `match`."""
    cells = load_phase(phase, data=data, size_override="tiny1").cells
    return next(c for c in cells if all(getattr(c, k) == v for k, v in match.items()))


def train_phase2_cell(bits: str, workdir: Path, text_data: str) -> Result:
    cell = phase_cell("2", text_data, bits=bits, warmdown=0.33, lr_mult=1.0, seed=0)
    return train(shrink(cell), workdir)


@pytest.fixture(scope="module")
def int6_result(workdir, text_data) -> Result:
    return train_phase2_cell("int6", workdir, text_data)


@pytest.fixture(scope="module")
def fp16_result(workdir, text_data) -> Result:
    return train_phase2_cell("fp16", workdir, text_data)


# ---------------------------------------------------------------------------
# final evaluations: export round-trip, PTQ, probe
# ---------------------------------------------------------------------------


def test_int6_round_trip_matches_val_bpb(int6_result):
    result = int6_result
    assert result.status == "done"
    val_bpb = result.metrics["val_bpb"]
    roundtrip = result.metrics["roundtrip_val_bpb"]
    assert math.isfinite(val_bpb)
    assert abs(roundtrip - val_bpb) < ROUNDTRIP_TOLERANCE, (roundtrip, val_bpb)
    # PTQ applies to fp16 cells only.
    assert math.isnan(result.metrics["ptq_val_bpb_int8"])


@pytest.mark.slow
def test_fp16_cell_has_ptq_numbers(fp16_result):
    result = fp16_result
    val_bpb = result.metrics["val_bpb"]
    for bits in (8, 6, 4):
        value = result.metrics[f"ptq_val_bpb_int{bits}"]
        assert math.isfinite(value), bits
        assert value > 0.0
    # int8 rounding moves each weight by at most 1/254 of its row's largest
    # weight, which barely changes the loss of a model this small.
    assert abs(result.metrics["ptq_val_bpb_int8"] - val_bpb) < 0.02
    assert math.isnan(result.metrics["roundtrip_val_bpb"])


def assert_single_probe_at_warmdown_start(result: Result) -> None:
    assert_probe_in_range(result)
    steps = int(result.attrs["steps"])
    warmdown_step = steps - math.floor(float(result.attrs["warmdown"]) * steps + 0.5)
    assert list(result.probe_step) == [warmdown_step]


def test_int6_probe_at_warmdown_start(int6_result):
    assert_single_probe_at_warmdown_start(int6_result)


@pytest.mark.slow
def test_fp16_probe_at_warmdown_start(fp16_result):
    assert_single_probe_at_warmdown_start(fp16_result)


@pytest.mark.slow
def test_int4_round_trip_matches_val_bpb(workdir, text_data):
    cell = phase_cell("5", text_data, block="int4", warmdown=0.10, seed=0)
    result = train(shrink(cell), workdir)
    assert result.status == "done"
    assert abs(result.metrics["roundtrip_val_bpb"] - result.metrics["val_bpb"]) < ROUNDTRIP_TOLERANCE
    assert_probe_in_range(result)


@pytest.mark.slow
def test_byte_corpus_trains_in_larger_vocab(workdir, text_data):
    spec = {
        "settings": {
            "data": text_data, "vocab_size": 1024, "seq_len": 64, "batch_size": 4, "steps": 6,
            "matrix_lr": 0.04, "adam_lr": 0.008, "val_tokens": 512, "evals": 2,
        },
        "block": [{"name": "main", "factors": {
            "bits": ["int8"], "warmdown": [0.5], "size": ["tiny1"], "seed": [0],
        }}],
    }
    cell = expand_spec("vocab1024", spec).cells[0]
    assert cell.vocab_size == 1024
    result = train(cell, workdir)
    assert result.status == "done"
    assert math.isfinite(result.metrics["val_bpb"])


# ---------------------------------------------------------------------------
# divergence
# ---------------------------------------------------------------------------


def test_huge_lr_recorded_as_diverged(workdir, tmp_path):
    spec = tmp_path / "huge-lr.toml"
    spec.write_text(
        '[settings]\ndata = "stdlib-docs"\nseq_len = 64\nbatch_size = 4\nsteps = 10\n'
        "matrix_lr = 1e6\nadam_lr = 1e6\nval_tokens = 256\nevals = 2\n"
        '[[block]]\nname = "main"\n[block.factors]\n'
        'bits = ["int6"]\nwarmdown = [0.5]\nsize = ["tiny1"]\nseed = [0]\n'
    )
    cell = load_phase(phase_file=spec).cells[0]
    # The embedded corpus is cached in the module's work directory.
    result = train(cell, workdir)

    assert result.status == "diverged"
    diverged_step = int(result.metrics["diverged_step"])
    assert 0 <= diverged_step < cell.steps
    limit = DIVERGENCE_FACTOR * math.log(cell.vocab_size)
    blown_up = ~np.isfinite(result.train_loss) | (result.train_loss > limit)
    assert blown_up[diverged_step]
    assert not blown_up[:diverged_step].any()
    assert result.metrics["steps_done"] < cell.steps
    assert math.isnan(result.metrics["val_bpb"])


# ---------------------------------------------------------------------------
# one cell of every phase 5 block, on the embedded corpus
# ---------------------------------------------------------------------------

PHASE5_SPEC = tomllib.loads((REPO / "pipeline" / "specs" / "5.toml").read_text())


def first_cell_of_block(block_name: str) -> Cell:
    """Expand one phase 5 block alone at tiny1 on the embedded corpus and take its first cell.

    Expanding the block alone, as a one-block phase file would, keeps it from
    merging with an earlier block whose cells become equal at one size.
    """
    block = next(b for b in PHASE5_SPEC["block"] if b["name"] == block_name)
    phase = expand_spec("5", {**PHASE5_SPEC, "block": [block]}, data="stdlib-docs", size_override="tiny1")
    return phase.cells[0]


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory) -> Path:
    """One corpus cache for the block runs, so the embedded corpus is built once."""
    return tmp_path_factory.mktemp("corpus-cache")


@pytest.mark.slow
@pytest.mark.parametrize("block", [b["name"] for b in PHASE5_SPEC["block"]])
def test_phase5_block_trains_on_cpu(corpus_cache, tmp_path, block):
    cell = shrink(first_cell_of_block(block))
    assert cell.block == block
    assert (cell.size, cell.data, cell.vocab_size) == ("tiny1", "stdlib-docs", 256)

    # A work directory per block: at tiny1 the first int4-reference cell
    # equals the first sizes cell, and a shared directory would skip it as done.
    (tmp_path / ".cache").symlink_to(corpus_cache, target_is_directory=True)
    result = train(cell, tmp_path)

    assert result.status == "done"
    for field in ("block", "optimizer", "shape", "bits", "steps_mult", "probe_every"):
        assert result.attrs[field] == getattr(cell, field), field
    assert math.isfinite(result.metrics["val_bpb"])
    if cell.bits == "fp16":
        for bits in (8, 6, 4):
            assert math.isfinite(result.metrics[f"ptq_val_bpb_int{bits}"]), bits
    else:
        roundtrip = result.metrics["roundtrip_val_bpb"]
        assert abs(roundtrip - result.metrics["val_bpb"]) < ROUNDTRIP_TOLERANCE
    assert_probe_in_range(result)

    # The LR follows the cell's schedule over all of its steps, so a length
    # cell decays over warmdown x (steps_mult x base) steps.
    expected_lr = [
        lr_multiplier(step, cell.steps, cell.warmup_steps, cell.warmdown, cell.shape)
        for step in range(cell.steps)
    ]
    np.testing.assert_allclose(result.lr, expected_lr, rtol=1e-6, atol=1e-7)
    if cell.probe_every:
        assert list(result.probe_step) == list(range(cell.steps))
    else:
        assert len(result.probe_step) == 1


def test_micro_batches_match_whole_batch(tmp_path):
    import torch

    from jobs.train import Trainer

    cell = load_phase("micro").cells[0].replace(steps=3, warmup_steps=1)
    whole = Trainer(cell, cache_dir=tmp_path, device=torch.device("cpu"))
    split = Trainer(cell, cache_dir=tmp_path, device=torch.device("cpu"), micro_batch_tokens=4 * cell.seq_len)
    assert split.micro_batch == 4
    assert whole.micro_batch == cell.batch_size
    x = torch.randint(0, 256, (cell.batch_size, cell.seq_len))
    y = torch.randint(0, 256, (cell.batch_size, cell.seq_len))
    loss_whole = whole._forward_backward(x, y)
    loss_split = split._forward_backward(x, y)
    assert loss_split.item() == pytest.approx(loss_whole.item(), rel=1e-5)
    for a, b in zip(whole.model.parameters(), split.model.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_finite_blowup_counts_as_diverged(tmp_path):
    from jobs.train import Trainer

    cell = load_phase("micro").cells[0].replace(steps=8, warmup_steps=1, matrix_lr=1e6, adam_lr=1e6)
    result = Trainer(cell, cache_dir=tmp_path).run(log_every=1)
    assert result.status == "diverged"
    assert 0 <= result.metrics["diverged_step"] < 8
