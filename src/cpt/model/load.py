"""Loading: a causal LM and its tokenizer from a Hugging Face folder or name, a GGUF file, or in 4 bits.

Also the checks that need the model's config but not its weights, and loading a trained run back
for inference (adapter folder, checkpoint, merged folder, GGUF).

    python -m pytest tests/test_model.py -q
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from cpt.config import Config, ConfigError, ModelConfig
from cpt.runtime import default_device, resolve_dtype, settle_cpu_math

log = logging.getLogger("cpt")


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
