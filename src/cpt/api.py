"""Python API that follows the familiar continued-pretraining flow and names:

    from cpt.api import CPTModel, CPTTrainer, TrainingArguments
    model, tokenizer = CPTModel.from_pretrained("HuggingFaceTB/SmolLM2-135M", max_seq_length=2048, load_in_4bit=False)
    model = CPTModel.get_peft_model(model, r=128, lora_alpha=32, use_rslora=True,
                                    target_modules=[..., "embed_tokens", "lm_head"])
    trainer = CPTTrainer(model=model, tokenizer=tokenizer, train_dataset=dataset, dataset_text_field="text",
                         max_seq_length=2048, args=TrainingArguments(max_steps=100, learning_rate=5e-6,
                         embedding_learning_rate=1e-6, output_dir="outputs/run"))
    stats = trainer.train()

Instruction fine-tuning (the stage after CPT) with TRL's names:

    from cpt.api import CPTModel, SFTConfig, SFTTrainer
    model, tokenizer = CPTModel.from_pretrained("outputs/cpt-merged", max_seq_length=2048)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=chat_dataset,
                         args=SFTConfig(max_length=2048, packing=True, assistant_only_loss=True, max_steps=100,
                                        learning_rate=1e-4, output_dir="outputs/sft"))
    trainer.train()

Everything goes through the same `run_training` as `cpt train`, so both faces behave the same.
Unsloth's names over this API are in cpt.compat (examples/seed.py).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch

from cpt.build import build_model
from cpt.checkpoint import COMPLETE, unwritable_dir
from cpt.config import (AdapterConfig, Config, ConfigError, ModelConfig, config_from_dict,
                        hf_training_arguments, validate)
from cpt.data import build_data, training_texts
from cpt.data.cache import cache_root
from cpt.data.inspect import labeled_warning
from cpt.data.sources import DataError, is_streaming, resolve_files, streamed_split_rows
from cpt.distributed import build_accelerator, loading_place
from cpt.evaluate import EvalSet, Evaluator, load_eval_sets
from cpt.model import (add_adapters, check_against_model, check_device, enable_gradient_checkpointing, load_base_model,
                       load_model_config, load_tokenizer)
from cpt.model.load import sole_gguf
from cpt.model.vocab import (EXTENSION_FILE, add_listed_tokens, extend_model, extended_tokenizer, learn_extension,
                             save_extension)
from cpt.plan.rules import checkpointing_mode
from cpt.report import write_report
from cpt.runtime import local_device, model_device, resolve_dtype
from cpt.track import check_trackers
from cpt.train import Trainer, resume_point

log = logging.getLogger("cpt")


def is_bfloat16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def check_paths(cfg: Config, train_dataset: Any = None, base_model: bool = True) -> None:
    """The run's locations, before anything heavy: the output folder and the token cache can be written
    (a file in the way, no permission, a read-only or full disk), every local data and eval path names
    files, and a local `model.name_or_path` holds a base model (when `base_model`: none was passed in).
    Raises ConfigError naming the key, the path and what to do."""
    if base_model:
        _check_base_model(cfg.model)
    out = Path(cfg.output.output_dir).expanduser()
    if (out / COMPLETE).is_file():
        raise ConfigError(f"output.output_dir={str(out)!r} is a checkpoint of another run: to continue that run, set "
                          f"output.output_dir={str(out.parent)!r} (output.resume: auto picks its newest checkpoint) or "
                          f"output.resume={str(out)!r}; otherwise choose another output_dir")
    problem = unwritable_dir(out, "output.output_dir")
    d = cfg.data
    cached = [s for s in ([train_dataset] if train_dataset is not None else d.sources) if not is_streaming(s, d.streaming)]
    if not problem and cached:  # only sources read whole write token shards
        problem = unwritable_dir(cache_root(d.cache_dir), "data.cache_dir")
    if problem:
        raise ConfigError(problem)
    if train_dataset is None and not d.sources:
        raise ConfigError("no training data: give data.path (a file, folder or glob) or data.dataset")
    for i, s in enumerate(d.sources):
        if s.dataset and is_streaming(s, d.streaming):
            try:
                streamed_split_rows(s)  # a percentage of a stream needs the split's size: known now, or the fix
            except DataError as e:
                raise ConfigError(f"data.sources[{i}]: {e}") from None
    for key, path in ([(f"data.sources[{i}].path", s.path) for i, s in enumerate(d.sources) if s.path]
                      + [(f"eval.sets[{i}].path", s.path) for i, s in enumerate(cfg.eval.sets) if s.path]):
        try:
            resolve_files(path)
        except DataError as e:
            raise ConfigError(f"{key}: {e}") from None


_BASE = "give a model folder (config.json and weights), a .gguf file or a folder holding one, or a hub name (org/name)"


def _check_base_model(m: ModelConfig) -> None:
    """A local model.name_or_path that holds no base model, named here rather than in transformers'
    `Unrecognized model` traceback. A name that does not exist and could be a hub id is left to the hub."""
    name = m.name_or_path
    p = Path(name).expanduser()
    if m.gguf_file and os.sep in m.gguf_file:
        p = Path(m.gguf_file).expanduser()
        if not p.is_file():
            raise ConfigError(f"model.gguf_file={m.gguf_file!r}: no such file")
        return
    where = f"model.name_or_path={name!r}"
    if p.is_file():
        if p.suffix != ".gguf":
            raise ConfigError(f"{where} is a file, not a model: {_BASE}")
    elif p.is_dir():
        if m.gguf_file:
            if not (p / m.gguf_file).is_file():
                raise ConfigError(f"model.gguf_file={m.gguf_file!r}: no such file in {p}")
        elif not (p / "config.json").is_file():
            if any((q / "adapter_config.json").is_file() for q in (p, p / "adapter")):
                raise ConfigError(f"{where} is a trained adapter, not a base model: give the model it was trained "
                                  "from (and output.resume to continue its run), or merge it first with `cpt merge`")
            if not sole_gguf(p, "model.gguf_file"):
                raise ConfigError(f"{where} holds no model (no config.json, no .gguf file): {_BASE}")
    elif (name.startswith(("/", ".", "~")) or name.count("/") > 1 or p.suffix in (".gguf", ".json", ".safetensors")
          or ("/" in name and Path(name.split("/")[0]).is_dir())):  # outputs/run where outputs/ exists
        raise ConfigError(f"{where}: no such file or folder; {_BASE}")


def run_training(cfg: Config, *, model: Any = None, tokenizer: Any = None, train_dataset: Any = None,
                 device: Optional[torch.device] = None, eval_dataset: Any = None) -> dict:
    """Config in, trained adapter out: model -> data -> evaluator -> trainer. Returns the run summary.
    `eval_dataset`: a datasets.Dataset of held-out text (its data.dataset_text_field column), evaluated as
    the 'domain' set (as 'eval' when the config names a 'domain' set already)."""
    validate(cfg)
    # Everything that can be checked in seconds is checked before minutes of model loading.
    resume_point(cfg.output)  # a foreign output_dir
    check_paths(cfg, train_dataset, base_model=model is None)
    check_trackers(cfg)
    # First the accelerator: under torchrun / accelerate launch it starts the process group and gives
    # each rank its own GPU, which is where that rank's model must be loaded.
    accelerator = build_accelerator(cfg, device)
    if device is None and accelerator.num_processes > 1:
        device = accelerator.device
    build_cfg, build_device = loading_place(cfg, accelerator, device)
    if cfg.vocab.add_tokens and tokenizer is None:
        tokenizer = setup_vocabulary(cfg, train_dataset, accelerator)
    bundle = build_model(build_cfg, device=build_device, model=model, tokenizer=tokenizer)
    data = build_data(cfg, bundle.tokenizer, train_dataset=train_dataset, rank=accelerator.process_index,
                      world_size=accelerator.num_processes)
    if data.stats.get("verdict") and cfg.train.stage == "cpt":
        warning = labeled_warning(data.stats["verdict"])
        if warning:
            log.warning(warning)
    summary_params = bundle.trainable_summary()
    log.info("trainable parameters: %s", ", ".join(f"{k}={v:,}" for k, v in summary_params.items()))
    eval_sets = load_eval_sets(cfg, data.holdout_texts, data.holdout_conversations, bundle.tokenizer)
    if eval_dataset is not None:
        eval_sets.append(_eval_set(eval_dataset, cfg, taken={s.name for s in eval_sets}))
    eval_dir = cfg.output.output_dir
    if not accelerator.is_main_process:
        import atexit
        import shutil
        import tempfile

        # Under FSDP every rank evaluates (the forward passes gather shards from all ranks); only the
        # main process writes the run's eval.jsonl and samples.jsonl.
        eval_dir = tempfile.mkdtemp(prefix=f"cpt-eval-rank{accelerator.process_index}-")
        atexit.register(shutil.rmtree, eval_dir, ignore_errors=True)
    evaluator = Evaluator(cfg, bundle.tokenizer, eval_sets, eval_dir) if eval_sets or cfg.eval.prompts else None
    trainer = Trainer(cfg, bundle, data, evaluator=evaluator, accelerator=accelerator)
    summary = trainer.train()
    summary["data"] = {k: v for k, v in data.stats.items() if k != "verdict"}
    if accelerator.is_main_process and not summary["interrupted"] and cfg.output.report:
        try:
            summary["report"] = str(write_report(cfg.output.output_dir))
        except Exception as e:  # a plotting problem must never cost the trained adapter
            log.warning("could not write the report: %s", e)
    return summary


def _eval_set(dataset: Any, cfg: Config, taken: set[str]) -> EvalSet:
    """An eval_dataset given to the trainer, as an evaluation set."""
    from cpt.data.sources import read_documents

    name = "domain" if "domain" not in taken else "eval"
    texts = list(read_documents(dataset, default_text_field=cfg.data.dataset_text_field, strict=cfg.data.strict))
    if not texts:
        raise ConfigError(f"eval_dataset: no documents in its {cfg.data.dataset_text_field!r} column")
    return EvalSet(name, texts)


def setup_vocabulary(cfg: Config, train_dataset: Any = None, accelerator: Any = None) -> Any:
    """vocab.add_tokens: the extended tokenizer of this run, learned from the training text by the main process
    into output_dir/tokenizer, or read back from there (a resumed run, or another process of this one)."""
    folder = Path(cfg.output.output_dir).expanduser() / "tokenizer"
    v = cfg.vocab
    settings = {"base": cfg.model.tokenizer or cfg.model.name_or_path, "gguf_file": cfg.model.gguf_file,
                "add_tokens": v.add_tokens, "min_frequency": v.min_frequency, "max_chars": v.max_chars,
                "merge_ascii": v.merge_ascii}
    main = accelerator is None or accelerator.is_main_process
    if main and not (folder / EXTENSION_FILE).is_file():
        base = load_tokenizer(cfg.model)
        log.info("learning %d new tokens from the training text (vocab.add_tokens)", v.add_tokens)
        texts = list(training_texts(cfg, train_dataset))
        ext = learn_extension(base, texts, v.add_tokens, min_frequency=v.min_frequency,
                              protect_ascii=not v.merge_ascii, max_chars=v.max_chars)
        if folder.exists():  # a half-written folder from a killed run: learning is deterministic, write it again
            import shutil
            shutil.rmtree(folder)
        save_extension(base, ext, folder, {"settings": settings, "documents": len(texts)})
        log.info("vocabulary: %d new tokens (ids %d-%d) written to %s", len(ext.tokens), ext.first_id, ext.size - 1, folder)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    saved = json.loads((folder / EXTENSION_FILE).read_text()).get("stats", {}).get("settings")
    if saved != settings:
        raise ConfigError(f"{folder} holds a vocabulary learned with other settings ({saved}); the run's are {settings}. "
                          "Use another output.output_dir, or delete that folder to learn again")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _section_kwargs(section: str, kwargs: dict) -> dict:
    """Route seed-style keyword arguments (cpt's names or transformers' TrainingArguments names) to their
    config section, rejecting unknown ones with a suggestion."""
    return hf_training_arguments(kwargs, section)


class CPTModel:
    """Loading and adapter set-up, with the argument names of the usual continued-pretraining recipe."""

    @staticmethod
    def from_pretrained(model_name: str, max_seq_length: int = 2048, dtype: Any = None, load_in_4bit: bool = False,
                        gguf_file: Optional[str] = None, device: Any = None, **kwargs: Any):
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).replace("torch.", "")
        unknown = [k for k in kwargs if k not in ModelConfig.__dataclass_fields__]
        if unknown:
            raise ConfigError(f"CPTModel.from_pretrained: unknown argument {unknown[0]!r}; valid: {', '.join(ModelConfig.__dataclass_fields__)}")
        mcfg = ModelConfig(name_or_path=model_name, max_seq_length=max_seq_length, dtype=dtype or "auto",
                           load_in_4bit=load_in_4bit, gguf_file=gguf_file, **kwargs)
        device = torch.device(device) if device is not None else local_device()
        cfg = Config(model=mcfg)
        check_device(cfg, device)
        check_against_model(cfg, load_model_config(mcfg))
        model = load_base_model(mcfg, device, resolve_dtype(mcfg.dtype, device))
        model._cpt_model_config = mcfg
        return model, load_tokenizer(mcfg)

    @staticmethod
    def extend_vocabulary(model: Any, tokenizer: Any, texts: Any, add_tokens: int = 8000, init: str = "subword",
                          min_frequency: int = 2, merge_ascii: bool = False, save_to: Optional[str] = None) -> Any:
        """Learn `add_tokens` new tokens from `texts`, grow the model's embeddings and start the new rows from
        their pieces (before get_peft_model). Returns the extended tokenizer (saved to `save_to` if given)."""
        if hasattr(model, "peft_config"):
            raise ConfigError("CPTModel.extend_vocabulary: call it before get_peft_model (the adapter copies the embeddings)")
        ext = learn_extension(tokenizer, texts, add_tokens, min_frequency=min_frequency, protect_ascii=not merge_ascii)
        new = save_extension(tokenizer, ext, save_to) if save_to else extended_tokenizer(tokenizer, ext)
        extend_model(model, {"first_id": ext.first_id, "size": ext.size, "pieces": ext.pieces}, init)
        if new.pad_token is None:
            new.pad_token = new.eos_token
        return new

    @staticmethod
    def add_new_tokens(model: Any, tokenizer: Any, new_tokens: list[str], special: bool = False,
                       init: str = "subword") -> list[str]:
        """Add `new_tokens` (the ones the tokenizer lacks) as whole tokens, grow the model's embeddings and
        start each new row from the tokens the string was split into (before get_peft_model; as vocab.tokens,
        or vocab.special_tokens with special=True). The tokenizer is changed in place; returns the tokens added."""
        if hasattr(model, "peft_config"):
            raise ConfigError("CPTModel.add_new_tokens: call it before get_peft_model (the adapter copies the embeddings)")
        if isinstance(new_tokens, str):
            new_tokens = [new_tokens]
        added = add_listed_tokens(model, tokenizer, list(new_tokens), special=special, init=init, where="new_tokens")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return added

    @staticmethod
    def get_peft_model(model: Any, r: int = 128, target_modules: Optional[list[str]] = None, lora_alpha: float = 32,
                       lora_dropout: float = 0.0, bias: str = "none", use_gradient_checkpointing: Any = True,
                       random_state: int = 3407, use_rslora: bool = True, method: str = "lora", **kwargs: Any):
        """Add LoRA/rsLoRA adapters; embed_tokens/lm_head in target_modules are trained in full (float32 masters)."""
        acfg = AdapterConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias=bias,
                             use_gradient_checkpointing=use_gradient_checkpointing, random_state=random_state,
                             use_rslora=use_rslora, method=method, **kwargs)
        if target_modules is not None:
            acfg.target_modules = list(target_modules)
        mcfg = getattr(model, "_cpt_model_config", ModelConfig(name_or_path=getattr(model, "name_or_path", "model")))
        cfg = Config(model=mcfg, adapter=acfg)
        validate(cfg)
        if acfg.method == "lora":
            for p in model.parameters():
                p.requires_grad_(False)
        if checkpointing_mode(acfg.use_gradient_checkpointing) != "off":
            enable_gradient_checkpointing(model)
        compute = next(model.parameters()).dtype
        compute = compute if compute.is_floating_point else torch.bfloat16
        # The optimizer is not known yet: the embeddings keep plain float32 masters (the run plan follows).
        model = add_adapters(model, acfg, compute)
        model._cpt_model_config = mcfg
        model._cpt_adapter_config = acfg
        return model


class TrainingArguments(dict):
    """Training, output and data arguments by their usual names (per_device_train_batch_size,
    gradient_accumulation_steps, warmup_ratio, max_steps, learning_rate, embedding_learning_rate,
    fp16, bf16, logging_steps, save_steps, save_total_limit, optim, weight_decay, lr_scheduler_type,
    seed, output_dir, ...). Unknown names are rejected with a suggestion."""

    def __init__(self, **kwargs: Any):
        _section_kwargs("TrainingArguments", kwargs)  # validate names now, not at train()
        super().__init__(**kwargs)


class CPTTrainer:
    def __init__(self, model: Any, tokenizer: Any, train_dataset: Any = None, args: Optional[TrainingArguments] = None,
                 dataset_text_field: str = "text", max_seq_length: Optional[int] = None, dataset_num_proc: int = 1,
                 config: Optional[Config] = None, eval_dataset: Any = None, **kwargs: Any):
        raw: dict[str, dict] = {}
        mcfg = getattr(model, "_cpt_model_config", None)
        acfg = getattr(model, "_cpt_adapter_config", None)
        if mcfg is not None:
            raw["model"] = {k: v for k, v in mcfg.__dict__.items()}
        if acfg is not None:
            raw["adapter"] = {k: v for k, v in acfg.__dict__.items()}
        for sec, vals in _section_kwargs("CPTTrainer", {**dict(args or {}), **kwargs}).items():
            raw.setdefault(sec, {}).update(vals)
        raw.setdefault("data", {}).update({"dataset_text_field": dataset_text_field, "dataset_num_proc": dataset_num_proc})
        if max_seq_length is not None:
            raw.setdefault("model", {})["max_seq_length"] = max_seq_length
        self.config = config or config_from_dict(raw)
        if train_dataset is None and not self.config.data.sources:
            raise ConfigError("CPTTrainer needs train_dataset (a datasets.Dataset) or data sources in the config")
        self.model, self.tokenizer, self.train_dataset = model, tokenizer, train_dataset
        self.eval_dataset = eval_dataset

    def train(self, resume_from_checkpoint: Any = None) -> dict:
        """The run summary (also in run_summary.json). resume_from_checkpoint: True (the newest checkpoint
        in output_dir) or a checkpoint folder, as in transformers."""
        if resume_from_checkpoint not in (None, False):
            self.config.output.resume = "true" if resume_from_checkpoint is True else str(resume_from_checkpoint)
        device = model_device(self.model) if any(True for _ in self.model.parameters()) else None
        return run_training(self.config, model=self.model, tokenizer=self.tokenizer,
                            train_dataset=self.train_dataset, device=device, eval_dataset=self.eval_dataset)


def _sft_names(kwargs: dict) -> dict:
    """TRL's SFTConfig names as cpt config keys: packing (bool) -> data.packing, max_length / max_seq_length ->
    model.max_seq_length; assistant_only_loss, completion_only_loss, dataset_text_field, chat_template keep theirs."""
    out = dict(kwargs)
    if "packing" in out and isinstance(out["packing"], bool):
        out["packing"] = "document" if out["packing"] else "none"
    if "max_length" in out:
        value = out.pop("max_length")
        if value is not None:
            out["max_seq_length"] = value
    out["stage"] = "sft"
    return out


class SFTConfig(TrainingArguments):
    """TrainingArguments plus TRL's SFTConfig names: max_length (or max_seq_length), packing (True: conversations
    packed, attention restarting at each; False: one per block), assistant_only_loss, completion_only_loss,
    dataset_text_field, chat_template, chat_format."""

    def __init__(self, **kwargs: Any):
        dict.__init__(self, **_sft_names(kwargs))
        _section_kwargs("SFTConfig", dict(self))


class SFTTrainer(CPTTrainer):
    """Instruction fine-tuning on the same loop as CPTTrainer (train.stage=sft): conversations, Alpaca rows or
    prompt/completion pairs, loss on the answers. `processing_class` is TRL's name for the tokenizer."""

    def __init__(self, model: Any, processing_class: Any = None, train_dataset: Any = None,
                 args: Optional[TrainingArguments] = None, tokenizer: Any = None, **kwargs: Any):
        merged = _sft_names({**dict(args or {}), **kwargs})
        if "max_seq_length" in merged and "max_seq_length" not in kwargs:
            kwargs["max_seq_length"] = merged.pop("max_seq_length")
        super().__init__(model=model, tokenizer=processing_class if processing_class is not None else tokenizer,
                         train_dataset=train_dataset, args=TrainingArguments(**{k: v for k, v in merged.items()
                                                                                if k != "max_seq_length"}), **kwargs)
