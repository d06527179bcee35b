"""Tests for optimiser construction, parameter grouping and LR setting."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jobs.model import GPT, GPTConfig
from jobs.optim import ADAM_BETAS, OPTIMIZERS, build_optimizers, set_lr
from jobs.quant import QATLinear


def small_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, seq_len=16), bits=None)


class ModelWithExtras(nn.Module):
    """A QATLinear with a bias, a 1-D gain, a scalar and a frozen weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.linear = QATLinear(8, 8, bias=True)
        self.gain = nn.Parameter(torch.ones(8))
        self.temperature = nn.Parameter(torch.tensor(1.0))
        self.frozen = nn.Parameter(torch.zeros(8, 8), requires_grad=False)


def grouped_ids(optimizers: list[torch.optim.Optimizer]) -> list[int]:
    return [id(p) for o in optimizers for g in o.param_groups for p in g["params"]]


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("model_factory", [small_model, ModelWithExtras])
def test_every_parameter_in_exactly_one_group(name, model_factory):
    model = model_factory()
    optimizers = build_optimizers(model, name, matrix_lr=0.02, adam_lr=0.003, weight_decay=0.1, lr_mult=1.0)
    ids = grouped_ids(optimizers)
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)), "a parameter appears in two groups"
    assert set(ids) == set(trainable)


def test_muon_groups_block_matrices():
    model = small_model()
    muon, adam = build_optimizers(model, "muon", matrix_lr=0.02, adam_lr=0.003, weight_decay=0.1, lr_mult=0.5)

    assert isinstance(muon, torch.optim.Muon)
    assert type(adam) is torch.optim.Adam
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    assert muon_ids == {id(m.weight) for _, m in model.quantized_linears()}
    adam_params = [p for g in adam.param_groups for p in g["params"]]
    assert [id(p) for p in adam_params] == [id(model.wte.weight)]


def test_muon_settings():
    model = small_model()
    muon, adam = build_optimizers(model, "muon", matrix_lr=0.02, adam_lr=0.003, weight_decay=0.1, lr_mult=0.5)

    muon_group = muon.param_groups[0]
    assert muon_group["lr"] == pytest.approx(0.01)
    assert muon_group["initial_lr"] == pytest.approx(0.01)
    assert muon_group["momentum"] == 0.95
    assert muon_group["nesterov"] is True
    assert muon_group["weight_decay"] == 0.1

    adam_group = adam.param_groups[0]
    assert adam_group["lr"] == pytest.approx(0.0015)
    assert adam_group["initial_lr"] == pytest.approx(0.0015)
    assert adam_group["betas"] == ADAM_BETAS
    assert adam_group["weight_decay"] == 0.0
    assert adam_group["fused"] is True  # CPU has fused Adam kernels in torch 2.13


def test_muon_sends_bias_and_vectors_to_adam():
    model = ModelWithExtras()
    muon, adam = build_optimizers(model, "muon", matrix_lr=0.02, adam_lr=0.003, weight_decay=0.0, lr_mult=1.0)
    assert [id(p) for g in muon.param_groups for p in g["params"]] == [id(model.linear.weight)]
    adam_ids = {id(p) for g in adam.param_groups for p in g["params"]}
    assert adam_ids == {id(model.embed.weight), id(model.linear.bias), id(model.gain), id(model.temperature)}


def test_adamw_decays_only_matrices():
    model = ModelWithExtras()
    (adamw,) = build_optimizers(model, "adamw", matrix_lr=0.02, adam_lr=0.003, weight_decay=0.1, lr_mult=2.0)

    assert type(adamw) is torch.optim.AdamW
    decayed, not_decayed = adamw.param_groups
    assert decayed["weight_decay"] == 0.1
    assert {id(p) for p in decayed["params"]} == {id(model.embed.weight), id(model.linear.weight)}
    assert not_decayed["weight_decay"] == 0.0
    assert {id(p) for p in not_decayed["params"]} == {
        id(model.linear.bias),
        id(model.gain),
        id(model.temperature),
    }
    for group in adamw.param_groups:
        assert group["lr"] == pytest.approx(0.006)
        assert group["initial_lr"] == pytest.approx(0.006)
        assert group["betas"] == ADAM_BETAS


def test_adamw_without_vectors_has_one_group():
    (adamw,) = build_optimizers(small_model(), "adamw", 0.02, 0.003, 0.1, 1.0)
    assert len(adamw.param_groups) == 1


def test_rejects_unknown_optimizer():
    with pytest.raises(ValueError, match="invalid optimizer 'sgd'; expected one of muon, adamw"):
        build_optimizers(small_model(), "sgd", 0.02, 0.003, 0.1, 1.0)


@pytest.mark.parametrize("field", ["matrix_lr", "adam_lr", "weight_decay", "lr_mult"])
def test_rejects_negative_values(field):
    values = dict(matrix_lr=0.02, adam_lr=0.003, weight_decay=0.1, lr_mult=1.0)
    values[field] = -1.0
    with pytest.raises(ValueError, match=f"invalid {field} -1.0"):
        build_optimizers(small_model(), "muon", **values)


def test_muon_rejects_model_without_matrices():
    with pytest.raises(ValueError, match="use optimizer 'adamw'"):
        build_optimizers(nn.Embedding(4, 4), "muon", 0.02, 0.003, 0.1, 1.0)


def test_set_lr_scales_every_group():
    optimizers = build_optimizers(ModelWithExtras(), "muon", 0.02, 0.003, 0.0, 1.0)
    optimizers += build_optimizers(ModelWithExtras(), "adamw", 0.02, 0.003, 0.1, 1.0)

    set_lr(optimizers, 0.25)

    for optimizer in optimizers:
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(0.25 * group["initial_lr"])

    set_lr(optimizers, 0.0)
    assert all(g["lr"] == 0.0 for o in optimizers for g in o.param_groups)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizers_lower_loss(name):
    model = small_model(seed=1)
    optimizers = build_optimizers(model, name, matrix_lr=0.02, adam_lr=0.01, weight_decay=0.0, lr_mult=1.0)
    sequence = torch.tensor([5, 9, 2, 40, 11, 7, 63, 30]).repeat(3)
    idx, targets = sequence[:16].unsqueeze(0), sequence[1:17].unsqueeze(0)

    losses = []
    for _ in range(30):
        loss = model(idx, targets)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        losses.append(loss.item())

    assert losses[-1] < 0.5 * losses[0], f"{name}: loss went from {losses[0]:.3f} to {losses[-1]:.3f}"


def test_zero_lr_leaves_weights_unchanged():
    model = small_model()
    optimizers = build_optimizers(model, "muon", 0.02, 0.003, 0.1, 1.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    set_lr(optimizers, 0.0)
    idx = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(2))
    model(idx, idx).backward()
    for optimizer in optimizers:
        optimizer.step()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
