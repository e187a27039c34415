"""liger-kernel's pieces that cpt uses: its fused linear cross-entropy (RunPlan.kernels='liger') and
its RMSNorm / SwiGLU on one model's modules (on CUDA, where the layers are not compiled).

    python -m pytest tests/test_speed_loss.py -q
"""
from __future__ import annotations

import sys
from typing import Any, Optional

import torch

from cpt.speed.linear_ce import IGNORE_INDEX


def liger_loss(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, num_items: Optional[Any]) -> torch.Tensor:
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else hidden.dtype
    # liger accumulates the weight's gradient in the weight's dtype with addmm: hand it a weight in
    # the compute dtype and let autograd carry the gradient back to a float32 master.
    weight = head.weight if head.weight.dtype == dtype else head.weight.to(dtype)
    bias = getattr(head, "bias", None)
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    t = targets.reshape(-1)
    total = LigerFusedLinearCrossEntropyFunction.apply(h, weight, t, bias, None, IGNORE_INDEX, 0.0, 0.0, "sum")
    total = total[0] if isinstance(total, tuple) else total
    if num_items is None:
        num_items = (t != IGNORE_INDEX).sum()
    return total / num_items


# Set on a causal LM whose norm and MLP modules carry liger's forwards: they stay for the model's life
# (nothing undoes them), and host layers are then off (the SwiGLU kernel keeps the gate and up outputs
# out of reach of the saved-tensor hooks).
ELEMENTWISE = "_cpt_liger_elementwise"


def patch_elementwise(causal_lm: torch.nn.Module) -> None:
    """liger's RMSNorm and SwiGLU on this model's modules only. liger also replaces the classes and the
    RoPE function in transformers' modeling module, which every later model of the process would then
    use (a CPU model included, where its Triton kernels cannot run): those names are put back, and RoPE,
    which has no per-module form, stays transformers' own."""
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    modeling = sys.modules.get(type(getattr(causal_lm, "model", causal_lm)).__module__)
    before = dict(vars(modeling)) if modeling is not None else {}
    try:
        _apply_liger_kernel_to_instance(model=causal_lm, rope=False, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
    finally:
        for name, value in before.items():
            if vars(modeling).get(name) is not value:
                setattr(modeling, name, value)
    setattr(causal_lm, ELEMENTWISE, True)


def has_elementwise(causal_lm: torch.nn.Module) -> bool:
    return bool(getattr(causal_lm, ELEMENTWISE, False))
