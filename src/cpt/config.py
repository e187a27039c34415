"""Typed run configuration: YAML in, dotted overrides, validation, YAML out.

One dataclass per section (model, adapter, data, train, eval, output). Field names follow the
names users already know from transformers, peft and Unsloth. Every field carries its help
text, which `cpt config --help-fields` prints and the configuration reference is built from.

    cpt train run.yaml train.max_steps=100 adapter.r=64
    python -c "from cpt.config import load_config; print(load_config('examples/seed.yaml'))"
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem, phrased for the user: names the key and what to do."""


def _f(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: yaml.safe_load(yaml.safe_dump(value)), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


SEED_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]
EMBEDDING_MODULES = ("embed_tokens", "lm_head")
TRACKERS = ("tensorboard", "wandb", "mlflow")


@dataclass
class ModelConfig:
    name_or_path: str = _f("HuggingFaceTB/SmolLM2-135M", "Hugging Face model name, or a local folder with config.json and weights, or a folder holding `gguf_file`.")
    gguf_file: Optional[str] = _f(None, "A GGUF file name inside `name_or_path` (or a path to one); its weights are dequantized on load.")
    tokenizer: Optional[str] = _f(None, "Tokenizer name or folder when it differs from the model's.")
    revision: Optional[str] = _f(None, "Hub revision (branch, tag or commit) of the model.")
    max_seq_length: int = _f(2048, "Tokens per training block. Must not exceed the model's max_position_embeddings.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f("auto", "Weight dtype. auto: bfloat16 where the GPU supports it, else float16 on GPU, float32 on CPU.")
    load_in_4bit: bool = _f(False, "Load the frozen base in 4-bit NF4 through bitsandbytes (QLoRA). CUDA only. "
                                 "With Triton, training dequantizes NF4 weights with cpt's own kernel: bitsandbytes' values "
                                 "bit for bit, 1.77x faster on an H200 (bench/results/dequant_4bit.md).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = _f("nf4", "4-bit quantization type.")
    bnb_4bit_use_double_quant: bool = _f(True, "Quantize the quantization constants too (saves about 0.4 bit per weight).")
    trust_remote_code: bool = _f(False, "Run model code shipped with a Hub repository. Off unless you trust its author.")
    attn_implementation: Optional[str] = _f("sdpa", "Attention backend passed to transformers: sdpa, eager, flash_attention_2. None lets transformers choose. An architecture transformers runs without SDPA (Gemma 2, whose attention scores are soft-capped) gets eager, and the log says so.")
    kernels: Literal["auto", "none", "liger", "cpt"] = _f("auto", "Fused GPU kernels. auto: the fastest available on this device; none: plain PyTorch.")
    compile: Union[bool, str] = _f("auto", "torch.compile each decoder layer's training step (forward, recompute and backward as generated graphs: far fewer kernel launches and Python calls per step). auto: on for CUDA (4-bit bases included), off on CPU, with model.kernels=liger and with train.fsdp. The first step pays the compilation (tens of seconds); evaluation and generation run the plain layers. If the compiler fails, a warning says why and training goes on uncompiled (much slower on a GPU); run_summary.json (compile_failed) and the report name it too.")
    adapter_path: Optional[str] = _f(None, "A trained adapter to keep training instead of a fresh one: a cpt run's output folder (or checkpoint-N, or any PEFT LoRA adapter folder) whose base is model.name_or_path. Its LoRA weights and trained embed_tokens/lm_head are loaded (rows for tokens the chat template adds start as the mean of its rows); adapter.r and target_modules must match it. The other way to continue from a CPT run: `cpt merge` it and give the merged folder as name_or_path, with a fresh adapter.")
    cuda_graphs: Union[bool, str] = _f("auto", "Replay each compiled decoder layer's forward and backward pass as a CUDA graph (torch.compile mode reduce-overhead): the host launches one graph per layer and pass instead of ~80 kernels (8B on an H200: +1-2% tokens/s in bf16, +4% in 4-bit, same memory). Recorded in the second step, once per sequence shape. auto: on for compiled layers on one CUDA GPU, off under DDP/FSDP (not measured there). true: also under DDP/FSDP; false: plain compiled layers.")


@dataclass
class AdapterConfig:
    method: Literal["lora", "full"] = _f("lora", "lora: frozen base plus LoRA adapters (QLoRA when load_in_4bit). full: train every parameter (small models).")
    r: int = _f(128, "LoRA rank. Continued pretraining wants a high rank: capacity for new knowledge.")
    lora_alpha: float = _f(32, "LoRA alpha. The update is scaled by alpha/r, or alpha/sqrt(r) with use_rslora.")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.")
    bias: Literal["none", "all", "lora_only"] = _f("none", "Which biases train.")
    use_rslora: bool = _f(True, "Rank-stabilised LoRA: scale by alpha/sqrt(r) so high ranks keep learning.")
    target_modules: list[str] = _f(list(SEED_TARGETS), "Modules to adapt. embed_tokens and lm_head here are trained in full (not LoRA), as continued pretraining needs. Where a model fuses projections (Phi-3: qkv_proj, gate_up_proj), naming all of their parts (q_proj, k_proj, v_proj; gate_proj, up_proj) adapts the fused module; the run log lists the modules adapted.")
    random_state: int = _f(3407, "Seed for the adapter's initialisation.")
    use_gradient_checkpointing: Union[bool, str] = _f(True, "Recompute activations in the backward pass: true, false, or 'offload' (keep checkpointed inputs in host memory; Unsloth's 'unsloth' means the same).")
    recompute_budget_gib: Optional[Union[float, str]] = _f(None, "Memory-aware recomputation (with use_gradient_checkpointing on): the lowest decoder layers keep their activations instead of recomputing them while `cpt plan`'s estimated peak stays under this many GiB; 'auto': 92% of the GPU's memory. A number is a cap on the whole run: train.offload_embedding_state=auto plans against it too. null (default): the lean plan, every layer recomputes and the host link carries what it can (adapter.host_activations, train.offload_embedding_state), which on a GPU is also faster than recomputing everything on the GPU.")
    host_activations: Union[int, str] = _f("auto", "Recomputing decoder layers that keep their MLP's gate and up outputs (about 60% of a layer's recompute work, 224 MiB per layer of an 8B model at 4096 tokens) in pinned host memory instead of rerunning them: copied out on a side stream during the forward pass, fetched back one layer ahead in the backward pass (one layer's worth, 0.22 GiB for 8B, in flight at a time). Needs compiled layers (model.compile) on one CUDA GPU with model.kernels cpt; such layers replay without CUDA graphs. auto: as many as `cpt plan` says the host link carries during the forward pass (at most half of a 4-bit model's layers, whose launches cost the host more); a number: that many of the recomputing layers (spread evenly, never the top layer nor the bottom two); 0: none. The run plan (run_plan.json, `cpt plan`) says which layers. docs/performance.md has what it buys.")
    embedding_master_dtype: Literal["float32", "model"] = _f("float32", "Dtype of the trained embed_tokens/lm_head copies. float32 keeps small updates from rounding away in bf16 runs. With train.optim=adamw_8bit in bf16 (not FSDP) the float32 value is held as the bf16 weight plus a 16-bit low half in the optimizer state: bit-exact float32 masters with bf16 gradients, and embed_tokens gets a gradient only for the rows the batch used. The adapter then saves the bf16 weights; the checkpoint keeps the low halves.")


@dataclass
class SourceConfig:
    path: Optional[str] = _f(None, "Local file, folder or glob: .txt .md .jsonl .json .parquet .csv .tsv (.gz too).")
    dataset: Optional[str] = _f(None, "A `datasets` name or local dataset folder, loaded with load_dataset(dataset, name, split=split).")
    name: Optional[str] = _f(None, "Dataset configuration name (the second argument of load_dataset).")
    split: str = _f("train", "Split with optional slicing, e.g. train[:10%].")
    data_files: Optional[Any] = _f(None, "data_files passed to load_dataset.")
    text_field: Optional[str] = _f(None, "Column holding the text; defaults to data.dataset_text_field.")
    weight: float = _f(1.0, "Share of training tokens drawn from this source, relative to the other sources' weights.")
    filters: list[str] = _f([], "Row filters on columns, e.g. 'int_score >= 3', 'language == \"ja\"'.")
    streaming: Optional[bool] = _f(None, "Read the source as a stream instead of materialising it. Defaults to data.streaming.")


@dataclass
class DataConfig:
    sources: list[SourceConfig] = _f([], "Training text sources. A single source may also be given as `path:` or `dataset:` directly under data.")
    dataset_text_field: str = _f("text", "Default text column for every source.")
    dataset_num_proc: int = _f(1, "Worker processes for tokenization.")
    fast_tokenizer: bool = _f(True, "Byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM ...) encode through tiktoken's merge loop: the same ids, 2.5-3x faster. Checked against the tokenizer on every batch's first document.")
    packing: Literal["auto", "concat", "document", "none"] = _f("auto", "concat: blocks span documents. document: attention and positions restart at each document (under train.stage=sft a conversation is never split: from the token cache conversations fill blocks best-fit, longest first into the tightest room; streamed, one that does not fit the room left starts the next block). none: one document per block, padded (sft's unpacked reference). auto: concat for cpt, document for sft.")
    streaming: bool = _f(False, "Stream sources instead of materialising them.")
    cache_dir: Optional[str] = _f(None, "Where token shards are cached. Default: ~/.cache/cpt/tokens (or $CPT_CACHE).")
    shuffle: bool = _f(True, "Shuffle blocks (deterministically, from train.seed).")
    strict: bool = _f(False, "Turn skipped rows (empty, non-string, bad UTF-8, malformed JSON) into errors.")
    add_eos: Optional[bool] = _f(None, "Append the tokenizer's EOS token after every document. None: true for train.stage=cpt; under sft nothing is appended, since the chat template ends each answer (its end-of-turn token carries loss, and generation stops there). true under sft: EOS also ends each conversation, with loss (for a template whose answers end without it, or a runtime that stops only at EOS); not added where the template's answers already end with EOS. false: never.")
    max_docs: Optional[int] = _f(None, "Read at most this many documents per source (quick experiments).")
    chat_format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion"] = _f("auto", "train.stage=sft: how rows hold the examples. messages: OpenAI-style role/content turns; sharegpt: `conversations` with from/value; alpaca: instruction/input/output; prompt_completion: prompt and completion (strings, or message lists). auto: recognised from each row's fields.")
    chat_template: str = _f("auto", "train.stage=sft: the chat template. auto: the tokenizer's own, else chatml. A built-in name (chatml, llama-3, alpaca) or a Jinja template string. Special tokens it uses that the vocabulary lacks are added, their embedding rows initialised from the mean row and trained; the template and tokens are saved with the adapter.")
    assistant_only_loss: bool = _f(True, "train.stage=sft: loss on the assistant turns only (each answer's tokens and its end-of-turn token); false trains on every token of the conversation.")
    completion_only_loss: bool = _f(True, "train.stage=sft: for prompt/completion rows, loss on the completion only; false trains on the prompt too.")


@dataclass
class EvalSetConfig:
    name: str = _f("domain", "Name shown in logs and reports. 'general' sets feed the forgetting alarm.")
    path: Optional[str] = _f(None, "Local file, folder or glob (as in data.sources).")
    dataset: Optional[str] = _f(None, "A `datasets` name or folder.")
    subset: Optional[str] = _f(None, "Dataset configuration name.")
    split: str = _f("train", "Split with optional slicing.")
    text_field: Optional[str] = _f(None, "Text column; defaults to data.dataset_text_field.")
    max_docs: Optional[int] = _f(None, "Use at most this many documents.")


@dataclass
class EvalConfig:
    sets: list[EvalSetConfig] = _f([], "Held-out evaluation sets.")
    holdout_fraction: float = _f(0.0, "When no 'domain' set is given, hold out this fraction of the training documents (never trained on). 0 disables.")
    holdout_max_docs: int = _f(200, "Upper bound on the documents held out automatically.")
    eval_steps: int = _f(0, "Evaluate every N optimizer steps (0: only at start and end).")
    eval_at_start: bool = _f(True, "Evaluate the base model before training.")
    max_eval_tokens: Optional[int] = _f(None, "Stop each set after this many tokens.")
    per_device_eval_batch_size: int = _f(4, "Eval micro-batch size.")
    prompts: list[str] = _f([], "Prompts sampled at every evaluation.")
    max_new_tokens: int = _f(48, "Tokens generated per prompt.")
    forgetting_limit: float = _f(0.05, "Warn when a 'general' set's bits per byte rises more than this fraction above the base model's.")


@dataclass
class TrainConfig:
    stage: Literal["cpt", "sft"] = _f("cpt", "cpt: continued pretraining on raw text. sft: instruction fine-tuning on conversations or prompt/completion pairs (data.chat_format), loss on the answers, same loop, speed features, checkpoints and reports; `cpt sft CONFIG` sets it. Also accepted as a top-level `stage:` key.")
    per_device_train_batch_size: int = _f(2, "Blocks per micro-batch on each device.")
    gradient_accumulation_steps: int = _f(8, "Micro-batches per optimizer step.")
    max_steps: int = _f(-1, "Optimizer steps to run. -1: run num_train_epochs over the data.")
    num_train_epochs: float = _f(1.0, "Epochs, when max_steps is -1.")
    learning_rate: float = _f(5e-6, "Learning rate of the adapter (or of all non-embedding weights in full mode).")
    embedding_learning_rate: Optional[float] = _f(None, "Learning rate of trained embed_tokens/lm_head; 2-10x below learning_rate is typical. None: learning_rate.")
    weight_decay: float = _f(0.0, "Decoupled weight decay; never applied to norms, biases or embeddings.")
    optim: Literal["adamw_torch", "adamw_8bit", "adamw_torch_fused"] = _f("adamw_torch", "Optimizer. adamw_8bit: 8-bit blockwise AdamW states (bitsandbytes' quantisation; needs bitsandbytes, made for CUDA, slow on the CPU), our one-pass update for the trained embeddings and the adapter tensors.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    lr_scheduler_type: Literal["cosine", "linear", "constant", "wsd", "constant_with_warmup", "cosine_with_min_lr", "warmup_stable_decay"] = _f("cosine", "Schedule after warmup. wsd: warmup, stable, then linear decay over the last decay_ratio of steps. transformers' names keep transformers' curves (warmup from 0): constant_with_warmup; cosine_with_min_lr (cosine down to min_lr_ratio, which must be > 0); warmup_stable_decay (cosine decay over the last decay_ratio of steps to min_lr_ratio). lr_scheduler_kwargs min_lr_rate / min_lr / num_decay_steps are read as min_lr_ratio / decay_ratio.")
    warmup_ratio: float = _f(0.0, "Warmup as a fraction of max_steps.")
    warmup_steps: int = _f(0, "Warmup steps; overrides warmup_ratio when > 0.")
    min_lr_ratio: float = _f(0.0, "Floor of the decayed learning rate, as a fraction of the peak.")
    decay_ratio: float = _f(0.2, "wsd only: fraction of steps spent decaying.")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this value (0 disables).")
    offload_embedding_state: Union[bool, str] = _f("auto", "With train.optim=adamw_8bit in bf16 (split float32 masters, see adapter.embedding_master_dtype): keep the trained embeddings' low halves and 8-bit moments in pinned host memory (4 bytes per element: 3.9 GiB for an 8B model with a 128k vocabulary) and stream them through the GPU for each update. Most of the copying runs during the backward pass (all of it but lm_head's when gradients are clipped); the update is the same bit for bit and a skipped non-finite step is undone. auto (default), on one CUDA GPU: on when `cpt plan` estimates it costs under 3% of the speed (or the run would not fit without it), and under a numeric adapter.recompute_budget_gib when the run would not fit the budget without it. Needs about 8 bytes of pinned host memory per embedding element (7.8 GiB for 8B); not with train.fsdp (use fsdp_offload_params). docs/performance.md has what it costs and saves.")
    bf16: Optional[bool] = _f(None, "bf16 mixed precision. None: on where the GPU supports it.")
    fp16: Optional[bool] = _f(None, "fp16 mixed precision with loss scaling. None: on for GPUs without bf16.")
    seed: int = _f(3407, "Seed for data order, dropout and everything else random.")
    max_nonfinite_steps: int = _f(5, "Stop after this many consecutive NaN/Inf steps (each is skipped, weights untouched).")
    deterministic: bool = _f(False, "Use deterministic algorithms (bitwise-reproducible resume on CPU; slower on GPU).")
    fsdp: bool = _f(False, "Under torchrun / accelerate launch: shard parameters, gradients and optimizer state across the processes (FSDP2) instead of giving each a whole copy (DDP). For models whose weights and states do not fit on one GPU. `accelerate launch --use_fsdp` turns it on too. See docs/distributed.md.")
    fsdp_offload_params: bool = _f(False, "FSDP only: keep parameter shards, gradients and optimizer state in host memory and step the optimizer there; each layer visits the GPU only while it runs. Fits much larger models, at a large cost in speed. CUDA only.")
    fsdp_reshard_after_forward: bool = _f(True, "FSDP only: free each decoder layer's gathered weights after its forward pass and gather them again for backward (least memory). false keeps them until backward: one all-gather fewer per layer, more memory.")


@dataclass
class VocabConfig:
    add_tokens: int = _f(0, "Learn this many new tokens from data.sources when the run starts (continuing the tokenizer's byte-level BPE; `cpt vocab extend` does the same ahead of time, then give its folder as model.tokenizer). The extended tokenizer is written to output_dir/tokenizer and reused on resume; the model's embeddings grow to match and the new rows start as set by vocab.init. 0: off.")
    init: Literal["subword", "mean"] = _f("subword", "How new token rows start when the tokenizer is longer than the model's embeddings (vocab.add_tokens, or a model.tokenizer from `cpt vocab extend`). subword: each new row, input and output side, is the mean of the rows of the old tokens it is made of; mean: transformers' default (drawn around the mean of all rows).")
    min_frequency: int = _f(2, "A pair of tokens must occur this often in the text to become a new token.")
    max_chars: int = _f(50_000_000, "Characters of training text read to learn the new tokens.")
    merge_ascii: bool = _f(False, "Allow new tokens made of two ASCII pieces. Off: English, code and other ASCII text keeps exactly its old token ids; only words with other characters get new tokens.")
    tokens: list[str] = _f([], "Strings to add as whole tokens (terms, tags, markers), as axolotl's `tokens` and Unsloth's add_new_tokens do: matched in the text before the tokenizer's own rules, so text holding them tokenises differently. Each new row starts from the tokens the string was split into (vocab.init) and trains with embed_tokens and lm_head. Saved with the adapter's tokenizer.")
    special_tokens: list[str] = _f([], "As vocab.tokens, added as special tokens (LLaMA-Factory's new_special_tokens): also dropped from decoded text by skip_special_tokens.")


@dataclass
class OutputConfig:
    output_dir: str = _f("outputs/cpt-run", "Where checkpoints, the final adapter, metrics and the report go.")
    logging_steps: int = _f(10, "Log metrics every N optimizer steps.")
    save_steps: int = _f(100, "Write checkpoint-N/ every N optimizer steps (0: only at the end).")
    save_total_limit: Optional[int] = _f(None, "Keep at most this many checkpoints (oldest deleted after a new one is complete).")
    resume: Union[bool, str] = _f("auto", "auto: continue from the newest complete checkpoint if any; true: require one; false: start fresh; or a checkpoint path.")
    overwrite_output_dir: bool = _f(False, "Allow starting fresh in an output_dir that holds another run's checkpoints.")
    report_to: list[str] = _f(["tensorboard"], "Experiment trackers, through accelerate: tensorboard (<output_dir>/tensorboard), wandb (WANDB_MODE=offline keeps the run in <output_dir>/wandb), mlflow (MLFLOW_TRACKING_URI, else a file store in <output_dir>/mlruns); none or [] for none. wandb and mlflow are installed separately (pip install wandb / mlflow-skinny). metrics.jsonl is always written.")
    run_name: Optional[str] = _f(None, "The run's name in wandb and mlflow. None: the output_dir's folder name.")
    save_grace_seconds: float = _f(120.0, "On SIGTERM/SIGINT: time allowed to finish the step and save before exiting.")
    report: bool = _f(True, "Write report.html at the end of the run.")
    metric_for_best_model: Optional[str] = _f(None, "Track the best checkpoint by this eval metric, '<set>/<metric>' (e.g. 'domain/bits_per_byte'; lower is better). A new best is always checkpointed and save_total_limit never deletes it. Needs eval.eval_steps > 0.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(redact(self.to_dict()), sort_keys=False, allow_unicode=True)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_yaml())

    @property
    def packing(self) -> str:
        """data.packing with auto resolved: concat for cpt, document for sft."""
        if self.data.packing == "auto":
            return "document" if self.train.stage == "sft" else "concat"
        return self.data.packing

    @property
    def add_eos(self) -> bool:
        """data.add_eos with None resolved: true for cpt; false for sft, whose chat template ends the answers."""
        return self.train.stage == "cpt" if self.data.add_eos is None else self.data.add_eos

    @property
    def trains_embeddings(self) -> bool:
        if self.adapter.method == "full":
            return True
        return any(m in EMBEDDING_MODULES for m in self.adapter.target_modules)


# ---------------------------------------------------------------------------- building from dicts

_SECRET = re.compile(r"(hf_[A-Za-z0-9]{20,}|(?i:token|secret|password|api_key)\s*[:=]\s*\S+)")


def redact(obj: Any) -> Any:
    """Replace anything that looks like an access token; used on every config dump and log line."""
    if isinstance(obj, dict):
        return {k: ("***" if re.search(r"(?i)token$|secret|password|api_key", str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "WANDB_API_KEY"):
            value = os.environ.get(var)
            if value and len(value) >= 8 and value in obj:
                obj = obj.replace(value, "***")  # a token of any shape, wherever it was pasted
        return _SECRET.sub("***", obj)
    return obj


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}


def _type_name(tp: Any) -> str:
    if tp in _TYPE_WORDS:
        return _TYPE_WORDS[tp]
    if typing.get_origin(tp) is list:
        return "a list"
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is loose (1 -> 1.0)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}.{hint}")
        return value
    if origin is list:
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            if dataclasses.is_dataclass(args[0]) and isinstance(value, dict):
                value = [value]
            elif args[0] is str and isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            else:
                raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if value is None and not key.endswith("]"):  # a section whose keys are all commented out
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads "5e-6" as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # a NaN or infinite rate, ratio or weight poisons the whole run
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown key {key!r}.{_suggest(str(k), names, prefix)}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _all_keys() -> dict[str, list[str]]:
    """Leaf field name -> the dotted keys that carry it (for flat overrides and suggestions)."""
    out: dict[str, list[str]] = {}
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(hints[section.name]):
            out.setdefault(f.name, []).append(f"{section.name}.{f.name}")
    return out


def _suggest(word: str, names: list[str], prefix: str = "") -> str:
    if word in OTHER_TOOLS:
        return _other_tool_hint(word)
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    if close:
        return f" Did you mean {(prefix + '.' if prefix else '') + close[0]!r}?"
    homes = _all_keys()
    if word in homes:
        return f" It belongs in {homes[word][0]!r}."
    # A misspelt key in the wrong place, or a flat override (`max_step=3`) that found no section.
    close = difflib.get_close_matches(word, list(homes), n=1, cutoff=0.75)
    if close:
        return f" Did you mean {' or '.join(repr(h) for h in homes[close[0]])}?"
    return f" Valid keys: {', '.join(names)}."


def _normalise(raw: dict) -> dict:
    """Accept the seed's flat spellings: top-level training keys and a single data source; and
    transformers' TrainingArguments names (see _HF_NAMES), wherever they are written."""
    raw = _hf_names_in(dict(raw or {}))
    sections = {f.name for f in dataclasses.fields(Config)}
    flat = _all_keys()
    for k in list(raw):
        if k not in sections and k in flat and len(flat[k]) == 1:
            sec, leaf = flat[k][0].split(".")
            raw.setdefault(sec, {})
            raw[sec] = dict(raw[sec] or {})
            raw[sec][leaf] = raw.pop(k)
    data = raw.get("data")
    if isinstance(data, dict):
        data = dict(data)
        single = {k: data.pop(k) for k in _SOURCE_KEYS if k in data}
        if single:
            data.setdefault("sources", [])
            data["sources"] = [single, *data["sources"]]
        raw["data"] = data
    return raw


def config_from_dict(raw: dict) -> Config:
    raw = _normalise(raw)
    cfg = _build(Config, raw)
    validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.max_steps=100")
    key, _, value = text.partition("=")
    key = key.strip().lstrip("-")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e}); "
                          f"if it is text, quote it: {key}=\"'{value}'\"") from None
    parts = key.split(".")
    if len(parts) == 1:
        homes = _all_keys().get(parts[0])
        if homes and len(homes) == 1:
            parts = homes[0].split(".")
        elif homes:
            raise ConfigError(f"override {key!r} is ambiguous: write one of {', '.join(homes)}")
    return parts, parsed


# The keys of one source (data.sources[i]) that may also be given directly under data: where its text
# is, and how it is read.
_READ_KEYS = ("text_field", "filters")
_SOURCE_KEYS = ("path", "dataset", "name", "split", "data_files", *_READ_KEYS)


def _data_override(data: dict, key: str) -> list[str]:
    """Where an override of data.<key> lands when the file gave its data as sources. data.path or
    data.dataset names the data to train on instead of the file's: a single source keeps how it is read
    (text field, filters), several give way to the new one. Another source key (data.split, ...) changes
    the file's single source. Overrides given before this one stay where they are."""
    sources = data.get("sources") or []
    if any(k in data for k in ("path", "dataset")) or not sources:  # an earlier override named the source
        return ["data", key]
    if key in ("path", "dataset"):
        kept = ({k: v for k, v in sources[0].items() if k in _READ_KEYS}
                if len(sources) == 1 and isinstance(sources[0], dict) else {})
        data.pop("sources")
        data.update(kept)
        return ["data", key]
    if len(sources) == 1:
        return ["data", "sources", "0", key]
    raise ConfigError(f"override data.{key}: the config has {len(sources)} data sources; write "
                      f"data.sources.<0..{len(sources) - 1}>.{key}=...")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = _normalise(yaml.safe_load(yaml.safe_dump(raw or {})))
    for ov in overrides:
        parts, value = parse_override(ov)
        if len(parts) == 2 and parts[0] == "data" and parts[1] in _SOURCE_KEYS and isinstance(raw.get("data"), dict):
            parts = _data_override(raw["data"], parts[1])
        if any(p.isdigit() for p in parts):
            raw = _normalise(raw)  # `data.path=...` given before is data.sources[0] by now
        node: Any = raw
        for depth, p in enumerate(parts):
            where = ".".join(parts[:depth])
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"override {ov!r}: {where} is a list of {len(node)}; address an entry as "
                                      f"{where}.<0..{len(node) - 1}>.<key>, or set {where}=[...] as a whole")
                p = int(p)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: {where} is {node!r}, which has no entry {p!r}; set {where}=... as a whole")
            if depth == len(parts) - 1:
                node[p] = value
                break
            if isinstance(node, dict) and not isinstance(node.get(p), (dict, list)):
                if parts[depth + 1].isdigit():
                    here = ".".join(parts[:depth + 1])
                    raise ConfigError(f"override {ov!r}: {here} is not given as a list here; set {here}=[...] as a whole")
                node[p] = {}
            node = node[p]
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (plain YAML keeps the last one silently)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    first: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden here
            continue
        key = loader.construct_object(key_node)
        try:
            if key in first:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: {key!r} is given twice in the same section "
                                  f"(first on line {first[key]}); keep one")
            first[key] = key_node.start_mark.line + 1
        except TypeError:  # an unhashable key: construct_mapping names it
            pass
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml_file(path: str | os.PathLike) -> dict:
    """The mapping a YAML config file holds, or a ConfigError naming the file (and line) and what to do."""
    p = Path(path).expanduser()
    if p.is_dir():
        inside = p / "config.yaml"
        hint = f" (a run's config is {inside})" if inside.is_file() else ""
        raise ConfigError(f"config file {str(p)!r} is a folder: give the path of a YAML file{hint}")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found: check the path")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (undecodable byte at offset {e.start}); a config is a YAML text file") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot be read ({e.strerror}); check its permissions") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except ConfigError as e:
        raise ConfigError(f"{p}, {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{p}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(p)
        what = "; ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise ConfigError(f"{where}: not valid YAML ({what}); fix the file there") from None
    if raw is None:
        raise ConfigError(f"{p} is empty: write the sections to change (model, adapter, data, train, eval, output), "
                          "or leave the file out to start from the defaults with key=value overrides")
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (model, adapter, data, train, eval, "
                          f"output), not a {type(raw).__name__}")
    return raw


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or start from defaults), apply `key=value` overrides, validate."""
    raw = read_yaml_file(path) if path is not None else {}
    try:
        return config_from_dict(apply_overrides(raw, overrides or []))
    except ConfigError as e:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{e}") from None


# ---------------------------------------------------------------------------- validation


def validate(cfg: Config) -> None:
    """Checks that need no model and no device. Raises ConfigError naming the key."""
    m, a, d, t, o, e = cfg.model, cfg.adapter, cfg.data, cfg.train, cfg.output, cfg.eval
    if m.max_seq_length < 2:
        raise ConfigError("model.max_seq_length must be at least 2")
    if a.method == "lora":
        if a.r < 1:
            raise ConfigError("adapter.r must be a positive integer")
        if not a.target_modules:
            raise ConfigError("adapter.target_modules is empty: name the projections to adapt, e.g. q_proj, v_proj")
    if not 0 <= a.lora_dropout < 1:
        raise ConfigError("adapter.lora_dropout must be in [0, 1)")
    if isinstance(a.use_gradient_checkpointing, str) and a.use_gradient_checkpointing not in ("offload", "unsloth", "true", "false"):
        raise ConfigError(f"adapter.use_gradient_checkpointing: {a.use_gradient_checkpointing!r} is not true, false, 'offload' or 'unsloth' (the same as 'offload')")
    if isinstance(m.compile, str) and m.compile not in ("auto", "true", "false"):
        raise ConfigError(f"model.compile: {m.compile!r} is not auto, true or false")
    if isinstance(m.cuda_graphs, str) and m.cuda_graphs not in ("auto", "true", "false"):
        raise ConfigError(f"model.cuda_graphs: {m.cuda_graphs!r} is not auto, true or false")
    if m.cuda_graphs in (True, "true") and m.compile in (False, "false"):
        raise ConfigError("model.cuda_graphs replays the compiled layers as CUDA graphs: it needs model.compile auto or true")
    if m.load_in_4bit and a.method == "full":
        raise ConfigError("model.load_in_4bit cannot be combined with adapter.method=full: 4-bit weights cannot be trained; use method: lora")
    for key in ("tokens", "special_tokens"):
        listed = getattr(cfg.vocab, key)
        for i, token in enumerate(listed):
            if not token.strip():
                raise ConfigError(f"vocab.{key}[{i}]: {token!r} is not a token; give non-empty strings")
        if listed and not cfg.trains_embeddings:
            raise ConfigError(f"vocab.{key} adds tokens whose rows must be trained: keep embed_tokens and lm_head in "
                              "adapter.target_modules")
    if t.embedding_learning_rate is not None and not cfg.trains_embeddings:
        raise ConfigError("train.embedding_learning_rate is set but no embeddings are trained: add embed_tokens and lm_head to adapter.target_modules, or remove embedding_learning_rate")
    if t.per_device_train_batch_size < 1 or t.gradient_accumulation_steps < 1:
        raise ConfigError("train.per_device_train_batch_size and train.gradient_accumulation_steps must be >= 1")
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError("train.max_steps must be positive, or -1 to train num_train_epochs")
    if t.learning_rate <= 0 or (t.embedding_learning_rate is not None and t.embedding_learning_rate <= 0):
        raise ConfigError("train.learning_rate and train.embedding_learning_rate must be > 0")
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError("train.warmup_ratio must be in [0, 1)")
    if t.bf16 and t.fp16:
        raise ConfigError("train.bf16 and train.fp16 are both true: choose one")
    if isinstance(a.host_activations, str) and a.host_activations.strip().isdigit():
        a.host_activations = int(a.host_activations)
    if (isinstance(a.host_activations, bool) or (isinstance(a.host_activations, str) and a.host_activations != "auto")
            or (isinstance(a.host_activations, int) and a.host_activations < 0)):
        raise ConfigError(f"adapter.host_activations: {a.host_activations!r} is not 'auto' or a number of layers (0: none)")
    if isinstance(t.offload_embedding_state, str):
        if t.offload_embedding_state not in ("auto", "true", "false"):
            raise ConfigError(f"train.offload_embedding_state: {t.offload_embedding_state!r} is not true, false or auto")
        if t.offload_embedding_state != "auto":
            t.offload_embedding_state = t.offload_embedding_state == "true"
    if t.offload_embedding_state is True and (t.optim != "adamw_8bit" or not cfg.trains_embeddings
                                      or a.embedding_master_dtype != "float32" or a.method != "lora"):
        raise ConfigError("train.offload_embedding_state keeps the 8-bit optimizer's state of trained float32-master "
                          "embeddings in host memory: it needs train.optim=adamw_8bit, adapter.method=lora, "
                          "adapter.embedding_master_dtype=float32 and embed_tokens or lm_head in adapter.target_modules")
    if t.offload_embedding_state is True and t.fsdp:
        raise ConfigError("train.offload_embedding_state does not apply under train.fsdp (FSDP shards hold no split "
                          "masters); use train.fsdp_offload_params to keep optimizer state in host memory there")
    if t.lr_scheduler_type == "cosine_with_min_lr" and t.min_lr_ratio <= 0:
        raise ConfigError("train.lr_scheduler_type=cosine_with_min_lr needs a floor: set train.min_lr_ratio > 0 "
                          "(transformers' lr_scheduler_kwargs min_lr_rate), or use lr_scheduler_type=cosine")
    if t.stage == "sft" and d.packing == "concat":
        raise ConfigError("data.packing=concat lets conversations attend to each other: under train.stage=sft use "
                          "document (packed, attention restarting per conversation), none, or auto")
    if t.max_nonfinite_steps < 1:
        raise ConfigError("train.max_nonfinite_steps must be >= 1")
    for key, ok, rule in _bounds(cfg):
        if not ok:
            section, leaf = key.split(".")
            raise ConfigError(f"{key} must be {rule}, got {getattr(getattr(cfg, section), leaf)!r}")
    b = a.recompute_budget_gib
    if (isinstance(b, str) and b != "auto") or (isinstance(b, (int, float)) and b <= 0):
        raise ConfigError(f"adapter.recompute_budget_gib: {b!r} is not a positive number of GiB, 'auto' or null")
    unknown = [r for r in o.report_to if r not in (*TRACKERS, "none")]
    if unknown:
        what = "name the trackers" if unknown[0] == "all" else "remove it"
        raise ConfigError(f"output.report_to: {unknown[0]!r} is not a tracker cpt writes to ({', '.join(TRACKERS)}, or "
                          f"none; metrics.jsonl is always written); {what}")
    if "none" in o.report_to and len(o.report_to) > 1:
        raise ConfigError(f"output.report_to: {o.report_to} names trackers and 'none': keep one or the other")
    if o.metric_for_best_model:
        set_name, _, metric = o.metric_for_best_model.partition("/")
        if not set_name or metric not in ("loss", "perplexity", "bits_per_byte"):
            raise ConfigError(f"output.metric_for_best_model={o.metric_for_best_model!r} is not '<set>/<metric>' with "
                              "metric one of loss, perplexity, bits_per_byte (e.g. 'domain/bits_per_byte')")
        if not e.eval_steps:
            raise ConfigError("output.metric_for_best_model needs evaluation during training: set eval.eval_steps > 0")
    for i, s in enumerate(d.sources):
        if bool(s.path) == bool(s.dataset):
            raise ConfigError(f"data.sources[{i}]: give exactly one of path or dataset")
        if s.weight <= 0:
            raise ConfigError(f"data.sources[{i}].weight must be > 0")
    names = [s.name for s in e.sets]
    for i, s in enumerate(e.sets):
        if bool(s.path) == bool(s.dataset):
            raise ConfigError(f"eval.sets[{i}] ({s.name}): give exactly one of path or dataset")
        if s.max_docs is not None and s.max_docs < 1:
            raise ConfigError(f"eval.sets[{i}].max_docs must be >= 1 (or null for every document), got {s.max_docs}")
        if s.name in names[:i]:
            raise ConfigError(f"eval.sets[{i}].name {s.name!r} is also eval.sets[{names.index(s.name)}]'s: their results "
                              "would mix; give each set its own name")
    if not 0 <= e.holdout_fraction < 1:
        raise ConfigError("eval.holdout_fraction must be in [0, 1)")
    if o.save_total_limit is not None and o.save_total_limit < 1:
        raise ConfigError("output.save_total_limit must be >= 1 (or null to keep every checkpoint)")
    if o.logging_steps < 1:
        raise ConfigError("output.logging_steps must be >= 1")
    if o.save_steps < 0:
        raise ConfigError("output.save_steps must be >= 0")
    if m.adapter_path and not Path(m.adapter_path).expanduser().is_dir():
        raise ConfigError(f"model.adapter_path: {m.adapter_path!r} is not a folder; give a cpt run's output folder or an "
                          "adapter folder (adapter_config.json)")
    if m.adapter_path and a.method != "lora":
        raise ConfigError("model.adapter_path continues a LoRA adapter: it needs adapter.method=lora")
    if isinstance(o.resume, str) and o.resume not in ("auto", "true", "false") and not Path(o.resume).exists():
        raise ConfigError(f"output.resume: checkpoint {o.resume!r} does not exist")


def _bounds(cfg: Config) -> list[tuple[str, bool, str]]:
    """(key, within its range, the range in words): a value outside its range would fail deep in the run,
    after the model has loaded, or train on silently with a meaningless setting."""
    m, a, d, t, o, e = cfg.model, cfg.adapter, cfg.data, cfg.train, cfg.output, cfg.eval
    return [
        ("model.name_or_path", bool(m.name_or_path.strip()), "a Hugging Face model name or a local folder"),
        ("adapter.lora_alpha", a.lora_alpha > 0, "> 0"),
        ("train.num_train_epochs", t.num_train_epochs > 0, "> 0"),
        ("train.weight_decay", t.weight_decay >= 0, ">= 0"),
        ("train.adam_beta1", 0 <= t.adam_beta1 < 1, "in [0, 1)"),
        ("train.adam_beta2", 0 <= t.adam_beta2 < 1, "in [0, 1)"),
        ("train.adam_epsilon", t.adam_epsilon > 0, "> 0"),
        ("train.warmup_steps", t.warmup_steps >= 0, ">= 0"),
        ("train.min_lr_ratio", 0 <= t.min_lr_ratio <= 1, "in [0, 1]"),
        ("train.decay_ratio", 0 < t.decay_ratio <= 1, "in (0, 1]"),
        ("train.max_grad_norm", t.max_grad_norm >= 0, ">= 0 (0 disables clipping)"),
        ("train.seed", 0 <= t.seed < 2**32, "in [0, 2**32) (NumPy's seed range)"),
        ("data.dataset_num_proc", d.dataset_num_proc >= 1, ">= 1"),
        ("data.max_docs", d.max_docs is None or d.max_docs >= 1, ">= 1 (or null for every document)"),
        ("data.dataset_text_field", bool(d.dataset_text_field.strip()), "a column name"),
        ("vocab.add_tokens", cfg.vocab.add_tokens >= 0, ">= 0 (0: no new tokens)"),
        ("vocab.min_frequency", cfg.vocab.min_frequency >= 1, ">= 1"),
        ("vocab.max_chars", cfg.vocab.max_chars >= 1, ">= 1"),
        ("eval.eval_steps", e.eval_steps >= 0, ">= 0 (0: only at start and end)"),
        ("eval.holdout_max_docs", e.holdout_max_docs >= 0, ">= 0"),
        ("eval.max_eval_tokens", e.max_eval_tokens is None or e.max_eval_tokens >= 1, ">= 1 (or null for no limit)"),
        ("eval.per_device_eval_batch_size", e.per_device_eval_batch_size >= 1, ">= 1"),
        ("eval.max_new_tokens", e.max_new_tokens >= 1, ">= 1"),
        ("eval.forgetting_limit", e.forgetting_limit >= 0, ">= 0"),
        ("output.output_dir", bool(o.output_dir.strip()), "a folder path"),
        ("output.save_grace_seconds", o.save_grace_seconds >= 0, ">= 0"),
    ]


def help_fields() -> str:
    """Markdown reference of every key, its default and its help text."""
    lines = []
    hints = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        lines.append(f"\n### `{section.name}`\n\n| key | default | meaning |\n|---|---|---|")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if dataclasses.is_dataclass(default) or (isinstance(default, list) and default and dataclasses.is_dataclass(default[0])):
                default = "see below"
            lines.append(f"| `{f.name}` | `{default!r}` | {f.metadata.get('help', '')} |")
    for cls in (SourceConfig, EvalSetConfig):
        lines.append(f"\n### each entry of `{'data.sources' if cls is SourceConfig else 'eval.sets'}`\n\n| key | default | meaning |\n|---|---|---|")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"| `{f.name}` | `{default!r}` | {f.metadata.get('help', '')} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- names from other tools

def _hf_resume(v: Any, get: Any) -> dict:
    if v is None:
        return {}
    return {"output.resume": "true" if v is True else "false" if v is False else str(v)}


def _hf_eval_strategy(v: Any, get: Any) -> dict:
    v = str(getattr(v, "value", v))
    if v == "no":
        return {"eval.eval_steps": 0}
    if v == "steps":
        steps = get("eval_steps") or get("logging_steps") or OutputConfig.logging_steps
        return {"eval.eval_steps": steps}
    raise ConfigError(f"eval_strategy={v!r}: cpt evaluates every eval.eval_steps optimizer steps (and at the start "
                      "and end); use eval_strategy='steps' with eval_steps=N")


def _hf_save_strategy(v: Any, get: Any) -> dict:
    v = str(getattr(v, "value", v))
    if v == "steps":
        return {}
    if v == "no":
        return {"output.save_steps": 0}
    raise ConfigError(f"save_strategy={v!r}: cpt checkpoints every output.save_steps optimizer steps (and keeps the best "
                      "one with output.metric_for_best_model); use save_strategy='steps' with save_steps=N")


def _hf_logging_strategy(v: Any, get: Any) -> dict:
    if str(getattr(v, "value", v)) != "steps":
        raise ConfigError(f"logging_strategy={v!r}: cpt logs every output.logging_steps optimizer steps; use "
                          "logging_strategy='steps' with logging_steps=N")
    return {}


def _hf_warmup_steps(v: Any, get: Any) -> dict:
    if isinstance(v, float) and 0 < v < 1:  # transformers 5: a fraction of the steps is a ratio
        return {"train.warmup_ratio": v}
    return {"train.warmup_steps": v}


_PAGED = ("paged_adamw_8bit", "paged_adamw_32bit", "paged_adamw", "paged_adam_8bit", "paged_lion_8bit", "paged_lion_32bit")
_OPTIM_ALIASES = {"adamw_bnb_8bit": "adamw_8bit", "adamw_torch_fused": "adamw_torch_fused", "adamw_torch": "adamw_torch",
                  "adamw_8bit": "adamw_8bit"}


def _hf_optim(v: Any, get: Any) -> dict:
    v = str(getattr(v, "value", v))
    if v in _PAGED:
        raise ConfigError(f"optim={v!r}: bitsandbytes' paged optimizer states are not available; use optim=adamw_8bit "
                          "(8-bit states; train.offload_embedding_state moves the embeddings' states to host memory)")
    return {"train.optim": _OPTIM_ALIASES.get(v, v)}


_HF_SCHEDULES_REJECTED = {"cosine_with_restarts": "cosine", "polynomial": "linear", "inverse_sqrt": "wsd",
                          "reduce_lr_on_plateau": "cosine", "cosine_warmup_with_min_lr": "cosine_with_min_lr",
                          "greedy": "cosine"}


def _hf_schedule(v: Any, get: Any) -> dict:
    v = str(getattr(v, "value", v))
    if v in _HF_SCHEDULES_REJECTED:
        raise ConfigError(f"lr_scheduler_type={v!r} is not available; cpt has cosine, linear, constant, wsd, "
                          f"constant_with_warmup, cosine_with_min_lr and warmup_stable_decay (closest: "
                          f"{_HF_SCHEDULES_REJECTED[v]})")
    return {"train.lr_scheduler_type": v}


def _hf_scheduler_kwargs(v: Any, get: Any) -> dict:
    """transformers' lr_scheduler_kwargs for the schedules cpt shares with it."""
    if not v:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"lr_scheduler_kwargs: expected a mapping, got {v!r}")
    out: dict = {}
    for k, x in v.items():
        if k in ("min_lr_rate", "min_lr_ratio"):
            out["train.min_lr_ratio"] = x
        elif k == "min_lr":
            out["train.min_lr_ratio"] = float(x) / float(get("learning_rate") or TrainConfig.learning_rate)
        elif k == "num_decay_steps":
            steps = get("max_steps")
            if not isinstance(steps, int) or steps <= 0:
                raise ConfigError("lr_scheduler_kwargs.num_decay_steps needs max_steps > 0; or give train.decay_ratio "
                                  "(the decayed fraction of the steps)")
            out["train.decay_ratio"] = float(x) / steps
        elif k == "decay_type" and x != "cosine":
            raise ConfigError(f"lr_scheduler_kwargs.decay_type={x!r}: warmup_stable_decay decays along a cosine; for a "
                              "linear decay use lr_scheduler_type=wsd")
        elif k == "warmup_type" and x != "linear":
            raise ConfigError(f"lr_scheduler_kwargs.warmup_type={x!r}: cpt warms up linearly")
        elif k == "num_cycles" and x != 0.5:
            raise ConfigError(f"lr_scheduler_kwargs.num_cycles={x!r}: cpt's cosine is one half cycle (0.5)")
        elif k not in ("decay_type", "warmup_type", "num_cycles"):
            raise ConfigError(f"lr_scheduler_kwargs.{k} is not used by cpt's schedules: give min_lr_rate, min_lr, "
                              "num_decay_steps (or train.min_lr_ratio, train.decay_ratio directly)")
    return out


def _hf_report_to(v: Any, get: Any) -> dict:
    if v in ("none", None):
        return {"output.report_to": []}
    return {"output.report_to": [v] if isinstance(v, str) and "," not in v else v}


def _hf_hub(name: str) -> Any:
    def refuse(v: Any, get: Any) -> dict:
        if name == "push_to_hub" and not v:
            return {}
        raise ConfigError(f"{name}: cpt does not upload; the output_dir holds a Hugging Face adapter folder: upload it "
                          "with `hf upload <repo id> <output_dir>` (huggingface_hub), after `cpt merge` for a full model")
    return refuse


def _hf_logging_dir(v: Any, get: Any) -> dict:
    raise ConfigError("logging_dir: cpt writes TensorBoard logs to <output_dir>/tensorboard; set output.output_dir")


def _ignored(v: Any, get: Any) -> dict:
    return {}  # transformers' Trainer does not read it either (do_train, do_eval): for the user's script


# transformers' TrainingArguments / TRL's SFTConfig names: each one either becomes cpt's key with the same
# meaning, or is a ConfigError saying what to use instead.
_HF_NAMES = {
    "resume_from_checkpoint": _hf_resume, "eval_strategy": _hf_eval_strategy, "evaluation_strategy": _hf_eval_strategy,
    "save_strategy": _hf_save_strategy, "logging_strategy": _hf_logging_strategy, "warmup_steps": _hf_warmup_steps,
    "optim": _hf_optim, "lr_scheduler_type": _hf_schedule, "lr_scheduler_kwargs": _hf_scheduler_kwargs,
    "report_to": _hf_report_to, "logging_dir": _hf_logging_dir,
    "gradient_checkpointing": lambda v, get: {"adapter.use_gradient_checkpointing": v},
    "push_to_hub": _hf_hub("push_to_hub"), "hub_model_id": _hf_hub("hub_model_id"), "hub_token": _hf_hub("hub_token"),
    "hub_strategy": _hf_hub("hub_strategy"), "hub_private_repo": _hf_hub("hub_private_repo"),
    "do_train": _ignored, "do_eval": _ignored,
}
_LATE = ("eval_strategy", "evaluation_strategy", "save_strategy")  # they override eval_steps / save_steps


def _hf_translate(values: dict, get: Any, where: str) -> dict:
    """{name: value} with transformers' names -> {dotted cpt key: value}; cpt's own names pass through."""
    homes = _all_keys()
    out: dict = {}
    for k in sorted(values, key=lambda k: k in _LATE):
        v = values[k]
        if k in _HF_NAMES:
            try:
                out.update(_HF_NAMES[k](v, get))
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
        elif k in homes:
            out[homes[k][0]] = v
        elif k in OTHER_TOOLS:
            raise ConfigError(f"{where}: unknown argument {k!r}.{_other_tool_hint(k)}")
        else:
            close = difflib.get_close_matches(k, list(homes) + list(_HF_NAMES), n=1)
            raise ConfigError(f"{where}: unknown argument {k!r}." + (f" Did you mean {close[0]!r}?" if close else ""))
    return out


def hf_training_arguments(values: dict, where: str) -> dict:
    """Keyword arguments by transformers' or cpt's names -> a raw config {section: {key: value}}."""
    dotted = _hf_translate(values, values.get, where)
    raw: dict = {}
    for key, v in dotted.items():
        sec, leaf = key.split(".")
        raw.setdefault(sec, {})[leaf] = v
    return raw


def _hf_names_in(raw: dict) -> dict:
    """transformers' names in a YAML config, at the top level or in any section, moved to cpt's keys."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)

    def get(name: str) -> Any:
        if name in raw and name not in sections:
            return raw[name]
        for sec in sections:
            if isinstance(raw.get(sec), dict) and name in raw[sec]:
                return raw[sec][name]
        return None

    found: list[tuple[Optional[str], str]] = [(None, k) for k in raw if k in _HF_NAMES]
    for sec in sections:
        if isinstance(raw.get(sec), dict):
            own = {f.name for f in dataclasses.fields(hints[sec])}
            found += [(sec, k) for k in raw[sec] if k in _HF_NAMES and (k not in own or k in
                      ("warmup_steps", "optim", "lr_scheduler_type", "report_to"))]
    if not found:
        return raw
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    values = {}
    for sec, k in found:
        values[k] = (raw if sec is None else raw[sec]).pop(k)
    for key, v in _hf_translate(values, get, "config").items():
        sec, leaf = key.split(".")
        if not isinstance(raw.get(sec), dict):
            raw[sec] = dict(raw.get(sec) or {})
        raw[sec][leaf] = v
    return raw


# Keys of LLaMA-Factory and axolotl configs: what cpt calls each one (`cpt convert-config` converts a whole file).
OTHER_TOOLS: dict[str, tuple[str, str]] = {
    # LLaMA-Factory
    "model_name_or_path": ("model.name_or_path", ""),
    "cutoff_len": ("model.max_seq_length", ""),
    "lora_rank": ("adapter.r", ""),
    "lora_target": ("adapter.target_modules", "a list; 'all' is the default list"),
    "additional_target": ("adapter.target_modules", "embed_tokens and lm_head there are trained in full"),
    "finetuning_type": ("adapter.method", "lora or full"),
    "quantization_bit": ("model.load_in_4bit", "true for 4-bit"),
    "preprocessing_num_workers": ("data.dataset_num_proc", ""),
    "max_samples": ("data.max_docs", ""),
    "val_size": ("eval.holdout_fraction", ""),
    "dataset_dir": ("data.sources", "each entry a path: or dataset:"),
    "flash_attn": ("model.attn_implementation", "flash_attention_2 or sdpa"),
    "template": ("nothing", "pretraining reads plain text"),
    "plot_loss": ("nothing", "every run writes report.html with its plots"),
    "overwrite_cache": ("nothing", "the token cache is keyed by the data and tokenizer"),
    "deepspeed": ("train.fsdp", "launch with torchrun; docs/distributed.md"),
    "new_special_tokens": ("vocab.special_tokens", "a list"),
    "resize_vocab": ("nothing", "cpt grows the model's embeddings to its tokenizer on its own"),
    # axolotl
    "base_model": ("model.name_or_path", ""),
    "tokens": ("vocab.tokens", ""),
    "base_model_config": ("model.name_or_path", ""),
    "sequence_len": ("model.max_seq_length", ""),
    "sample_packing": ("data.packing", "document: attention restarts at each document; cpt always packs"),
    "pretraining_dataset": ("data.sources", "with data.streaming: true"),
    "datasets": ("data.sources", "each entry a path: or dataset:, with split: and text_field:"),
    "dataset_prepared_path": ("data.cache_dir", ""),
    "num_epochs": ("train.num_train_epochs", ""),
    "micro_batch_size": ("train.per_device_train_batch_size", ""),
    "lora_r": ("adapter.r", ""),
    "lora_target_modules": ("adapter.target_modules", ""),
    "lora_target_linear": ("adapter.target_modules", "list the projections"),
    "lora_modules_to_save": ("adapter.target_modules", "embed_tokens and lm_head there are trained in full"),
    "peft_use_rslora": ("adapter.use_rslora", ""),
    "embedding_lr": ("train.embedding_learning_rate", ""),
    "embedding_lr_scale": ("train.embedding_learning_rate", "a rate, not a scale"),
    "lr_scheduler": ("train.lr_scheduler_type", ""),
    "cosine_min_lr_ratio": ("train.min_lr_ratio", ""),
    "optimizer": ("train.optim", ""),
    "val_set_size": ("eval.holdout_fraction", ""),
    "evals_per_epoch": ("eval.eval_steps", "in optimizer steps"),
    "saves_per_epoch": ("output.save_steps", "in optimizer steps"),
    "auto_resume_from_checkpoints": ("output.resume", "auto is the default"),
    "wandb_project": ("output.report_to", "[wandb], with WANDB_PROJECT in the environment"),
    "wandb_name": ("output.run_name", ""),
    "wandb_mode": ("output.report_to", "[wandb], with WANDB_MODE in the environment"),
    "flash_attention": ("model.attn_implementation", "flash_attention_2"),
    "sdp_attention": ("model.attn_implementation", "sdpa"),
    "adapter": ("adapter.method", "lora; qlora is lora with model.load_in_4bit: true"),
    "load_in_8bit": ("model.load_in_4bit", "cpt loads 4-bit or 16-bit bases"),
}


def _other_tool_hint(word: str) -> str:
    key, note = OTHER_TOOLS[word]
    if key == "nothing":
        return f" cpt has no such setting ({note}); remove it. `cpt convert-config FILE` converts a LLaMA-Factory or axolotl config."
    return (f" cpt calls this {key!r}" + (f" ({note})" if note else "") + ". `cpt convert-config FILE` converts a "
            "LLaMA-Factory or axolotl config.")
