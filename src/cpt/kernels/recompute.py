"""Which decoder layers recompute their activations in the backward pass, and where their inputs wait.

Three per-layer choices, set once at model setup:
- keep: the layer's activations stay on the GPU (fastest; about 0.8 GiB per layer of an 8B model
  at 4096 tokens);
- recompute: transformers' own gradient checkpointing (only the layer's input is kept);
- offload: recompute, and the layer's input waits in pinned host memory instead of on the GPU
  (copied out on a side stream during the forward pass, back just before the layer's backward).

`set_recompute(model, recompute_layers, offload)` applies them: the first `len(layers) -
recompute_layers` layers keep their activations (the memory-aware mode, where activations fit),
the rest recompute.

    python -m pytest tests/test_kernels.py -q -k recompute
"""
from __future__ import annotations

import types
from typing import Any, Callable, Optional

import torch


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layer list of a (peft-wrapped) causal LM."""
    inner = model
    for _ in range(4):  # PeftModel -> LoraModel -> XForCausalLM -> XModel
        layers = getattr(inner, "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
        nxt = getattr(inner, "model", None) or getattr(inner, "base_model", None)
        if nxt is None or nxt is inner:
            break
        inner = nxt
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


class _OffloadedCheckpoint(torch.autograd.Function):
    """Run a layer without saving its activations; keep only its input, in host memory."""

    @staticmethod
    def forward(ctx, run: Callable[[torch.Tensor], Any], hidden: torch.Tensor, pool: dict):
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
            stream = _side_stream(hidden.device)
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
        return None, hidden.grad, None


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    from cpt.kernels.host_activations import side_stream

    return side_stream(device, "offload")


def _offloaded_forward(layer: torch.nn.Module, plain_forward: Callable) -> Callable:
    pool: dict = {}

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not (self.training and torch.is_grad_enabled() and hidden_states.requires_grad):
            return plain_forward(hidden_states, *args, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("use_cache", "past_key_values", "cache", "past_key_value")}

        def run(h: torch.Tensor):
            out = plain_forward(h, *args, use_cache=False, **kwargs)
            return out[0] if isinstance(out, tuple) else out

        return _OffloadedCheckpoint.apply(run, hidden_states, pool)

    return types.MethodType(forward, layer)


def mark_recomputed(layer: torch.nn.Module, on: bool) -> int:
    """Tell the fused LoRA projections of a decoder layer whether the layer recomputes in backward (4-bit
    bases then dequantize into an op output that the recomputed forward and the backward share,
    kernels/lora.py). Returns how many projections over 4-bit bases were marked on."""
    n = 0
    for m in layer.modules():
        if getattr(m, "_cpt_plain_lora_forward", None) is not None:
            m._cpt_recomputed = on
            n += int(on and type(getattr(m, "base_layer", None)).__name__ == "Linear4bit")
    return n


def set_recompute(model: torch.nn.Module, recompute_layers: Optional[int] = None, offload: bool = False,
                  host_layers: int = 0) -> dict:
    """Set, per decoder layer, keep / recompute / offload. recompute_layers None means all layers.
    `host_layers` of the recomputing layers (spread evenly, not with offload) keep their MLP
    activations in host memory once compiled (kernels/host_activations.py; uncompiled they recompute).

    The model's gradient checkpointing must already be enabled (transformers'
    `gradient_checkpointing_enable`) when any layer recomputes without offload. Returns a summary
    {"keep": n, "recompute": n, "offload": n, "host": n} (host layers count as recompute too).
    """
    from cpt.kernels.host_activations import HostActivations, host_layer_indices

    layers = decoder_layers(model)
    n = len(layers)
    k = n if recompute_layers is None else max(0, min(n, int(recompute_layers)))
    summary = {"keep": 0, "recompute": 0, "offload": 0, "host": 0}
    from cpt.kernels.compile import uncompile_layer

    host = set() if offload else set(host_layer_indices(list(range(n - k, n)), n, host_layers))
    ring: dict = {}  # the GPU buffers that graphed host layers' tensors come back into, two layers' worth
    for i, layer in enumerate(layers):
        uncompile_layer(layer)  # a compiled layer fixed its recompute choice: back to eager (compile again after)
        plain = getattr(layer, "_cpt_plain_forward", None)
        if plain is not None:  # undo an earlier offload patch
            layer.forward = plain
            del layer._cpt_plain_forward
        if i in host:
            layer._cpt_host_activations = HostActivations(i, slot=summary["host"] % 2, ring=ring)
            summary["host"] += 1
        elif hasattr(layer, "_cpt_host_activations"):
            del layer._cpt_host_activations
        recompute = i >= n - k
        if recompute and offload:
            # Our checkpoint replaces transformers' for this layer (never both: that would
            # recompute twice).
            layer.gradient_checkpointing = False
            layer._cpt_plain_forward = layer.forward
            layer.forward = _offloaded_forward(layer, layer.forward)
            summary["offload"] += 1
        elif recompute:
            if not getattr(layer, "_gradient_checkpointing_func", None):
                raise ValueError("set_recompute: call model.gradient_checkpointing_enable() first")
            layer.gradient_checkpointing = True
            summary["recompute"] += 1
        else:
            layer.gradient_checkpointing = False
            summary["keep"] += 1
        mark_recomputed(layer, recompute)
    return summary
