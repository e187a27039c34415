"""Recomputing decoder layers whose MLP activations wait in host memory (RunPlan.host_layers).

A recomputing layer keeps only its input and reruns its forward pass in backward. Two thirds of
that rerun are the MLP's expanding projections (gate and up: 2 x hidden x intermediate each, the
down projection's base GEMM is already skipped, speed/compile.py), and their outputs are what
the GPU cannot afford to keep: 224 MiB per layer of an 8B model at 4096 tokens, 7 GiB for 32 layers.
The host link can carry them instead. In a "host" layer the compiled step saves those two outputs
(a selective-checkpoint policy) and everything else is recomputed as before; the saved tensors of
the step (the two outputs; not the layer's input, which a recomputing layer keeps anyway) are
copied to pinned host memory on a side stream as soon as the forward pass has made them, and their
GPU memory is freed when the copy is done.
In the backward pass the copies come back on another side stream, started when the backward pass
reaches the layer `lead` layers above (a hook on that layer's output, speed/compile.py), so they are
in place when the layer's own backward starts.

How many layers can do this is set by the link, not by GPU memory: what the forward pass produces
faster than the link drains it waits on the GPU. The run plan picks them (cpt.plan.decide, from the
link's measured speed and the forward pass's estimated length; docs/performance.md).

Only compiled layers (RunPlan.compile) can: the saved tensors are the compiled step's own (eager
checkpointing keeps its saved tensors out of reach of these hooks), so without compile such
layers simply recompute. Host layers run their compiled step without CUDA graphs: a graph replay
writes the memory its saved tensors were recorded in whatever the copy stream still reads, and
while the host link bounds the step a faster forward pass only waits longer for it.

    python -m pytest tests/test_speed_host_activations.py -q
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from cpt.speed.offload import SideStreams

log = logging.getLogger(__name__)

MIN_BYTES = 1 << 20  # default of HostActivations.min_bytes: smaller saved tensors stay on the GPU


class _Stashed:
    """One saved tensor in host memory: where it is, and (once fetched) its way back."""

    __slots__ = ("host", "device", "copied", "gpu", "fetched", "used")

    def __init__(self, host: torch.Tensor, device: torch.device, copied: Optional[torch.cuda.Event]):
        self.host, self.device, self.copied = host, device, copied
        self.used = False
        self.gpu: Optional[torch.Tensor] = None
        self.fetched: Optional[torch.cuda.Event] = None


class HostActivations:
    """The saved-tensor hooks of one host layer, and its pinned buffers (made in the first step,
    reused by every later forward pass in the same order). `streams`: the run's side streams;
    `min_bytes`: smaller saved tensors stay where they are."""

    def __init__(self, index: int, streams: SideStreams, min_bytes: int = MIN_BYTES):
        self.index = index
        self.streams = streams
        self.min_bytes = min_bytes
        self.buffers: list[torch.Tensor] = []
        self.stashed: list[_Stashed] = []
        self.weights: set[int] = set()
        self.count = 0  # tensors stashed in the last forward pass (tests and logs)
        self.late = 0  # tensors the backward pass found not yet fetched (should stay 0)
        self.warned = False

    # ------------------------------------------------------------------ forward: out to host

    def begin(self, layer: torch.nn.Module, inputs: list) -> None:
        """Before the layer's forward pass: the storages that are the layer's own (weights, their
        4-bit statistics) or its inputs never move. An input may be the output of a CUDA graph,
        whose memory the next replay reuses whatever a side stream still reads; it is the one
        tensor a recomputing layer keeps anyway."""
        for h in self.stashed:  # fetched and never read (a backward pass that did not run): the
            if h.gpu is not None:  # memory goes back to the current stream once the copy into it is done
                torch.cuda.current_stream(h.device).wait_event(h.fetched)
                h.gpu = None
        if any(not h.used for h in self.stashed):
            # A second forward pass before the first one's backward (not the loop's way, but a
            # caller's): the first one's tensors still wait in the buffers, so new ones are made.
            self.buffers = []
        self.stashed, self.count = [], 0
        ptrs = set()
        flat = [y for x in inputs for y in (x if isinstance(x, (tuple, list)) else (x,)) if isinstance(y, torch.Tensor)]
        for t in list(layer.parameters()) + list(layer.buffers()) + flat:
            ptrs.add(t.untyped_storage().data_ptr())
            state = getattr(t, "quant_state", None)
            for s in (state, getattr(state, "state2", None)):
                for name in ("absmax", "code"):
                    x = getattr(s, name, None)
                    if isinstance(x, torch.Tensor):
                        ptrs.add(x.untyped_storage().data_ptr())
        self.weights = ptrs

    def pack(self, t: torch.Tensor) -> Any:
        if (t.numel() * t.element_size() < self.min_bytes or t.device.type not in ("cuda", "cpu")
                or t.untyped_storage().data_ptr() in self.weights):
            return t
        i = len(self.stashed)
        host = self.buffers[i] if i < len(self.buffers) else None
        if host is None or host.shape != t.shape or host.stride() != t.stride() or host.dtype != t.dtype:
            # Same strides as the saved tensor: the backward graph was compiled for them.
            host = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu",
                                       pin_memory=t.device.type == "cuda")
            if i < len(self.buffers):
                self.buffers[i] = host
            else:
                self.buffers.append(host)
        copied = None
        if t.device.type == "cuda":
            out = self.streams.get(t.device, "out")
            # Waits for the forward pass that made t; the buffer's previous contents went back to
            # the GPU in the last backward pass, which the current stream has also waited for.
            out.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(out):
                host.copy_(t, non_blocking=True)
            copied = out.record_event()
            t.record_stream(out)  # its memory is reused only after the copy
        else:
            host.copy_(t)
        h = _Stashed(host, t.device, copied)
        self.stashed.append(h)
        self.count += 1
        return h

    # ------------------------------------------------------------------ backward: back to the GPU

    def fetch(self, only: Optional[_Stashed] = None) -> None:
        """Start bringing every stashed tensor of the last forward pass back (or just `only`; idempotent)."""
        todo = [h for h in (self.stashed if only is None else [only]) if h.gpu is None and h.copied is not None]
        for h in todo:
            device = h.device
            main = torch.cuda.current_stream(device)
            back = self.streams.get(device, "in")
            gpu = torch.empty_strided(h.host.shape, h.host.stride(), dtype=h.host.dtype, device=device)
            # Allocated on the current stream, written on the side stream once everything queued so far
            # (the last user of that memory included) is done. It stays the current stream's: that
            # stream waits for the copy before its first use (unpack), so when the backward pass lets go
            # of it the memory is free for the current stream at once. (Marked as used on the side
            # stream too, it would count as allocated until the side stream had done every fetch queued
            # by then, which is layers ahead of the GPU when the host runs ahead.)
            back.wait_stream(main)
            back.wait_event(h.copied)
            with torch.cuda.stream(back):
                gpu.copy_(h.host, non_blocking=True)
            h.gpu, h.fetched = gpu, back.record_event()

    def unpack(self, packed: Any) -> torch.Tensor:
        if not isinstance(packed, _Stashed):
            return packed
        h = packed
        h.used = True
        if h.device.type != "cuda":
            return h.host.clone()
        if h.gpu is None:  # not fetched ahead (a second read, or no hook ran): fetch now
            self.late += 1
            self.fetch(only=h)
        torch.cuda.current_stream(h.device).wait_event(h.fetched)
        gpu, h.gpu = h.gpu, None  # the backward graph may free it as soon as it is done with it
        return gpu

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def warn_if_empty(self) -> None:
        """After a forward pass: a host layer whose saved tensors never reached the hooks keeps its gate
        and up outputs on the GPU; say so, once."""
        if self.count == 0 and not self.warned:
            self.warned = True
            log.warning("adapter.host_activations: decoder layer %d saved nothing to host memory; it keeps its "
                        "gate and up outputs on the GPU (set adapter.host_activations: 0)", self.index)

    def close(self) -> None:
        self.buffers, self.stashed, self.weights = [], [], set()


def fetch_hook(targets: list[HostActivations]):
    """A gradient hook for a layer's output: when the backward pass reaches that layer, start
    fetching the host layers `targets` (`lead` layers below)."""

    def hook(grad: torch.Tensor) -> None:
        if grad.is_cuda:
            for t in targets:
                t.fetch()

    return hook
