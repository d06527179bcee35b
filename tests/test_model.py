"""Tests for the GPT model, its size table, parameter count and FLOP estimate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from jobs.model import SIZES, GPT, GPTConfig, _apply_rotary, _rotary_tables, count_params, flops_per_token
from jobs.quant import QATLinear

NOMINAL_SIZES = ["3M", "5M", "8M", "15M", "20M", "30M", "50M", "100M", "175M", "250M", "350M"]


def make_config(size: str, vocab_size: int = 1024, seq_len: int = 64) -> GPTConfig:
    n_layer, n_embd, n_head = SIZES[size]
    return GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab_size, seq_len=seq_len)


def small_model(bits: int | None = None, seed: int = 0, vocab_size: int = 64, seq_len: int = 16) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=vocab_size, seq_len=seq_len)
    return GPT(config, bits=bits)


def test_sizes_has_every_label():
    assert set(SIZES) == set(NOMINAL_SIZES) | {"tiny1", "tiny2"}


@pytest.mark.parametrize("size", NOMINAL_SIZES)
def test_size_within_ten_percent(size):
    n_layer, n_embd, _ = SIZES[size]
    nominal = float(size.removesuffix("M")) * 1e6
    n_params = count_params(n_layer, n_embd, vocab_size=1024)
    assert abs(n_params / nominal - 1) <= 0.10, f"{size}: {n_params:,} vs nominal {nominal:,.0f}"


@pytest.mark.parametrize("size", NOMINAL_SIZES)
def test_size_head_dim_64(size):
    _, n_embd, n_head = SIZES[size]
    assert n_embd == 64 * n_head


def test_tiny_sizes_parameter_counts():
    tiny1 = count_params(*SIZES["tiny1"][:2], vocab_size=256)
    tiny2 = count_params(*SIZES["tiny2"][:2], vocab_size=256)
    assert 80_000 <= tiny1 <= 130_000
    assert 250_000 <= tiny2 <= 400_000


@pytest.mark.parametrize("size", sorted(SIZES))
def test_count_params_equals_model(size):
    vocab_size = 256 if size.startswith("tiny") else 1024
    config = make_config(size, vocab_size=vocab_size)
    # The meta device allocates no storage, so even 350M builds instantly.
    with torch.device("meta"):
        model = GPT(config, bits=8)
    actual = sum(p.numel() for p in model.parameters())
    assert count_params(config.n_layer, config.n_embd, config.vocab_size) == actual


def test_count_params_closed_form():
    assert count_params(n_layer=2, n_embd=64, vocab_size=256) == 256 * 64 + 2 * 12 * 64 * 64


def test_flops_per_token_hand_computed():
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=256, seq_len=128)
    n_params = 256 * 64 + 24 * 64 * 64  # 114,688
    expected = 6 * n_params + 12 * 2 * 64 * 128
    assert flops_per_token(config) == float(expected)


def test_config_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="not divisible by n_head 3"):
        GPTConfig(n_layer=1, n_head=3, n_embd=64, vocab_size=10, seq_len=8)


def test_config_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="head dimension 5"):
        GPTConfig(n_layer=1, n_head=2, n_embd=10, vocab_size=10, seq_len=8)


@pytest.mark.parametrize("field", ["n_layer", "n_head", "n_embd", "vocab_size", "seq_len"])
def test_config_rejects_nonpositive(field):
    values = dict(n_layer=1, n_head=2, n_embd=8, vocab_size=10, seq_len=8)
    values[field] = 0
    with pytest.raises(ValueError, match=f"invalid {field} 0"):
        GPTConfig(**values)


def test_forward_logits_shape_and_dtype():
    model = small_model()
    idx = torch.randint(0, 64, (3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, 64)
    assert logits.dtype == torch.float32


def test_forward_loss_scalar_near_log_vocab():
    model = small_model(vocab_size=64)
    idx = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    loss = model(idx, targets)
    assert loss.shape == ()
    assert loss.dtype == torch.float32
    # At init the logits are small, so the loss is close to uniform guessing.
    assert loss.item() == pytest.approx(math.log(64), abs=0.1)


def test_forward_loss_equals_cross_entropy_of_logits():
    model = small_model()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    targets = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(idx)
        loss = model(idx, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 64), targets.view(-1)))


def test_forward_shorter_sequence():
    model = small_model(seq_len=16)
    assert model(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 64)


def test_forward_rejects_too_long_sequence():
    model = small_model(seq_len=16)
    with pytest.raises(ValueError, match="sequence length 17 exceeds config.seq_len 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_forward_is_causal():
    model = small_model().eval()
    idx = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(5))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 64
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(before[:, :10], after[:, :10], rtol=0, atol=0)
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_rotary_scores_depend_on_relative_position():
    head_dim, seq_len = 16, 12
    cos, sin = _rotary_tables(seq_len, head_dim)
    generator = torch.Generator().manual_seed(6)
    q = torch.randn(head_dim, generator=generator).expand(1, seq_len, 1, head_dim)
    k = torch.randn(head_dim, generator=generator).expand(1, seq_len, 1, head_dim)
    q_rot = _apply_rotary(q, cos, sin)[0, :, 0]  # (T, hd)
    k_rot = _apply_rotary(k, cos, sin)[0, :, 0]
    scores = q_rot @ k_rot.T  # (T, T)
    # Same offset m - n gives the same score.
    torch.testing.assert_close(scores[5, 2], scores[9, 6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores[3, 3], scores[11, 11], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(scores[5, 2], scores[5, 4])


def test_rotary_preserves_norm():
    cos, sin = _rotary_tables(8, 16)
    x = torch.randn(2, 8, 3, 16, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(_apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def test_model_has_no_biases_and_no_position_parameters():
    model = small_model()
    names = [name for name, _ in model.named_parameters()]
    assert not any(name.endswith("bias") for name in names)
    assert names[0] == "wte.weight"
    assert all(name.startswith("blocks.") for name in names[1:])
    assert "rotary_cos" not in model.state_dict()


def test_head_is_tied_to_embedding():
    model = small_model()
    idx = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        model.wte.weight[7].zero_()
        logits = model(idx)
    # A zero embedding row gives a zero logit for that token at every position.
    assert torch.equal(logits[..., 7], torch.zeros(1, 16))


def test_every_block_linear_is_qatlinear():
    model = small_model(bits=6)
    linears = model.quantized_linears()
    assert len(linears) == 6 * model.config.n_layer
    names = {name for name, _ in linears}
    assert "blocks.1.attn.q" in names
    assert "blocks.0.mlp.proj" in names
    assert all(isinstance(m, QATLinear) and m.bits == 6 for _, m in linears)


def test_set_bits_switches_all_linears():
    model = small_model(bits=None)
    model.set_bits(4)
    assert model.bits == 4
    assert {m.bits for _, m in model.quantized_linears()} == {4}
    model.set_bits(None)
    assert {m.bits for _, m in model.quantized_linears()} == {None}


def test_set_bits_rejects_invalid():
    model = small_model()
    with pytest.raises(ValueError, match="invalid bits 16"):
        model.set_bits(16)
    with pytest.raises(ValueError, match="invalid bits 2"):
        GPT(model.config, bits=2)


def test_bits_change_logits():
    model = small_model(bits=None).eval()
    idx = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = model(idx)
        model.set_bits(4)
        quantised = model(idx)
    assert not torch.allclose(full, quantised)


def test_init_scales():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=8, n_head=4, n_embd=256, vocab_size=512, seq_len=16)
    model = GPT(config)
    block = model.blocks[0]
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.attn.q.weight.std().item() == pytest.approx(256**-0.5, rel=0.05)
    assert block.mlp.fc.weight.std().item() == pytest.approx(256**-0.5, rel=0.05)
    assert block.attn.proj.weight.std().item() == pytest.approx(256**-0.5 / 4, rel=0.05)
    assert block.mlp.proj.weight.std().item() == pytest.approx(1024**-0.5 / 4, rel=0.05)


def test_forward_under_bfloat16_autocast():
    model = small_model(bits=8)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    assert model.blocks[0].attn.q.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("bits", [None, 4])
def test_model_trains_on_repeated_sequence(bits):
    model = small_model(bits=bits, vocab_size=64, seq_len=16)
    pattern = torch.tensor([3, 17, 42, 8, 25, 60, 1, 33])
    sequence = pattern.repeat(3)  # 24 tokens: inputs 0..15, targets 1..16
    idx, targets = sequence[:16].unsqueeze(0), sequence[1:17].unsqueeze(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    losses = []
    for _ in range(30):
        loss = model(idx, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert losses[-1] < 0.5 * losses[0], f"loss went from {losses[0]:.3f} to {losses[-1]:.3f}"
