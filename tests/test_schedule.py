"""Tests for the warmup/warmdown learning-rate multiplier."""

from __future__ import annotations

import math

import pytest

from jobs.schedule import SHAPES, lr_multiplier, warmdown_start

TOTAL = 101  # warmdown 0.5 rounds to 51 decay steps (50..100), so the decay midpoint is a whole step


def test_warmdown_start_values():
    assert warmdown_start(1000, 0.2) == 800
    assert warmdown_start(1000, 0.0) == 1000
    assert warmdown_start(1000, 1.0) == 0
    assert warmdown_start(10, 0.25) == 7  # 2.5 decay steps round half up to 3


def test_warmdown_start_absorbs_float_error():
    # 0.35 * 90 is 31.499999999999996 in doubles; it means 31.5 and rounds up.
    assert warmdown_start(90, 0.35) == 90 - 32


@pytest.mark.parametrize("warmdown", [-0.1, 1.5])
def test_warmdown_start_rejects_bad_fraction(warmdown):
    with pytest.raises(ValueError, match="expected a fraction in"):
        warmdown_start(100, warmdown)


def test_warmdown_start_rejects_zero_steps():
    with pytest.raises(ValueError, match="invalid total_steps 0"):
        warmdown_start(0, 0.5)


def test_warmup_first_and_last_step():
    assert lr_multiplier(0, TOTAL, 10, 0.5) == pytest.approx(0.1)
    assert lr_multiplier(4, TOTAL, 10, 0.5) == pytest.approx(0.5)
    assert lr_multiplier(9, TOTAL, 10, 0.5) == 1.0
    assert lr_multiplier(10, TOTAL, 10, 0.5) == 1.0


def test_no_warmup_starts_at_peak():
    assert lr_multiplier(0, TOTAL, 0, 0.5) == 1.0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("warmdown", [0.05, 0.3, 0.5, 0.9])
def test_peak_at_warmdown_start(shape, warmdown):
    start = warmdown_start(TOTAL, warmdown)
    assert lr_multiplier(start, TOTAL, 5, warmdown, shape) == 1.0
    assert lr_multiplier(start - 1, TOTAL, 5, warmdown, shape) == 1.0
    assert lr_multiplier(start + 1, TOTAL, 5, warmdown, shape) < 1.0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("warmdown", [0.01, 0.05, 0.3, 0.5, 1.0])
def test_zero_at_last_step(shape, warmdown):
    assert lr_multiplier(TOTAL - 1, TOTAL, 5, warmdown, shape) == 0.0
    assert lr_multiplier(TOTAL - 2, TOTAL, 5, warmdown, shape) > 0.0


def test_single_decay_step_is_zero():
    # warmdown 0.01 of 101 steps rounds to 1 decay step: only the last step decays.
    assert warmdown_start(TOTAL, 0.01) == TOTAL - 1
    assert lr_multiplier(TOTAL - 2, TOTAL, 0, 0.01) == 1.0
    assert lr_multiplier(TOTAL - 1, TOTAL, 0, 0.01) == 0.0


@pytest.mark.parametrize("shape", SHAPES)
def test_midpoint_is_half(shape):
    start = warmdown_start(TOTAL, 0.5)  # 50; the decay spans steps 50..100
    midpoint = start + (TOTAL - 1 - start) // 2
    assert (TOTAL - 1 - start) % 2 == 0
    assert lr_multiplier(midpoint, TOTAL, 0, 0.5, shape) == pytest.approx(0.5, abs=1e-12)


def test_linear_and_cosine_values_inside_decay():
    start = warmdown_start(TOTAL, 0.5)
    quarter = start + (TOTAL - 1 - start) // 4  # progress 12/50
    progress = (quarter - start) / (TOTAL - 1 - start)
    assert lr_multiplier(quarter, TOTAL, 0, 0.5, "linear") == pytest.approx(1 - progress)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    assert lr_multiplier(quarter, TOTAL, 0, 0.5, "cosine") == pytest.approx(cosine)
    assert cosine > 1 - progress  # cosine stays higher early in the decay


@pytest.mark.parametrize("shape", SHAPES)
def test_monotone_in_warmdown(shape):
    fractions = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]
    for step in range(TOTAL):
        values = [lr_multiplier(step, TOTAL, 5, w, shape) for w in fractions]
        assert all(a >= b for a, b in zip(values, values[1:])), f"step {step}: {values}"


@pytest.mark.parametrize("shape", SHAPES)
def test_nonincreasing_during_decay(shape):
    start = warmdown_start(TOTAL, 0.4)
    values = [lr_multiplier(step, TOTAL, 5, 0.4, shape) for step in range(start, TOTAL)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("shape", SHAPES)
def test_warmdown_zero_never_decays(shape):
    values = [lr_multiplier(step, TOTAL, 10, 0.0, shape) for step in range(10, TOTAL)]
    assert values == [1.0] * len(values)


@pytest.mark.parametrize("shape", SHAPES)
def test_warmdown_one_decays_from_first_step(shape):
    assert lr_multiplier(0, TOTAL, 0, 1.0, shape) == 1.0
    assert lr_multiplier(1, TOTAL, 0, 1.0, shape) < 1.0
    assert lr_multiplier(TOTAL - 1, TOTAL, 0, 1.0, shape) == 0.0


def test_warmup_overlapping_decay_takes_minimum():
    # Warmup of 20 steps with warmdown 1: early steps follow the warmup ramp,
    # later ones the decay line.
    assert lr_multiplier(0, TOTAL, 20, 1.0) == pytest.approx(1 / 20)
    assert lr_multiplier(19, TOTAL, 20, 1.0) == pytest.approx(1 - 19 / 100)
    assert lr_multiplier(50, TOTAL, 20, 1.0) == pytest.approx(0.5)


def test_single_step_run():
    assert lr_multiplier(0, 1, 0, 0.0) == 1.0
    assert lr_multiplier(0, 1, 0, 1.0) == 0.0


@pytest.mark.parametrize("shape", SHAPES)
def test_values_within_unit_interval(shape):
    for warmdown in (0.0, 0.15, 0.6, 1.0):
        for step in range(TOTAL):
            assert 0.0 <= lr_multiplier(step, TOTAL, 7, warmdown, shape) <= 1.0


def test_rejects_unknown_shape():
    with pytest.raises(ValueError, match="invalid shape 'exp'; expected one of linear, cosine"):
        lr_multiplier(0, TOTAL, 0, 0.5, "exp")


@pytest.mark.parametrize("step", [-1, TOTAL])
def test_rejects_step_out_of_range(step):
    with pytest.raises(ValueError, match=f"step {step} is outside"):
        lr_multiplier(step, TOTAL, 0, 0.5)


def test_rejects_negative_warmup():
    with pytest.raises(ValueError, match="invalid warmup_steps -1"):
        lr_multiplier(0, TOTAL, -1, 0.5)
