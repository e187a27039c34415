"""Loading: a causal LM and its tokenizer from a Hugging Face folder or name, a GGUF file, or in 4 bits.

Also the checks that need the model's config but not its weights, and loading a trained run back
for inference (run output folder, checkpoint, adapter folder, merged folder, GGUF).

    python -m pytest tests/test_model.py tests/test_bad_input_model.py -q
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

import torch
from torch import nn

from cpt.config import Config, ConfigError, ModelConfig
from cpt.runtime import default_device, resolve_dtype, settle_cpu_math

log = logging.getLogger("cpt")

# What a model argument may be, said in every message about one that is not.
EXPECTED = ("expected a run's output folder or one of its checkpoint-N folders, an adapter folder (adapter_config.json), "
            "a model folder (config.json and weights), a .gguf file or a folder holding one, or a hub name")

# Loggers that print at every load, on every machine, and ask nothing of the user: bitsandbytes' CPU backend
# probes a kernel hub when it is imported (and fails offline or untrusted), the kernels package warns that
# it skips a trust check offline. Their errors still show.
_CHATTY_LOGGERS = ("bitsandbytes.backends.cpu", "kernels")

# A hub id is `name` or `org/name`; anything else that does not exist is a mistyped local path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".json", ".jsonl", ".yaml", ".yml", ".txt", ".md", ".csv", ".tsv",
                  ".parquet", ".gz")


class NotAModelError(FileNotFoundError):
    """A path given as a model that holds none; the message names the path and what was expected."""


def sole_gguf(folder: str | Path, setting: str = "model.gguf_file") -> Optional[str]:
    """The name of the one .gguf file in a folder without config.json: such a folder stands for that file
    (the way GGUF models are shipped). None when there is none; several need `setting` to pick one."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / "config.json").is_file():
        return None
    found = sorted(p.name for p in folder.glob("*.gguf") if p.is_file())
    if len(found) > 1:
        shown = ", ".join(found[:12]) + (f" and {len(found) - 12} more" if len(found) > 12 else "")
        raise ConfigError(f"{folder} holds {len(found)} GGUF files ({shown}); name the one to load with {setting}")
    return found[0] if found else None


def _split_gguf(mcfg: ModelConfig) -> tuple[str, Optional[str]]:
    """(folder or name, gguf file name) from name_or_path and gguf_file, which may be a full path, or a
    folder whose only model is one .gguf file."""
    path, gguf = mcfg.name_or_path, mcfg.gguf_file
    if gguf is None and str(path).endswith(".gguf"):
        path, gguf = str(Path(path).parent), Path(path).name
    elif gguf is not None and os.sep in gguf:
        path, gguf = str(Path(gguf).parent), Path(gguf).name
    elif gguf is None:
        gguf = sole_gguf(path)
    return path, gguf


def _hub_kwargs(mcfg: ModelConfig) -> dict:
    kw: dict[str, Any] = {"trust_remote_code": mcfg.trust_remote_code}
    if mcfg.revision:
        kw["revision"] = mcfg.revision
    return kw


@contextlib.contextmanager
def quiet_loading(local: bool = True, gguf: bool = False) -> Iterator[None]:
    """Silence what every load prints and no user acts on, for the load only: the chatty loggers' warnings
    (peft is imported here, as its first import pulls in bitsandbytes, whose import is what warns), the
    GGUF dequantization bar and, for a local model, transformers' weight-loading bar. Download bars of a
    hub model stay: they are the only sign of progress then."""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    restore: list = []
    try:
        import peft  # noqa: F401

        from transformers.utils import logging as hf_logging

        if local and hf_logging.is_progress_bar_enabled():
            from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

            hub_off = are_progress_bars_disabled()
            hf_logging.disable_progress_bar()  # also turns the hub's bars off: put back as found

            def bars_back() -> None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the hub warns when HF_HUB_DISABLE_PROGRESS_BARS pins them
                    hf_logging.enable_progress_bar()
                    if hub_off:
                        disable_progress_bars()
            restore.append(bars_back)
        if gguf:
            # transformers' GGUF reader uses a plain tqdm no switch reaches; hand it a silent one meanwhile.
            try:
                mod = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
            except ImportError:
                mod = None
            bar = getattr(mod, "tqdm", None)
            if bar is not None:
                mod.tqdm = functools.partial(bar, disable=True)
                restore.append(lambda: setattr(mod, "tqdm", bar))
        yield
    finally:
        for undo in reversed(restore):
            undo()
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _gguf_kwargs(gguf: str) -> dict:
    """from_pretrained arguments for a GGUF file: always a dense model. Newer transformers keep some
    architectures' weights packed in GGUF blocks when a kernel exists; those cannot be trained or saved."""
    kw: dict[str, Any] = {"gguf_file": gguf}
    try:
        from transformers import GgufConfig

        kw["quantization_config"] = GgufConfig(dequantize=True)
    except (ImportError, TypeError):  # older transformers: GGUF weights are always dequantized
        pass
    return kw


def _as_plain_model(model: nn.Module) -> nn.Module:
    """A GGUF model is dequantized on load, yet transformers may still mark it quantized with gguf, which
    makes save_pretrained refuse it (so merge could not write the merged model). Its weights are ordinary
    tensors: drop the marks."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is not None and str(getattr(method, "value", method)) == "gguf":
        quantizer.remove_quantization_config(model)
        for m in model.modules():
            if getattr(getattr(m, "config", None), "_is_quantized", False):
                m.config._is_quantized = False
    return model


def load_tokenizer(mcfg: ModelConfig):
    from transformers import AutoTokenizer

    path, gguf = _split_gguf(mcfg)
    kw = _hub_kwargs(mcfg)
    with quiet_loading(Path(mcfg.tokenizer or path).exists(), gguf=bool(gguf)):
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
    with quiet_loading(Path(path).exists(), gguf=bool(gguf)):
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
        if gguf:
            kw["gguf_file"] = gguf
    elif gguf:
        kw.update(_gguf_kwargs(gguf))
    with quiet_loading(Path(path).exists(), gguf=bool(gguf)):
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
        except ValueError as e:
            if kw.get("attn_implementation") != "sdpa" or "scaled_dot_product_attention" not in str(e):
                raise
            # Gemma 2 soft-caps its attention scores, which SDPA cannot: transformers refuses it there.
            log.info("model.attn_implementation=sdpa: this architecture has no SDPA attention in transformers; "
                     "eager attention instead")
            kw["attn_implementation"] = "eager"
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
    if not mcfg.load_in_4bit:
        _as_plain_model(model)
        model.to(device=device, dtype=dtype)
    return model


class InferenceSource(NamedTuple):
    """What a model argument names: a folder, file's folder or hub name, the GGUF file in it, and the
    adapter folder when it is a trained run."""
    path: str
    gguf_file: Optional[str] = None
    adapter: Optional[Path] = None


def resolve_inference_source(path_or_name: str | Path, gguf_file: Optional[str] = None) -> InferenceSource:
    """Where the model behind a command's MODEL argument lives, checked before anything heavy loads. A run's
    output folder holds its final adapter; a checkpoint-N folder holds one in adapter/. Raises
    NotAModelError, naming the path and what it expected, for anything else on disk."""
    name = str(path_or_name)
    p = Path(name).expanduser()
    if gguf_file and os.sep in gguf_file:
        p, gguf_file = Path(gguf_file).expanduser().parent, Path(gguf_file).name
    if p.is_file():
        if p.suffix == ".gguf":
            return InferenceSource(str(p.parent), p.name)
        raise NotAModelError(f"{p} is a file, not a model: {EXPECTED}")
    if p.is_dir():
        if gguf_file:
            if not (p / gguf_file).is_file():
                raise NotAModelError(f"{p / gguf_file}: no such GGUF file in {p}")
            return InferenceSource(str(p), gguf_file)
        for folder in (p, p / "adapter"):
            if (folder / "adapter_config.json").is_file():
                return InferenceSource(str(folder), None, folder)
            if (folder / "config.json").is_file():
                return InferenceSource(str(folder))
        gguf = sole_gguf(p, "--gguf-file")
        if gguf:
            return InferenceSource(str(p), gguf)
        raise NotAModelError(_why_no_model(p))
    if _looks_local(name):
        raise NotAModelError(f"{name}: no such file or folder; {EXPECTED}")
    return InferenceSource(name, gguf_file)


def _looks_local(name: str) -> bool:
    """A missing name that cannot be a hub id is a mistyped local path, not something to download."""
    if not _HUB_ID.match(name) or name.lower().endswith(_FILE_SUFFIXES):
        return True
    return "/" in name and Path(name.split("/")[0]).is_dir()  # outputs/run, where outputs/ exists


def _why_no_model(p: Path) -> str:
    entries = sorted(e.name for e in p.iterdir())
    if not entries:
        return f"{p} is an empty folder; {EXPECTED}"
    checkpoints = sorted((e for e in p.glob("checkpoint-*") if (e / "adapter").is_dir()),
                         key=lambda e: int(e.name.rsplit("-", 1)[-1]) if e.name.rsplit("-", 1)[-1].isdigit() else -1)
    if checkpoints:
        return (f"{p} is a run folder without a final adapter (the run has not finished); "
                f"pass one of its checkpoints, the newest is {checkpoints[-1]}")
    if (p / "config.yaml").is_file() or (p / "metrics.jsonl").is_file():
        return f"{p} is a run folder without an adapter or checkpoint (the run saved none); {EXPECTED}"
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    return f"{p} holds no model ({len(entries)} entries: {shown}); {EXPECTED}"


def load_for_inference(path_or_name: str, gguf_file: str | None = None, device: torch.device | str | None = None,
                       dtype: torch.dtype | str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer) from a run's output folder or checkpoint-N folder (PEFT adapter), an adapter folder,
    a merged folder, a hub name or a GGUF file. An adapter's base comes from its adapter_config.json, its
    GGUF file and attention from the run's config.yaml beside it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_inference_source(path_or_name, gguf_file)
    device = torch.device(device) if device is not None else default_device()
    settle_cpu_math()
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype, device)
    dtype = dtype or resolve_dtype("auto", device)
    if source.adapter is not None:
        from peft import PeftModel

        adapter = source.adapter
        base_name = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        run_cfg = _run_config_near(adapter)
        base_gguf = _split_gguf(run_cfg.model)[1] if run_cfg else None
        if not Path(base_name).exists() and _looks_local(base_name):
            raise NotAModelError(f"{adapter}: its base model {base_name} (base_model_name_or_path in adapter_config.json) "
                                 "is missing; put it back or edit that path")
        mcfg = ModelConfig(name_or_path=base_name, gguf_file=base_gguf, trust_remote_code=trust_remote_code)
        if run_cfg:
            mcfg.attn_implementation = run_cfg.model.attn_implementation
        base = load_base_model(mcfg, device, dtype)
        if (adapter / "tokenizer_config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(adapter)
        else:
            tokenizer = load_tokenizer(dataclasses.replace(run_cfg.model, load_in_4bit=False) if run_cfg else mcfg)
        # An extended vocabulary (cpt vocab extend, or a chat template's tokens): the adapter holds the whole
        # trained embeddings; the base only needs their shape.
        rows = adapter_vocab_rows(adapter) or len(tokenizer)
        if rows > base.get_input_embeddings().weight.shape[0]:
            base.resize_token_embeddings(rows, mean_resizing=False)
        with quiet_loading():
            model = PeftModel.from_pretrained(base, str(adapter))
    else:
        kw: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
        if source.gguf_file:
            kw.update(_gguf_kwargs(source.gguf_file))
        local = Path(source.path).exists()
        try:
            with quiet_loading(local, gguf=bool(source.gguf_file)):
                model = _as_plain_model(AutoModelForCausalLM.from_pretrained(source.path, **kw))
                tokenizer = AutoTokenizer.from_pretrained(source.path, **({"gguf_file": source.gguf_file} if source.gguf_file else {}))
        except OSError as e:
            if local:
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise NotAModelError(f"{source.path}: not a local file or folder, and the hub could not provide it ({first}); {EXPECTED}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    return model, tokenizer


def adapter_vocab_rows(adapter: str | Path) -> Optional[int]:
    """Rows of the trained embed_tokens / lm_head an adapter folder holds (its vocabulary size), read from the
    safetensors header; None when it trains no embeddings."""
    f = Path(adapter) / "adapter_model.safetensors"
    if not f.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as st:
        for k in st.keys():
            if ("embed_tokens" in k or "lm_head" in k) and k.endswith("weight"):
                return int(st.get_slice(k).get_shape()[0])
    return None


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
