"""Model stage: load a causal LM (HF folder or name, GGUF, 4-bit), add adapters, build parameter groups.

The continued-pretraining recipe lives here: LoRA (rsLoRA) on the projections, and `embed_tokens` /
`lm_head` trained in full through peft's `modules_to_save`, kept as float32 master copies so that
small updates (lr 1e-6) do not round away in bf16 (with the 8-bit optimizer in bf16: held as the bf16
weight plus a low half in the optimizer state, cpt.optim). Tied embeddings stay tied.

    python -m pytest tests/test_model.py -q
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from cpt.config import EMBEDDING_MODULES, Config, ConfigError, ModelConfig
from cpt.optim import ROW_SPARSE, SPLIT_MASTER, mark_split_master

log = logging.getLogger("cpt")

# Parameter groups by role; the names appear in logs and metrics ("lr": {"adapter": ..., "embeddings": ...}).
GROUP_ADAPTER = "adapter"
GROUP_NO_DECAY = "adapter_no_decay"
GROUP_EMBEDDINGS = "embeddings"


# ---------------------------------------------------------------------------- device and dtype


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# Unary ops that torch's CPU wheels hand to MKL's vector math library (VML) for contiguous float32/64.
_VML_OPS = ("acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2", "sin",
            "sqrt", "tan", "tanh", "trunc")
_vml_settled = False


def settle_cpu_math() -> None:
    """Call each VML function once on one element, on this thread, before any model runs on the CPU.

    VML picks a function's kernel on its first call. When that first call is split across intra-op
    threads, one thread's chunk can come out of a lower-accuracy kernel: the first run of a process then
    got rotary `cos` values a few bf16 ulps off, and a run and its resume (or two runs meant to be
    identical) differed from the first step on, about one process in ten. A one-element call never
    splits, so after it every call is the same."""
    global _vml_settled
    if _vml_settled:
        return
    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for name in _VML_OPS:
            getattr(torch, name)(x)
    _vml_settled = True


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 where the GPU supports it, else fp16 on GPU, fp32 on CPU."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# ---------------------------------------------------------------------------- loading


def _split_gguf(mcfg: ModelConfig) -> tuple[str, Optional[str]]:
    """(folder or name, gguf file name) from name_or_path and gguf_file, which may be a full path."""
    path, gguf = mcfg.name_or_path, mcfg.gguf_file
    if gguf is None and str(path).endswith(".gguf"):
        path, gguf = str(Path(path).parent), Path(path).name
    elif gguf is not None and os.sep in gguf:
        path, gguf = str(Path(gguf).parent), Path(gguf).name
    return path, gguf


def _hub_kwargs(mcfg: ModelConfig) -> dict:
    kw: dict[str, Any] = {"trust_remote_code": mcfg.trust_remote_code}
    if mcfg.revision:
        kw["revision"] = mcfg.revision
    return kw


def load_tokenizer(mcfg: ModelConfig):
    from transformers import AutoTokenizer

    path, gguf = _split_gguf(mcfg)
    kw = _hub_kwargs(mcfg)
    if mcfg.tokenizer:
        tok = AutoTokenizer.from_pretrained(mcfg.tokenizer, **kw)
    else:
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf, **kw) if gguf else AutoTokenizer.from_pretrained(path, **kw)
    if tok.eos_token is None:
        raise ConfigError(f"the tokenizer of {mcfg.tokenizer or path!r} has no EOS token; documents cannot be separated. Set model.tokenizer to one that has")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model_config(mcfg: ModelConfig):
    """The model's config only (no weights): lets us validate before the expensive load."""
    from transformers import AutoConfig

    path, gguf = _split_gguf(mcfg)
    if gguf:
        return AutoConfig.from_pretrained(path, gguf_file=gguf, **_hub_kwargs(mcfg))
    return AutoConfig.from_pretrained(path, **_hub_kwargs(mcfg))


def check_against_model(cfg: Config, model_config) -> None:
    """Config checks that need the model's config (not its weights)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit and cfg.model.max_seq_length > limit:
        raise ConfigError(f"model.max_seq_length={cfg.model.max_seq_length} exceeds the model's max_position_embeddings={limit}; lower it")


def check_device(cfg: Config, device: torch.device) -> None:
    if cfg.model.load_in_4bit and device.type != "cuda":
        raise ConfigError("model.load_in_4bit needs a CUDA GPU (bitsandbytes NF4); on this machine set model.load_in_4bit=false")
    if device.type == "cuda" and cfg.train.bf16 and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.bf16=true but this GPU has no bf16 support; set train.fp16=true or leave both unset")


def load_base_model(mcfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    path, gguf = _split_gguf(mcfg)
    kw = _hub_kwargs(mcfg)
    kw["dtype"] = dtype
    if mcfg.attn_implementation:
        kw["attn_implementation"] = mcfg.attn_implementation
    if gguf:
        kw["gguf_file"] = gguf
    if mcfg.load_in_4bit:
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"model.load_in_4bit needs bitsandbytes: pip install 'cpt[gpu]' ({e})") from None
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=mcfg.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=mcfg.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype)
        kw["device_map"] = {"": device.index or 0}
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if not mcfg.load_in_4bit:
        model.to(device=device, dtype=dtype)
    return model


# ---------------------------------------------------------------------------- adapters


def _cast_output(dtype: torch.dtype) -> Callable:
    def hook(module, args, output):
        return output.to(dtype) if torch.is_tensor(output) and output.is_floating_point() else output
    return hook


def _cast_input_to_weight(module, args):
    # A float32 head fed bf16 hidden states outside autocast (CPU bf16 runs); under autocast the matmul
    # still runs in the autocast dtype.
    x = args[0]
    if torch.is_tensor(x) and x.dtype != module.weight.dtype and not torch.is_autocast_enabled(x.device.type):
        return (x.to(module.weight.dtype), *args[1:])
    return None


def trained_embedding_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules that hold the trained embed_tokens / lm_head copies (peft wrappers resolved)."""
    out = {}
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in EMBEDDING_MODULES and hasattr(mod, "modules_to_save"):
            out[leaf] = mod.modules_to_save[mod.active_adapter if isinstance(mod.active_adapter, str) else mod.active_adapters[0]]
    return out


def add_adapters(model: nn.Module, cfg: Config, compute_dtype: torch.dtype) -> nn.Module:
    """LoRA/rsLoRA on the projections; embed_tokens/lm_head in target_modules become full trained copies."""
    a = cfg.adapter
    if a.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        if a.embedding_master_dtype == "float32" and compute_dtype != torch.float32:
            # Train in float32 masters; autocast runs the matmuls in the compute dtype.
            model.float()
        return model

    from peft import LoraConfig, get_peft_model

    lora_targets = [m for m in a.target_modules if m not in EMBEDDING_MODULES]
    full = [m for m in a.target_modules if m in EMBEDDING_MODULES]
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) or _weights_shared(model)
    if tied and full and set(full) != set(EMBEDDING_MODULES):
        # A tied model has one matrix: training the input side trains the output side too.
        full = list(EMBEDDING_MODULES)
    extra = {"ensure_weight_tying": True} if tied and full else {}
    lcfg = LoraConfig(
        r=a.r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout, bias=a.bias, use_rslora=a.use_rslora,
        target_modules=lora_targets or None, modules_to_save=full or None, task_type="CAUSAL_LM", **extra)
    torch.manual_seed(a.random_state)  # LoRA A initialisation
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        model = get_peft_model(model, lcfg)
    if not lora_targets:
        raise ConfigError("adapter.target_modules has no LoRA projection (only embeddings); add e.g. q_proj, v_proj or use adapter.method=full")
    if a.embedding_master_dtype == "float32":
        from cpt.distributed import launched_world_size

        split = use_split_masters(cfg, compute_dtype)
        for leaf, mod in trained_embedding_modules(model).items():
            if split:
                # bf16 weight + low half in the optimizer state: float32 masters at bf16 gradient cost.
                mod.to(torch.bfloat16)
                mark_split_master(mod.weight)
                if leaf == "embed_tokens" and not tied and launched_world_size() == 1:
                    mod.sparse = True  # a gradient for the rows the batch used, not a dense 0.5B matrix
                    setattr(mod.weight, ROW_SPARSE, True)
                continue
            if mod.weight.dtype != torch.float32:
                mod.float()
            if leaf == "embed_tokens" and compute_dtype != torch.float32:
                # Lookups are exact in float32; hand the layers their usual dtype.
                mod.register_forward_hook(_cast_output(compute_dtype))
            if leaf == "lm_head":
                mod.register_forward_pre_hook(_cast_input_to_weight)
    for n, p in model.named_parameters():
        if p.requires_grad and p.dtype != torch.float32 and p.is_floating_point() and not getattr(p, SPLIT_MASTER, False):
            p.data = p.data.float()  # every trained tensor has a float32 master
    return model


def use_split_masters(cfg: Config, compute_dtype: torch.dtype) -> bool:
    """Whether the trained embeddings' float32 masters are held split (bf16 weight + int16 low half,
    cpt.optim): bf16 runs of LoRA with the 8-bit optimizer, which knows the layout; not under FSDP,
    whose sharded parameters the optimizer sees as pieces."""
    from cpt.distributed import launched_with_fsdp

    return (cfg.adapter.method == "lora" and cfg.adapter.embedding_master_dtype == "float32"
            and compute_dtype == torch.bfloat16 and cfg.train.optim == "adamw_8bit"
            and not (cfg.train.fsdp or launched_with_fsdp()))


def sparse_gradients(model: nn.Module) -> bool:
    """Whether some trained embedding produces row-sparse gradients (the loop clips them itself)."""
    return any(getattr(m, "sparse", False) for m in trained_embedding_modules(model).values())


def _weights_shared(model: nn.Module) -> bool:
    try:
        return model.get_input_embeddings().weight is model.get_output_embeddings().weight
    except AttributeError:
        return False


def enable_gradient_checkpointing(model: nn.Module, mode: bool | str) -> None:
    if mode in (False, "false"):
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    if mode == "offload":
        from cpt.kernels import enable_activation_offload

        enable_activation_offload(base)


# ---------------------------------------------------------------------------- parameter groups


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Adapter weights at learning_rate (with weight decay), norms and biases without decay,
    embeddings and head at embedding_learning_rate without decay. Tied matrices appear once."""
    t = cfg.train
    emb_lr = t.embedding_learning_rate if t.embedding_learning_rate is not None else t.learning_rate
    groups: dict[str, list] = {GROUP_ADAPTER: [], GROUP_NO_DECAY: [], GROUP_EMBEDDINGS: []}
    names: dict[str, list[str]] = {k: [] for k in groups}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if any(f"{m}." in name or name.endswith(m + ".weight") for m in EMBEDDING_MODULES):
            key = GROUP_EMBEDDINGS
        elif p.ndim < 2 or "norm" in name or name.endswith(".bias"):
            key = GROUP_NO_DECAY
        else:
            key = GROUP_ADAPTER
        groups[key].append(p)
        names[key].append(name)
    spec = {GROUP_ADAPTER: (t.learning_rate, t.weight_decay), GROUP_NO_DECAY: (t.learning_rate, 0.0),
            GROUP_EMBEDDINGS: (emb_lr, 0.0)}
    # Embeddings first: the optimizer's two largest updates start on the GPU while the host is still
    # launching the many small adapter updates (bench/NOTES.md, "embedding group first").
    order = (GROUP_EMBEDDINGS, GROUP_ADAPTER, GROUP_NO_DECAY)
    return [{"name": k, "params": groups[k], "param_names": names[k], "lr": spec[k][0], "weight_decay": spec[k][1]}
            for k in order if groups[k]]


# ---------------------------------------------------------------------------- the bundle


@dataclass
class ModelBundle:
    model: nn.Module
    tokenizer: Any
    loss_fn: Callable
    device: torch.device
    dtype: torch.dtype
    groups: list[dict] = field(default_factory=list)

    @property
    def is_peft(self) -> bool:
        return hasattr(self.model, "peft_config")

    def trainable_summary(self) -> dict:
        total = sum(p.numel() for p in self.model.parameters())
        counted = {id(p): p for p in self.model.parameters() if p.requires_grad}
        per_group = {g["name"]: sum(p.numel() for p in g["params"]) for g in self.groups}
        return {"total_params": total, "trainable_params": sum(p.numel() for p in counted.values()), **{f"{k}_params": v for k, v in per_group.items()}}


def build_model(cfg: Config, device: torch.device | None = None, model: nn.Module | None = None,
                tokenizer: Any = None) -> ModelBundle:
    """Load (or take) the model and tokenizer, check limits, add adapters, pick kernels, make groups."""
    from cpt.kernels import apply_kernels, use_compile, use_cuda_graphs

    device = device or default_device()
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
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {model.get_input_embeddings().weight.shape[0]} rows; they do not belong together")
    if getattr(model, "_cpt_adapter_config", None) is None:  # the Python API may have added them already
        if cfg.adapter.method == "lora":
            for p in model.parameters():
                p.requires_grad_(False)
        enable_gradient_checkpointing(model, cfg.adapter.use_gradient_checkpointing)
        model = add_adapters(model, cfg, dtype)
    from cpt.plan import apply_memory_plan, resolve_offload
    resolve_offload(model, cfg, device)  # train.offload_embedding_state=auto: host memory only where needed
    apply_memory_plan(model, cfg, device)  # adapter.recompute_budget_gib: keep activations where they fit
    # Last: compiled layers take the recompute choice the memory plan made.
    loss_fn = apply_kernels(model, cfg.model.kernels, device,
                            compile=use_compile(cfg.model.compile, cfg.model.kernels, device, cfg.train.fsdp, cfg.model.load_in_4bit),
                            cuda_graphs=use_cuda_graphs(cfg.model.cuda_graphs, device, cfg.train.fsdp))
    bundle = ModelBundle(model=model, tokenizer=tokenizer, loss_fn=loss_fn, device=device, dtype=dtype)
    bundle.groups = param_groups(model, cfg)
    if cfg.trains_embeddings and not any(g["name"] == GROUP_EMBEDDINGS for g in bundle.groups):
        raise ConfigError("adapter.target_modules names embed_tokens/lm_head but no embedding parameter is trainable; does this model name them differently?")
    return bundle


# ---------------------------------------------------------------------------- saving and loading trained weights


def save_trained(model: nn.Module, path: str | Path, tokenizer: Any = None) -> None:
    """Adapter in PEFT format (LoRA + trained embeddings, float32) or, in full mode, a whole HF model."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # peft looks for the base's config.json to see whether the vocabulary changed; a GGUF base has
        # none, and the trained embeddings are saved in full either way.
        warnings.filterwarnings("ignore", message="Could not find a config file")
        model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor by name, exactly as held (float32 masters)."""
    seen, out = set(), {}
    for n, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[n] = p.detach()
    return out


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in trainable_state(model) if n not in state]
    if missing:
        raise ValueError(f"checkpoint lacks trained tensors {missing[:3]}...; was it written by another configuration?")
    with torch.no_grad():
        for n, t in state.items():
            if n not in params:
                raise ValueError(f"checkpoint tensor {n!r} has no place in this model; was it written by another configuration?")
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def load_for_inference(path_or_name: str, gguf_file: str | None = None, device: torch.device | str | None = None,
                       dtype: torch.dtype | str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer) from a run's output_dir or checkpoint (PEFT adapter), a merged folder, a hub
    name or a GGUF file. An adapter folder's base comes from its adapter_config.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device) if device is not None else default_device()
    settle_cpu_math()
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    dtype = dtype or resolve_dtype("auto", device)
    p = Path(path_or_name)
    if p.is_file() and p.suffix == ".gguf":
        p, gguf_file = p.parent, p.name
        path_or_name = str(p)
    adapter_cfg = p / "adapter_config.json"
    if adapter_cfg.is_file():
        from peft import PeftModel

        base_name = json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
        run_cfg = _run_config_near(p)
        base_gguf = run_cfg.model.gguf_file if run_cfg else None
        mcfg = run_cfg.model if run_cfg else ModelConfig(name_or_path=base_name)
        mcfg.load_in_4bit = False
        base = load_base_model(ModelConfig(name_or_path=base_name, gguf_file=base_gguf, trust_remote_code=trust_remote_code,
                                           attn_implementation=mcfg.attn_implementation), device, dtype)
        model = PeftModel.from_pretrained(base, str(p))
        tok_src = p if (p / "tokenizer_config.json").is_file() else None
        tokenizer = AutoTokenizer.from_pretrained(tok_src) if tok_src else load_tokenizer(mcfg)
    else:
        kw: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
        if gguf_file:
            kw["gguf_file"] = gguf_file
        model = AutoModelForCausalLM.from_pretrained(path_or_name, **kw)
        tokenizer = AutoTokenizer.from_pretrained(path_or_name, **({"gguf_file": gguf_file} if gguf_file else {}))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return model, tokenizer


def _run_config_near(path: Path) -> Optional[Config]:
    """The run config saved beside an adapter (output_dir/config.yaml or checkpoint-N/config.yaml)."""
    from cpt.config import load_config

    for c in (path / "config.yaml", path.parent / "config.yaml"):
        if c.is_file():
            try:
                return load_config(c)
            except ConfigError:
                return None
    return None
