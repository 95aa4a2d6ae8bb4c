"""The learning-rate schedule: linear warmup, then cosine decay to the floor (nanoGPT's `get_lr`)."""

from __future__ import annotations

import math


def learning_rate(step: int, peak: float, floor: float, warmup_steps: int, decay_steps: int) -> float:
    """LR for optimizer step `step` (0-based): peak·(step+1)/warmup, then cosine from peak to floor at
    `decay_steps`, then the floor."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if step >= decay_steps:
        return floor
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)
