"""The small rules the run plan is made of: pure functions of the config and the launch, no model.

    python -m pytest tests/test_plan.py -q
"""
from __future__ import annotations

import importlib.util

import torch

from cpt.config import Config
from cpt.runtime import launched_with_fsdp, launched_world_size

# A host layer's saved tensors start back to the GPU when the backward pass reaches the layer this
# many above it (cpt.speed.host_activations).
HOST_LEAD = 1
# Architectures whose logits are lm_head(last_hidden_state), soft-capped by config.final_logit_softcapping
# only in SOFTCAPPED_MODEL_TYPES: the fused head (cpt.speed.loss) computes the same function. Others
# (Cohere's logit_scale, Granite's logits_scaling, ...) keep transformers' loss, and the run log says so.
FUSABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "phi3", "smollm3",
                                 "gemma2", "gemma3_text"})
SOFTCAPPED_MODEL_TYPES = frozenset({"gemma2", "gemma3_text"})
# Architectures whose norms and MLP liger-kernel's RMSNorm / SwiGLU replace on CUDA (uncompiled layers);
# Gemma's (1 + weight) norms and GELU MLP are not among them.
LIGER_ELEMENTWISE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "phi3", "smollm3"})


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None and importlib.util.find_spec("triton") is not None


def use_compile(setting: bool | str, kernels: str, device: torch.device | str, fsdp: bool = False) -> bool:
    """model.compile: auto is on for CUDA, except with liger's own kernels (its Triton launchers are
    opaque to the compiler) and under FSDP (not measured). 4-bit bases compile too."""
    if setting in (True, "true"):
        return True
    if setting in (False, "false"):
        return False
    return torch.device(device).type == "cuda" and kernels != "liger" and not fsdp


def use_cuda_graphs(setting: bool | str, device: torch.device | str, fsdp: bool = False,
                    world_size: int | None = None) -> bool:
    """model.cuda_graphs (only where the layers compile): auto is on for one CUDA process; off under
    FSDP or several processes (DDP), where it has not been measured."""
    if setting in (True, "true"):
        return True
    if setting in (False, "false"):
        return False
    world = launched_world_size() if world_size is None else world_size
    return torch.device(device).type == "cuda" and not fsdp and world == 1


def fsdp_wanted(cfg: Config) -> bool:
    return bool(cfg.train.fsdp) or launched_with_fsdp()


def use_split_masters(cfg: Config, compute_dtype: torch.dtype, fsdp: bool = False) -> bool:
    """Whether the trained embeddings' float32 masters are held split (bf16 weight + int16 low half,
    cpt.optim): bf16 runs of LoRA with the 8-bit optimizer, which knows the layout; not under FSDP,
    whose sharded parameters the optimizer sees as pieces."""
    return (cfg.adapter.method == "lora" and cfg.adapter.embedding_master_dtype == "float32"
            and compute_dtype == torch.bfloat16 and cfg.train.optim == "adamw_8bit" and not fsdp)


def checkpointing_mode(setting: bool | str) -> str:
    """adapter.use_gradient_checkpointing as 'off', 'recompute' or 'offload'. Unsloth's 'unsloth' is its
    offloaded checkpointing (layer inputs wait in host memory), so it means cpt's 'offload'."""
    if setting in (False, "false"):
        return "off"
    if setting in ("offload", "unsloth"):
        return "offload"
    return "recompute"


def host_layer_indices(recomputing: list[int], n_layers: int, count: int) -> list[int]:
    """Which recomputing layers become host layers: `count` of them, spread evenly so the copies
    keep pace with the forward pass; none of the top HOST_LEAD layers (nothing above them could start
    their fetch early) and none of the bottom HOST_LEAD + 1 (their fetched-ahead tensors would add to
    the peak at the very end of the backward pass, when every gradient exists)."""
    candidates = [i for i in recomputing if HOST_LEAD < i < n_layers - HOST_LEAD]
    count = max(0, min(count, len(candidates)))
    if count == 0:
        return []
    step = len(candidates) / count
    return sorted({candidates[int(j * step)] for j in range(count)})
