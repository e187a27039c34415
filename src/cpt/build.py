"""Building a run's model: load, decide the run plan, add adapters, apply the plan, name the groups.

The one place where the stages meet: the model stage loads and adapts, the plan stage decides from
the config, the model's shape and the hardware, the speed stage converts the model once. What comes
out is a ModelBundle: the model ready to train, its tokenizer, the loss function, the parameter groups,
the RunPlan that was applied and the per-run Speed object (whose hooks the loop calls).

    python -m pytest tests/test_build.py -q
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from cpt import speed as speed_stage
from cpt.config import Config, ConfigError
from cpt.data.chat import apply_template
from cpt.model import (GROUP_EMBEDDINGS, SPLIT_MASTER, add_adapters, add_token_rows, check_against_model, check_device,
                       enable_gradient_checkpointing, load_adapter_weights, load_base_model, load_model_config,
                       load_tokenizer, param_groups,
                       sparse_gradients)
from cpt.model.vocab import add_listed_tokens, extend_model, read_extension, unknown_tokens
from cpt.plan.decide import decide, format_run_plan
from cpt.plan.run_plan import RunPlan
from cpt.runtime import default_device, resolve_dtype, settle_cpu_math

log = logging.getLogger("cpt")


@dataclass
class ModelBundle:
    model: nn.Module
    tokenizer: Any
    loss_fn: Callable
    device: torch.device
    dtype: torch.dtype
    groups: list[dict] = field(default_factory=list)
    plan: RunPlan = field(default_factory=RunPlan)
    speed: Any = None  # cpt.speed.Speed: the hooks the loop calls, and what was applied

    @property
    def is_peft(self) -> bool:
        return hasattr(self.model, "peft_config")

    def trainable_summary(self) -> dict:
        total = sum(p.numel() for p in self.model.parameters())
        counted = {id(p): p for p in self.model.parameters() if p.requires_grad}
        per_group = {g["name"]: sum(p.numel() for p in g["params"]) for g in self.groups}
        return {"total_params": total, "trainable_params": sum(p.numel() for p in counted.values()),
                **{f"{k}_params": v for k, v in per_group.items()}}


def _as_built(run: RunPlan, model: nn.Module) -> RunPlan:
    """A model whose adapters were added before the run plan existed (the Python API's get_peft_model
    runs before the optimizer is known): the plan follows how its embeddings are actually held."""
    split = any(getattr(p, SPLIT_MASTER, False) for p in model.parameters())
    sparse = sparse_gradients(model)
    if (split, sparse) == (run.split_masters, run.sparse_embedding_grad):
        return run
    return dataclasses.replace(run, split_masters=split, sparse_embedding_grad=sparse, offload_embedding_state=(
        run.offload_embedding_state and split), reasons=(*run.reasons, "adapters were added before the run plan: "
                                                         f"split masters {'on' if split else 'off'} as built"))


def build_model(cfg: Config, device: Optional[torch.device] = None, model: Optional[nn.Module] = None,
                tokenizer: Any = None, **speed_options: Any) -> ModelBundle:
    """Load (or take) the model and tokenizer, check limits, decide the run plan, add adapters, apply the
    plan, make the parameter groups. `speed_options` go to cpt.speed.apply (benchmarks' switches)."""
    device = torch.device(device) if device is not None else default_device()
    check_device(cfg, device)
    settle_cpu_math()
    dtype = resolve_dtype(cfg.model.dtype, device)
    if model is None:
        check_against_model(cfg, load_model_config(cfg.model))
        model = load_base_model(cfg.model, device, dtype)
    else:
        check_against_model(cfg, model.config)
        if not getattr(model, "is_loaded_in_4bit", False):
            model.to(device)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model)
    adapted = getattr(model, "_cpt_adapter_config", None) is not None  # the Python API may have added them already
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows and not adapted:
        extension = read_extension(getattr(tokenizer, "name_or_path", None))
        if extension is None or extension["size"] != len(tokenizer):
            raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows; "
                              "they do not belong together (a tokenizer extended with `cpt vocab extend` keeps "
                              "vocab_extension.json beside it, which tells how to grow the model)")
        extend_model(model, extension, cfg.vocab.init)
        log.info("vocabulary extended: %d -> %d tokens, new rows from %s", rows, len(tokenizer), cfg.vocab.init)
        rows = len(tokenizer)
    listed = unknown_tokens(tokenizer, cfg.vocab.tokens) + unknown_tokens(tokenizer, cfg.vocab.special_tokens, special=True)
    if listed and adapted:
        raise ConfigError(f"vocab.tokens: {', '.join(listed[:3])} must be added before the adapters are made: call "
                          "CPTModel.add_new_tokens before get_peft_model, or build the model from a config")
    if listed:
        added = add_listed_tokens(model, tokenizer, cfg.vocab.tokens, init=cfg.vocab.init, where="vocab.tokens")
        added += add_listed_tokens(model, tokenizer, cfg.vocab.special_tokens, special=True, init=cfg.vocab.init,
                                   where="vocab.special_tokens")
        log.info("added %d listed tokens, new rows from %s: %s", len(added), cfg.vocab.init, ", ".join(added))
        rows = max(rows, len(tokenizer))
    if cfg.train.stage == "sft":
        added = apply_template(tokenizer, cfg.data.chat_template)
        if added and not cfg.trains_embeddings:
            raise ConfigError(f"the chat template adds tokens the vocabulary lacks ({', '.join(added)}): train their rows "
                              "by keeping embed_tokens and lm_head in adapter.target_modules, or choose a template "
                              "the tokenizer already knows (data.chat_template)")
        if len(tokenizer) > rows:
            if adapted:
                raise ConfigError(f"the chat template adds tokens ({', '.join(added)}) after the adapters were made: "
                                  "give SFTTrainer a tokenizer that has the template, or build the model from a config")
            add_token_rows(model, len(tokenizer))
            log.info("added %d template tokens to the vocabulary: %s", len(added), ", ".join(added))
            rows = len(tokenizer)
    if len(tokenizer) > rows:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows; "
                          "they do not belong together (with the Python API, extend before get_peft_model)")
    run = decide(cfg, model.config, device)
    if not adapted:
        if cfg.adapter.method == "lora":
            for p in model.parameters():
                p.requires_grad_(False)
        if run.recomputes:
            enable_gradient_checkpointing(model)
        model = add_adapters(model, cfg.adapter, dtype, split_masters=run.split_masters,
                             sparse_embedding_grad=run.sparse_embedding_grad)
    else:
        run = _as_built(run, model)
    if cfg.model.adapter_path:
        load_adapter_weights(model, cfg.model.adapter_path)
        log.info("continuing the adapter of %s", cfg.model.adapter_path)
    speed = speed_stage.apply(model, run, **speed_options)
    log.info("%s", format_run_plan(run))
    bundle = ModelBundle(model=model, tokenizer=tokenizer, loss_fn=speed.loss_fn, device=device, dtype=dtype,
                         plan=run, speed=speed)
    bundle.groups = param_groups(model, cfg)
    if cfg.trains_embeddings and not any(g["name"] == GROUP_EMBEDDINGS for g in bundle.groups):
        raise ConfigError("adapter.target_modules names embed_tokens/lm_head but no embedding parameter is trainable; "
                          "does this model name them differently?")
    return bundle
