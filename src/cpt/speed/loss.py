"""The causal-LM loss the loop calls, and the fused head that computes it without full logits.

`plain_causal_lm_loss` is what the loop calls on every model: the model's own forward with labels.
With RunPlan.kernels 'cpt' or 'liger' the causal LM's forward is patched so that, while training with
labels, it runs the decoder, then a fused linear + cross-entropy on the output head (cpt's chunked one,
speed/linear_ce.py, or liger's) instead of making the logits in full. Gemma 2's soft-capped logits go
through cpt's chunked loss, which applies the cap (liger's is called without one). Architectures whose
logits are something else keep the model's own loss, and `fused_head_refusal` says why. Generation,
evaluation without gradients and callers that want logits keep the original forward.

    python -m pytest tests/test_speed_loss.py -q
"""
from __future__ import annotations

import logging
import types
from typing import Any, Callable, Optional

import torch

from cpt.plan.rules import FUSABLE_MODEL_TYPES, SOFTCAPPED_MODEL_TYPES
from cpt.speed.linear_ce import TritonRows, fused_linear_cross_entropy, shift_labels
from cpt.speed.patch import replace_forward

LossFn = Callable[[torch.nn.Module, dict, int], torch.Tensor]
log = logging.getLogger(__name__)


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


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
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


def output_head(lm: torch.nn.Module) -> torch.nn.Module:
    """The module that computes the logits right now: for a peft `modules_to_save` head, the
    trained copy of the active adapter (or the frozen original while adapters are disabled)."""
    head = lm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(lm).__name__} has no output embeddings")
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):
        active = head.active_adapters
        if head.disable_adapters or any(a not in head.modules_to_save for a in active):
            return head.original_module
        if len(active) != 1:
            raise ValueError("the fused loss needs exactly one active adapter on the output head")
        return head.modules_to_save[active[0]]
    return head


def model_type(lm: torch.nn.Module) -> str:
    return str(getattr(getattr(lm, "config", None), "model_type", ""))


def logit_softcap(lm: torch.nn.Module) -> Optional[float]:
    """The soft-cap the model's forward puts on its logits (Gemma 2's 30.0), or None."""
    cap = getattr(getattr(lm, "config", None), "final_logit_softcapping", None)
    return float(cap) if cap and model_type(lm) in SOFTCAPPED_MODEL_TYPES else None


def fused_head_refusal(lm: torch.nn.Module) -> Optional[str]:
    """None where the fused head computes this model's function (logits lm_head(last_hidden_state), with
    the family's soft-cap), else why not, for the run log."""
    kind = model_type(lm) or type(lm).__name__
    if model_type(lm) not in FUSABLE_MODEL_TYPES:
        return f"the fused head does not know how {kind!r} turns hidden states into logits"
    if getattr(lm.config, "final_logit_softcapping", None) and model_type(lm) not in SOFTCAPPED_MODEL_TYPES:
        return (f"the config sets final_logit_softcapping, which the fused head applies for Gemma 2 and 3 only, "
                f"not {kind!r}")
    if not hasattr(lm, "model") or lm.get_output_embeddings() is None:
        return f"{type(lm).__name__} has no decoder `model` and output head to split"
    return None


def fusable(lm: torch.nn.Module) -> bool:
    """Whether the fused head computes this model's function."""
    return fused_head_refusal(lm) is None


def _fused_forward(original: Callable, use_liger_loss: bool, rows: TritonRows) -> Callable:
    def forward(self, *args: Any, **kwargs: Any):
        labels = kwargs.get("labels")
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
        cap = logit_softcap(self)
        if use_liger_loss and not cap:
            from cpt.speed.liger import liger_loss

            loss = liger_loss(hidden, head, targets, num_items)
        else:
            loss = fused_linear_cross_entropy(hidden, head.weight, targets, num_items, bias=getattr(head, "bias", None),
                                              rows=rows, softcap=cap)
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                      attentions=outputs.attentions)

    return forward


def patch_loss(lm: torch.nn.Module, use_liger_loss: bool, rows: TritonRows) -> Callable[[], None]:
    """Give the causal LM `lm` (check `fusable` first) the fused head while training with labels; returns
    the undo. `rows`: the run's Triton pass for cpt's loss."""
    return replace_forward(lm, types.MethodType(_fused_forward(lm.forward, use_liger_loss, rows), lm))
