"""Phase specs: expansion into cells, stable ids, and the errors for bad specs."""

import pytest

from pipeline.cell import Cell
from pipeline.errors import UsageError
from pipeline.phases import expand_spec, load_phase

BASE = {
    "settings": {"seq_len": 16, "batch_size": 2, "steps": 10, "matrix_lr": 0.02, "adam_lr": 0.01, "val_tokens": 64},
}


def spec(*blocks):
    return {**BASE, "block": list(blocks)}


def test_micro_has_36_cells():
    phase = load_phase("micro")
    assert len(phase.cells) == 36
    assert {c.bits for c in phase.cells} == {"fp16", "int8", "int6"}
    assert {c.warmdown for c in phase.cells} == {0.10, 0.33, 0.50}
    assert {c.size for c in phase.cells} == {"tiny1", "tiny2"}
    assert {c.seed for c in phase.cells} == {0, 1}
    assert len({c.cell_id for c in phase.cells}) == 36


def test_cell_id_stable_across_loads():
    first = [c.cell_id for c in load_phase("micro").cells]
    second = [c.cell_id for c in load_phase("micro").cells]
    assert first == second


def test_cell_id_ignores_labels():
    cell = load_phase("micro").cells[0]
    relabelled = Cell(**{**cell.to_row(), "phase": "other", "block": "b", "cell_id": ""})
    assert relabelled.cell_id == cell.cell_id


def test_cell_id_changes_with_settings():
    cell = load_phase("micro").cells[0]
    assert cell.replace(seed=cell.seed + 1).cell_id != cell.cell_id
    assert cell.replace(warmdown=0.2).cell_id != cell.cell_id


def test_factor_table_list_is_a_union():
    phase = expand_spec("t", spec({"name": "b", "factors": [
        {"bits": ["fp16"], "warmdown": [0.1], "size": ["tiny1"], "seed": [0, 1]},
        {"bits": ["int4"], "warmdown": [0.1], "size": ["tiny1"], "seed": [0, 1, 2]},
    ]}))
    assert len(phase.cells) == 5


def test_steps_mult_multiplies_steps_not_warmup():
    phase = expand_spec("t", spec({"name": "b", "factors": {
        "bits": ["fp16"], "warmdown": [0.1], "size": ["tiny1"], "seed": [0], "steps_mult": [1, 3],
    }}))
    short, long = phase.cells
    assert long.steps == 3 * short.steps
    assert long.warmup_steps == short.warmup_steps


@pytest.mark.parametrize(
    "block, needle",
    [
        ({"name": "b", "factors": {"bits": ["int5"], "size": ["tiny1"], "seed": [0], "warmdown": [0.1]}}, "int5"),
        ({"name": "b", "factors": {"bits": [], "size": ["tiny1"], "seed": [0], "warmdown": [0.1]}}, "non-empty"),
        ({"name": "b", "factors": {"colour": ["red"]}}, "colour"),
        ({"name": "b", "factors": {"bits": ["fp16"], "size": ["9000M"], "seed": [0], "warmdown": [0.1]}}, "9000M"),
        ({"name": "b", "factors": {"bits": ["fp16"], "size": ["tiny1"], "seed": [0], "warmdown": [1.5]}}, "1.5"),
        ({"factors": {"bits": ["fp16"]}}, "no name"),
    ],
)
def test_bad_block_named_in_error(block, needle):
    with pytest.raises(UsageError) as err:
        expand_spec("t", spec(block))
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_duplicate_cell_across_blocks_rejected():
    grid = {"bits": ["fp16"], "warmdown": [0.1], "size": ["tiny1"], "seed": [0]}
    with pytest.raises(UsageError) as err:
        expand_spec("t", spec({"name": "a", "factors": grid}, {"name": "b", "factors": grid}))
    assert "'b'" in str(err.value)
    assert "'a'" in str(err.value)


def test_unknown_setting_rejected():
    bad = {**BASE, "settings": {**BASE["settings"], "learning_rate": 1.0}, "block": [
        {"name": "b", "factors": {"bits": ["fp16"], "warmdown": [0.1], "size": ["tiny1"], "seed": [0]}}
    ]}
    with pytest.raises(UsageError, match="learning_rate"):
        expand_spec("t", bad)


def test_unknown_phase_lists_available():
    with pytest.raises(UsageError, match="micro"):
        load_phase("nope")


def test_phase_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        '[settings]\nseq_len = 16\nbatch_size = 2\nsteps = 10\nmatrix_lr = 0.02\nadam_lr = 0.01\nval_tokens = 64\n'
        '[[block]]\nname = "x"\n[block.factors]\nbits = ["int4", "fp16"]\nwarmdown = [0.1]\nsize = ["tiny1"]\nseed = [0]\n'
    )
    phase = load_phase(phase_file=path)
    assert phase.name == "mine"
    assert [c.bits for c in phase.cells] == ["int4", "fp16"]


def test_size_override_changes_dimensions():
    phase = load_phase("micro", size_override="tiny1")
    assert {c.size for c in phase.cells} == {"tiny1"}
    assert len(phase.cells) == 18  # cells that differed only in size merge
    with pytest.raises(UsageError, match="huge"):
        load_phase("micro", size_override="huge")
