"""The step hooks: what the training loop calls around each step, built once per run.

The loop names no speed feature. It calls these five hooks at fixed points of a step, and what they do
follows from the run plan that was applied (cpt.speed.Speed) and the optimizer that was built:

    before_forward()           CUDA graphs: a new forward pass begins (graph outputs may be reused)
    before_backward(batches, last, clipping)
                               host-resident embedding states: start the gradient-free part of the
                               update beside the last backward pass
    after_backward(index, last)
                               CUDA graphs: the first micro-batch's gradients leave the graphs' memory
                               (later ones add into those copies)
    clip_grad_norm(max_norm)   the norm over every trained tensor (row-sparse embed_tokens gradients
                               summed first), clipped to max_norm
    skip()                     a step the loop skips (non-finite): undo what started early

    python -m pytest tests/test_train.py -q
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from cpt.model import sparse_gradients
from cpt.optim import clip_grad_norm_


class StepHooks:
    def __init__(self, speed: Any, model: torch.nn.Module, optimizer: Any, accelerator: Any, world_size: int):
        self.speed, self.model, self.accelerator = speed, model, accelerator
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        self._early = inner if getattr(inner, "host_split_state", False) and world_size == 1 else None
        self._sparse = sparse_gradients(accelerator.unwrap_model(model))
        # The trained parameters, listed once: walking an 8B LoRA model's ~2,700 modules for them took
        # the host ~6 ms per step while the GPU waited. Distributed wrappers (FSDP's gradient clipping)
        # want the model's own list.
        self._params: Optional[list] = [p for p in model.parameters() if p.requires_grad] if world_size == 1 else None

    def params(self):
        return self._params if self._params is not None else self.model.parameters()

    def before_forward(self) -> None:
        self.speed.before_micro_batch()

    def before_backward(self, batches: list[dict], last: bool, clipping: bool) -> None:
        if last and self._early is not None:
            self._early.start_early(torch.cat([b["input_ids"].reshape(-1) for b in batches]), clipping)

    def after_backward(self, index: int, last: bool) -> None:
        if index == 0 and not last:
            self.speed.after_backward(self.params(), last)

    def clip_grad_norm(self, max_norm: float) -> Optional[torch.Tensor]:
        if self._sparse:
            return clip_grad_norm_(self.params(), max_norm)
        return self.accelerator.clip_grad_norm_(self.params(), max_norm)

    def skip(self) -> None:
        if self._early is not None:
            self._early.abandon_early()

    def summary(self) -> dict:
        return self.speed.summary()
