"""Learning-rate schedule of the pixel optimisation: one cosine cycle with linear warm-up per phase (PSAQ-ViT)."""

from __future__ import annotations

import math


def phase_learning_rate(base_lr: float, step: int, iterations: int, warmup: int) -> float:
    """Learning rate at `step` (0-based) of a phase of `iterations` steps.

    Linear warm-up `base_lr * (step + 1) / warmup` for the first `warmup` steps, then a cosine decay from `base_lr`
    towards 0 over the remaining steps (PSAQ-ViT's `lr_cosine_policy`).

    Args:
        base_lr (`float`): peak learning rate.
        step (`int`): step within the phase.
        iterations (`int`): length of the phase.
        warmup (`int`): warm-up steps.

    Returns:
        `float`

    Example:
        >>> phase_learning_rate(0.2, 0, 500, 100)
        0.002
        >>> phase_learning_rate(0.2, 100, 500, 100)
        0.2
    """
    if step < warmup:
        return base_lr * (step + 1) / warmup
    decay_steps = max(iterations - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / decay_steps)) * base_lr
