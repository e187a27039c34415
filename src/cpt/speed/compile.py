"""Regional torch.compile: each decoder layer's training step as one compiled graph.

An 8B step in eager mode is host-bound on an H200 (docs/performance.md): the GPU needs about 400 ms,
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
to host memory (speed/offload.py) stay eager. If the compiler fails (no C compiler or Triton
on the machine, an op it cannot handle), a warning says why and the layers train uncompiled; the
failure is the run's (`LayerCompiler.failed`, reported in the run's summary), never another run's.

With RunPlan.cuda_graphs the compiled passes replay as CUDA graphs (torch.compile's reduce-overhead
mode): one recording per layer and pass, made in the second step, then one launch per layer and pass
instead of ~80. On an 8B step that gave +1% (bf16, where the GPU was already never waiting) to +4%
(4-bit, whose bitsandbytes ops cost more host time). The loop then marks each micro-batch's start and,
under gradient accumulation, takes the first micro-batch's gradients out of the graphs' memory
(cpt.speed.Speed.before_micro_batch / after_backward).

    python -m pytest tests/test_speed_compile.py -q
"""
from __future__ import annotations

import logging
import types
from typing import Any, Callable, Optional

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from cpt.speed.host_activations import HostActivations, fetch_hook
from cpt.speed.patch import replace_forward

log = logging.getLogger(__name__)

_DROPPED = ("use_cache", "past_key_values", "past_key_value", "cache", "layer_past")
GRAPHS = "reduce-overhead"  # torch.compile's mode that replays each compiled pass as a CUDA graph


def _layer_step(layer: torch.nn.Module, recompute: Any, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    # The class's own forward: with layer.gradient_checkpointing off it is the plain computation in
    # every transformers version (newer ones wrap `forward` itself in their checkpoint switch).
    # recompute: False (keep), True (recompute everything), "host" (save the MLP's expanding
    # projections' outputs, for speed/host_activations.py to move to host memory).
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
    # 8B model. Every op of the layer is recomputed, as in the eager checkpoint.
    return create_selective_checkpoint_contexts(_must_recompute)


_4BIT_OUT_FEATURES = 10  # cpt::lora_linear_4bit's argument `out_features` (speed/lora.py's schema)


def _expanding(op: Any, args: tuple) -> bool:
    """Whether op is one of cpt's LoRA projections with more outputs than inputs (gate, up)."""
    if op is torch.ops.cpt.lora_linear.default:
        return args[1].shape[0] > args[0].shape[-1]
    if op is torch.ops.cpt.lora_linear_4bit.default:
        return int(args[_4BIT_OUT_FEATURES]) > args[0].shape[-1]
    return False


def _save_if_expanding(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if _expanding(op, args) else CheckpointPolicy.MUST_RECOMPUTE


def _save_expanding_projections() -> tuple:
    # A host layer (speed/host_activations.py): the gate and up outputs are saved (and leave the GPU),
    # everything else is recomputed as in _recompute_everything.
    return create_selective_checkpoint_contexts(_save_if_expanding)


def _checkpoint_side_effects_allowed(step: Callable) -> Callable:
    # transformers >= 5.25 routes attention through the `kernels` hub wrapper, whose forward sets and
    # then resets a module-level context variable. Inside a recomputing layer (a checkpoint HOP) dynamo
    # refuses that mutation and breaks the graph, unless told that the forward's Python side effects
    # need not be replayed when the backward recomputes: true here, the variable is reset on return.
    if not hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        return step  # older torch: no such check, nothing to allow
    return torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)(step)


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


class LayerCompiler:
    """One run's compiled decoder layers: the compiled step per torch.compile mode, and whether
    compiling failed (then every layer of the run goes back to its plain forward, for good)."""

    def __init__(self, backend: Any = "inductor", cuda_graphs: bool = False):
        self.backend = backend
        self.mode = GRAPHS if cuda_graphs and backend == "inductor" else None
        self.failed: Optional[str] = None
        self._steps: dict[Optional[str], Callable] = {}

    def step(self, mode: Optional[str]) -> Callable:
        # Every layer goes through the same code object, so dynamo's cache holds one graph per
        # distinct layer kind (keeping, recomputing, host) and shape.
        if mode not in self._steps:
            self._steps[mode] = _checkpoint_side_effects_allowed(torch.compile(_layer_step, backend=self.backend, mode=mode))
        return self._steps[mode]

    def compile(self, layers: list, choices: list[str], hosts: dict[int, HostActivations],
                lead: int) -> tuple[dict, list[Callable[[], None]]]:
        """Compile every decoder layer's training forward (and so its backward), each with the choice
        set for it ("keep", "recompute", "offload": offloaded layers stay eager). `hosts`: the
        recomputing layers whose gate/up outputs go to host memory, by index; their fetch starts
        when the backward pass reaches the layer `lead` above. Host layers run without CUDA graphs.
        Returns {"compiled", "recompute", "eager", "host", "graphed"} counts and the undo of each
        compiled layer."""
        summary = {"compiled": 0, "recompute": 0, "eager": 0, "host": 0, "graphed": 0}
        fetch: dict[int, list] = {}
        for i, host in hosts.items():
            if i + lead < len(layers):
                fetch.setdefault(i + lead, []).append(host)
        undo = []
        for i, (layer, choice) in enumerate(zip(layers, choices)):
            if choice == "offload":  # its own autograd.Function
                summary["eager"] += 1
                continue
            recompute = choice == "recompute"
            host = hosts.get(i) if recompute else None
            mode = None if host is not None else self.mode
            undo.append(self._compile_layer(layer, "host" if host is not None else recompute, mode, host, fetch.get(i)))
            summary["compiled"] += 1
            summary["recompute"] += int(recompute)
            summary["host"] += int(host is not None)
            summary["graphed"] += int(mode == GRAPHS)
        return summary, undo

    def _compile_layer(self, layer: torch.nn.Module, recompute: Any, mode: Optional[str],
                       host: Optional[HostActivations], fetch: Optional[list]) -> Callable[[], None]:
        compiler = self
        plain = layer.forward
        hook = fetch_hook(fetch) if fetch else None
        checkpointing = bool(recompute)
        layer.gradient_checkpointing = False  # the checkpoint happens inside the compiled step
        restore: Callable[[], None]

        def uncompile() -> None:
            restore()
            layer.gradient_checkpointing = checkpointing

        def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
            if not (self.training and torch.is_grad_enabled()):
                return plain(hidden_states, *args, **kwargs)
            kwargs = {k: v for k, v in kwargs.items() if k not in _DROPPED}
            if compiler.failed is None:
                step = compiler.step(mode)
                try:
                    if host is None:
                        out = step(self, recompute, hidden_states, *args, **kwargs)
                    else:
                        host.begin(self, [hidden_states, *args, *kwargs.values()])
                        with host.hooks():
                            out = step(self, recompute, hidden_states, *args, **kwargs)
                        host.warn_if_empty()
                    if hook is not None:
                        first = out[0] if isinstance(out, tuple) else out
                        if first.requires_grad:
                            first.register_hook(hook)
                    return out
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception as e:  # the compiler's own failure (no C compiler, Triton, an unsupported op)
                    compiler.failed = f"{type(e).__name__}: {e}".strip()[:400]
                    log.debug("compiling the decoder layers failed", exc_info=True)
                    log.warning("compiling the decoder layers failed, training goes on with the plain layers "
                                "(model.compile: false skips the attempt): %s", compiler.failed)
            # Back to the plain layer for good (its own checkpointing switch restored); this call
            # recomputes as the compiled one would have (a host layer recomputes everything).
            uncompile()
            return _layer_step(self, checkpointing, hidden_states, *args, **kwargs)

        restore = replace_forward(layer, types.MethodType(forward, layer))
        return uncompile
