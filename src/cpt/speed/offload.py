"""What waits in host memory instead of on the GPU: offloaded layer inputs, and peft's frozen originals.

- Activation offload (use_gradient_checkpointing='offload'): a decoder layer recomputes in backward,
  and its input waits in pinned host memory (copied out on a side stream during the forward pass,
  back just before the layer's backward) instead of on the GPU.
- Frozen originals (RunPlan.frozen_originals_on_host): the frozen copies that peft keeps beside trained
  `modules_to_save` embeddings (about 2 GiB for an 8B model's embed_tokens + lm_head) live in host
  memory and visit the GPU only for a call with adapters disabled.

The side streams these copies use belong to the run (`SideStreams`, owned by cpt.speed.Speed), as do
the pinned buffers (owned by each offloaded layer's forward).

    python -m pytest tests/test_speed_offload.py -q
"""
from __future__ import annotations

import types
from typing import Any, Callable

import torch


class SideStreams:
    """One CUDA side stream per device and purpose ("offload" here; "out" and "in" for host layers,
    speed/host_activations.py), made on first use and dropped with the run."""

    def __init__(self) -> None:
        self._streams: dict = {}

    def get(self, device: torch.device, purpose: str) -> torch.cuda.Stream:
        key = (device, purpose)
        if key not in self._streams:
            self._streams[key] = torch.cuda.Stream(device)
        return self._streams[key]

    def close(self) -> None:
        for stream in self._streams.values():
            stream.synchronize()
        self._streams.clear()


class _OffloadedCheckpoint(torch.autograd.Function):
    """Run a layer without saving its activations; keep only its input, in host memory."""

    @staticmethod
    def forward(ctx, run: Callable[[torch.Tensor], Any], hidden: torch.Tensor, pool: dict, streams: SideStreams):
        ctx.run = run
        ctx.device = hidden.device
        ctx.autocast = (torch.is_autocast_enabled(hidden.device.type), torch.get_autocast_dtype(hidden.device.type))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        if hidden.is_cuda:
            # One pinned buffer per layer and shape, reused every step: pinning host memory is
            # slow (tens of ms per GiB), copying into pinned memory is not.
            key = (tuple(hidden.shape), hidden.dtype)
            host = pool.get(key)
            if host is None:
                pool.clear()  # a new shape (another sequence length): drop the old buffer first
                host = pool[key] = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
            stream = streams.get(hidden.device, "offload")
            # The side stream waits for everything queued so far: the layer's input is ready, and
            # the previous step's read of this buffer (backward, main stream) is done.
            stream.wait_stream(torch.cuda.current_stream(hidden.device))
            with torch.cuda.stream(stream):
                host.copy_(hidden, non_blocking=True)
            # The copy reads `hidden` on the side stream: keep its memory until the copy is done.
            hidden.record_stream(stream)
            ctx.copied = stream.record_event()
        else:
            host = hidden.detach().clone()
            ctx.copied = None
        ctx.host = host
        with torch.no_grad():
            out = run(hidden)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if ctx.copied is not None:
            torch.cuda.current_stream(ctx.device).wait_event(ctx.copied)
        hidden = ctx.host.to(ctx.device, non_blocking=True).requires_grad_(True)
        ctx.host = None
        with torch.random.fork_rng(devices=[ctx.device] if ctx.cuda_rng is not None else []):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            with torch.enable_grad(), torch.autocast(ctx.device.type, enabled=ctx.autocast[0], dtype=ctx.autocast[1]):
                out = ctx.run(hidden)
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.backward(out, grad_out)
        # The layer's parameters got their gradients from the inner backward above.
        return None, hidden.grad, None, None


_DROPPED = ("use_cache", "past_key_values", "cache", "past_key_value")


def offloaded_forward(layer: torch.nn.Module, streams: SideStreams) -> Callable:
    """A forward for `layer` (its gradient checkpointing switched off: this replaces it, never both,
    which would recompute twice) that keeps only its input, in pinned host memory, while training."""
    plain_forward = layer.forward
    pool: dict = {}

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not (self.training and torch.is_grad_enabled() and hidden_states.requires_grad):
            return plain_forward(hidden_states, *args, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in _DROPPED}

        def run(h: torch.Tensor):
            out = plain_forward(h, *args, use_cache=False, **kwargs)
            return out[0] if isinstance(out, tuple) else out

        return _OffloadedCheckpoint.apply(run, hidden_states, pool, streams)

    return types.MethodType(forward, layer)


# ---------------------------------------------------------------------------- frozen originals


def _visit_on_device(module: torch.nn.Module, args: tuple) -> None:
    dev = next((a.device for a in args if torch.is_tensor(a)), None)
    if dev is not None and dev.type != "cpu":
        module.to(dev)


def _back_to_host(module: torch.nn.Module, args: tuple, output: Any) -> None:
    module.to("cpu")


def frozen_originals_to_host(model: torch.nn.Module) -> tuple[int, Callable[[], None]]:
    """Move the frozen originals of peft's `modules_to_save` to host memory; they visit the GPU for a
    call with adapters disabled (the only time they are read). Returns the bytes moved and the function
    that puts them back where they were."""
    moved, undo = 0, []
    for mod in model.modules():
        orig = getattr(mod, "original_module", None)
        if orig is None or not hasattr(mod, "modules_to_save"):
            continue
        params = list(orig.parameters())
        if not params or any(p.requires_grad for p in params):
            continue
        device = params[0].device
        if device.type != "cpu":
            moved += sum(p.numel() * p.element_size() for p in params)
            orig.to("cpu")
        # (Already on the host: a tied original that shares its matrix with one moved above; it
        # needs the same visits. Undone in reverse order, the shared matrix ends where it was.)
        handles = (orig.register_forward_pre_hook(_visit_on_device), orig.register_forward_hook(_back_to_host))
        undo.append((orig, device, handles))
    if moved and torch.cuda.is_available():
        torch.cuda.empty_cache()

    def put_back() -> None:
        for orig, device, handles in reversed(undo):
            for h in handles:
                h.remove()
            orig.to(device)

    return moved, put_back
