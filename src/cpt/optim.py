"""Optimizers and learning-rate schedules.

    python -m pytest tests/test_optim.py -q
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from cpt.config import ConfigError, TrainConfig


def build_optimizer(groups: list[dict], t: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the named parameter groups. adamw_torch is fused where the device allows it."""
    param_groups = [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"], "name": g["name"]}
                    for g in groups]
    kw = dict(betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    if t.optim == "adamw_8bit":
        if device.type != "cuda":
            raise ConfigError("train.optim=adamw_8bit needs a CUDA GPU (bitsandbytes); use train.optim=adamw_torch here")
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ConfigError(f"train.optim=adamw_8bit needs bitsandbytes: pip install 'cpt[gpu]' ({e})") from None
        return _adamw_8bit_without_syncs()(param_groups, **kw)
    fused = device.type == "cuda" and all(p.dtype == torch.float32 for g in groups for p in g["params"])
    if t.optim == "adamw_torch_fused" and not fused:
        raise ConfigError("train.optim=adamw_torch_fused needs a CUDA device and float32 trained weights")
    return torch.optim.AdamW(param_groups, fused=fused or None, **kw)


@functools.lru_cache(maxsize=None)
def _adamw_8bit_without_syncs() -> type:
    """bitsandbytes' AdamW8bit with a step that does not wait for the GPU after each tensor.

    bitsandbytes (0.50) calls torch.cuda.synchronize() after every parameter's update, which paged
    optimizers need (their states live in unified memory) and device-resident states do not: the
    updates are queued on one stream in order either way. With ~450 LoRA tensors that serialises the
    host and the GPU for each of them: about 25 ms of an 8B step in which the GPU waits for Python
    (bench/NOTES.md). Same kernels, same arguments, same order, so the same result bit for bit.
    """
    import bitsandbytes as bnb

    class AdamW8bit(bnb.optim.AdamW8bit):
        @torch.no_grad()
        def step(self, closure=None):
            if self.is_paged:
                return super().step(closure)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if not self.state[p]:
                        self.init_state(group, p, gindex, pindex)
                    self.update_step(group, p, gindex, pindex)
            return loss

    return AdamW8bit


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
