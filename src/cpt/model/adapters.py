"""Adapters: LoRA/rsLoRA on the projections, embed_tokens / lm_head trained in full, float32 masters.

The continued-pretraining recipe lives here: `embed_tokens` / `lm_head` are trained through peft's
`modules_to_save`, as float32 master copies so that small updates (lr 1e-6) do not round away in bf16.
With the 8-bit optimizer in bf16 the float32 master is held split: the bf16 weight here, its 16-bit
low half in the optimizer state (cpt.optim); the parameter is marked so the optimizer knows. Tied
embeddings stay tied. Whether to split, and whether embed_tokens' gradient is row-sparse, is the run
plan's choice (cpt.plan), passed in.

    python -m pytest tests/test_model.py -q
"""
from __future__ import annotations

import difflib
import logging
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from cpt.config import EMBEDDING_MODULES, AdapterConfig, ConfigError

# Marks on a trained bf16 embedding parameter (read by cpt.optim): the high half of a float32 master,
# and (embed_tokens) a gradient that covers only the rows a batch used.
SPLIT_MASTER = "_cpt_split_master"
ROW_SPARSE = "_cpt_row_sparse"
# Projections that some families compute as one module (Phi-3: qkv_proj, gate_up_proj). A target list
# naming every part adapts the fused module instead, so the usual list works on every family.
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

log = logging.getLogger("cpt")


def mark_split_master(p: torch.Tensor) -> None:
    """Let the 8-bit optimizer treat this bf16 parameter as the high half of a float32 master."""
    if p.dtype != torch.bfloat16 or p.ndim != 2:
        raise ValueError(f"split masters are 2-d bf16 weights, not {p.dtype} {tuple(p.shape)}")
    setattr(p, SPLIT_MASTER, True)


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


def add_adapters(model: nn.Module, a: AdapterConfig, compute_dtype: torch.dtype, *, split_masters: bool = False,
                 sparse_embedding_grad: bool = False) -> nn.Module:
    """LoRA/rsLoRA on the projections; embed_tokens/lm_head in target_modules become full trained copies.
    `split_masters`: their float32 masters are held as the bf16 weight (marked here) plus a low half in the
    optimizer; `sparse_embedding_grad`: an untied embed_tokens then gets gradients for the used rows only."""
    if a.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        if a.embedding_master_dtype == "float32" and compute_dtype != torch.float32:
            # Train in float32 masters; autocast runs the matmuls in the compute dtype.
            model.float()
        return model

    from peft import LoraConfig, get_peft_model

    lora_targets = resolve_targets(model, [m for m in a.target_modules if m not in EMBEDDING_MODULES])
    full = [m for m in a.target_modules if m in EMBEDDING_MODULES]
    _check_targets(model, lora_targets)
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
    log.info("%s", adapted_summary(model, tied))
    if a.embedding_master_dtype == "float32":
        for leaf, mod in trained_embedding_modules(model).items():
            if split_masters:
                # bf16 weight + low half in the optimizer state: float32 masters at bf16 gradient cost.
                mod.to(torch.bfloat16)
                mark_split_master(mod.weight)
                if leaf == "embed_tokens" and not tied and sparse_embedding_grad:
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


def resolve_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The LoRA targets for this model's layout: where the model fuses projections into one module and
    has none of the separate ones, the parts are replaced by the fused module (q_proj, k_proj, v_proj ->
    qkv_proj). Naming only some of the parts would adapt more than asked, so that is an error."""
    leaves = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n}
    out = list(targets)
    for fused, parts in FUSED_PROJECTIONS.items():
        named = [p for p in parts if p in out]
        if fused not in leaves or not named or any(p in leaves for p in parts):
            continue
        if len(named) < len(parts):
            raise ConfigError(f"adapter.target_modules: this model computes {', '.join(parts)} in one module, "
                              f"{fused}; name {fused} (all of them) instead of {', '.join(named)}")
        at = out.index(named[0])
        out = [m for m in out if m not in parts]
        if fused not in out:
            out.insert(at, fused)
    return out


def adapted_summary(model: nn.Module, tied: bool) -> str:
    """One line for the run log: which projections carry LoRA, in how many modules, and which
    embeddings train in full."""
    leaves: dict[str, int] = {}
    full = set()
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if hasattr(mod, "lora_A") and hasattr(mod, "base_layer"):
            leaves[leaf] = leaves.get(leaf, 0) + 1
        elif leaf in EMBEDDING_MODULES and hasattr(mod, "modules_to_save"):
            full.add(leaf)
    lora = ", ".join(f"{k} x{v}" for k, v in leaves.items()) or "none"
    emb = ", ".join(m for m in EMBEDDING_MODULES if m in full) or "none"
    return f"adapted: LoRA on {lora}; trained in full: {emb}" + (" (tied: one matrix)" if tied and full else "")


def _check_targets(model: nn.Module, targets: list[str]) -> None:
    """Every LoRA target must name some module, by peft's rule (the whole name or its last parts): peft
    wraps the ones it finds and keeps the others in the saved adapter config, so a typo trains less than
    asked, silently."""
    names = [n for n, _ in model.named_modules() if n]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not missing:
        return
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"} - set(EMBEDDING_MODULES))
    hints = []
    for t in missing:
        close = difflib.get_close_matches(t, linear, n=1)
        hints.append(f"{t!r} (did you mean {close[0]!r}?)" if close else repr(t))
    raise ConfigError(f"adapter.target_modules: {', '.join(hints)} matches no module of this model; "
                      f"its linear layers are {', '.join(linear) or 'none'}")


def sparse_gradients(model: nn.Module) -> bool:
    """Whether some trained embedding produces row-sparse gradients (the loop clips them itself)."""
    return any(getattr(m, "sparse", False) for m in trained_embedding_modules(model).values())


def _weights_shared(model: nn.Module) -> bool:
    try:
        return model.get_input_embeddings().weight is model.get_output_embeddings().weight
    except AttributeError:
        return False


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """transformers' own (non-reentrant) checkpointing of every decoder layer. Which layers really
    recompute, and how, is the run plan's choice, applied later by cpt.speed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False


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


def add_token_rows(model: nn.Module, n_tokens: int) -> int:
    """Grow the vocabulary to `n_tokens` rows for special tokens a chat template added; returns how many.

    A new row starts as the mean of the existing rows (input and output side), so the new tokens begin as
    an average token rather than noise that dominates the softmax; they are trained with embed_tokens and
    lm_head. Must run before adapters are added (their trained copies are made from these weights)."""
    emb = model.get_input_embeddings()
    old = emb.weight.shape[0]
    if n_tokens <= old:
        return 0
    model.resize_token_embeddings(n_tokens, mean_resizing=False)
    with torch.no_grad():
        for m in {id(x): x for x in (model.get_input_embeddings(), model.get_output_embeddings()) if x is not None}.values():
            w = m.weight
            w[old:] = w[:old].float().mean(0).to(w.dtype)
            bias = getattr(m, "bias", None)
            if bias is not None:
                bias[old:] = bias[:old].float().mean().to(bias.dtype)
    return n_tokens - old


def load_adapter_weights(model: nn.Module, folder: str | Path) -> None:
    """Load a saved LoRA adapter (a CPT run's output) into `model`'s freshly added adapter, to keep training
    it. Trained embed_tokens/lm_head copies with fewer rows than the model now has (a chat template added
    tokens) fill the rows they have; the new rows start as the mean of the loaded rows. Raises ConfigError naming the
    folder when the adapter was trained with another rank or other target modules."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / "adapter" / "adapter_config.json").is_file() and not (folder / "adapter_config.json").is_file():
        folder = folder / "adapter"
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"model.adapter_path={str(folder)!r} holds no adapter_model.safetensors: give a cpt run's "
                          "output folder, one of its checkpoint-N folders or a PEFT adapter folder")
    state = load_file(str(weights))
    copies = trained_embedding_modules(model)
    for k, v in list(state.items()):
        leaf = next((m for m in EMBEDDING_MODULES if f"{m}.weight" in k and "lora_" not in k), None)
        if leaf in copies and v.ndim == 2 and v.shape[0] < copies[leaf].weight.shape[0]:
            grown = copies[leaf].weight.detach().to("cpu", torch.float32).clone()
            grown[: v.shape[0]] = v.float()
            grown[v.shape[0]:] = v.float().mean(0)  # new rows: the mean of the rows being continued
            state[k] = grown.to(v.dtype)
    fixed = state
    try:
        result = set_peft_model_state_dict(model, fixed)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ConfigError(f"model.adapter_path={str(folder)!r} does not fit this run's adapter "
                          f"({first[-1].strip() if first else e}); set adapter.r and adapter.target_modules to those of "
                          "the adapter being continued (its adapter_config.json)") from None
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k or "modules_to_save" in k]
    if unexpected:
        raise ConfigError(f"model.adapter_path={str(folder)!r}: {unexpected[0]} has no place in this run's adapter; "
                          "set adapter.target_modules to those of the adapter being continued")
