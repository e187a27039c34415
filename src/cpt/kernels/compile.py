"""Regional torch.compile: each decoder layer's training step as one compiled graph.

An 8B step in eager mode is host-bound on an H200 (bench/NOTES.md): the GPU needs about 400 ms,
the host about 690 ms to issue it, because every LoRA projection, norm and activation is a few
Python calls and several kernel launches, three times per step (forward, recompute, backward).
Compiling the decoder layer turns each of those passes into one call of a generated graph that
also fuses the elementwise work (RMSNorm, RoPE, SwiGLU, residual adds) into a few kernels.

Only the decoder layer is compiled, and only while training with gradients: embeddings, the
chunked loss and the optimizer stay eager, and evaluation and generation (KV caches, changing
shapes) run the plain layer. All layers of a model share one compiled graph (the layer is an
argument, not a constant), so the compile cost is one layer's, not 32.

Recomputation moves inside the graph: a layer that recomputes calls torch.utils.checkpoint within
the compiled function, so its backward graph recomputes the forward itself (transformers' own
checkpoint wrapper is switched off for that layer, never both). Layers whose inputs are offloaded
to host memory (kernels/recompute.py) stay eager. If the compiler fails (no C compiler or Triton
on the machine, an op it cannot handle), a warning says why and the layers train uncompiled.

With model.cuda_graphs (auto, the default: on for one CUDA GPU) the compiled passes replay as CUDA graphs
(torch.compile's reduce-overhead mode): one recording per layer and pass, made in the second step,
then one launch per layer and pass instead of ~80. On an 8B step that gave +1% (bf16, where the GPU
was already never waiting) to +4% (4-bit, whose bitsandbytes ops cost more host time); bench/NOTES.md,
session 7. The loop marks each micro-batch's start (`mark_step`) and, under gradient accumulation,
takes the first micro-batch's gradients out of the graphs' memory (`own_gradients`).

    python -m pytest tests/test_kernels.py -q -k compile
"""
from __future__ import annotations

import logging
import types
from typing import Any, Callable, Optional

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from cpt.kernels import host_activations
from cpt.kernels.host_activations import LEAD, fetch_hook
from cpt.kernels.recompute import decoder_layers

log = logging.getLogger(__name__)

_DROPPED = ("use_cache", "past_key_values", "past_key_value", "cache", "layer_past")


def _layer_step(layer: torch.nn.Module, recompute: Any, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    # The class's own forward: with layer.gradient_checkpointing off it is the plain computation in
    # every transformers version (newer ones wrap `forward` itself in their checkpoint switch).
    # recompute: False (keep), True (recompute everything), "host" (save the MLP's expanding
    # projections' outputs, for kernels/host_activations.py to move to host memory).
    forward = type(layer).forward
    if recompute:
        policy = _save_expanding_projections if recompute == "host" else _recompute_everything
        return checkpoint(forward, layer, hidden, *args, use_reentrant=False, context_fn=policy, **kwargs)
    return forward(layer, hidden, *args, **kwargs)


def _must_recompute(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_RECOMPUTE


def _recompute_everything() -> tuple:
    # A plain checkpoint only lets the compiler prefer recomputation, and it keeps the outputs of ops
    # it will not recompute, such as bitsandbytes' fused 4-bit GEMM (a custom op): about 9 GiB for an
    # 8B model (bench/NOTES.md). Every op of the layer is recomputed, as in the eager checkpoint.
    return create_selective_checkpoint_contexts(_must_recompute)


def _expanding(op: Any, args: tuple) -> bool:
    """Whether op is one of cpt's LoRA projections with more outputs than inputs (gate, up)."""
    if op is torch.ops.cpt.lora_linear.default:
        return args[1].shape[0] > args[0].shape[-1]
    if op is torch.ops.cpt.lora_linear_4bit.default:
        return int(args[9]) > args[0].shape[-1]
    return False


def _save_if_expanding(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if _expanding(op, args) else CheckpointPolicy.MUST_RECOMPUTE


def _save_expanding_projections() -> tuple:
    # A host layer (kernels/host_activations.py): the gate and up outputs are saved (and leave the GPU),
    # everything else is recomputed as in _recompute_everything.
    return create_selective_checkpoint_contexts(_save_if_expanding)


_COMPILED: dict[Any, Callable] = {}
_FAILED: dict[Any, str] = {}  # backend -> why compiling failed in this process (then nothing more is compiled)
GRAPHS = "reduce-overhead"  # torch.compile's mode that replays each compiled pass as a CUDA graph
HOST_LAYER_GRAPHS = False  # True: host layers replay as CUDA graphs too (slower while the host link is the bottleneck: bench/NOTES.md, session 16)


def _compiled_step(backend: str, mode: Optional[str] = None) -> Callable:
    # One compiled function per backend for the whole process: every layer of every model goes
    # through the same code object, so dynamo's cache holds one graph per distinct layer shape.
    if (backend, mode) not in _COMPILED:
        step = torch.compile(_layer_step, backend=backend, mode=mode)
        _COMPILED[(backend, mode)] = _checkpoint_side_effects_allowed(step)
    return _COMPILED[(backend, mode)]


def _checkpoint_side_effects_allowed(step: Callable) -> Callable:
    # transformers >= 5.25 routes attention through the `kernels` hub wrapper, whose forward sets and
    # then resets a module-level context variable. Inside a recomputing layer (a checkpoint HOP) dynamo
    # refuses that mutation and breaks the graph, unless told that the forward's Python side effects
    # need not be replayed when the backward recomputes: true here, the variable is reset on return.
    if not hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        return step  # older torch: no such check, nothing to allow
    return torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)(step)


def graphs_in_use() -> bool:
    """Whether some layers were compiled to replay as CUDA graphs (model.cuda_graphs) in this process."""
    return any(mode == GRAPHS for _, mode in _COMPILED)


def mark_step() -> None:
    """Tell CUDA-graph replay that a new forward pass begins: every output of the previous pass's
    graphs may be overwritten from here on. The loop calls it before each micro-batch."""
    if graphs_in_use():
        torch.compiler.cudagraph_mark_step_begin()


def graphs_recorded(device_index: int = 0) -> int:
    """How many CUDA graphs torch.compile has recorded on this device (one per layer and pass once the
    second step ran): 0 when replay never started, e.g. because inductor skipped it (it logs why)."""
    try:
        from torch._inductor import cudagraph_trees

        manager = cudagraph_trees.get_manager(device_index, create_if_none_exists=False)
    except Exception:  # noqa: BLE001 - no CUDA, or an inductor without CUDA-graph trees
        return 0
    if manager is None or manager.roots is None:
        return 0
    n, todo = 0, [node for nodes in manager.roots.values() for node in nodes]
    while todo:
        node = todo.pop()
        n += 1
        todo.extend(child for children in node.children.values() for child in children)
    return n


def own_gradients(params) -> None:
    """After a micro-batch that is not the step's last: move every gradient out of the graphs' memory.
    A first gradient is the backward graph's own output buffer (autograd keeps it as .grad without a
    copy), and the next micro-batch's replay writes that buffer again: accumulating into it would
    silently double-count (pytorch/pytorch#169545). The same holds for embed_tokens' row-sparse
    gradient, whose values are a view of the first layer's input gradient (a graph output). A copy is
    made once per step; later micro-batches add into it."""
    if graphs_in_use():
        for p in params:
            if p.grad is not None:
                p.grad = p.grad.clone()


def _compiled_forward(layer: torch.nn.Module, recompute: Any, backend: str, mode: Optional[str] = None,
                      host: Any = None, fetch: Optional[list] = None, index: int = 0) -> Callable:
    step = _compiled_step(backend, mode)
    plain = layer.forward
    hook = fetch_hook(fetch) if fetch else None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not (self.training and torch.is_grad_enabled()):
            return plain(hidden_states, *args, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in _DROPPED}
        if host_activations._HELD:  # graphed host layers' saved tensors below: let go of those copied out
            host_activations.release(index)
        if backend not in _FAILED:
            try:
                if host is None:
                    out = step(self, recompute, hidden_states, *args, **kwargs)
                else:
                    host.begin(self, [hidden_states, *args, *kwargs.values()])
                    with host.hooks():
                        out = step(self, recompute, hidden_states, *args, **kwargs)
                    if host.count == 0 and not host.warned:
                        host.warned = True
                        log.warning("adapter.host_activations: decoder layer %d saved nothing to host memory; it keeps its "
                                    "gate and up outputs on the GPU (set adapter.host_activations: 0)", host.index)
                if hook is not None:
                    first = out[0] if isinstance(out, tuple) else out
                    if first.requires_grad:
                        first.register_hook(hook)
                return out
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # the compiler's own failure (no C compiler, Triton, an unsupported op)
                _FAILED[backend] = f"{type(e).__name__}: {e}".strip()[:400]
                log.debug("compiling the decoder layers failed", exc_info=True)
                log.warning("compiling the decoder layers failed, training goes on with the plain layers "
                            "(model.compile: false skips the attempt): %s", _FAILED[backend])
        # Back to the plain layer for good (its own checkpointing switch restored); this call
        # recomputes as the compiled one would have (a host layer recomputes everything).
        uncompile_layer(self)
        return _layer_step(self, bool(recompute), hidden_states, *args, **kwargs)

    return types.MethodType(forward, layer)


def compile_decoder_layers(model: torch.nn.Module, backend: str = "inductor", cuda_graphs: bool = False,
                           host_layers: bool = True) -> dict:
    """Compile every decoder layer's training forward (and so its backward). Reads each layer's
    recompute choice as model setup left it (set_recompute / gradient checkpointing), so call it
    last. `cuda_graphs`: each layer's forward and backward replay as CUDA graphs (one recording per
    layer and pass, made in the second step), so the host launches one graph instead of ~80 kernels
    per layer and pass. `host_layers`: the layers set_recompute chose as host layers become them
    (False: they recompute like the others). Returns {"compiled": n, "recompute": n, "eager": n, "host": n} (eager: layers whose inputs
    are offloaded; host: recomputing layers whose MLP activations wait in host memory)."""
    mode = GRAPHS if cuda_graphs and backend == "inductor" else None
    summary = {"compiled": 0, "recompute": 0, "eager": 0, "host": 0}
    layers = list(decoder_layers(model))
    for layer in layers:
        if getattr(layer, "_cpt_compiled", None) is not None:
            uncompile_layer(layer)
    # Host layers (set_recompute's choice): whose output starts fetching each one's tensors back.
    fetch: dict[int, list] = {}
    for i, layer in enumerate(layers):
        host = getattr(layer, "_cpt_host_activations", None) if host_layers else None
        if host is not None and i + LEAD < len(layers):
            fetch.setdefault(i + LEAD, []).append(host)
    for i, layer in enumerate(layers):
        if getattr(layer, "_cpt_plain_forward", None) is not None:  # offloaded: its own autograd.Function
            summary["eager"] += 1
            continue
        recompute = bool(getattr(layer, "gradient_checkpointing", False))
        host = getattr(layer, "_cpt_host_activations", None) if recompute and host_layers else None
        layer._cpt_compiled = {"recompute": recompute, "forward": layer.__dict__.get("forward")}
        layer.gradient_checkpointing = False
        layer_mode = mode
        if host is not None:
            host.graphs = mode is not None and HOST_LAYER_GRAPHS
            layer_mode = mode if host.graphs else None
        layer.forward = _compiled_forward(layer, "host" if host is not None else recompute, backend,
                                          layer_mode, host=host, fetch=fetch.get(i), index=i)
        summary["compiled"] += 1
        summary["recompute"] += int(recompute)
        summary["host"] += int(host is not None)
    return summary


def uncompile_layer(layer: torch.nn.Module) -> Optional[bool]:
    """Undo compile_decoder_layers for one layer; returns its recompute choice (None: not compiled)."""
    state = getattr(layer, "_cpt_compiled", None)
    if state is None:
        return None
    if state["forward"] is None:
        del layer.forward  # back to the class's forward
    else:
        layer.forward = state["forward"]
    layer.gradient_checkpointing = state["recompute"]
    del layer._cpt_compiled
    return state["recompute"]


def recomputes(layer: torch.nn.Module) -> bool:
    """Whether a decoder layer recomputes its activations in backward, compiled or not."""
    state = getattr(layer, "_cpt_compiled", None)
    return bool(state["recompute"]) if state is not None else bool(getattr(layer, "gradient_checkpointing", False))
