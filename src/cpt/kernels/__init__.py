"""Loss and fused-kernel paths, chosen once at model setup (never by `if`s in the training loop).

`apply_kernels(model, mode, device)` patches the model where a faster path exists and returns the
loss function the loop calls. Every fused path has a plain fallback here and an equality test.

Modes (config `model.kernels`):
- none:  plain transformers forward; the loss is computed from the full logits.
- cpt:   our chunked linear + cross-entropy for the output head (any device; the logits never
         exist in full) and the LoRA update added inside the projection's GEMM; on CUDA also liger-kernel's RMSNorm and SwiGLU when it is installed,
         the frozen originals peft keeps of trained embeddings move to host memory, and peft's
         float32 upcast of every LoRA input is skipped while autocast is on.
- liger: liger-kernel for all of these, its own fused linear cross-entropy included (CUDA only).
- auto:  cpt on CUDA, none elsewhere (on CPU the plain path is as fast and bit-for-bit familiar).

Config `model.compile` adds regional torch.compile of the decoder layers on top of any mode
(kernels/compile.py); with it, cpt mode leaves RMSNorm/SwiGLU to the compiler instead of liger.

    python -m pytest tests/test_kernels.py -q
"""
from __future__ import annotations

import importlib.util
import logging
import types
from typing import Any, Callable, Optional

import torch

from cpt.kernels.compile import compile_decoder_layers, recomputes, uncompile_layer
from cpt.kernels.linear_ce import IGNORE_INDEX, fused_linear_cross_entropy, shift_labels
from cpt.kernels.lora import fuse_lora_projections, unfuse_lora_projections
from cpt.kernels.recompute import decoder_layers, mark_recomputed, set_recompute

LossFn = Callable[[torch.nn.Module, dict, int], torch.Tensor]

__all__ = ["LossFn", "plain_causal_lm_loss", "apply_kernels", "fused_linear_cross_entropy", "shift_labels",
           "set_recompute", "decoder_layers", "output_head", "liger_available", "enable_activation_offload", "offload_frozen_originals",
           "skip_lora_input_upcast", "fuse_lora_projections", "compile_decoder_layers", "use_compile", "use_cuda_graphs", "MODES"]

log = logging.getLogger(__name__)
MODES = ("auto", "none", "cpt", "liger")
# Architectures whose logits are exactly lm_head(last_hidden_state): no soft-capping or scaling
# between the two, so the fused head computes the same function.
FUSABLE_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "phi3", "smollm3"}


def plain_causal_lm_loss(model: torch.nn.Module, batch: dict, num_items: int) -> torch.Tensor:
    """Sum of next-token losses over the batch divided by `num_items` (the real tokens in the whole
    optimizer step), so that accumulated micro-batches add up to the token mean of the step."""
    out = model(
        input_ids=batch["input_ids"],
        position_ids=batch.get("position_ids"),
        attention_mask=batch.get("attention_mask"),
        labels=batch["labels"],
        num_items_in_batch=num_items,
        use_cache=False,
    )
    return out.loss


def enable_activation_offload(model: torch.nn.Module) -> dict:
    """use_gradient_checkpointing='offload': every decoder layer recomputes, and its input waits in
    pinned host memory instead of on the GPU."""
    return set_recompute(model, None, offload=True)


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None and importlib.util.find_spec("triton") is not None


def _causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers *ForCausalLM inside peft / accelerate wrappers."""
    inner = model
    for _ in range(4):
        if hasattr(inner, "get_base_model"):  # peft PeftModel
            inner = inner.get_base_model()
        elif hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):  # DDP
            inner = inner.module
        else:
            break
    return inner


def output_head(causal_lm: torch.nn.Module) -> torch.nn.Module:
    """The module that computes the logits right now: for a peft `modules_to_save` head, the
    trained copy of the active adapter (or the frozen original while adapters are disabled)."""
    head = causal_lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(causal_lm).__name__} has no output embeddings")
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):
        active = head.active_adapters
        if head.disable_adapters or any(a not in head.modules_to_save for a in active):
            return head.original_module
        if len(active) != 1:
            raise ValueError("the fused loss needs exactly one active adapter on the output head")
        return head.modules_to_save[active[0]]
    return head


def _fused_forward(original: Callable, use_liger_loss: bool) -> Callable:
    def forward(self, *args: Any, **kwargs: Any):
        labels = kwargs.get("labels")
        # Generation, evaluation without gradients and callers that want logits keep the
        # original forward: the fused path exists only to train.
        if (args or labels is None or not torch.is_grad_enabled() or kwargs.get("inputs_embeds") is not None
                or kwargs.get("logits_to_keep") not in (None, 0) or kwargs.get("return_dict") is False):
            return original(*args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("labels")
        kwargs.pop("logits_to_keep", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(**kwargs)
        hidden = outputs.last_hidden_state
        head = output_head(self)
        targets = shift_labels(labels).to(hidden.device)
        if use_liger_loss:
            loss = _liger_loss(hidden, head, targets, num_items)
        else:
            loss = fused_linear_cross_entropy(hidden, head.weight, targets, num_items, bias=getattr(head, "bias", None))
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                      attentions=outputs.attentions)

    return forward


def _liger_loss(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, num_items: Optional[Any]) -> torch.Tensor:
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else hidden.dtype
    # liger accumulates the weight's gradient in the weight's dtype with addmm: hand it a weight in
    # the compute dtype and let autograd carry the gradient back to a float32 master.
    weight = head.weight if head.weight.dtype == dtype else head.weight.to(dtype)
    bias = getattr(head, "bias", None)
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    t = targets.reshape(-1)
    total = LigerFusedLinearCrossEntropyFunction.apply(h, weight, t, bias, None, IGNORE_INDEX, 0.0, 0.0, "sum")
    total = total[0] if isinstance(total, tuple) else total
    if num_items is None:
        num_items = (t != IGNORE_INDEX).sum()
    return total / num_items


def _model_type(causal_lm: torch.nn.Module) -> str:
    return str(getattr(getattr(causal_lm, "config", None), "model_type", ""))


def _patch_loss(causal_lm: torch.nn.Module, use_liger_loss: bool) -> bool:
    cfg = causal_lm.config
    if (_model_type(causal_lm) not in FUSABLE_MODEL_TYPES or getattr(cfg, "final_logit_softcapping", None)
            or not hasattr(causal_lm, "model") or causal_lm.get_output_embeddings() is None):
        log.info("fused loss: %s not supported, keeping the plain loss", _model_type(causal_lm))
        return False
    if getattr(causal_lm, "_cpt_plain_forward", None) is None:
        causal_lm._cpt_plain_forward = causal_lm.forward
    causal_lm.forward = types.MethodType(_fused_forward(causal_lm._cpt_plain_forward, use_liger_loss), causal_lm)
    return True


def _patch_liger_elementwise(causal_lm: torch.nn.Module) -> bool:
    """liger's RMSNorm and SwiGLU on this model's modules only. liger also replaces the classes and the
    RoPE function in transformers' modeling module, which every later model of the process would then
    use (a CPU model included, where its Triton kernels cannot run): those names are put back, and RoPE,
    which has no per-module form, stays transformers' own."""
    import sys

    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    modeling = sys.modules.get(type(getattr(causal_lm, "model", causal_lm)).__module__)
    before = dict(vars(modeling)) if modeling is not None else {}
    try:
        _apply_liger_kernel_to_instance(model=causal_lm, rope=False, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
    finally:
        for name, value in before.items():
            if vars(modeling).get(name) is not value:
                setattr(modeling, name, value)
    causal_lm._cpt_liger_elementwise = True  # it stays: host layers (adapter.host_activations) are then off
    return True


def _visit_on_device(module: torch.nn.Module, args: tuple) -> None:
    dev = next((a.device for a in args if torch.is_tensor(a)), None)
    if dev is not None and dev.type != "cpu":
        module.to(dev)


def _back_to_host(module: torch.nn.Module, args: tuple, output: Any) -> None:
    module.to("cpu")


def offload_frozen_originals(model: torch.nn.Module) -> int:
    """Move the frozen originals that peft keeps beside trained `modules_to_save` copies (about
    2 GiB for an 8B model's embed_tokens + lm_head) to host memory. They are read only while
    adapters are disabled; then they visit the GPU for that call. Returns the bytes moved."""
    moved = 0
    for mod in model.modules():
        orig = getattr(mod, "original_module", None)
        if orig is None or not hasattr(mod, "modules_to_save") or getattr(orig, "_cpt_on_host", False):
            continue
        params = list(orig.parameters())
        if not params or any(p.requires_grad for p in params):
            continue
        if params[0].device.type != "cpu":
            moved += sum(p.numel() * p.element_size() for p in params)
            orig.to("cpu")
        # (Already on the host: a tied original that shares its matrix with one moved above; it
        # needs the same visits.)
        orig.register_forward_pre_hook(_visit_on_device)
        orig.register_forward_hook(_back_to_host)
        orig._cpt_on_host = True
    if moved and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return moved


def _lora_input_cast_hook(module: torch.nn.Module, args: tuple) -> None:
    if torch.compiler.is_compiling():
        # Inside a compiled layer the flag would be a side effect that breaks the graph (and the
        # fused LoRA forward, which compiled layers use, never casts anyway).
        return
    x = args[0] if args else None
    # Under autocast the LoRA matmuls run in bf16 whatever the input: peft's upcast of the input
    # to the float32 adapter dtype is a full-size copy that autocast immediately undoes (exactly:
    # bf16 -> float32 -> bf16 is lossless). Outside autocast the upcast is needed, so keep it.
    if torch.is_tensor(x):
        module.cast_input_dtype_enabled = not torch.is_autocast_enabled(x.device.type)


def skip_lora_input_upcast(model: torch.nn.Module) -> int:
    """Stop peft from copying every LoRA input to float32 while autocast is on (about 10% of an
    8B bf16 step on an H200: two full-size casts per projection, forward, recompute and backward).
    Returns the number of LoRA layers hooked."""
    n = 0
    for mod in model.modules():
        if hasattr(mod, "cast_input_dtype_enabled") and hasattr(mod, "lora_A") and not getattr(mod, "_cpt_cast_hook", False):
            mod.register_forward_pre_hook(_lora_input_cast_hook)
            mod._cpt_cast_hook = True
            n += 1
    return n


def use_compile(setting: bool | str, mode: str, device: torch.device, fsdp: bool = False, load_in_4bit: bool = False) -> bool:
    """Resolve config `model.compile`. auto is on for CUDA, except with liger's own kernels (its
    Triton launchers are opaque to the compiler) and under FSDP (not measured). `load_in_4bit` no
    longer matters: with every op of a recomputing layer recomputed (kernels/compile.py) a compiled
    4-bit 8B step holds what the eager one does (18.6 vs 18.8 GiB) and runs 1.10x faster (bench/NOTES.md)."""
    if setting in (True, "true"):
        return True
    if setting in (False, "false"):
        return False
    return torch.device(device).type == "cuda" and mode != "liger" and not fsdp


def use_cuda_graphs(setting: bool | str, device: torch.device, fsdp: bool = False) -> bool:
    """Resolve config `model.cuda_graphs` (it applies only where the layers compile). auto: on for one
    CUDA process; off under FSDP or several processes (DDP), where it has not been measured."""
    if setting in (True, "true"):
        return True
    if setting in (False, "false"):
        return False
    from cpt.distributed import launched_world_size

    return torch.device(device).type == "cuda" and not fsdp and launched_world_size() == 1


def _layers_or_none(model: torch.nn.Module) -> list:
    try:
        return list(decoder_layers(model))
    except ValueError:
        return []


def apply_kernels(model: torch.nn.Module, mode: str, device: torch.device, compile: bool = False,
                  cuda_graphs: bool = False) -> LossFn:
    """Patch `model` (a transformers causal LM, possibly peft-wrapped) for `mode` on `device` and
    return the loss function the loop calls. Calling it again re-chooses the loss path (`mode="none"`
    restores the plain loss; liger's RMSNorm/SwiGLU, once applied to a model on CUDA, stay on its modules).

    `compile` compiles every decoder layer last, reading the recompute choice each layer has
    then (so model setup sets the memory plan first); with `cuda_graphs` (CUDA only) they replay as
    CUDA graphs.

    The patched model still goes through its own `__call__` (so accelerate / DDP wrappers keep
    their hooks): only the causal LM's forward changes, and only while training with labels.
    """
    if mode not in MODES:
        raise ValueError(f"model.kernels: {mode!r} is not one of {', '.join(MODES)}")
    device = torch.device(device)
    causal_lm = _causal_lm(model)
    if getattr(causal_lm, "_cpt_plain_forward", None) is not None:  # undo an earlier patch
        causal_lm.forward = causal_lm._cpt_plain_forward
        del causal_lm._cpt_plain_forward
    unfuse_lora_projections(model)
    for layer in _layers_or_none(model):
        uncompile_layer(layer)
    if mode == "auto":
        mode = "cpt" if device.type == "cuda" else "none"
    applied = []
    if mode == "liger" and device.type != "cuda":
        raise ValueError("model.kernels=liger needs a CUDA device; use 'cpt' or 'none' on CPU")
    if mode == "liger" and not liger_available():
        raise ValueError("model.kernels=liger needs liger-kernel: pip install liger-kernel")
    if mode in ("cpt", "liger"):
        if _patch_loss(causal_lm, use_liger_loss=(mode == "liger")):
            applied.append("liger fused linear cross-entropy" if mode == "liger" else "cpt chunked linear cross-entropy")
        if fuse_lora_projections(model):
            from cpt.kernels import lora as lora_mod

            applied.append("LoRA update fused into the projection (" + ("cpt::lora_linear, lora_linear_4bit for 4-bit bases, or addmm for others"
                                                                        if lora_mod.LINEAR_OP else "addmm epilogue") + ")")
        # Under compile the generated kernels fuse norms, RoPE and SwiGLU themselves.
        if (device.type == "cuda" and liger_available() and _model_type(causal_lm) in FUSABLE_MODEL_TYPES
                and (mode == "liger" or not compile)):
            if _patch_liger_elementwise(causal_lm):
                applied.append("liger RMSNorm/SwiGLU")
        if device.type == "cuda" and skip_lora_input_upcast(model):
            applied.append("LoRA inputs stay bf16 under autocast")
        if device.type == "cuda" and offload_frozen_originals(model):
            applied.append("frozen embedding originals in host memory")
    if compile:
        graphs = cuda_graphs and device.type == "cuda"
        # Host layers need cpt's own projections in the graph; under liger's Triton SwiGLU the
        # saved gate/up outputs never reached the hooks (CUDA test, session 9).
        host = device.type == "cuda" and not getattr(causal_lm, "_cpt_liger_elementwise", False)
        layers = compile_decoder_layers(model, cuda_graphs=graphs, host_layers=host)
        applied.append(f"decoder layers compiled ({layers['compiled']} of {layers['compiled'] + layers['eager']}, "
                       f"{layers['recompute']} recompute inside the graph"
                       + (f", {layers['host']} with MLP activations in host memory" if layers["host"] else "")
                       + f"{', replayed as CUDA graphs' if graphs else ''})")
    if mode in ("cpt", "liger"):
        reused = sum(mark_recomputed(layer, recomputes(layer) or getattr(layer, "_cpt_plain_forward", None) is not None)
                     for layer in _layers_or_none(model))
        if reused:
            applied.append(f"4-bit weights of recomputing layers dequantized once in backward ({reused} projections)")
    causal_lm._cpt_kernels = applied
    log.info("kernels: %s", ", ".join(applied) or "plain PyTorch")
    return plain_causal_lm_loss
