"""Schedules of the aligner training: the prior-substitution probability p and the
learning rate.

p (paper §3.2 and §4): with probability p a training sample's MAE prior is the MAE's
*reconstruction prior*, computed from the whole, unmasked image, instead of the prior
predicted from the visible pixels. Early in training this tells the aligner that the
prior describes what the UNet must draw, even where the MAE could not have guessed it;
later most samples use the real (masked) prior. The paper sets p to 100 % and lowers it
linearly to 10 % over the first 2K steps, then keeps it there.
"""

from __future__ import annotations

import math


def substitution_probability(step: int, start: float = 1.0, end: float = 0.1, steps: int = 2000) -> float:
    """p at optimiser step ``step`` (0-based): linear from ``start`` to ``end`` over
    ``steps`` steps, then constant."""
    if steps <= 0 or step >= steps:
        return float(end)
    return float(start + (end - start) * (step / steps))


def learning_rate(step: int, base: float, *, warmup: int = 0, total: int = 0, final: float = 1.0) -> float:
    """Linear warm-up over ``warmup`` steps, then constant (``final`` = 1) or cosine
    decay to ``final * base`` at step ``total``."""
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    if final >= 1.0 or total <= warmup:
        return base
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t)))
