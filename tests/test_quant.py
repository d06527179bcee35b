"""Tests for fake quantisation, the straight-through gradient, export and the grid probe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jobs.model import GPT, GPTConfig
from jobs.quant import (
    QATLinear,
    export_quantized,
    fake_quantize,
    grid_distance,
    load_quantized,
    probe_model,
    qmax,
    row_scale,
)

BITS = (4, 6, 8)


def reference_round_trip(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise to int8 and dequantise step by step, independently of jobs.quant.

    Returns (integers as int8, float16 scales of shape (out,), dequantised float32 weights).
    """
    limit = 2 ** (bits - 1) - 1
    row_max = w.abs().max(dim=1).values.float()
    scale16 = (row_max / limit).clamp(min=2.0**-14).to(torch.float16)
    scale32 = scale16.float().unsqueeze(1)
    integers = torch.round(w.float() / scale32).clamp(-limit, limit).to(torch.int8)
    dequantised = integers.to(torch.float32) * scale32
    return integers, scale16, dequantised


def adversarial_matrix() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(6, 64, generator=generator) * 0.02
    w[1] = 0.0  # all-zero row: scale must not be 0 or give NaN
    w[2, 7] = 40.0  # one huge outlier squeezes the rest of the row to 0
    w[3] = -w[3].abs() - 1e-3  # negative-only row
    w[4] = 1e-6  # row far below the smallest float16 normal scale
    w[5, ::2] = 0.5  # half the row at the row maximum
    return w


@pytest.mark.parametrize("bits", BITS)
def test_qmax_values(bits):
    assert qmax(bits) == {4: 7, 6: 31, 8: 127}[bits]


@pytest.mark.parametrize("bad", [0, 1, 2, 3, 5, 16, 32, True, "8", None])
def test_qmax_rejects_invalid_bits(bad):
    with pytest.raises(ValueError, match="expected one of 4, 6, 8"):
        qmax(bad)


@pytest.mark.parametrize("bits", BITS)
def test_fake_quantize_random_matches_reference(bits):
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(bits)) * 0.05
    integers, _, dequantised = reference_round_trip(w, bits)

    result = fake_quantize(w, bits)

    assert result.dtype == w.dtype
    assert torch.equal(result, dequantised)
    assert int(integers.abs().max()) == qmax(bits)


@pytest.mark.parametrize("bits", BITS)
def test_fake_quantize_adversarial_matches_reference(bits):
    w = adversarial_matrix()
    _, _, dequantised = reference_round_trip(w, bits)

    result = fake_quantize(w, bits)

    assert torch.isfinite(result).all()
    assert torch.equal(result, dequantised)
    assert torch.equal(result[1], torch.zeros(64))
    assert (result[3] <= 0).all()


@pytest.mark.parametrize("bits", BITS)
def test_fake_quantize_outlier_keeps_outlier(bits):
    w = adversarial_matrix()
    result = fake_quantize(w, bits)
    # 40.0 / qmax rounded to float16 and multiplied back lands within float16 precision of 40.
    assert result[2, 7].item() == pytest.approx(40.0, rel=1e-3)


def test_fake_quantize_is_idempotent():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    once = fake_quantize(w, 6)
    assert torch.equal(fake_quantize(once, 6), once)


def test_fake_quantize_keeps_bfloat16_dtype():
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    _, _, dequantised = reference_round_trip(w, 8)

    result = fake_quantize(w, 8)

    assert result.dtype == torch.bfloat16
    assert torch.equal(result, dequantised.to(torch.bfloat16))


def test_row_scale_zero_row_positive():
    scale = row_scale(torch.zeros(3, 5), 8)
    assert scale.shape == (3, 1)
    assert (scale > 0).all()
    assert torch.isfinite(scale).all()


def test_row_scale_is_float16_exact():
    w = torch.randn(32, 32, generator=torch.Generator().manual_seed(5))
    scale = row_scale(w, 4)
    assert scale.dtype == torch.float32
    assert torch.equal(scale, scale.half().float())


def test_row_scale_rejects_vector():
    with pytest.raises(ValueError, match="2-D"):
        row_scale(torch.ones(4), 8)


@pytest.mark.parametrize("bits", BITS)
def test_straight_through_gradient_is_identity(bits):
    generator = torch.Generator().manual_seed(10 + bits)
    w = adversarial_matrix().requires_grad_(True)
    upstream = torch.randn(w.shape, generator=generator)

    (fake_quantize(w, bits) * upstream).sum().backward()

    assert torch.equal(w.grad, upstream)


def test_qatlinear_without_bits_equals_linear():
    torch.manual_seed(0)
    reference = nn.Linear(24, 40, bias=False)
    layer = QATLinear(24, 40, bits=None)
    with torch.no_grad():
        layer.weight.copy_(reference.weight)
    x = torch.randn(3, 7, 24)

    assert torch.equal(layer(x), reference(x))


def test_qatlinear_with_bias_without_bits_equals_linear():
    torch.manual_seed(0)
    reference = nn.Linear(24, 40, bias=True)
    layer = QATLinear(24, 40, bias=True)
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(5, 24)

    assert torch.equal(layer(x), reference(x))


@pytest.mark.parametrize("bits", BITS)
def test_qatlinear_with_bits_uses_fake_quantized_weight(bits):
    torch.manual_seed(0)
    layer = QATLinear(24, 40, bits=bits)
    x = torch.randn(3, 24)
    expected = x @ reference_round_trip(layer.weight.detach(), bits)[2].T

    assert torch.equal(layer(x), expected)


def test_qatlinear_rejects_invalid_bits():
    with pytest.raises(ValueError, match="invalid bits 5"):
        QATLinear(4, 4, bits=5)


def test_grid_distance_zero_on_grid():
    generator = torch.Generator().manual_seed(6)
    for bits in BITS:
        limit = qmax(bits)
        integers = torch.randint(-limit, limit + 1, (16, 64), generator=generator).float()
        integers[:, 0] = limit  # fixes each row's maximum, so the scale is the step
        # float16-exact steps, some not powers of two, so w / scale is exact
        steps = torch.tensor([2.0**-7, 3 * 2.0**-9, 0.01171875, 1.5] * 4).unsqueeze(1)
        assert grid_distance(integers * steps, bits) == 0.0


@pytest.mark.parametrize("bits", BITS)
def test_grid_distance_uniform_noise_quarter(bits):
    w = torch.rand(256, 1024, generator=torch.Generator().manual_seed(bits)) * 2 - 1
    assert grid_distance(w, bits) == pytest.approx(0.25, abs=0.01)


def test_grid_distance_half_way_points():
    # Every element except the row maximum sits half-way between grid points.
    limit = qmax(8)
    w = torch.full((4, 100), 10.5)
    w[:, 0] = limit
    expected = 99 * 0.5 / 100
    assert grid_distance(w, 8) == pytest.approx(expected, abs=1e-6)


def test_grid_distance_beyond_range_measures_to_qmax():
    # The exact scale 1 + 2**-12 lies below half the float16 spacing at 1.0
    # (2**-10), so row_scale rounds it down to 1.0 and the row maximum ends
    # up 127 * 2**-12 grid steps beyond qmax.
    limit = qmax(8)
    row_max = limit * (1.0 + 2.0**-12)
    w = torch.tensor([[row_max, 0.0]])
    assert row_scale(w, 8).item() == 1.0
    expected = (row_max - limit) / 2  # the 0.0 element is on the grid
    assert grid_distance(w, 8) == pytest.approx(expected, rel=1e-6)


def tiny_gpt(bits: int | None, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=97, seq_len=32), bits=bits)


def test_probe_model_keys_and_range():
    result = probe_model(tiny_gpt(bits=None))
    assert set(result) == {"int4", "int6", "int8"}
    for value in result.values():
        assert 0.0 < value < 0.5


def test_probe_model_zero_after_quantized_load():
    model = tiny_gpt(bits=6)
    load_quantized(model, export_quantized(model, bits=6))
    assert probe_model(model)["int6"] == pytest.approx(0.0, abs=1e-6)


def test_probe_model_rejects_model_without_qatlinear():
    with pytest.raises(ValueError, match="no QATLinear"):
        probe_model(nn.Linear(3, 3))


@pytest.mark.parametrize("bits", BITS)
def test_export_round_trip_matches_fake_quant_eval(bits):
    model = tiny_gpt(bits=bits).eval()
    idx = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(idx)

    state = export_quantized(model, bits)
    restored = tiny_gpt(bits=bits, seed=123).eval()
    load_quantized(restored, state)
    with torch.no_grad():
        logits = restored(idx)

    assert restored.bits is None
    assert all(linear.bits is None for _, linear in restored.quantized_linears())
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", BITS)
def test_export_integers_int8_in_range(bits):
    model = tiny_gpt(bits=bits)
    state = export_quantized(model, bits)

    for name, _ in model.quantized_linears():
        codes = state[f"{name}.weight.q"]
        scale = state[f"{name}.weight.scale"]
        assert codes.dtype == torch.int8
        assert int(codes.min()) >= -qmax(bits)
        assert int(codes.max()) <= qmax(bits)
        assert scale.dtype == torch.float16
        assert scale.shape == (codes.shape[0],)
        assert f"{name}.weight" not in state

    assert state["wte.weight"].dtype == torch.float32


def test_export_keys_cover_state_dict():
    model = tiny_gpt(bits=4)
    state = export_quantized(model, 4, embed_bits=8)
    covered = {key.removesuffix(".q").removesuffix(".scale") for key in state}
    assert covered == set(model.state_dict())


def test_export_embedding_at_int8():
    model = tiny_gpt(bits=4).eval()
    state = export_quantized(model, 4, embed_bits=8)

    assert state["wte.weight.q"].dtype == torch.int8
    assert state["wte.weight.scale"].shape == (97,)
    assert "wte.weight" not in state

    restored = tiny_gpt(bits=4, seed=5).eval()
    load_quantized(restored, state)
    expected_embedding = reference_round_trip(model.wte.weight.detach(), 8)[2]
    assert torch.equal(restored.wte.weight, expected_embedding)


def test_export_of_full_precision_model_is_post_training_quantization():
    model = tiny_gpt(bits=None).eval()
    idx = torch.randint(0, 97, (1, 32), generator=torch.Generator().manual_seed(8))
    model.set_bits(4)
    with torch.no_grad():
        expected = model(idx)
    model.set_bits(None)

    state = export_quantized(model, 4)
    load_quantized(model, state)
    with torch.no_grad():
        logits = model(idx)

    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def test_export_does_not_alias_model_weights():
    model = tiny_gpt(bits=None)
    state = export_quantized(model, 8)
    with torch.no_grad():
        model.wte.weight.add_(1.0)
    assert not torch.equal(state["wte.weight"], model.wte.weight)


def test_load_quantized_missing_scale_raises():
    model = tiny_gpt(bits=8)
    state = export_quantized(model, 8)
    del state["blocks.0.mlp.fc.weight.scale"]
    with pytest.raises(KeyError, match="blocks.0.mlp.fc.weight.scale"):
        load_quantized(model, state)


def test_load_quantized_missing_weight_raises():
    model = tiny_gpt(bits=8)
    state = export_quantized(model, 8)
    del state["wte.weight"]
    with pytest.raises(RuntimeError, match="wte.weight"):
        load_quantized(model, state)


def test_export_rejects_invalid_bits():
    with pytest.raises(ValueError, match="invalid bits 3"):
        export_quantized(tiny_gpt(bits=None), 3)
    with pytest.raises(ValueError, match="invalid bits 16"):
        export_quantized(tiny_gpt(bits=None), 8, embed_bits=16)


def test_export_round_trip_under_bfloat16_autocast():
    model = tiny_gpt(bits=6).eval()
    idx = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(9))
    restored = tiny_gpt(bits=6, seed=77).eval()
    load_quantized(restored, export_quantized(model, 6))

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(idx)
        logits = restored(idx)

    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
