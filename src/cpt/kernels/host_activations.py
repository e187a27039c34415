"""Recomputing decoder layers whose MLP activations wait in host memory (adapter.host_activations).

A recomputing layer keeps only its input and reruns its forward pass in backward. Two thirds of
that rerun are the MLP's expanding projections (gate and up: 2 x hidden x intermediate each, the
down projection's base GEMM is already skipped, kernels/compile.py), and their outputs are what
the GPU cannot afford to keep: 224 MiB per layer of an 8B model at 4096 tokens, 7 GiB for 32 layers.
The host link can carry them instead. In a "host" layer the compiled step saves those two outputs
(a selective-checkpoint policy) and everything else is recomputed as before; the saved tensors of
the step (the two outputs; not the layer's input, which a recomputing layer keeps anyway) are
copied to pinned host memory on a side stream as soon as the forward pass has made them, and their
GPU memory is freed when the copy is done.
In the backward pass the copies come back on another side stream, started when the backward pass
reaches the layer LEAD layers above (hooks on those layers' outputs), so they are in place when
the layer's own backward starts.

How many layers can do this is set by the link, not by GPU memory: what the forward pass produces
faster than the link drains it waits on the GPU (bench/NOTES.md, session 9). `cpt plan` picks the
count ('auto') from the link's measured speed and the forward pass's estimated length.

Only compiled layers (model.compile) can: the saved tensors are the compiled step's own (eager
checkpointing keeps its saved tensors out of reach of these hooks), so without compile such
layers simply recompute.

By default host layers run their compiled step without CUDA graphs while the other layers replay
theirs. They can replay as graphs too (kernels/compile.py's HOST_LAYER_GRAPHS), which takes two rules
below; on the 8B capped rows that was 3-5% slower, because the faster forward pass then waits for the
host link (bench/NOTES.md, session 16):
- Forward: a saved tensor of a replayed graph lives in the graphs' memory pool, and a later
  replay writes the memory it was recorded with, whatever the copy stream is still reading (a
  replay does not go through the allocator). So the tensor stays referenced until the forward pass
  reaches the layer HOLD layers above (graphs recorded in between see it alive and keep off its
  memory), and the current stream waits for its copy before letting go (`release`). With HOLD=2
  the link has one more layer's forward to finish each copy before the GPU would wait for it.
- Backward: the backward graph takes its saved tensors at the addresses it was recorded with
  (inductor treats them as static inputs; another address means recording the graph again). So
  the tensors come back into fixed GPU buffers, two layers' worth (`ring`: host layers
  alternate between two slots; LEAD=1 has at most the running layer's and the next one's in use).

    python -m pytest tests/test_kernels.py -q -k host_activations
"""
from __future__ import annotations

from typing import Any, Optional

import torch

LEAD = 1  # a host layer's tensors start back when the backward pass reaches the layer this many above it
HOLD = 2  # with CUDA graphs: a saved tensor is let go when the forward pass reaches the layer this many above
MIN_BYTES = 1 << 20  # smaller saved tensors stay on the GPU (tests set 0)
RING = True  # False: graphed host layers fetch into new memory too (their backward graphs then record again; bench A/B)

_STREAMS: dict = {}  # (device, purpose) -> side stream
_HELD: list = []  # (layer index, copy-done event, tensor): saved tensors of graphed host layers on their way out


def release(index: Optional[int] = None) -> None:
    """Let go of the graphed host layers' saved tensors whose copy out was queued HOLD or more layers
    below decoder layer `index`, or at or above it (a new forward pass); None: all of them (the
    backward pass has begun). The current stream first waits for each one's copy, so no later
    graph replay or allocation overwrites it while the link still reads it."""
    keep = []
    for entry in _HELD:
        i, copied, t = entry
        if index is None or index - i >= HOLD or index <= i:
            torch.cuda.current_stream(t.device).wait_event(copied)
        else:
            keep.append(entry)
    _HELD[:] = keep


def side_stream(device: torch.device, purpose: str) -> torch.cuda.Stream:
    """One side stream per device and purpose ("out", "in" here; kernels/recompute.py's offload)."""
    key = (device, purpose)
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(device)
    return _STREAMS[key]


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
    reused by every later forward pass in the same order)."""

    def __init__(self, index: int, slot: int = 0, ring: Optional[dict] = None):
        self.index = index
        self.graphs = False  # set by compile_decoder_layers: the layer replays as CUDA graphs
        # With graphs: the GPU buffers the tensors come back into, shared by the model's host layers
        # (slot -> {"owner": HostActivations, "tensors": [...]}); this layer's slot.
        self.ring, self.slot = ring, slot
        self.fresh = 0  # tensors fetched into new memory although graphed (the slot was busy)
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
        if (t.numel() * t.element_size() < MIN_BYTES or t.device.type not in ("cuda", "cpu")
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
            out = side_stream(t.device, "out")
            # Waits for the forward pass that made t; the buffer's previous contents went back to
            # the GPU in the last backward pass, which the current stream has also waited for.
            out.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(out):
                host.copy_(t, non_blocking=True)
            copied = out.record_event()
            if self.graphs:  # held until the layer HOLD above (see release)
                _HELD.append((self.index, copied, t))
            else:
                t.record_stream(out)  # its memory is reused only after the copy
        else:
            host.copy_(t)
        h = _Stashed(host, t.device, copied)
        self.stashed.append(h)
        self.count += 1
        return h

    # ------------------------------------------------------------------ backward: back to the GPU

    def _targets(self, todo: list) -> list:
        """The GPU tensors that the stashed tensors `todo` come back into. Without graphs: new ones.
        With graphs: this layer's ring slot (made once, the same addresses every step), unless the
        slot's last owner has fetched tensors the backward pass has not read yet (a caller's second
        forward pass before backward): then new ones, which its graph records again."""
        def new(h: _Stashed) -> torch.Tensor:
            return torch.empty_strided(h.host.shape, h.host.stride(), dtype=h.host.dtype, device=h.device)

        if not (self.graphs and self.ring is not None and RING):
            return [new(h) for h in todo]
        slot = self.ring.setdefault(self.slot, {"owner": None, "tensors": []})
        owner = slot["owner"]
        if owner is not None and owner is not self and any(h.gpu is not None for h in owner.stashed):
            self.fresh += len(todo)
            return [new(h) for h in todo]
        slot["owner"] = self
        tensors = slot["tensors"]
        tensors.extend([None] * (len(self.stashed) - len(tensors)))
        where = {id(h): j for j, h in enumerate(self.stashed)}
        out = []
        for h in todo:
            j = where.get(id(h))
            if j is None:  # from an earlier forward pass than the last one: not this slot's
                self.fresh += 1
                out.append(new(h))
                continue
            t = tensors[j]
            if t is None or (t.shape, t.stride(), t.dtype, t.device) != (h.host.shape, h.host.stride(), h.host.dtype, h.device):
                t = tensors[j] = new(h)
            out.append(t)
        return out

    def fetch(self, only: Optional[_Stashed] = None) -> None:
        """Start bringing every stashed tensor of the last forward pass back (or just `only`; idempotent)."""
        release()  # the backward pass has begun: nothing is on its way out any more
        todo = [h for h in (self.stashed if only is None else [only]) if h.gpu is None and h.copied is not None]
        for h, gpu in zip(todo, self._targets(todo) if todo else []):
            device = h.device
            main = torch.cuda.current_stream(device)
            back = side_stream(device, "in")
            # Allocated on the current stream (or a ring slot), written on the side stream once
            # everything queued so far (the last user of that memory included) is done. It stays the
            # current stream's: that stream waits for the copy before its first use (unpack), so when
            # the backward pass lets go of it the memory is free for the current stream at once.
            # (Marked as used on the side stream too, it would count as allocated until the side
            # stream had done every fetch queued by then, which is layers ahead of the GPU when the
            # host runs ahead.)
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


def fetch_hook(targets: list[HostActivations]):
    """A gradient hook for a layer's output: when the backward pass reaches that layer, start
    fetching the host layers `targets` (LEAD layers below)."""

    def hook(grad: torch.Tensor) -> None:
        if grad.is_cuda:
            for t in targets:
                t.fetch()

    return hook


def host_layer_indices(recomputing: list[int], n_layers: int, count: int) -> list[int]:
    """Which recomputing layers become host layers: `count` of them, spread evenly so the copies
    keep pace with the forward pass; none of the top LEAD layers (nothing above them could start
    their fetch early) and none of the bottom LEAD + 1 (their fetched-ahead tensors would add to the
    peak at the very end of the backward pass, when every gradient exists)."""
    candidates = [i for i in recomputing if LEAD < i < n_layers - LEAD]
    count = max(0, min(count, len(candidates)))
    if count == 0:
        return []
    step = len(candidates) / count
    return sorted({candidates[int(j * step)] for j in range(count)})
