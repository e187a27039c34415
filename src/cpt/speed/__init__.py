"""The speed stage: applies a frozen RunPlan to the model once, and hands the loop its step hooks.

    speed = cpt.speed.apply(model, plan)      # converts the model; returns the run's Speed
    loss = speed.loss_fn(model, batch, n)     # every micro-batch, after speed.before_micro_batch()
    speed.after_backward(params, last)        # after each micro-batch's backward
    speed.close()                             # undoes every conversion, releases streams and buffers

What `apply` does, in this order, and only what the plan says (the decisions are cpt.plan.decide's):
1. per decoder layer, keep / recompute / offload (RunPlan.checkpointing, keep_layers; speed/recompute.py);
2. the kernels of RunPlan.kernels: 'cpt' is cpt's chunked linear + cross-entropy for the output head
   (speed/loss.py, speed/linear_ce.py) and the LoRA update inside the projection's GEMM
   (speed/lora.py, NF4 weights dequantized by speed/nf4.py); on CUDA also liger-kernel's RMSNorm and
   SwiGLU where the layers are not compiled and liger is installed, and peft's float32 upcast of every
   LoRA input is skipped while autocast is on. 'liger' is liger-kernel for all of these, its own fused
   linear cross-entropy included (CUDA only). 'none' is plain transformers. A model that one of these
   does not fit (cpt.speed.loss says which families the fused head computes) keeps the plain path for
   it, and `Speed.fallbacks` says which feature and why (logged as warnings, run_summary.json);
3. peft's frozen originals of trained embeddings to host memory (RunPlan.frozen_originals_on_host;
   speed/offload.py);
4. regional torch.compile of the decoder layers (RunPlan.compile), replayed as CUDA graphs
   (RunPlan.cuda_graphs), host layers among them (RunPlan.host_layers; speed/compile.py,
   speed/host_activations.py);
5. 4-bit projections of recomputing layers marked to dequantize once in backward.

Everything a run needs (side streams, pinned buffers, the compiled step, a compile failure, whether the
Triton loss pass works) belongs to its Speed: a second run, or a second test, starts clean. Calling
`apply` again on the same model first closes the Speed applied before. docs/performance.md tells what
each feature buys and how to measure it.

    python -m pytest tests/test_speed.py -q
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Optional

import torch

from cpt.plan.rules import HOST_LEAD, LIGER_ELEMENTWISE_MODEL_TYPES, liger_available
from cpt.plan.run_plan import RunPlan
from cpt.speed import liger as liger_mod
from cpt.speed.compile import LayerCompiler, graphs_recorded
from cpt.speed.host_activations import MIN_BYTES, HostActivations
from cpt.speed.linear_ce import TritonRows, fused_linear_cross_entropy, shift_labels
from cpt.speed.lora import fuse_lora_projections, skip_lora_input_upcast
from cpt.speed.loss import (LossFn, causal_lm, fused_head_refusal, logit_softcap, model_type, output_head, patch_loss,
                            plain_causal_lm_loss)
from cpt.speed.offload import SideStreams, frozen_originals_to_host
from cpt.speed.recompute import decoder_layers, layer_choices, set_recompute

__all__ = ["apply", "Speed", "LossFn", "plain_causal_lm_loss", "decoder_layers", "output_head", "causal_lm",
           "fused_linear_cross_entropy", "shift_labels", "graphs_recorded", "KERNELS"]

log = logging.getLogger(__name__)
KERNELS = ("none", "cpt", "liger")
_SPEED = "_cpt_speed"  # on the causal LM: the Speed applied to it, closed by the next apply


class Speed:
    """One run's conversion of one model: what was applied, the loss function, the step hooks, and
    everything the conversion holds (side streams, host layers' buffers, the compiled step and whether
    it failed, the Triton loss pass's state). Made by `apply`; `close` undoes it."""

    def __init__(self, model: torch.nn.Module, plan: RunPlan, *, lora_op: bool = True, nf4_kernel: bool = True,
                 host_lead: int = HOST_LEAD, host_min_bytes: int = MIN_BYTES, dequantize_once: bool = True,
                 dequantize_once_skip_lowest: int = 0, compile_backend: Any = "inductor"):
        self.model = model
        self.plan = plan
        self.options = dict(lora_op=lora_op, nf4_kernel=nf4_kernel, host_lead=host_lead, host_min_bytes=host_min_bytes,
                            dequantize_once=dequantize_once, dequantize_once_skip_lowest=dequantize_once_skip_lowest,
                            compile_backend=compile_backend)
        self.loss_fn: LossFn = plain_causal_lm_loss
        self.applied: list[str] = []
        self.fallbacks: list[str] = []  # "feature: why not", for the features the plan asked for that this model cannot take
        self.layers: dict[str, int] = {"keep": 0, "recompute": 0, "offload": 0, "host": 0, "compiled": 0}
        self.hosts: list[HostActivations] = []  # the host layers' saved-tensor hooks (their counts, buffers)
        self.streams = SideStreams()
        self.rows = TritonRows()
        self.compiler: Optional[LayerCompiler] = None
        self.graphs = False  # some layers replay as CUDA graphs: the loop's hooks below have work to do
        self._nf4_tables: dict = {}
        self._undo: list[Callable[[], None]] = []
        self._closed = False

    # ------------------------------------------------------------------ the loop's hooks

    def before_micro_batch(self) -> None:
        """Before each micro-batch's forward pass: with CUDA graphs, every output of the previous pass's
        graphs may be overwritten from here on."""
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def after_backward(self, params: Iterable[torch.nn.Parameter], last: bool) -> None:
        """After a micro-batch's backward pass. With CUDA graphs and not the step's last micro-batch:
        move every gradient out of the graphs' memory. A first gradient is the backward graph's own
        output buffer (autograd keeps it as .grad without a copy), and the next micro-batch's replay
        writes that buffer again: accumulating into it would silently double-count
        (pytorch/pytorch#169545). The same holds for embed_tokens' row-sparse gradient, whose values
        are a view of the first layer's input gradient (a graph output). One copy per step suffices
        (later micro-batches add into it), but copying again is harmless."""
        if self.graphs and not last:
            for p in params:
                if p.grad is not None:
                    p.grad = p.grad.clone()

    @property
    def compile_failed(self) -> Optional[str]:
        return self.compiler.failed if self.compiler is not None else None

    def summary(self) -> dict:
        """What the run's summary records of this stage: what was applied, and a compile failure."""
        out: dict = {"speed": list(self.applied)}
        if self.fallbacks:
            out["speed_fallbacks"] = list(self.fallbacks)
        if self.compile_failed:
            out["compile_failed"] = self.compile_failed
        return out

    def close(self) -> None:
        """Undo every conversion (liger's RMSNorm/SwiGLU excepted: they stay on the model's modules),
        release the side streams and the host layers' buffers. Calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        while self._undo:
            self._undo.pop()()
        for host in self.hosts:
            host.close()
        self.streams.close()
        self._nf4_tables.clear()
        self.loss_fn = plain_causal_lm_loss
        lm = causal_lm(self.model)
        if lm.__dict__.get(_SPEED) is self:
            del lm.__dict__[_SPEED]

    # ------------------------------------------------------------------ applying the plan

    def _nf4_code(self, device: torch.device) -> Optional[torch.Tensor]:
        if not self.options["nf4_kernel"]:
            return None
        from cpt.speed import lora

        if lora._nf4 is None:  # no Triton
            return None
        if device not in self._nf4_tables:
            self._nf4_tables[device] = lora._nf4.code_table(device)
        return self._nf4_tables[device]

    def _apply(self) -> None:
        plan, model, opts = self.plan, self.model, self.options
        if plan.kernels not in KERNELS:
            raise ValueError(f"RunPlan.kernels: {plan.kernels!r} is not one of {', '.join(KERNELS)}")
        device = torch.device(plan.device)
        cuda = device.type == "cuda"
        if plan.kernels == "liger" and not cuda:
            raise ValueError("kernels=liger needs a CUDA device; use 'cpt' or 'none' on CPU")
        if plan.kernels == "liger" and not liger_available():
            raise ValueError("kernels=liger needs liger-kernel: pip install liger-kernel")
        lm = causal_lm(model)
        try:
            layers = list(decoder_layers(model))
        except ValueError:
            layers = []

        # 1. keep / recompute / offload, per layer
        choices = layer_choices(len(layers), plan.checkpointing, plan.keep_layers)
        self._undo.append(set_recompute(layers, choices, self.streams))
        for c in choices:
            self.layers[c] += 1

        # 2. kernels
        fused = []
        if plan.kernels in ("cpt", "liger"):
            liger = plan.kernels == "liger"
            refusal = fused_head_refusal(lm)
            cap = logit_softcap(lm)
            if refusal is not None:
                self.applied.append(f"plain loss ({refusal})")
                self.fallbacks.append(f"fused loss: {refusal}")
            elif cap:
                self._undo.append(patch_loss(lm, use_liger_loss=liger, rows=self.rows))
                self.applied.append(f"cpt chunked linear cross-entropy with the logits soft-capped at {cap:g}")
                if liger:
                    self.fallbacks.append("liger fused linear cross-entropy: it takes no logit soft-cap; cpt's chunked "
                                          "loss applies it")
                if cuda:
                    self.fallbacks.append("Triton loss pass: it has no logit soft-cap; soft-capped chunks run as "
                                          "PyTorch operations")
            else:
                self._undo.append(patch_loss(lm, use_liger_loss=liger, rows=self.rows))
                self.applied.append("liger fused linear cross-entropy" if liger else "cpt chunked linear cross-entropy")
            fused, unfuse = fuse_lora_projections(model, linear_op=opts["lora_op"], nf4_code=self._nf4_code)
            self._undo.append(unfuse)
            if fused:
                self.applied.append("LoRA update fused into the projection (" + (
                    "cpt::lora_linear, lora_linear_4bit for 4-bit bases, or addmm for others" if opts["lora_op"]
                    else "addmm epilogue") + (", NF4 dequantized by cpt's kernel" if self._nf4_tables else "") + ")")
            # Compiled layers generate norms, RoPE and SwiGLU themselves.
            if cuda and liger_available() and (liger or not plan.compile) and not liger_mod.has_elementwise(lm):
                if model_type(lm) in LIGER_ELEMENTWISE_MODEL_TYPES:
                    liger_mod.patch_elementwise(lm)
                else:
                    self.fallbacks.append(f"liger RMSNorm/SwiGLU: not for {model_type(lm) or type(lm).__name__!r} "
                                          "(its norms or MLP differ); the model's own modules run")
            if liger_mod.has_elementwise(lm):
                self.applied.append("liger RMSNorm/SwiGLU")
            if cuda:
                n, undo = skip_lora_input_upcast(model)
                self._undo.append(undo)
                if n:
                    self.applied.append("LoRA inputs stay bf16 under autocast")

        # 3. frozen originals
        if plan.frozen_originals_on_host:
            moved, undo = frozen_originals_to_host(model)
            self._undo.append(undo)
            if moved:
                self.applied.append(f"frozen embedding originals in host memory ({moved / 2**30:.2f} GiB)")

        # 4. compile, last: the layers take the choices made above
        if plan.compile and layers:
            self.compiler = LayerCompiler(opts["compile_backend"], cuda_graphs=plan.cuda_graphs and cuda)
            hosts = {}
            if not liger_mod.has_elementwise(lm):  # liger's SwiGLU hides gate/up from the saved-tensor hooks
                hosts = {i: HostActivations(i, self.streams, opts["host_min_bytes"])
                         for i in plan.host_layers if 0 <= i < len(layers) and choices[i] == "recompute"}
            counts, undo = self.compiler.compile(layers, choices, hosts, lead=opts["host_lead"])
            self._undo.extend(undo)
            self.hosts = [hosts[i] for i in sorted(hosts)]
            self.layers["host"] = counts["host"]
            self.layers["compiled"] = counts["compiled"]
            self.graphs = counts["graphed"] > 0
            self.applied.append(f"decoder layers compiled ({counts['compiled']} of {len(layers)}, "
                                f"{counts['recompute']} recompute inside the graph"
                                + (f", {counts['host']} with MLP activations in host memory" if counts["host"] else "")
                                + (", replayed as CUDA graphs" if self.graphs else "") + ")")

        # 5. dequantize once in recomputing 4-bit layers
        if fused and opts["dequantize_once"]:
            recomputing = [i for i, c in enumerate(choices) if c != "keep"]
            skip = set(recomputing[:max(0, opts["dequantize_once_skip_lowest"])])
            marked = 0
            for i in recomputing:
                if i in skip:
                    continue
                for m in layers[i].modules():
                    state = m.__dict__.get("_cpt_lora")
                    if state is not None:
                        state.recomputed = True
                        marked += int(state.is_4bit)
            if marked:
                self.applied.append(f"4-bit weights of recomputing layers dequantized once in backward ({marked} projections)")


def apply(model: torch.nn.Module, plan: RunPlan, **options: Any) -> Speed:
    """Convert `model` (a transformers causal LM, possibly peft-wrapped, with gradient checkpointing
    enabled where the plan recomputes) for `plan` and return the run's Speed. Calling it again on the
    same model first closes the Speed applied before.

    options (benchmarks' and tests' switches; the defaults are what runs use):
    - lora_op: plain and 4-bit LoRA projections run cpt::lora_linear / lora_linear_4bit (False: the
      addmm epilogue over the base output);
    - nf4_kernel: NF4 weights on CUDA are dequantized by cpt's Triton kernel (False: bitsandbytes');
    - host_lead: a host layer's tensors start back when the backward pass reaches the layer this many
      above it;
    - host_min_bytes: host layers leave saved tensors smaller than this on the GPU;
    - dequantize_once: 4-bit projections of recomputing layers dequantize once in backward (False: in
      each op, forward, recompute and backward); dequantize_once_skip_lowest: not in the lowest N
      recomputing layers;
    - compile_backend: torch.compile's backend for the decoder layers.
    """
    lm = causal_lm(model)
    earlier = lm.__dict__.get(_SPEED)
    if earlier is not None:
        earlier.close()
    speed = Speed(model, plan, **options)
    try:
        speed._apply()
    except BaseException:
        speed.close()
        raise
    lm.__dict__[_SPEED] = speed
    log.info("speed: %s", ", ".join(speed.applied) or "plain PyTorch")
    for line in speed.fallbacks:
        log.warning("speed: fell back: %s", line)
    return speed
