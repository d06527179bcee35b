"""The study's phases 2 and 5: their grids, derived settings, committed manifests and data checks."""

from __future__ import annotations

import collections
import math
import re
from pathlib import Path

import numpy as np
import pytest
import sentencepiece

from jobs import data
from jobs.data import DataError
from jobs.model import SIZES, count_params
from jobs.schedule import lr_multiplier, warmdown_start
from pipeline import manifest
from pipeline.errors import UsageError
from pipeline.phases import expand_spec, load_phase
from tests.helpers import REPO, run_cli

DATASET = "fineweb10B_sp1024"
CELL_LINE = re.compile(r"^  ([0-9a-f]{12})  ")
SEEDS = {0, 1, 2, 3, 4}
WARMDOWNS = {0.10, 0.20, 0.33, 0.50}
QAT_BITS = {"fp16", "int8", "int6"}

PHASE5_COUNTS = {
    "optimiser": 120,
    "shape": 120,
    "length": 90,
    "sizes": 100,
    "int4": 100,
    "int4-reference": 20,
    "probe": 75,
}


@pytest.fixture(scope="module")
def phase2():
    return load_phase("2")


@pytest.fixture(scope="module")
def phase5():
    return load_phase("5")


def block_cells(phase, block):
    return [cell for cell in phase.cells if cell.block == block]


def levels(cells, field):
    return {getattr(cell, field) for cell in cells}


def nominal_params(size: str) -> float:
    """Return the parameter count a label such as "15M" names."""
    return float(size.rstrip("M")) * 1e6


# ---------------------------------------------------------------------------
# grids
# ---------------------------------------------------------------------------


def test_phase2_has_720_cells(phase2):
    cells = phase2.cells
    assert len(cells) == 720
    assert len({cell.cell_id for cell in cells}) == 720
    assert phase2.blocks == ("main",)
    assert levels(cells, "bits") == QAT_BITS
    assert levels(cells, "warmdown") == WARMDOWNS
    assert levels(cells, "lr_mult") == {0.5, 1.0, 2.0}
    assert levels(cells, "size") == {"15M", "30M", "50M", "100M"}
    assert levels(cells, "seed") == SEEDS


def test_phase2_is_full_factorial(phase2):
    combos = collections.Counter((c.bits, c.warmdown, c.lr_mult, c.size) for c in phase2.cells)
    assert len(combos) == 3 * 4 * 3 * 4
    assert set(combos.values()) == {5}


def test_phase2_fixed_settings(phase2):
    cells = phase2.cells
    assert levels(cells, "optimizer") == {"muon"}
    assert levels(cells, "shape") == {"linear"}
    assert levels(cells, "steps_mult") == {1}
    assert levels(cells, "tokens_per_param") == {20.0}
    assert levels(cells, "data") == {DATASET}
    assert levels(cells, "vocab_size") == {1024}
    assert levels(cells, "seq_len") == {1024}
    assert levels(cells, "probe_every") == {0}


def test_phase5_has_625_cells(phase5):
    assert len(phase5.cells) == 625
    assert len({cell.cell_id for cell in phase5.cells}) == 625
    assert phase5.blocks == tuple(PHASE5_COUNTS)


@pytest.mark.parametrize("block, count", PHASE5_COUNTS.items())
def test_phase5_block_count(phase5, block, count):
    assert len(block_cells(phase5, block)) == count


@pytest.mark.parametrize(
    "block, expected",
    [
        ("optimiser", {"optimizer": {"adamw"}, "shape": {"linear"}, "bits": QAT_BITS,
                       "warmdown": WARMDOWNS, "size": {"15M", "50M"}, "steps_mult": {1}}),
        ("shape", {"optimizer": {"muon"}, "shape": {"cosine"}, "bits": QAT_BITS,
                   "warmdown": WARMDOWNS, "size": {"15M", "50M"}, "steps_mult": {1}}),
        ("length", {"optimizer": {"muon"}, "shape": {"linear"}, "bits": QAT_BITS,
                    "warmdown": {0.10, 0.33, 0.50}, "size": {"15M"}, "steps_mult": {3, 9}}),
        ("sizes", {"optimizer": {"muon"}, "bits": {"fp16", "int6"}, "warmdown": {0.10, 0.33},
                   "size": {"5M", "8M", "175M", "250M", "350M"}, "steps_mult": {1}}),
        ("int4", {"optimizer": {"muon"}, "bits": {"int4"}, "warmdown": {0.10, 0.33},
                  "size": {"3M", "5M", "8M", "15M", "20M", "30M", "50M", "100M"}}),
        ("int4-reference", {"optimizer": {"muon"}, "bits": {"fp16"}, "warmdown": {0.10, 0.33},
                            "size": {"3M", "20M"}}),
        ("probe", {"optimizer": {"muon"}, "bits": QAT_BITS, "warmdown": {0.33},
                   "size": {"5M", "15M", "30M", "50M", "100M"}}),
    ],
)
def test_phase5_block_levels(phase5, block, expected):
    cells = block_cells(phase5, block)
    for field, values in expected.items():
        assert levels(cells, field) == values, field
    assert levels(cells, "lr_mult") == {1.0}


def test_phase5_int4_seeds(phase5):
    seeds = collections.defaultdict(set)
    for cell in block_cells(phase5, "int4"):
        seeds[(cell.size, cell.warmdown)].add(cell.seed)
    for (size, _), found in seeds.items():
        expected = set(range(10)) if size in ("50M", "100M") else SEEDS
        assert found == expected, size


def test_phase5_probe_block_probes_densely(phase5):
    for cell in phase5.cells:
        if cell.block == "probe":
            assert cell.probe_every == cell.steps // 100
            assert cell.probe_every > 0
        else:
            assert cell.probe_every == 0


def test_phase5_optimiser_block_settings(phase5):
    for cell in block_cells(phase5, "optimiser"):
        assert cell.weight_decay == 0.1
        assert cell.adam_lr == {"15M": 0.0027, "50M": 0.0020}[cell.size]
    for cell in phase5.cells:
        if cell.block != "optimiser":
            assert (cell.adam_lr, cell.weight_decay) == (0.008, 0.0)


def test_phases_share_no_cell(phase2, phase5):
    assert not {c.cell_id for c in phase2.cells} & {c.cell_id for c in phase5.cells}


def test_phase5_inherits_phase2_settings(phase2, phase5):
    reference = {c.size: c for c in phase2.cells}
    for cell in phase5.cells:
        if cell.size not in reference:
            continue
        base = reference[cell.size]
        for field in ("seq_len", "batch_size", "matrix_lr", "val_tokens", "data", "vocab_size"):
            assert getattr(cell, field) == getattr(base, field), field


# ---------------------------------------------------------------------------
# derived settings
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("phase_name", ["2", "5"])
def test_sizes_within_10_percent(phase_name):
    for cell in load_phase(phase_name).cells:
        assert cell.n_params == count_params(cell.n_layer, cell.n_embd, cell.vocab_size)
        nominal = nominal_params(cell.size)
        assert abs(cell.n_params - nominal) <= 0.10 * nominal, (cell.size, cell.n_params)


def test_every_study_size_within_10_percent():
    for size, (n_layer, n_embd, _) in SIZES.items():
        if size.startswith("tiny"):
            continue
        n_params = count_params(n_layer, n_embd, 1024)
        assert abs(n_params - nominal_params(size)) <= 0.10 * nominal_params(size), size


@pytest.mark.parametrize("phase_name", ["2", "5"])
def test_steps_follow_tokens_per_param(phase_name):
    for cell in load_phase(phase_name).cells:
        tokens_per_step = cell.batch_size * cell.seq_len
        base_steps = round(cell.tokens_per_param * cell.n_params / tokens_per_step)
        assert cell.steps == base_steps * cell.steps_mult
        # Rounding to whole steps moves the tokens per parameter by at most half a step.
        achieved = cell.steps / cell.steps_mult * tokens_per_step / cell.n_params
        assert abs(achieved - 20.0) <= 0.5 * tokens_per_step / cell.n_params
        assert cell.warmup_steps == math.ceil(0.02 * base_steps)
        assert cell.eval_every == cell.steps // 10


def test_phase2_steps_by_size(phase2):
    steps = {cell.size: cell.steps for cell in phase2.cells}
    assert steps == {"15M": 4440, "30M": 4400, "50M": 7600, "100M": 7620}


def test_length_block_warmdown_on_total_steps(phase2, phase5):
    base = next(c for c in phase2.cells if c.size == "15M")
    for cell in block_cells(phase5, "length"):
        assert cell.steps == cell.steps_mult * base.steps
        assert cell.warmup_steps == base.warmup_steps
        start = warmdown_start(cell.steps, cell.warmdown)
        decay_steps = cell.steps - start
        # The decay covers the warmdown fraction of all steps, so it is
        # steps_mult times as long as the base run's, up to rounding.
        assert abs(decay_steps - cell.warmdown * cell.steps) <= 0.5
        base_decay = base.steps - warmdown_start(base.steps, cell.warmdown)
        assert abs(decay_steps - cell.steps_mult * base_decay) <= cell.steps_mult
        multiplier = [
            lr_multiplier(step, cell.steps, cell.warmup_steps, cell.warmdown, cell.shape)
            for step in (start - 1, start, start + 1, cell.steps - 1)
        ]
        assert multiplier[0] == 1.0
        assert multiplier[1] == 1.0
        assert multiplier[2] < 1.0
        assert multiplier[3] == 0.0


# ---------------------------------------------------------------------------
# committed manifests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("phase_name", ["2", "5"])
def test_committed_manifest_matches_spec(phase_name):
    path = REPO / "manifests" / f"{phase_name}.csv"
    regenerate = (
        f"regenerate it from the repository root with "
        f"`python -m pipeline manifest --phase {phase_name} --workdir .`"
    )
    assert path.is_file(), f"{path} is missing; {regenerate}"
    expected = manifest.render(load_phase(phase_name).cells)
    assert path.read_bytes() == expected, (
        f"{path} does not match pipeline/specs/{phase_name}.toml; {regenerate}"
    )


@pytest.mark.parametrize("phase_name", ["2", "5"])
def test_committed_manifest_names_no_path(phase_name):
    cells = manifest.read(REPO / "manifests" / f"{phase_name}.csv")
    assert {cell.data for cell in cells} == {DATASET}


# ---------------------------------------------------------------------------
# size tables and the CPU override
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("phase_name", ["2", "5"])
def test_size_tables_cover_every_size(phase_name):
    for size in SIZES:
        cells = load_phase(phase_name, size_override=size).cells
        assert levels(cells, "size") == {size}


def test_phase2_batch_doubles_with_size(phase2):
    batches = {cell.size: cell.batch_size for cell in phase2.cells}
    assert batches == {"15M": 64, "30M": 128, "50M": 128, "100M": 256}


def test_size_override_with_embedded_corpus():
    phase = load_phase("2", data="stdlib-docs", size_override="tiny1")
    assert len(phase.cells) == 180  # the four sizes merge into one
    cell = phase.cells[0]
    assert (cell.size, cell.data, cell.vocab_size) == ("tiny1", "stdlib-docs", 256)
    assert cell.n_params == count_params(2, 64, 256) == 114_688
    assert (cell.seq_len, cell.batch_size, cell.val_tokens) == (1024, 4, 65_536)
    assert cell.steps == round(20 * 114_688 / 4096)


def test_size_override_keeps_phase5_blocks_apart():
    phase = load_phase("5", data="stdlib-docs", size_override="tiny1")
    counts = collections.Counter(cell.block for cell in phase.cells)
    # Sizes merge within a block, and the int4-reference cells become equal
    # to fp16 cells of the sizes block, which is listed first.
    assert counts == {
        "optimiser": 60, "shape": 60, "length": 90, "sizes": 20, "int4": 20, "probe": 15,
    }
    assert len({cell.cell_id for cell in phase.cells}) == len(phase.cells)


def test_size_override_without_data_keeps_dataset():
    cell = load_phase("2", size_override="tiny1").cells[0]
    assert (cell.data, cell.vocab_size) == (DATASET, 1024)
    assert cell.n_params == count_params(2, 64, 1024)


# ---------------------------------------------------------------------------
# spec format: size tables, probes, settings_from, vocabulary
# ---------------------------------------------------------------------------

BASE_SETTINGS = {
    "seq_len": 16, "steps": 10, "matrix_lr": 0.02, "adam_lr": 0.01, "val_tokens": 64,
    "batch_size": {"tiny1": 2, "tiny2": 3},
}
GRID = {"bits": ["fp16"], "warmdown": [0.1], "size": ["tiny1", "tiny2"], "seed": [0]}


def spec(settings=None, block_settings=None, **top):
    block = {"name": "b", "factors": GRID}
    if block_settings is not None:
        block["settings"] = block_settings
    return {"settings": {**BASE_SETTINGS, **(settings or {})}, "block": [block], **top}


def test_size_table_picks_value_per_size():
    cells = expand_spec("t", spec()).cells
    assert [(c.size, c.batch_size) for c in cells] == [("tiny1", 2), ("tiny2", 3)]


def test_size_table_default_entry():
    cells = expand_spec("t", spec({"val_tokens": {"default": 128, "tiny2": 256}})).cells
    assert [c.val_tokens for c in cells] == [128, 256]


@pytest.mark.parametrize(
    "settings, needle",
    [
        ({"batch_size": {"tiny1": 2}}, "no value for size 'tiny2'"),
        ({"batch_size": {"tiny1": 2, "tiny2": 3, "9000M": 4}}, "invalid size '9000M'"),
        ({"batch_size": {"tiny1": 2, "tiny2": "four"}}, "expected a number"),
        ({"data": {"tiny1": "stdlib-docs"}}, "setting 'data' is a table"),
        ({"probes": 10, "probe_every": 2}, "both probe_every and probes"),
        ({"vocab_size": 100}, "vocab_size 100 is smaller than the 256 tokens"),
    ],
)
def test_bad_setting_named_in_error(settings, needle):
    with pytest.raises(UsageError) as error:
        expand_spec("t", spec(settings))
    assert needle in str(error.value)
    assert "\n" not in str(error.value)


def test_block_probes_replace_phase_probe_every():
    cells = expand_spec("t", spec({"probe_every": 3}, block_settings={"probes": 5})).cells
    assert {c.probe_every for c in cells} == {10 // 5}
    cells = expand_spec("t", spec({"probes": 5}, block_settings={"probe_every": 4})).cells
    assert {c.probe_every for c in cells} == {4}
    cells = expand_spec("t", spec({"probes": 0})).cells
    assert {c.probe_every for c in cells} == {0}


def test_settings_from_takes_packaged_settings():
    grid = {"bits": ["int6"], "warmdown": [0.2], "size": ["15M"], "seed": [0]}
    phase = expand_spec("mine", {"settings_from": "2", "block": [{"name": "b", "factors": grid}]})
    reference = next(
        c for c in load_phase("2").cells
        if (c.bits, c.warmdown, c.size, c.seed, c.lr_mult) == ("int6", 0.2, "15M", 0, 1.0)
    )
    assert phase.cells[0].cell_id == reference.cell_id


@pytest.mark.parametrize(
    "parent, needle",
    [("nope", "settings_from 'nope' is not a packaged phase"), ("5", "has settings_from itself")],
)
def test_settings_from_rejects(parent, needle):
    with pytest.raises(UsageError, match=needle):
        expand_spec("t", spec(settings_from=parent))


# ---------------------------------------------------------------------------
# the named data set and its checks
# ---------------------------------------------------------------------------


def write_shard(path: Path, tokens, magic: int = 20240520) -> Path:
    """Write a token shard by hand from the format: 256 int32 header, then uint16 tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = (magic, 1, len(tokens))
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())
    return path


def train_tokenizer(directory: Path, vocab_size: int) -> Path:
    """Train a SentencePiece BPE model on Python sources that ship with every interpreter."""
    import argparse
    import inspect
    import typing

    text = directory / "train.txt"
    text.write_text("".join(Path(module.__file__).read_text() for module in (inspect, argparse, typing)))
    prefix = directory / f"bpe{vocab_size}"
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, minloglevel=2,
    )
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[int, Path]:
    directory = tmp_path_factory.mktemp("tokenizers")
    return {size: train_tokenizer(directory, size) for size in (1024, 512)}


@pytest.fixture
def data_root(tmp_path, tokenizers, monkeypatch) -> Path:
    """A data root in the layout of the parameter-golf download, with small shards."""
    root = tmp_path / "data"
    shards = root / "datasets" / DATASET
    shards.mkdir(parents=True)
    (root / "tokenizers").mkdir()
    (root / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(tokenizers[1024].read_bytes())
    tokens = np.arange(20_000) % 1024
    write_shard(shards / "fineweb_train_000000.bin", tokens[:12_000])
    write_shard(shards / "fineweb_train_000001.bin", tokens[12_000:18_000])
    write_shard(shards / "fineweb_val_000000.bin", tokens[18_000:])
    monkeypatch.setenv(data.DATA_ROOT_ENV, str(root))
    return root


def test_dataset_passes_check(data_root):
    data.check_data(DATASET, vocab_size=1024)
    assert data.resolve_data(DATASET) == DATASET


def test_dataset_loads_from_root(data_root, tmp_path):
    corpus = data.load_corpus(DATASET, tmp_path / "cache")
    assert corpus.vocab_size == 1024
    assert len(corpus.train) == 18_000
    assert len(corpus.val) == 2_000
    assert corpus.bytes_per_token.shape == (1024,)


def test_dataset_vocab_needs_no_files(monkeypatch):
    monkeypatch.delenv(data.DATA_ROOT_ENV, raising=False)
    assert data.data_vocab_size(DATASET) == 1024
    assert data.data_vocab_size("stdlib-docs") == 256


def test_dataset_without_root_rejected(monkeypatch):
    monkeypatch.delenv(data.DATA_ROOT_ENV, raising=False)
    with pytest.raises(DataError) as error:
        data.check_data(DATASET)
    message = str(error.value)
    assert "QAT_DATA_ROOT is not set" in message
    assert "datasets/fineweb10B_sp1024/" in message
    assert "\n" not in message
    with pytest.raises(DataError, match="QAT_DATA_ROOT"):
        data.load_corpus(DATASET, "unused")


def test_dataset_root_not_a_directory(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_ROOT_ENV, str(tmp_path / "missing"))
    with pytest.raises(DataError, match="is not a directory"):
        data.check_data(DATASET)


@pytest.mark.parametrize(
    "damage, needle",
    [
        ("no shard directory", "shard directory .* not found"),
        ("no tokenizer", "tokenizer .*fineweb_1024_bpe.model of data set .* not found"),
        ("wrong tokenizer", "has 512 pieces, but data set 'fineweb10B_sp1024' has a vocabulary of 1024"),
        ("bad magic", "fineweb_train_000001.bin has magic number 1234"),
        ("truncated shard", "fineweb_val_000000.bin is truncated"),
        ("no val shard", "no \\*_val_\\*.bin shard"),
    ],
)
def test_damaged_dataset_rejected(data_root, tokenizers, damage, needle):
    shards = data_root / "datasets" / DATASET
    model = data_root / "tokenizers" / "fineweb_1024_bpe.model"
    if damage == "no shard directory":
        for path in shards.iterdir():
            path.unlink()
        shards.rmdir()
    elif damage == "no tokenizer":
        model.unlink()
    elif damage == "wrong tokenizer":
        model.write_bytes(tokenizers[512].read_bytes())
    elif damage == "bad magic":
        write_shard(shards / "fineweb_train_000001.bin", [1, 2, 3], magic=1234)
    elif damage == "truncated shard":
        val = shards / "fineweb_val_000000.bin"
        val.write_bytes(val.read_bytes()[:-10])
    elif damage == "no val shard":
        (shards / "fineweb_val_000000.bin").unlink()

    with pytest.raises(DataError, match=needle) as error:
        data.check_data(DATASET, vocab_size=1024)
    assert "\n" not in str(error.value)
    with pytest.raises(DataError, match=needle):
        data.resolve_data(DATASET)


def test_check_data_rejects_small_vocab(data_root):
    with pytest.raises(DataError, match="vocab_size is 512; set vocab_size to at least 1024"):
        data.check_data(DATASET, vocab_size=512)
    with pytest.raises(DataError, match="at least 256"):
        data.check_data("stdlib-docs", vocab_size=100)
    data.check_data("stdlib-docs", vocab_size=1024)


def test_check_data_txt_directory(tmp_path):
    (tmp_path / "corpus").mkdir()
    with pytest.raises(DataError, match="is empty"):
        data.check_data(f"txt:{tmp_path / 'corpus'}")
    (tmp_path / "corpus" / "a.txt").write_text("some text")
    data.check_data(f"txt:{tmp_path / 'corpus'}", vocab_size=256)


def test_dataset_name_refuses_tokenizer(data_root, tokenizers):
    with pytest.raises(DataError, match="has its own tokenizer"):
        data.resolve_data(DATASET, tokenizer=tokenizers[1024])


def test_shards_override_takes_tokenizer_vocab(data_root):
    shard_dir = data_root / "datasets" / DATASET
    resolved = data.resolve_data(str(shard_dir), tokenizer=data_root / "tokenizers" / "fineweb_1024_bpe.model")
    cell = load_phase("2", data=resolved).cells[0]
    assert cell.vocab_size == 1024
    assert cell.data == resolved


# ---------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------


def test_submit_dry_run_lists_720_cells(data_root, tmp_path):
    workdir = tmp_path / "wd"
    result = run_cli(
        "submit", "--phase", "2", "--dry-run", "--workdir", str(workdir),
        env={data.DATA_ROOT_ENV: str(data_root)},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "phase 2: 720 cells, 0 done, 720 to submit"
    # A cell line starts with its 12-digit id; the arrays, the sbatch script
    # and the estimate that follow do not.
    listed = [match.group(1) for line in lines if (match := CELL_LINE.match(line))]
    assert listed == [cell.cell_id for cell in load_phase("2").cells]
    assert not workdir.exists()


def test_manifest_command_reproduces_committed(tmp_path):
    result = run_cli("manifest", "--phase", "5", "--workdir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "625 cells in 7 block(s)" in result.stdout
    committed = (REPO / "manifests" / "5.csv").read_bytes()
    assert (tmp_path / "manifests" / "5.csv").read_bytes() == committed


def test_submit_rejects_malformed_shard(data_root, tmp_path):
    write_shard(data_root / "datasets" / DATASET / "fineweb_train_000001.bin", [1, 2, 3], magic=1234)
    result = run_cli(
        "submit", "--phase", "2", "--cluster", "local", "--workdir", str(tmp_path / "wd"),
        env={data.DATA_ROOT_ENV: str(data_root)},
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "magic number 1234" in lines[0]
    assert not (tmp_path / "wd" / "results").exists()
    assert not (tmp_path / "wd" / "logs").exists()


def test_dry_run_warns_on_missing_data(tmp_path):
    result = run_cli(
        "submit", "--phase", "2", "--dry-run", "--workdir", str(tmp_path / "wd"),
        env={data.DATA_ROOT_ENV: str(tmp_path / "no-such-root")},
    )
    assert result.returncode == 0
    assert result.stderr.startswith("warning: ")
