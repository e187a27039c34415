"""Unsloth's names over cpt, so a continued-pretraining script written for Unsloth runs with only its
import line changed:

    from cpt.compat import FastLanguageModel, UnslothTrainer, UnslothTrainingArguments, is_bfloat16_supported

`FastLanguageModel.from_pretrained` / `get_peft_model`, `UnslothTrainer` and `UnslothTrainingArguments`
take Unsloth's (and transformers' TrainingArguments') argument names and defaults; everything runs
through cpt.api.run_training, like `cpt train`. What Unsloth means and cpt does too is mapped
(`use_gradient_checkpointing="unsloth"`: layer inputs offloaded to host memory; `embedding_learning_rate`;
`modules_to_save` of the embeddings: trained in full); what cpt does not do (`loftq_config`, DoRA, layer
subsets, 8-bit loading, ...) is a ConfigError naming the argument, never a TypeError deep inside.
`trainer.train()` returns transformers' TrainOutput (`global_step`, `training_loss`, `metrics` with
train_runtime, train_samples_per_second, train_loss, ...).

    python examples/seed.py
    python -m pytest tests/test_compat.py -q
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch

from cpt.api import CPTModel, TrainingArguments, is_bfloat16_supported, run_training
from cpt.config import ConfigError, config_from_dict, hf_training_arguments
from cpt.runtime import model_device

__all__ = ["FastLanguageModel", "UnslothTrainer", "UnslothTrainingArguments", "add_new_tokens",
           "is_bfloat16_supported", "convert_config"]

log = logging.getLogger("cpt")

# transformers' TrainingArguments defaults where cpt's own differ: a script that leaves a value out
# gets what it got under Unsloth (transformers 5).
HF_DEFAULTS = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 5e-5,
               "lr_scheduler_type": "linear", "num_train_epochs": 3.0, "logging_steps": 500, "save_steps": 500,
               "seed": 42, "report_to": "none", "output_dir": "trainer_output"}
_DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _quiet() -> None:
    """cpt's lines on stderr, the libraries quiet (CPT_VERBOSE=1: everything), unless the caller has set
    up cpt's logger itself."""
    if not logging.getLogger("cpt").handlers:
        from cpt.console import setup_logging
        from cpt.data.sources import DataWarning

        setup_logging(bool(os.environ.get("CPT_VERBOSE")), keep_warnings=(DataWarning,))


def _refuse(where: str, name: str, value: Any, ok: tuple, why: str) -> None:
    if value not in ok:
        raise ConfigError(f"{where}: {name}={value!r} is not supported: {why}")


class FastLanguageModel:
    """Unsloth's loader: `from_pretrained` then `get_peft_model`."""

    @staticmethod
    def from_pretrained(model_name: str = "unsloth/llama-3-8b-bnb-4bit", max_seq_length: Optional[int] = 2048,
                        dtype: Any = None, load_in_4bit: bool = True, load_in_8bit: bool = False,
                        full_finetuning: bool = False, token: Optional[str] = None, device_map: Any = "sequential",
                        rope_scaling: Any = None, fix_tokenizer: bool = True, trust_remote_code: bool = False,
                        use_gradient_checkpointing: Any = "unsloth", resize_model_vocab: Optional[int] = None,
                        revision: Optional[str] = None, fast_inference: bool = False, *args: Any, **kwargs: Any):
        """Load the base model and tokenizer (model_name: hub name, folder, or folder with `gguf_file=`).
        The defaults are Unsloth's, load_in_4bit=True included (QLoRA needs a CUDA GPU)."""
        _quiet()
        where = "FastLanguageModel.from_pretrained"
        if args:
            raise ConfigError(f"{where}: give arguments by name (model_name=..., max_seq_length=...), not {len(args)} more by position")
        _refuse(where, "load_in_8bit", load_in_8bit, (False, None), "cpt loads the frozen base in 4-bit (load_in_4bit=True) or 16-bit")
        _refuse(where, "rope_scaling", rope_scaling, (None,), "set it in the model's config.json instead")
        _refuse(where, "resize_model_vocab", resize_model_vocab, (None,), "resize the vocabulary before training (model.resize_token_embeddings) and save the model")
        _refuse(where, "fast_inference", fast_inference, (False, None), "cpt does not start vLLM; serve the merged model (`cpt merge`) with vLLM after training")
        for ignored in ("use_exact_model_name", "disable_log_stats", "max_lora_rank", "gpu_memory_utilization",
                        "float8_kv_cache", "random_state"):
            kwargs.pop(ignored, None)  # Unsloth's name resolution and vLLM settings: nothing to do here
        device = _device(where, device_map)
        if full_finetuning and load_in_4bit:
            raise ConfigError(f"{where}: full_finetuning=True trains every weight, which 4-bit weights cannot be: pass load_in_4bit=False")
        if token:
            os.environ["HF_TOKEN"] = token
        model, tokenizer = CPTModel.from_pretrained(
            model_name, max_seq_length=max_seq_length or 2048, dtype=dtype, load_in_4bit=bool(load_in_4bit),
            device=device, revision=revision, trust_remote_code=trust_remote_code, **kwargs)
        model._cpt_gradient_checkpointing = use_gradient_checkpointing
        model._cpt_full_finetuning = bool(full_finetuning)
        return model, tokenizer

    @staticmethod
    def get_peft_model(model: Any, r: int = 16, target_modules: Optional[list[str]] = None, lora_alpha: float = 16,
                       lora_dropout: float = 0.0, bias: str = "none", layers_to_transform: Any = None,
                       layers_pattern: Any = None, use_gradient_checkpointing: Any = "unsloth", random_state: int = 3407,
                       max_seq_length: Optional[int] = None, use_rslora: bool = False,
                       modules_to_save: Optional[list[str]] = None, init_lora_weights: Any = True,
                       loftq_config: Any = None, temporary_location: Optional[str] = None, qat_scheme: Any = None,
                       ensure_weight_tying: bool = False, **kwargs: Any):
        """LoRA (rsLoRA with use_rslora) on target_modules; embed_tokens / lm_head named in target_modules
        or modules_to_save are trained in full, with float32 masters. use_gradient_checkpointing:
        "unsloth" offloads each layer's input to host memory, True recomputes, False keeps activations."""
        where = "FastLanguageModel.get_peft_model"
        _refuse(where, "loftq_config", loftq_config if loftq_config != {} else None, (None,),
                "LoftQ initialisation is not available; pass loftq_config=None (LoRA starts from peft's default)")
        _refuse(where, "init_lora_weights", init_lora_weights, (True,),
                "only peft's default initialisation (A random, B zero) is available")
        _refuse(where, "layers_to_transform", layers_to_transform, (None,), "cpt adapts every decoder layer")
        _refuse(where, "layers_pattern", layers_pattern, (None,), "cpt adapts every decoder layer")
        _refuse(where, "qat_scheme", qat_scheme, (None,), "quantization-aware training is not available")
        if kwargs.pop("use_dora", False):
            raise ConfigError(f"{where}: use_dora=True is not supported: cpt trains LoRA or rsLoRA (use_rslora=True)")
        if kwargs:
            name = next(iter(kwargs))
            raise ConfigError(f"{where}: unknown argument {name!r}; cpt takes r, target_modules, lora_alpha, "
                              "lora_dropout, bias, use_gradient_checkpointing, random_state, use_rslora, modules_to_save")
        targets = list(target_modules) if target_modules is not None else list(_DEFAULT_TARGETS)
        for m in modules_to_save or []:
            if m not in ("embed_tokens", "lm_head"):
                raise ConfigError(f"{where}: modules_to_save={modules_to_save!r}: only embed_tokens and lm_head are "
                                  "trained in full; adapt other modules through target_modules")
            if m not in targets:
                targets.append(m)
        mcfg = getattr(model, "_cpt_model_config", None)
        if max_seq_length is not None and mcfg is not None and max_seq_length != mcfg.max_seq_length:
            mcfg.max_seq_length = int(max_seq_length)
        return CPTModel.get_peft_model(model, r=r, target_modules=targets, lora_alpha=lora_alpha,
                                       lora_dropout=lora_dropout, bias=bias,
                                       use_gradient_checkpointing=use_gradient_checkpointing,
                                       random_state=random_state, use_rslora=use_rslora)

    @staticmethod
    def for_inference(model: Any) -> Any:
        """Evaluation mode (generation runs the plain layers anyway)."""
        model.eval()
        return model

    @staticmethod
    def for_training(model: Any) -> Any:
        model.train()
        return model


def add_new_tokens(model: Any, tokenizer: Any, new_tokens: Any = (), method: str = "mean",
                   interpolation: float = 0.5) -> None:
    """Unsloth's `add_new_tokens`: the strings become whole tokens of `tokenizer` (changed in place) and the
    model's embeddings grow to match, before get_peft_model. Each new row starts as the mean of the rows of
    the tokens the string was split into (cpt.api.CPTModel.add_new_tokens); `method` and `interpolation`
    are accepted with Unsloth's defaults only."""
    _refuse("add_new_tokens", "method", method, ("mean",), "cpt starts each new row from the tokens the string was split into")
    _refuse("add_new_tokens", "interpolation", interpolation, (0.5,), "cpt starts each new row from the tokens the "
            "string was split into and has no interpolation to set")
    added = CPTModel.add_new_tokens(model, tokenizer, list(new_tokens))
    log.info("added %d tokens: %s", len(added), ", ".join(added))


def _device(where: str, device_map: Any) -> Optional[torch.device]:
    """One device: Unsloth's strings mean this machine's first GPU (or the CPU); {"": n} means GPU n."""
    if device_map in (None, "sequential", "auto", "balanced", "cuda"):
        return None
    if isinstance(device_map, dict) and set(device_map) == {""}:
        d = device_map[""]
        return torch.device(f"cuda:{d}" if isinstance(d, int) else d)
    if isinstance(device_map, (str, torch.device)):
        return torch.device(device_map)
    raise ConfigError(f"{where}: device_map={device_map!r} is not supported: cpt puts the model on one device per "
                      "process; for several GPUs launch with torchrun (docs/distributed.md)")


class UnslothTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments names and defaults, plus embedding_learning_rate. HF names cpt
    maps (resume_from_checkpoint, eval_strategy, warmup_steps as a ratio, HF scheduler names and
    lr_scheduler_kwargs, report_to, ...) are translated; those it does not do are a ConfigError that
    says what to use."""

    def __init__(self, output_dir: Optional[str] = None, **kwargs: Any):
        values = {**HF_DEFAULTS, **({"output_dir": output_dir} if output_dir is not None else {}), **kwargs}
        hf_training_arguments(values, "UnslothTrainingArguments")  # every name checked now, not at train()
        dict.__init__(self, values)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class UnslothTrainer:
    """Unsloth's (and TRL's SFTTrainer's) constructor over cpt's run: `train()` returns TrainOutput."""

    def __init__(self, model: Any, tokenizer: Any = None, train_dataset: Any = None, eval_dataset: Any = None,
                 args: Optional[dict] = None, dataset_text_field: str = "text", max_seq_length: Optional[int] = None,
                 dataset_num_proc: Optional[int] = None, processing_class: Any = None, data_collator: Any = None,
                 callbacks: Any = None, formatting_func: Any = None, compute_metrics: Any = None,
                 optimizers: Any = (None, None), **kwargs: Any):
        _quiet()
        where = "UnslothTrainer"
        for name, value in (("data_collator", data_collator), ("callbacks", callbacks),
                            ("formatting_func", formatting_func), ("compute_metrics", compute_metrics)):
            if value is not None:
                raise ConfigError(f"{where}: {name} is not supported: cpt packs the text of dataset_text_field itself "
                                  "and evaluates loss, perplexity and bits per byte")
        if optimizers not in ((None, None), None):
            raise ConfigError(f"{where}: optimizers is not supported: choose the optimizer with args optim=...")
        if train_dataset is None:
            raise ConfigError(f"{where}: train_dataset is required (a datasets.Dataset with a {dataset_text_field!r} column)")
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else processing_class
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.args = args if args is not None else UnslothTrainingArguments()
        values = dict(self.args) if isinstance(self.args, dict) else _object_arguments(self.args)
        values.update(kwargs)
        raw = hf_training_arguments(values, where)
        mcfg = getattr(model, "_cpt_model_config", None)
        acfg = getattr(model, "_cpt_adapter_config", None)
        if mcfg is None:
            raise ConfigError(f"{where}: model was not loaded with FastLanguageModel.from_pretrained")
        raw.setdefault("model", {}).update({k: v for k, v in mcfg.__dict__.items()})
        if acfg is not None:
            raw.setdefault("adapter", {}).update({k: v for k, v in acfg.__dict__.items()})
        elif getattr(model, "_cpt_full_finetuning", False):
            raw.setdefault("adapter", {}).update({"method": "full"})
        else:
            raise ConfigError(f"{where}: the model has no adapters: call FastLanguageModel.get_peft_model first "
                              "(or load with full_finetuning=True)")
        if "use_gradient_checkpointing" not in raw.get("adapter", {}):
            raw["adapter"]["use_gradient_checkpointing"] = getattr(model, "_cpt_gradient_checkpointing", True)
        data = raw.setdefault("data", {})
        data["dataset_text_field"] = dataset_text_field
        if dataset_num_proc is not None:
            # worker processes beyond the cores only add start-up time (the notebook asks for 8)
            data["dataset_num_proc"] = max(1, min(int(dataset_num_proc), os.cpu_count() or 1))
        if max_seq_length is not None:
            raw["model"]["max_seq_length"] = int(max_seq_length)
        self.config = config_from_dict(raw)
        self.summary: Optional[dict] = None

    def train(self, resume_from_checkpoint: Any = None, **kwargs: Any) -> Any:
        """Run, and answer with transformers' TrainOutput; the whole cpt summary is `self.summary`."""
        from transformers.trainer_utils import TrainOutput

        if kwargs:
            raise ConfigError(f"UnslothTrainer.train: unknown argument {next(iter(kwargs))!r}")
        cfg = self.config
        if resume_from_checkpoint not in (None, False):
            cfg.output.resume = "true" if resume_from_checkpoint is True else str(resume_from_checkpoint)
        device = model_device(self.model)
        summary = run_training(cfg, model=self.model, tokenizer=self.tokenizer, train_dataset=self.train_dataset,
                               device=device, eval_dataset=self.eval_dataset)
        self.summary = summary
        return TrainOutput(summary["step"], summary["train_loss"], train_metrics(summary, cfg, self.model))

    def save_model(self, output_dir: Optional[str] = None) -> None:
        """The trained adapter (or model) and tokenizer, as Hugging Face folders."""
        out = output_dir or self.config.output.output_dir
        self.model.save_pretrained(out)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out)


def _object_arguments(args: Any) -> dict:
    """transformers' own TrainingArguments object given as args: the values its user set."""
    import dataclasses

    if not dataclasses.is_dataclass(args):
        raise ConfigError(f"UnslothTrainer: args must be UnslothTrainingArguments(...), not {type(args).__name__}")
    out = {}
    for f in dataclasses.fields(args):
        if not f.init:
            continue
        value = getattr(args, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if value != default:
            out[f.name] = value
    return {**HF_DEFAULTS, **out}


def train_metrics(summary: dict, cfg: Any, model: Any) -> dict:
    """transformers' train metrics from a cpt run summary (a sample is one packed block)."""
    t = cfg.train
    runtime = max(float(summary["train_runtime_s"]), 1e-9)
    steps = int(summary["step"])
    world = int(summary.get("world_size", 1))
    samples = steps * t.per_device_train_batch_size * t.gradient_accumulation_steps * world
    tokens = int(summary.get("tokens_read", summary["tokens"]))  # positions processed, as transformers counts them
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    epoch = summary.get("epoch")
    return {"train_runtime": round(runtime, 4), "train_samples_per_second": round(samples / runtime, 3),
            "train_steps_per_second": round(steps / runtime, 3), "train_tokens_per_second": round(tokens / runtime, 3),
            "total_flos": float(6 * non_embedding * tokens), "train_loss": summary["train_loss"],
            **({"epoch": epoch} if epoch is not None else {})}


# ---------------------------------------------------------------------------- other tools' configs

_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Keys that steer the other tool's own machinery and mean nothing for cpt's run.
_NO_EFFECT = {"do_train", "plot_loss", "overwrite_cache", "template", "ddp_timeout", "save_only_model",
              "dataloader_num_workers", "model_type", "tokenizer_type", "strict", "pad_to_sequence_len",
              "train_on_inputs", "group_by_length", "tf32", "special_tokens", "stage", "dataset_dir", "lora_alpha",
              "debug", "deepspeed", "fsdp", "fsdp_config", "xformers_attention", "early_stopping_patience",
              "resize_vocab"}
# Same name, same meaning: copied into their section.
_SAME = {"learning_rate": "train", "gradient_accumulation_steps": "train", "per_device_train_batch_size": "train",
         "num_train_epochs": "train", "max_steps": "train", "lr_scheduler_type": "train", "warmup_ratio": "train",
         "warmup_steps": "train", "weight_decay": "train", "max_grad_norm": "train", "seed": "train", "bf16": "train",
         "fp16": "train", "optim": "train", "output_dir": "output", "logging_steps": "output", "save_steps": "output",
         "save_total_limit": "output", "overwrite_output_dir": "output", "report_to": "output",
         "resume_from_checkpoint": "output", "eval_steps": "eval", "per_device_eval_batch_size": "eval",
         "lora_dropout": "adapter", "use_rslora": "adapter", "load_in_4bit": "model", "trust_remote_code": "model",
         "streaming": "data", "eval_strategy": "eval", "gradient_checkpointing": "adapter"}


def convert_config(raw: dict, source: str = "config", base: Optional[str] = None) -> tuple[dict, list[str]]:
    """A LLaMA-Factory (`stage: pt`) or axolotl pretraining config as a raw cpt config, and the keys left
    out because cpt has nothing like them. Keys the file does not give take cpt's defaults. `base`: the
    folder LLaMA-Factory's dataset_dir is relative to when it is not found from the working folder.
    Raises ConfigError for a setting cpt cannot honour (another stage, 8-bit loading, freeze tuning)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys")
    axolotl = any(k in raw for k in ("base_model", "sequence_len", "micro_batch_size", "pretraining_dataset",
                                     "datasets", "num_epochs", "adapter"))
    if "model_name_or_path" not in raw and not axolotl:
        raise ConfigError(f"{source}: neither a LLaMA-Factory config (model_name_or_path) nor an axolotl config "
                          "(base_model); `cpt convert-config` reads those two")
    out: dict[str, dict] = {}
    skipped: list[str] = []

    def put(key: str, value: Any) -> None:
        sec, leaf = key.split(".")
        out.setdefault(sec, {})[leaf] = value

    def refuse(key: str, why: str) -> None:
        raise ConfigError(f"{source}: {key}={raw[key]!r}: {why}")

    if not axolotl and raw.get("stage", "pt") != "pt":
        refuse("stage", "cpt does continued pretraining: convert-config reads LLaMA-Factory's stage: pt configs")
    targets: list[str] = []
    for key, value in raw.items():
        if value is None:
            continue
        if key in ("bf16", "fp16") and value == "auto":
            continue  # axolotl's auto: where the GPU supports it, which is cpt's default (null)
        if key in _SAME:
            hf = hf_training_arguments({key: value}, source)
            for sec, vals in hf.items():
                out.setdefault(sec, {}).update(vals)
        elif key in ("model_name_or_path", "base_model"):
            put("model.name_or_path", value)
        elif key in ("cutoff_len", "sequence_len"):
            put("model.max_seq_length", value)
        elif key in ("lora_rank", "lora_r"):
            put("adapter.r", value)
        elif key == "finetuning_type":
            if value not in ("lora", "full"):
                refuse(key, "cpt trains LoRA adapters (lora) or every weight (full)")
            put("adapter.method", value)
        elif key == "adapter":
            if value not in ("lora", "qlora"):
                refuse(key, "cpt trains LoRA adapters (lora, or qlora on a 4-bit base)")
            if value == "qlora":
                put("model.load_in_4bit", True)
        elif key == "quantization_bit":
            if value != 4:
                refuse(key, "cpt loads the frozen base in 4-bit (quantization_bit: 4) or 16-bit")
            put("model.load_in_4bit", True)
        elif key == "load_in_8bit":
            if value:
                refuse(key, "cpt loads the frozen base in 4-bit (load_in_4bit: true) or 16-bit")
        elif key in ("lora_target", "lora_target_modules"):
            names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
            targets += _PROJECTIONS if names == ["all"] else names
        elif key == "lora_target_linear":
            if value:
                targets += _PROJECTIONS
        elif key in ("additional_target", "lora_modules_to_save"):
            targets += [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
        elif key == "peft_use_rslora":
            put("adapter.use_rslora", value)
        elif key == "preprocessing_num_workers":
            put("data.dataset_num_proc", value)
        elif key == "max_samples":
            put("data.max_docs", value)
        elif key in ("val_size", "val_set_size"):
            if value:
                put("eval.holdout_fraction", value)
        elif key == "flash_attn":
            put("model.attn_implementation", {"fa2": "flash_attention_2", "sdpa": "sdpa", "disabled": "eager"}.get(value, None))
        elif key == "flash_attention":
            if value:
                put("model.attn_implementation", "flash_attention_2")
        elif key == "sdp_attention":
            if value:
                put("model.attn_implementation", "sdpa")
        elif key == "sample_packing":
            put("data.packing", "document" if value else "concat")
        elif key == "num_epochs":
            put("train.num_train_epochs", value)
        elif key == "micro_batch_size":
            put("train.per_device_train_batch_size", value)
        elif key == "optimizer":
            put("train.optim", hf_training_arguments({"optim": value}, source)["train"]["optim"])
        elif key == "lr_scheduler":
            put("train.lr_scheduler_type", value)
        elif key == "cosine_min_lr_ratio":
            put("train.min_lr_ratio", value)
        elif key == "embedding_lr":
            put("train.embedding_learning_rate", value)
        elif key == "embedding_lr_scale":
            put("train.embedding_learning_rate", float(raw.get("learning_rate", 5e-5)) * float(value))
        elif key in ("new_special_tokens", "tokens"):  # LLaMA-Factory, axolotl
            listed = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
            put("vocab.special_tokens" if key == "new_special_tokens" else "vocab.tokens", listed)
        elif key == "dataset_prepared_path":
            put("data.cache_dir", value)
        elif key == "auto_resume_from_checkpoints":
            put("output.resume", "auto" if value else "false")
        elif key in ("wandb_project", "wandb_mode"):
            if value and value != "disabled":
                put("output.report_to", ["wandb"])
                skipped.append(f"{key} (set {'WANDB_PROJECT' if key == 'wandb_project' else 'WANDB_MODE'}={value} in the environment)")
        elif key == "wandb_name":
            put("output.run_name", value)
        elif key in ("dataset", "datasets", "pretraining_dataset"):
            sources = _sources(key, value, raw, source, base)
            out.setdefault("data", {}).setdefault("sources", []).extend(sources)
            if key == "pretraining_dataset":
                put("data.streaming", True)
        elif key in ("deepspeed", "fsdp", "fsdp_config"):
            skipped.append(f"{key} (several GPUs: launch with torchrun, train.fsdp: true; docs/distributed.md)")
        elif key not in _NO_EFFECT:
            skipped.append(key)
    if not axolotl and "lora_alpha" not in raw and out.get("adapter", {}).get("r"):
        put("adapter.lora_alpha", 2 * out["adapter"]["r"])  # LLaMA-Factory's default: twice the rank
    elif raw.get("lora_alpha") is not None:
        put("adapter.lora_alpha", raw["lora_alpha"])
    if targets:
        put("adapter.target_modules", list(dict.fromkeys(targets)))
    config_from_dict(out)  # the result is a valid cpt config, or the error names the key
    return out, skipped


def _sources(key: str, value: Any, raw: dict, source: str, base: Optional[str]) -> list[dict]:
    """LLaMA-Factory's `dataset` names (looked up in dataset_dir/dataset_info.json) or axolotl's
    `datasets` / `pretraining_dataset` entries, as cpt data sources."""
    import json
    from pathlib import Path

    if key == "dataset":  # LLaMA-Factory
        names = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
        folder = Path(raw.get("dataset_dir") or "data")
        if not folder.is_absolute() and not (folder / "dataset_info.json").is_file() and base:
            folder = Path(base) / folder
        info_file = folder / "dataset_info.json"
        if not info_file.is_file():
            raise ConfigError(f"{source}: dataset={value!r} names entries of {info_file}, which is not there: set "
                              "dataset_dir to LLaMA-Factory's data folder, or write data.sources by hand")
        try:
            info = json.loads(info_file.read_text())
        except ValueError as e:
            raise ConfigError(f"{info_file}: not valid JSON ({e})") from None
        out = []
        for name in names:
            entry = info.get(name)
            if not isinstance(entry, dict):
                raise ConfigError(f"{source}: dataset {name!r} is not in {info_file}")
            text = (entry.get("columns") or {}).get("prompt", "text")
            if entry.get("file_name"):
                src: dict = {"path": str(folder / entry["file_name"])}
            elif entry.get("hf_hub_url") or entry.get("ms_hub_url"):
                src = {"dataset": entry.get("hf_hub_url") or entry.get("ms_hub_url")}
                if entry.get("subset"):
                    src["name"] = entry["subset"]
            else:
                raise ConfigError(f"{source}: dataset {name!r} in {info_file} has no file_name or hf_hub_url")
            if entry.get("split"):
                src["split"] = entry["split"]
            if text != "text":
                src["text_field"] = text
            out.append(src)
        return out
    entries = value if isinstance(value, list) else [value]
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not e.get("path"):
            raise ConfigError(f"{source}: {key}[{i}] needs a path")
        kind = e.get("type", "pretrain" if key == "pretraining_dataset" else None)
        if kind not in ("pretrain", "completion", None):
            raise ConfigError(f"{source}: {key}[{i}].type={kind!r}: cpt trains on plain text (type: completion or "
                              "pretrain); instruction formats are for fine-tuning after")
        path = str(e["path"])
        if e.get("data_files"):
            src = {"dataset": e.get("ds_type") or path, "data_files": e["data_files"]}
        else:  # a local file or folder of text files, else a `datasets` name
            src = {"path": path} if Path(path).expanduser().exists() else {"dataset": path}
        for a, b in (("name", "name"), ("split", "split")):
            if e.get(a):
                src[b] = e[a]
        text = e.get("text_column") or e.get("field")
        if text and text != "text":
            src["text_field"] = text
        out.append(src)
    return out
