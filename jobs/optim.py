"""Optimisers for the study: Muon for block matrices plus Adam, or AdamW for everything.

Every parameter group stores its peak LR in ``group["initial_lr"]``. The
training loop scales all groups with ``set_lr(optimizers, lr_multiplier(...))``.
"""

from __future__ import annotations

import torch
from torch import nn

from jobs.quant import QATLinear

OPTIMIZERS = ("muon", "adamw")

# beta2 = 0.95 instead of PyTorch's default 0.999: the second-moment estimate
# then follows the gradient scale over about 20 steps instead of about 1000.
# With 0.999, a gradient that grows after a quiet stretch is divided by a stale,
# too-small estimate, and the oversized update can cause a loss spike.
# beta1 = 0.9 is the usual momentum.
ADAM_BETAS = (0.9, 0.95)

# Muon settings: Nesterov momentum 0.95, PyTorch's defaults for torch.optim.Muon.
MUON_MOMENTUM = 0.95


def _fused_supported(params: list[nn.Parameter]) -> bool:
    # torch 2.13 has fused Adam/AdamW kernels for CUDA and CPU. A fused optimiser
    # needs all its tensors on one device, so mixed placements use the default.
    devices = {p.device for p in params}
    return len(devices) == 1 and next(iter(devices)).type in ("cuda", "cpu")


def _split_muon_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split trainable parameters into (2-D QATLinear weights, everything else)."""
    matrix_ids = {
        id(m.weight) for m in model.modules() if isinstance(m, QATLinear) and m.weight.ndim == 2
    }
    matrices, others = [], []
    for p in model.parameters():  # parameters() yields a tied tensor once
        if not p.requires_grad:
            continue
        (matrices if id(p) in matrix_ids else others).append(p)
    return matrices, others


def _with_initial_lr(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


def build_optimizers(
    model: nn.Module,
    optimizer: str,
    matrix_lr: float,
    adam_lr: float,
    weight_decay: float,
    lr_mult: float,
) -> list[torch.optim.Optimizer]:
    """Build the optimisers for one cell; every trainable parameter lands in exactly one group.

    Parameters
    ----------
    model : nn.Module
        The model. Its ``QATLinear`` weights are the block matrices.
    optimizer : str
        "muon": ``torch.optim.Muon`` (Nesterov momentum 0.95, ``weight_decay``
        applied decoupled, scaled by the LR) for the 2-D ``QATLinear`` weights at
        ``matrix_lr * lr_mult``, plus Adam for all other parameters (embedding,
        any 1-D or scalar parameters) at ``adam_lr * lr_mult`` without weight
        decay. The documentation of ``torch.optim.Muon`` (torch 2.13) restricts
        it to 2-D hidden-layer matrices and recommends a standard optimiser for
        embeddings and biases.
        "adamw": ``torch.optim.AdamW`` for all parameters at ``adam_lr * lr_mult``
        with ``weight_decay`` on 2-D parameters (embedding included) and none on
        1-D or scalar ones.
    matrix_lr : float
        Peak Muon LR before ``lr_mult``; unused for "adamw".
    adam_lr : float
        Peak Adam or AdamW LR before ``lr_mult``.
    weight_decay : float
        Decoupled weight decay, as described for each optimizer.
    lr_mult : float
        Multiplies every peak LR.

    Returns
    -------
    list[torch.optim.Optimizer]
        Muon then Adam for "muon"; one AdamW for "adamw". Adam and AdamW use
        betas ``ADAM_BETAS`` and fused kernels when all parameters share one
        CUDA or CPU device.

    Raises
    ------
    ValueError
        For an unknown ``optimizer`` or a negative LR, weight decay or ``lr_mult``.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"invalid optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    for name, value in (
        ("matrix_lr", matrix_lr),
        ("adam_lr", adam_lr),
        ("weight_decay", weight_decay),
        ("lr_mult", lr_mult),
    ):
        if value < 0:
            raise ValueError(f"invalid {name} {value!r}; expected a value >= 0")

    if optimizer == "muon":
        matrices, others = _split_muon_params(model)
        if not matrices:
            raise ValueError("model has no 2-D QATLinear weights for Muon; use optimizer 'adamw'")
        optimizers: list[torch.optim.Optimizer] = [
            torch.optim.Muon(
                matrices,
                lr=matrix_lr * lr_mult,
                weight_decay=weight_decay,
                momentum=MUON_MOMENTUM,
                nesterov=True,
            )
        ]
        if others:
            optimizers.append(
                torch.optim.Adam(
                    others,
                    lr=adam_lr * lr_mult,
                    betas=ADAM_BETAS,
                    fused=_fused_supported(others) or None,
                )
            )
        return [_with_initial_lr(o) for o in optimizers]

    params = [p for p in model.parameters() if p.requires_grad]
    decayed = [p for p in params if p.ndim >= 2]
    not_decayed = [p for p in params if p.ndim < 2]
    groups = [
        {"params": group_params, "weight_decay": group_decay}
        for group_params, group_decay in ((decayed, weight_decay), (not_decayed, 0.0))
        if group_params
    ]
    adamw = torch.optim.AdamW(
        groups, lr=adam_lr * lr_mult, betas=ADAM_BETAS, fused=_fused_supported(params) or None
    )
    return [_with_initial_lr(adamw)]


def set_lr(optimizers: list[torch.optim.Optimizer], multiplier: float) -> None:
    """Set every group's LR to ``group["initial_lr"] * multiplier``."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
