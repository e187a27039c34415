"""Facts about the machine and the launch: devices, dtypes, process counts, host memory.

A leaf: it imports nothing of cpt, so every stage can ask it without creating a cycle.

    python -m pytest tests/test_runtime.py -q
"""
from __future__ import annotations

import os
from typing import Optional

import torch


# ---------------------------------------------------------------------------- the launch


def launched_world_size() -> int:
    """How many processes the launcher (torchrun / accelerate launch) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_with_fsdp() -> bool:
    """`accelerate launch --use_fsdp` (or an accelerate config with FSDP) sets this variable."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


# ---------------------------------------------------------------------------- devices and dtypes


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_device() -> torch.device:
    """This process's device before any Accelerator exists: under torchrun / accelerate launch the
    GPU numbered LOCAL_RANK, so that a model loaded early (the Python API) lands on its own GPU."""
    local = os.environ.get("LOCAL_RANK")
    if local is not None and torch.cuda.is_available():
        return torch.device("cuda", int(local) % torch.cuda.device_count())
    return default_device()


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are the same one: accelerate names a lone GPU `cuda` (no index) while the
    tensors on it say `cuda:0`, and torch.device('cuda') != torch.device('cuda', 0)."""
    if a.type != b.type:
        return False
    current = torch.cuda.current_device() if a.type == "cuda" else 0
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where `model` computes: the device of its first parameter off the host, else the CPU. A model the
    run plan has set up on a GPU keeps some frozen tensors (the embeddings' originals) in host memory, so
    its first parameter can be on the CPU."""
    for p in model.parameters():
        if p.device.type != "cpu":
            return p.device
    return torch.device("cpu")


def gpu_memory_gib(device: torch.device) -> Optional[float]:
    """Total memory of a CUDA device in GiB; None elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**30


def host_memory_gib() -> float:
    """This machine's physical memory in GiB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 where the GPU supports it, else fp16 on GPU, fp32 on CPU."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def mixed_precision(device: torch.device, dtype: torch.dtype, bf16: Optional[bool] = None,
                    fp16: Optional[bool] = None) -> str:
    """'no', 'bf16' or 'fp16' for accelerate: autocast only on CUDA; an explicit train.bf16 / train.fp16
    wins, otherwise the model's dtype decides."""
    if torch.device(device).type != "cuda":
        return "no"
    if fp16 or (fp16 is None and bf16 is None and dtype == torch.float16):
        return "fp16"
    if bf16 or (bf16 is None and dtype == torch.bfloat16):
        return "bf16"
    return "no"


# Unary ops that torch's CPU wheels hand to MKL's vector math library (VML) for contiguous float32/64.
_VML_OPS = ("acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2", "sin",
            "sqrt", "tan", "tanh", "trunc")


def settle_cpu_math() -> None:
    """Call each VML function once on one element, on this thread, before any model runs on the CPU.

    VML picks a function's kernel on its first call. When that first call is split across intra-op
    threads, one thread's chunk can come out of a lower-accuracy kernel: the first run of a process then
    got rotary `cos` values a few bf16 ulps off, and a run and its resume (or two runs meant to be
    identical) differed from the first step on, about one process in ten. A one-element call never
    splits, so after it every call is the same. Cheap (32 one-element calls): safe to call every time."""
    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for name in _VML_OPS:
            getattr(torch, name)(x)


# ---------------------------------------------------------------------------- host memory


def host_tensor(shape, dtype: torch.dtype, fill: int = 0) -> torch.Tensor:
    """A host tensor, pinned where a GPU can copy from it asynchronously."""
    return torch.full(shape, fill, dtype=dtype, device="cpu", pin_memory=torch.cuda.is_available())


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t onto the device without waiting for it: a copy from pageable host memory would first wait for
    everything queued on the GPU (the loop's batches, the early pass's token ids) to finish."""
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """t in (pinned, where a GPU exists) host memory."""
    if t.device.type == "cpu" and (t.is_pinned() or not torch.cuda.is_available()):
        return t
    t = t.cpu()
    return t.pin_memory() if torch.cuda.is_available() else t
