"""Learning-rate schedules: warmup, then constant, linear, cosine or warmup-stable-decay (wsd).

    python -m pytest tests/test_optim.py -q -k "warmup or schedule or floor"
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from cpt.config import TrainConfig


def warmup_steps(t: TrainConfig, total_steps: int) -> int:
    return t.warmup_steps if t.warmup_steps > 0 else int(math.ceil(t.warmup_ratio * total_steps))


def lr_lambda(t: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of each group's peak lr at a given optimizer step (0-based)."""
    warm = warmup_steps(t, total_steps)
    floor = t.min_lr_ratio
    kind = t.lr_scheduler_type
    decay_start = total_steps - max(1, int(round(t.decay_ratio * total_steps))) if kind == "wsd" else warm

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)  # never exactly 0: the first step still learns a little
        if kind == "constant":
            return 1.0
        if kind == "wsd" and step < decay_start:
            return 1.0
        span = max(1, total_steps - decay_start)
        progress = min(1.0, (step - decay_start) / span)
        if kind == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * (1 - progress)  # linear, and wsd's decay

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t, total_steps))
