"""The optimizer a run trains with, the gradient norm it clips by, and the float32 values it trains.

    python -m pytest tests/test_optim.py -q
"""
from __future__ import annotations

import logging
import math

import torch

from cpt.config import ConfigError, TrainConfig
from cpt.optim.split_master import SPLIT_MASTER, join_float32

logger = logging.getLogger("cpt")


def build_optimizer(groups: list[dict], t: TrainConfig, device: torch.device, *,
                    offload_embedding_state: bool = False, **knobs) -> torch.optim.Optimizer:
    """AdamW over the named parameter groups, as train.optim says. adamw_torch is fused where the device
    allows it; adamw_8bit is cpt.optim.adamw8bit.AdamW8bit.

    offload_embedding_state: the run plan's decision to keep the trained embeddings' 8-bit states in
    host memory (adamw_8bit with split masters on a CUDA GPU; elsewhere a warning, and they stay).
    knobs: further keyword arguments of AdamW8bit (its kernel's launch shape and shortcuts, chunk
    sizes), for benchmarks and tests; adamw_8bit only."""
    if not isinstance(offload_embedding_state, bool):
        raise TypeError(f"offload_embedding_state is the run plan's decision (a bool), not {offload_embedding_state!r}")
    param_groups = [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"], "name": g["name"]}
                    for g in groups]
    kw = dict(betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    if t.optim == "adamw_8bit":
        # bitsandbytes steps on CUDA, and (0.45+, slowly, in PyTorch operations) on the CPU.
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"train.optim=adamw_8bit needs bitsandbytes: pip install 'cpt[gpu]' ({e}); "
                              "or use train.optim=adamw_torch") from None
        from cpt.optim.adamw8bit import AdamW8bit

        host = offload_embedding_state and device.type == "cuda"
        opt = AdamW8bit(param_groups, host_split_state=host, **kw, **knobs)
        if offload_embedding_state and not (host and any(
                getattr(p, SPLIT_MASTER, False) for g in groups for p in g["params"])):
            logger.warning(
                "train.offload_embedding_state has nothing to move here: only bf16 runs on a CUDA GPU hold the "
                "trained embeddings as split float32 masters (this run: %s)", device.type)
        return opt
    if knobs:
        raise TypeError(f"{', '.join(sorted(knobs))}: options of train.optim=adamw_8bit, not {t.optim}")
    fused = device.type == "cuda" and all(p.dtype == torch.float32 for g in groups for p in g["params"])
    if t.optim == "adamw_torch_fused" and not fused:
        raise ConfigError("train.optim=adamw_torch_fused needs a CUDA device and float32 trained weights")
    return torch.optim.AdamW(param_groups, fused=fused or None, **kw)


def master_weight(p: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The float32 value the optimizer trains for p: for a split master the weight and its low half."""
    inner = getattr(optimizer, "optimizer", optimizer)
    state = inner.state.get(p, {})
    if getattr(p, SPLIT_MASTER, False) and "lo" in state:
        if state["lo"].device != p.device:  # host-resident: the last update's copy back must have landed
            inner.finish_host_updates(p.device)
        return join_float32(p.detach(), state["lo"].to(p.device))
    return p.detach()


def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ (2-norm over all gradients), also over row-sparse gradients, whose
    repeated rows are summed first. Returns the norm before clipping."""
    # The dense gradients' norms are queued first: summing a sparse gradient's rows waits for the GPU
    # (the backward pass's end), and the host work of hundreds of norms would then run while the GPU
    # idles. Each tensor's norm is its own, so the result is the same either way.
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    norms: list = [None] * len(params)
    dense: dict[torch.dtype, list] = {}
    for i, p in enumerate(params):
        if not p.grad.is_sparse:
            dense.setdefault(p.grad.dtype, []).append(i)
    for idx in dense.values():
        for i, n in zip(idx, torch._foreach_norm([params[i].grad for i in idx])):
            norms[i] = n
    grads = []
    for i, p in enumerate(params):
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            norms[i] = torch._foreach_norm([p.grad._values()])[0]
        grads.append(p.grad._values() if p.grad.is_sparse else p.grad)
    by_dtype: dict[torch.dtype, list] = {}
    for g, n in zip(grads, norms):
        by_dtype.setdefault(g.dtype, []).append((g, n))
    total = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(torch.stack([n for _, n in gn]).float()) for gn in by_dtype.values()]))
    if math.isinf(max_norm):  # no clipping: the norm is for logging and the non-finite check only
        return total
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for gn in by_dtype.values():
        torch._foreach_mul_([g for g, _ in gn], coef.to(gn[0][0].dtype))
    return total
