"""Learning-rate schedules: warmup, then constant, linear, cosine or warmup-stable-decay (wsd); and
transformers' constant_with_warmup, cosine_with_min_lr and warmup_stable_decay with transformers'
curves (warmup from 0, cosine decays), for configs written for the HF Trainer.

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
    decay_start = (total_steps - max(1, int(round(t.decay_ratio * total_steps)))
                   if kind in ("wsd", "warmup_stable_decay") else warm)
    if kind in HF_CURVES:
        return _hf_curve(kind, warm, decay_start, total_steps, floor)

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


HF_CURVES = ("constant_with_warmup", "cosine_with_min_lr", "warmup_stable_decay")


def _hf_curve(kind: str, warm: int, decay_start: int, total_steps: int, floor: float) -> Callable[[int], float]:
    """transformers' schedules of these names (get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup, get_wsd_schedule with its cosine decay)."""

    def f(step: int) -> float:
        if step < warm:  # warmup_stable_decay warms up from its floor, the others from 0
            return (floor if kind == "warmup_stable_decay" else 0.0) + (
                1 - (floor if kind == "warmup_stable_decay" else 0.0)) * step / max(1, warm)
        if kind == "constant_with_warmup" or step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t, total_steps))
