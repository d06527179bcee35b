"""Learning-rate schedule: linear warmup, constant peak, then a warmdown to 0.

All optimisers share one multiplier in [0, 1]. Each parameter group's LR is
its peak LR times this multiplier (see ``jobs.optim.set_lr``).
"""

from __future__ import annotations

import math

SHAPES = ("linear", "cosine")


def warmdown_start(total_steps: int, warmdown: float) -> int:
    """Return the first step of the decay: ``total_steps - round(warmdown * total_steps)``.

    The fraction is rounded half up, so the result does not depend on Python's
    round-half-to-even. With ``warmdown=0`` the result is ``total_steps`` and
    no step decays. With ``warmdown=1`` it is 0.

    Raises
    ------
    ValueError
        If ``total_steps < 1`` or ``warmdown`` is outside [0, 1].
    """
    if total_steps < 1:
        raise ValueError(f"invalid total_steps {total_steps!r}; expected at least 1")
    if not 0.0 <= warmdown <= 1.0:
        raise ValueError(f"invalid warmdown {warmdown!r}; expected a fraction in [0, 1]")
    # The 1e-9 absorbs float error before rounding half up: 0.35 * 90 is
    # 31.499999999999996 in doubles but means 31.5, which rounds to 32.
    decay_steps = math.floor(warmdown * total_steps + 0.5 + 1e-9)
    return total_steps - min(decay_steps, total_steps)


def lr_multiplier(
    step: int, total_steps: int, warmup_steps: int, warmdown: float, shape: str = "linear"
) -> float:
    """Return the LR multiplier in [0, 1] for the 0-based ``step`` of ``total_steps``.

    Warmup: ``(step + 1) / warmup_steps`` for ``step < warmup_steps``, so the
    first step trains at ``1 / warmup_steps`` and step ``warmup_steps - 1`` at 1.

    Decay: from ``start = warmdown_start(total_steps, warmdown)`` the decay
    progress is ``p = (step - start) / (total_steps - 1 - start)``, so the
    multiplier is exactly 1 at ``start`` and exactly 0 at the last step
    ``total_steps - 1``. "linear" gives ``1 - p`` and "cosine" gives
    ``(1 + cos(pi * p)) / 2``. Both are 0.5 at ``p = 0.5``. If the decay spans
    only the last step, that step gets 0. With ``warmdown=0`` there is no decay
    and the last step trains at the peak LR.

    Where warmup and decay overlap, the smaller of the two applies.

    Raises
    ------
    ValueError
        For an unknown ``shape``, a negative ``warmup_steps``, or a ``step``
        outside ``[0, total_steps)``; also as ``warmdown_start``.
    """
    if shape not in SHAPES:
        raise ValueError(f"invalid shape {shape!r}; expected one of {', '.join(SHAPES)}")
    if warmup_steps < 0:
        raise ValueError(f"invalid warmup_steps {warmup_steps!r}; expected 0 or more")
    start = warmdown_start(total_steps, warmdown)
    if not 0 <= step < total_steps:
        raise ValueError(
            f"step {step!r} is outside [0, {total_steps}); steps are 0-based and the last is total_steps - 1"
        )

    warmup = (step + 1) / warmup_steps if step < warmup_steps else 1.0
    if step < start:
        return warmup

    decay_span = total_steps - 1 - start
    progress = 1.0 if decay_span == 0 else (step - start) / decay_span
    if shape == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min(warmup, decay)
