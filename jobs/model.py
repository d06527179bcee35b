"""Decoder-only transformer language model with quantisation-aware linears.

Pre-norm blocks with parameter-free RMSNorm, rotary position embedding,
causal scaled-dot-product attention, a 4x relu^2 MLP, no biases, and a token
embedding tied to the output head. Every linear layer inside the blocks is a
``QATLinear``, so one ``set_bits`` call switches the fake quantisation of all
of them. The embedding and head are not fake-quantised during training
(``jobs.quant.export_quantized`` can still store the embedding at int8).

Parameter count: ``vocab_size * n_embd`` (the tied embedding) plus
``12 * n_embd**2`` per block (q, k, v, attention output: 4 d^2; MLP: 8 d^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from jobs.quant import QATLinear, qmax

# Rotary base: the usual value. The slowest channel pair rotates with a
# wavelength just under 2 * pi * 10000 positions.
ROPE_BASE = 10000.0


@dataclass(frozen=True)
class GPTConfig:
    """Architecture of a GPT model."""

    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    seq_len: int  # maximum sequence length, which sizes the rotary tables

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"invalid {name} {value!r}; expected a positive integer")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}; "
                "choose n_head so that the head dimension is an integer"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(
                f"head dimension {self.head_dim} (n_embd {self.n_embd} / n_head {self.n_head}) "
                "is odd; rotary embedding rotates pairs of channels, so it must be even"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# Nominal size label -> (n_layer, n_embd, n_head). Counts at vocab_size 1024
# (count_params) are within 5% of the label. Head dimension is 64 for every
# label and depth grows with size, keeping n_embd / n_layer between 32 and 64.
# The tiny sizes are for a CPU demo at vocab_size 256: tiny1 has 114,688
# parameters and tiny2 356,352. They use head dimension 32, because at
# 64 or 96 wide a head dimension of 64 would leave one head or an
# indivisible width.
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny1": (2, 64, 2),
    "tiny2": (3, 96, 3),
    "3M": (6, 192, 3),  # 2,850,816
    "5M": (6, 256, 4),  # 4,980,736
    "8M": (6, 320, 5),  # 7,700,480
    "15M": (8, 384, 6),  # 14,548,992
    "20M": (8, 448, 7),  # 19,726,336
    "30M": (9, 512, 8),  # 28,835,840
    "50M": (10, 640, 10),  # 49,807,360
    "100M": (14, 768, 12),  # 99,876,864
    "175M": (18, 896, 14),  # 174,325,760
    "250M": (20, 1024, 16),  # 252,706,816
    "350M": (22, 1152, 18),  # 351,535,104
}


def count_params(n_layer: int, n_embd: int, vocab_size: int) -> int:
    """Return the exact trainable parameter count of ``GPT``.

    The tied embedding contributes ``vocab_size * n_embd`` once, and each block
    contributes ``12 * n_embd**2``. RMSNorm and rotary embedding have no
    parameters and there are no biases.
    """
    return vocab_size * n_embd + 12 * n_layer * n_embd * n_embd


def flops_per_token(config: GPTConfig) -> float:
    """Estimate the training FLOPs per token (forward plus backward).

    Returns ``6 * N + 12 * n_layer * n_embd * seq_len``. Here N is
    ``count_params`` including the tied embedding, because its use as the output
    head is a real (n_embd x vocab_size) matmul. The second term is the
    attention scores and weighted values: 2 matmuls of 2 * seq_len * n_embd
    FLOPs per token and layer in the forward pass, times 3 for the backward
    pass.

    The attention term is not halved for the causal mask. This is the
    convention of nanoGPT's MFU estimate, which follows PaLM (arXiv:2204.02311,
    appendix B), so MFU figures compare with published ones. Causal
    flash-attention kernels skip the fully masked blocks of the upper triangle,
    so the estimate exceeds the work they do by up to
    ``6 * n_layer * n_embd * seq_len``. At small sizes and long sequences that
    is a sizeable fraction of ``6 * N``.
    """
    n_params = count_params(config.n_layer, config.n_embd, config.vocab_size)
    return 6.0 * n_params + 12.0 * config.n_layer * config.n_embd * config.seq_len


def _rotary_tables(seq_len: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = ROPE_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
    return angles.cos(), angles.sin()


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + hd/2) of x (B, T, H, hd) by position-dependent angles."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos = cos[None, :, None, :].to(x.dtype)  # (1, T, 1, hd/2)
    sin = sin[None, :, None, :].to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)  # (B, T, H, hd)


def _rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, bits: int | None) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        # Separate q, k and v matrices instead of one fused (3d x d) matrix,
        # because Muon orthogonalises each weight matrix as a whole and q, k
        # and v play different roles.
        self.q = QATLinear(config.n_embd, config.n_embd, bits=bits)
        self.k = QATLinear(config.n_embd, config.n_embd, bits=bits)
        self.v = QATLinear(config.n_embd, config.n_embd, bits=bits)
        self.proj = QATLinear(config.n_embd, config.n_embd, bits=bits)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim)  # (B, T, H, hd)
        k = self.k(x).view(B, T, self.n_head, self.head_dim)
        v = self.v(x).view(B, T, self.n_head, self.head_dim)
        q = _apply_rotary(q, cos, sin).transpose(1, 2)  # (B, H, T, hd)
        k = _apply_rotary(k, cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.proj(y)


class MLP(nn.Module):
    """Position-wise MLP with a 4x hidden layer and relu(x)^2 activation.

    relu^2 instead of GELU: Primer (So et al., 2021, arXiv:2109.08668)
    attributes most of its reduction in language-model training cost to two
    changes, and squaring the ReLU is one of them. It is also cheaper than
    GELU's erf.
    """

    def __init__(self, config: GPTConfig, bits: int | None) -> None:
        super().__init__()
        self.fc = QATLinear(config.n_embd, 4 * config.n_embd, bits=bits)
        self.proj = QATLinear(4 * config.n_embd, config.n_embd, bits=bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(x)).square()  # (B, T, 4C)
        return self.proj(h)  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, bits: int | None) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config, bits)
        self.mlp = MLP(config, bits)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(_rms_norm(x), cos, sin)
        x = x + self.mlp(_rms_norm(x))
        return x


class GPT(nn.Module):
    """Decoder-only language model.

    Parameters
    ----------
    config : GPTConfig
        Architecture.
    bits : int or None
        Bit-width of the fake quantisation of every block linear from step 0,
        or None for full-precision training.

    Notes
    -----
    Initialisation: the embedding (and so the tied head) is drawn from
    normal(0, 0.02). Linears that read the normalised residual stream (q, k,
    v, MLP fc) use normal(0, 1/sqrt(fan_in)), which keeps their outputs at
    unit RMS for unit-RMS inputs at every width. The two linears per block that
    write into the residual stream (attention proj, MLP proj) are further
    scaled by 1/sqrt(2 * n_layer), as in GPT-2, so the residual stream does not
    grow with depth at initialisation.
    """

    def __init__(self, config: GPTConfig, bits: int | None = None) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, bits) for _ in range(config.n_layer))
        cos, sin = _rotary_tables(config.seq_len, config.head_dim)
        # Not persistent: the tables are derived from the config, so checkpoints
        # and exports need not store them.
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        self.set_bits(bits)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.02)
        residual_scale = 1.0 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            for linear in (block.attn.q, block.attn.k, block.attn.v, block.mlp.fc):
                nn.init.normal_(linear.weight, mean=0.0, std=linear.in_features**-0.5)
            for linear in (block.attn.proj, block.mlp.proj):
                std = linear.in_features**-0.5 * residual_scale
                nn.init.normal_(linear.weight, mean=0.0, std=std)

    def set_bits(self, bits: int | None) -> None:
        """Set the fake-quantisation bit-width of every block linear (None disables it)."""
        if bits is not None:
            qmax(bits)
        self.bits = bits
        for _, linear in self.quantized_linears():
            linear.bits = bits

    def quantized_linears(self) -> list[tuple[str, QATLinear]]:
        """Return (qualified name, module) for every ``QATLinear``, in module order."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, QATLinear)]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Return logits (B, T, vocab_size) in float32, or the mean cross-entropy loss.

        Parameters
        ----------
        idx : torch.Tensor
            Token ids, int64 of shape (B, T) with T <= config.seq_len.
        targets : torch.Tensor or None
            Next-token ids of shape (B, T). If given, the scalar float32 mean
            cross-entropy over all positions is returned instead of logits.
        """
        B, T = idx.shape
        if T > self.config.seq_len:
            raise ValueError(
                f"sequence length {T} exceeds config.seq_len {self.config.seq_len}; "
                "build the model with a larger seq_len or feed shorter sequences"
            )
        cos, sin = self.rotary_cos[:T], self.rotary_sin[:T]  # (T, hd/2)

        x = self.wte(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin)
        x = _rms_norm(x)
        logits = F.linear(x, self.wte.weight).float()  # (B, T, V)

        if targets is None:
            return logits
        return F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T))
