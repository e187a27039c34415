"""Which decoder layers recompute their activations in the backward pass, and where their inputs wait.

Three per-layer choices, made by the run plan (RunPlan.checkpointing, keep_layers) and set here:
- keep: the layer's activations stay on the GPU (fastest; about 0.8 GiB per layer of an 8B model
  at 4096 tokens);
- recompute: transformers' own gradient checkpointing (only the layer's input is kept);
- offload: recompute, and the layer's input waits in pinned host memory instead of on the GPU
  (speed/offload.py).

The lowest `keep_layers` layers keep their activations (where the plan found room for them), the
rest recompute. Compiled layers (speed/compile.py) read these choices and recompute inside their graph.

    python -m pytest tests/test_speed_recompute.py -q
"""
from __future__ import annotations

from typing import Callable

import torch

from cpt.speed.offload import SideStreams, offloaded_forward
from cpt.speed.patch import replace_forward

CHOICES = ("keep", "recompute", "offload")


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


def layer_choices(n_layers: int, checkpointing: str, keep_layers: int) -> list[str]:
    """Each layer's choice: 'keep' for all without checkpointing, else the lowest keep_layers keep and
    the rest take `checkpointing` ('recompute' or 'offload')."""
    if checkpointing not in ("off", "recompute", "offload"):
        raise ValueError(f"checkpointing: {checkpointing!r} is not one of off, recompute, offload")
    if checkpointing == "off":
        return ["keep"] * n_layers
    keep = max(0, min(n_layers, int(keep_layers)))
    return ["keep"] * keep + [checkpointing] * (n_layers - keep)


def set_recompute(layers: list, choices: list[str], streams: SideStreams) -> Callable[[], None]:
    """Apply each layer's choice. A recomputing layer needs transformers' gradient checkpointing
    enabled on the model (`gradient_checkpointing_enable`; the model builder does it); an offloaded
    layer's own checkpoint replaces transformers' (never both: that would recompute twice). Returns the
    function that puts every layer's checkpointing switch and forward back."""
    undo: list[Callable[[], None]] = []

    def restore() -> None:
        for u in reversed(undo):
            u()

    try:
        for layer, choice in zip(layers, choices):
            undo.append(_switch_restorer(layer))
            if choice == "offload":
                layer.gradient_checkpointing = False
                undo.append(replace_forward(layer, offloaded_forward(layer, streams)))
            elif choice == "recompute":
                if not getattr(layer, "_gradient_checkpointing_func", None):
                    raise ValueError("a recomputing layer needs transformers' gradient checkpointing: call "
                                     "model.gradient_checkpointing_enable() first")
                layer.gradient_checkpointing = True
            else:
                layer.gradient_checkpointing = False
    except Exception:
        restore()
        raise
    return restore


def _switch_restorer(layer: torch.nn.Module) -> Callable[[], None]:
    had = "gradient_checkpointing" in layer.__dict__
    before = layer.__dict__.get("gradient_checkpointing")

    def undo() -> None:
        if had:
            layer.gradient_checkpointing = before
        else:
            layer.__dict__.pop("gradient_checkpointing", None)

    return undo
