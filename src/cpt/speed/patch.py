"""Replacing a module's forward for one run, and putting it back.

Every conversion cpt.speed applies to a module (the fused loss on the causal LM, the fused LoRA
projections, offloaded or compiled decoder layers) sets an instance `forward` that shadows the class's,
and hands the run (cpt.speed.Speed) the function that undoes it. The module still goes through its own
`__call__`, so hooks that accelerate, peft or DDP put there keep working.

    python -m pytest tests/test_speed.py -q
"""
from __future__ import annotations

from typing import Callable

import torch

_MISSING = object()


def replace_forward(module: torch.nn.Module, forward: Callable) -> Callable[[], None]:
    """Set `module.forward` to `forward`; returns the undo, which restores what was there (the class's
    forward, or an earlier instance forward) only while `forward` is still the one in place, so calling
    it twice, or after something else replaced it, changes nothing."""
    before = module.__dict__.get("forward", _MISSING)
    module.forward = forward

    def undo() -> None:
        if module.__dict__.get("forward") is not forward:
            return
        if before is _MISSING:
            del module.forward
        else:
            module.forward = before

    return undo
