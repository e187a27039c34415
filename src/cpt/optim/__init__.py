"""Optimizers and learning-rate schedules.

- schedule: warmup and decay of the learning rate;
- split_master: float32 masters held as bf16 weight + int16 low half, their 8-bit AdamW in PyTorch;
- host_state: split masters' states in host memory, streamed through the GPU beside the backward pass;
- adamw8bit: the 8-bit AdamW optimizer and its Triton kernel (imported only for train.optim=adamw_8bit);
- build: the optimizer train.optim names, the sparse-row-aware gradient norm, the trained float32 values.

Each module imports only modules listed above it.

    python -m pytest tests/test_optim.py tests/test_split_master.py -q
"""
from cpt.optim.build import build_optimizer, clip_grad_norm_, master_weight
from cpt.optim.schedule import build_scheduler, lr_lambda, warmup_steps
from cpt.optim.split_master import ROW_SPARSE, SPLIT_MASTER, mark_split_master

__all__ = ["build_optimizer", "build_scheduler", "clip_grad_norm_", "mark_split_master", "master_weight",
           "SPLIT_MASTER", "ROW_SPARSE", "warmup_steps", "lr_lambda"]
