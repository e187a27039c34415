"""Export: merge an adapter into its base model (a plain HF folder), write a GGUF file for llama.cpp and
Ollama, and sample text from any model.

    cpt merge outputs/run outputs/run-merged
    cpt export outputs/run --format gguf --outtype q8_0
    cpt generate outputs/run --prompt "The court held that"
    python -m pytest tests/test_model.py tests/test_bad_input_model.py tests/test_export.py -q
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

import numpy as np
import torch

from cpt.runtime import model_device

log = logging.getLogger("cpt")


class ExportError(ValueError):
    """A model the GGUF writer cannot represent; the message names what and the way out."""


def merge(adapter_dir: str | Path, out_dir: str | Path, dtype: Optional[str] = None, device: Optional[str] = None) -> Path:
    """Fold LoRA into the base weights and the trained embeddings into place; write a folder that
    AutoModelForCausalLM.from_pretrained loads on its own. `adapter_dir`: a run's output folder, a
    checkpoint-N folder or an adapter folder. dtype defaults to the base's dtype. The folder is written
    beside `out_dir` under a hidden name and renamed when whole: a failed merge leaves nothing behind, and
    one that was killed leaves a temp folder the next merge to the same place removes."""
    from cpt.model.load import NotAModelError, resolve_inference_source

    out = Path(out_dir).expanduser()
    if out.is_file():
        raise FileExistsError(f"{out} is a file; give merge a new folder for the merged model")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder for the merged model")
    source = resolve_inference_source(adapter_dir)
    if source.adapter is None:
        raise NotAModelError(f"{adapter_dir} holds no adapter (adapter_config.json) to merge: pass a run's output "
                             "folder, one of its checkpoint-N folders or an adapter folder")
    created = _first_missing(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _claim_temp(out, "merge")
    tmp.mkdir()
    try:
        merged, tokenizer = _merged_model(source, device or "cpu")
        target = getattr(torch, dtype) if dtype else _base_dtype(merged)
        merged.to(target)
        if getattr(merged.config, "tie_word_embeddings", False):
            merged.tie_weights()
        merged.config.use_cache = True
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out)  # onto nothing or an empty folder: atomic
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    log.info("merged model written to %s (%s)", out, target)
    return out


def _merged_model(source: Any, device: str) -> tuple[Any, Any]:
    """(model, tokenizer) of an adapter's run with LoRA folded into the base weights and the trained
    embeddings in place, in float32 so that the base + delta sum is not rounded twice."""
    from cpt.model.load import load_for_inference

    model, tokenizer = load_for_inference(str(source.adapter), device=device, dtype=torch.float32)
    return model.merge_and_unload(), tokenizer


def _claim_temp(out: Path, command: str) -> Path:
    """The hidden name `out` is written under (`.tmp-<name>-<pid>` beside it). Temp files or folders of the
    same target left by a killed run (their process is gone) are removed; one whose process still runs is
    another command writing the same target, which this one must not race."""
    for stale in out.parent.glob(f".tmp-{out.name}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            raise FileExistsError(f"{stale} is being written by process {pid} (another cpt {command} to {out}); "
                                  "wait for it to finish or stop it, then run this again")
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        log.info("removed %s, left by a %s that was killed", stale, command)
    return out.parent / f".tmp-{out.name}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _first_missing(folder: Path) -> Optional[Path]:
    """The outermost folder of `folder` that does not exist yet (what mkdir(parents=True) would create)."""
    missing = None
    for f in (folder, *folder.parents):
        if f.exists():
            break
        missing = f
    return missing


def _base_dtype(model: Any) -> torch.dtype:
    d = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else torch.float32


# --- GGUF ---------------------------------------------------------------------------------------------------

OUTTYPES = ("f16", "bf16", "q8_0")

# transformers architecture -> the llama.cpp architecture written. Mistral's dense models are Llama's graph
# (llama.cpp reads them as llama); sliding-window attention, where a config sets one, is not written.
_GGUF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama"}

_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

# A text that tells pre-tokenizers apart: contractions in both cases, digit runs of every length, runs of
# spaces and newlines, letters outside ASCII, punctuation glued to words.
_PRE_PROBE = ("Hello world! It's 2024: 1234567 apples cost $3.14159...\n\n  don't  SHOUT'LL\tëxâmple 你好世界 "
              "x=y+1;  \r\n  end.\n\n\nΑθήνα 00 123456789012 (a)[b]{c} CamelCaseWord ___init___")


class GgufTensor(NamedTuple):
    """A tensor under its llama.cpp name; `rope_heads` > 0: its rows are reordered for llama.cpp's RoPE (in
    that many heads) as it is written, so that no second copy of the model is held."""
    name: str
    tensor: torch.Tensor
    rope_heads: int = 0


def export_gguf(model_path: str | Path, out: str | Path | None = None, outtype: str = "f16",
                gguf_file: Optional[str] = None, device: Optional[str] = None) -> Path:
    """Write a GGUF file that llama.cpp (and so Ollama, LM Studio, ...) loads. `model_path`: a run's output
    folder, a checkpoint-N folder or an adapter folder (merged first, the same way `cpt merge` merges), or
    a model folder, a .gguf file or a hub name. `out` defaults to `<model_path>-<outtype>.gguf` beside it.
    The file is written under a hidden name and renamed when whole."""
    from cpt.model.load import load_for_inference, resolve_inference_source

    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype {outtype!r} is not one GGUF export writes; choose one of {', '.join(OUTTYPES)}")
    source = resolve_inference_source(model_path, gguf_file)
    target = Path(out).expanduser() if out is not None else _default_gguf_path(model_path, source, outtype)
    if target.is_dir():
        raise FileExistsError(f"{target} is a folder; give --out a file name ending in .gguf")
    if target.exists():
        raise FileExistsError(f"{target} exists; remove it or choose another file with --out")
    if source.gguf_file and (Path(source.path) / source.gguf_file).resolve() == target.resolve():
        raise FileExistsError(f"{target} is the model being exported; choose another file with --out")
    if target.suffix != ".gguf":
        raise ExportError(f"{target}: a GGUF file name ends in .gguf; llama.cpp and Ollama look for it")
    early = _config_without_weights(source)
    if early is not None:  # an architecture the writer cannot take costs seconds, not a model load
        _gguf_architecture(early)
        _rope_scaling(early)
    if source.adapter is not None:
        model, tokenizer = _merged_model(source, device or "cpu")
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()  # as `cpt merge` writes it
    else:
        model, tokenizer = load_for_inference(source.path, gguf_file=source.gguf_file, device=device or "cpu")
    check_gguf_exportable(model, tokenizer)  # before anything is written
    created = _first_missing(target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _claim_temp(target, "export")
    try:
        write_gguf(model, tokenizer, tmp, outtype, name=target.stem)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    log.info("GGUF (%s) written to %s (%.1f MB)", outtype, target, target.stat().st_size / 1e6)
    return target


def _config_without_weights(source: Any) -> Any:
    """The model's config (the base's, for an adapter) read without its weights; None when that cannot be
    done cheaply here (the checks then run after loading)."""
    from cpt.config import ModelConfig
    from cpt.model.load import load_model_config

    try:
        if source.adapter is None:
            return load_model_config(ModelConfig(name_or_path=source.path, gguf_file=source.gguf_file))
        base = json.loads((source.adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
        if Path(base).is_dir() and (Path(base) / "config.json").is_file():
            return load_model_config(ModelConfig(name_or_path=base))
    except Exception:  # noqa: BLE001 - the load that follows reports a broken model with its own message
        return None
    return None


def _default_gguf_path(model_path: str | Path, source: Any, outtype: str) -> Path:
    if source.gguf_file:
        return Path(source.path) / f"{Path(source.gguf_file).stem}-{outtype}.gguf"
    p = Path(model_path).expanduser()
    if p.exists():
        p = p.resolve()
        return p.parent / f"{p.name}-{outtype}.gguf"
    return Path(f"{str(model_path).rstrip('/').rsplit('/', 1)[-1]}-{outtype}.gguf")  # a hub name: here


def check_gguf_exportable(model: Any, tokenizer: Any) -> None:
    """Raise ExportError, naming what and the way out, for a model or tokenizer the writer cannot represent,
    before any file is opened."""
    _gguf_architecture(model.config)
    _rope_scaling(model.config)
    gguf_tokens(tokenizer, _vocab_rows(model))
    gguf_tensors(model)


def write_gguf(model: Any, tokenizer: Any, path: str | Path, outtype: str = "f16", name: Optional[str] = None) -> None:
    """Write `model` (a Llama-family causal LM in memory) and its byte-level BPE tokenizer as one GGUF file.
    Tensors are converted one at a time while writing, so memory stays at the model plus one tensor."""
    import gguf

    cfg = model.config
    arch = _gguf_architecture(cfg)
    tensors = gguf_tensors(model)
    tok = gguf_tokens(tokenizer, _vocab_rows(model))
    kinds = [_gguf_kind(t.tensor, outtype) for t in tensors]

    w = gguf.GGUFWriter(str(path), arch)
    w.add_type("model")
    w.add_name(name or Path(str(getattr(cfg, "_name_or_path", "") or "model")).name)
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                     "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    head_dim = _head_dim(cfg)
    w.add_vocab_size(_vocab_rows(model))
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(int(cfg.num_attention_heads))
    w.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_freq_base(float(_rope_theta(cfg)))
    w.add_rope_dimension_count(head_dim)
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    scaling = _rope_scaling(cfg)
    if scaling is not None and scaling["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling is not None and scaling["rope_type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(scaling["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(scaling.get("original_max_position_embeddings") or cfg.max_position_embeddings))

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok.pre)
    w.add_token_list(tok.tokens)
    w.add_token_types(tok.types)
    w.add_token_merges(tok.merges)
    for key, value in tok.special_ids.items():
        getattr(w, f"add_{key}_token_id")(value)
    w.add_add_bos_token(tok.add_bos)
    w.add_add_eos_token(tok.add_eos)
    if tok.chat_template:
        w.add_chat_template(tok.chat_template)

    for t, (qtype, shape, dtype, nbytes) in zip(tensors, kinds):
        w.add_tensor_info(t.name, shape, dtype, nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t in tensors:
        w.write_tensor_data(_gguf_data(t, outtype))
    w.close()


def _gguf_architecture(cfg: Any) -> str:
    names = list(getattr(cfg, "architectures", None) or [])
    arch = next((_GGUF_ARCHITECTURES[n] for n in names if n in _GGUF_ARCHITECTURES), None)
    if arch is None:
        if getattr(cfg, "model_type", None) in ("llama", "mistral"):
            arch = "llama"
        else:
            shown = ", ".join(names) or getattr(cfg, "model_type", "unknown")
            raise ExportError(f"GGUF export writes Llama-family models ({', '.join(_GGUF_ARCHITECTURES)}); this one is {shown}. "
                              "Merge it with `cpt merge` and convert the folder with llama.cpp's convert_hf_to_gguf.py")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(cfg, flag, False):
            raise ExportError(f"the model's config sets {flag}=true, which GGUF export does not write; merge it with "
                              "`cpt merge` and convert the folder with llama.cpp's convert_hf_to_gguf.py")
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise ExportError(f"the model's hidden_act is {act!r}; llama.cpp's llama graph computes silu. Merge it with "
                          "`cpt merge` and convert the folder with llama.cpp's convert_hf_to_gguf.py")
    return arch


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return params.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0


def _rope_scaling(cfg: Any) -> Optional[dict]:
    """The model's RoPE scaling as a dict with `rope_type`, None when it has none. Linear, YaRN and Llama 3's
    frequency scaling are written; anything else would make llama.cpp place tokens differently."""
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return None
    if kind not in ("linear", "yarn", "llama3"):
        raise ExportError(f"the model's RoPE scaling is {kind!r}; GGUF export writes linear, yarn and llama3 scaling only")
    params["rope_type"] = kind
    return params


def _head_dim(cfg: Any) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _vocab_rows(model: Any) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def _rope_factors(cfg: Any) -> torch.Tensor:
    """Llama 3's per-frequency RoPE divisors, as llama.cpp reads them (`rope_freqs.weight`): the plain
    frequencies over the scaled ones transformers computes for this config."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dim = _head_dim(cfg)
    plain = 1.0 / (_rope_theta(cfg) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaled = ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))[0].to(torch.float64)
    return (plain / scaled).to(torch.float32)


def _permute_for_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers rotates the two halves of each head; llama.cpp's llama graph rotates neighbouring pairs.
    Reorder the rows of q_proj / k_proj so that the same pairs rotate together."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model: Any) -> list[GgufTensor]:
    """The model's tensors under llama.cpp's names, in writing order, q/k marked for reordering. The output
    head is left out when it is the input embedding (tied). Raises ExportError for a tensor with no place in
    the file."""
    cfg = model.config
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    embed = state.pop("model.embed_tokens.weight", None)
    if embed is None:
        raise ExportError("the model has no model.embed_tokens.weight; GGUF export writes Llama-family models")
    out = [GgufTensor("token_embd.weight", embed)]
    if (_rope_scaling(cfg) or {}).get("rope_type") == "llama3":
        out.append(GgufTensor("rope_freqs.weight", _rope_factors(cfg)))
    for i in range(int(cfg.num_hidden_layers)):
        for hf, name in _LAYER_TENSORS.items():
            t = state.pop(f"model.layers.{i}.{hf}", None)
            if t is None:
                raise ExportError(f"the model has no model.layers.{i}.{hf}; GGUF export writes Llama-family models")
            rope_heads = heads if hf.startswith("self_attn.q_proj") else kv_heads if hf.startswith("self_attn.k_proj") else 0
            out.append(GgufTensor(f"blk.{i}.{name}", t, rope_heads))
    norm = state.pop("model.norm.weight", None)
    if norm is None:
        raise ExportError("the model has no model.norm.weight; GGUF export writes Llama-family models")
    out.append(GgufTensor("output_norm.weight", norm))
    head = state.pop("lm_head.weight", None)
    if head is not None and not (head.shape == embed.shape and torch.equal(head, embed)):
        out.append(GgufTensor("output.weight", head))
    if state:
        extra = sorted(state)
        raise ExportError(f"GGUF export has no place for {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}; "
                          "merge the model with `cpt merge` and convert the folder with llama.cpp's convert_hf_to_gguf.py")
    return out


def _gguf_kind(t: torch.Tensor, outtype: str) -> tuple:
    """(raw GGML type or None, shape, numpy dtype, bytes) of a tensor as written: vectors stay float32; a
    matrix takes the outtype, q8_0 falling back to f16 for rows that are not whole 32-element blocks (what
    llama.cpp's own converter does)."""
    import gguf

    shape, n = tuple(t.shape), t.numel()
    if t.dim() < 2:
        return None, shape, np.dtype(np.float32), 4 * n
    if outtype == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        qtype = gguf.GGMLQuantizationType.Q8_0
        byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
        return qtype, byte_shape, np.dtype(np.uint8), math.prod(byte_shape)
    if outtype == "bf16":
        return gguf.GGMLQuantizationType.BF16, (*shape[:-1], 2 * shape[-1]), np.dtype(np.uint8), 2 * n
    return None, shape, np.dtype(np.float16), 2 * n


def _gguf_data(t: GgufTensor, outtype: str) -> np.ndarray:
    import gguf

    qtype = _gguf_kind(t.tensor, outtype)[0]
    x = t.tensor.detach().to("cpu", torch.float32)
    a = (_permute_for_rope(x, t.rope_heads) if t.rope_heads else x).contiguous().numpy()
    if t.tensor.dim() < 2:
        return a
    if qtype is None:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)


class GgufTokens(NamedTuple):
    pre: str
    tokens: list
    types: list
    merges: list
    special_ids: dict
    add_bos: bool
    add_eos: bool
    chat_template: Optional[str]


def gguf_tokens(tokenizer: Any, rows: int) -> GgufTokens:
    """The tokenizer as llama.cpp's metadata spells a byte-level BPE ("gpt2") vocabulary: tokens by id
    (padded with unused `[PAD<i>]` entries up to the embedding's rows), their types (special added tokens are
    control tokens, other added ones user-defined), the merges, the special ids, whether BOS/EOS are added,
    the chat template, and the pre-tokenizer by the name llama.cpp knows it."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("decoder")):
        raise ExportError("GGUF export writes byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM, ...); this "
                          f"model's is {model.get('type') or type(tokenizer).__name__}"
                          f"{' with byte fallback (sentencepiece-style)' if model.get('byte_fallback') else ''}. "
                          "Merge it with `cpt merge` and convert the folder with llama.cpp's convert_hf_to_gguf.py")
    vocab = tokenizer.get_vocab()
    if len(vocab) > rows:
        raise ExportError(f"the tokenizer has {len(vocab)} tokens but the model's embedding only {rows} rows")
    by_id: list[Optional[str]] = [None] * rows
    for token, i in vocab.items():
        by_id[i] = token
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i, token in enumerate(by_id):
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
               "pad": tokenizer.pad_token_id}
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    add_bos = special["bos"] is not None and len(ids) > len(bare) and ids[0] == special["bos"]
    add_eos = special["eos"] is not None and len(ids) > len(bare) and ids[-1] == special["eos"]
    template = getattr(tokenizer, "chat_template", None)
    return GgufTokens(pre=_pre_tokenizer_name(backend), tokens=tokens, types=types, merges=merges,
                      special_ids={k: int(v) for k, v in special.items() if v is not None}, add_bos=add_bos,
                      add_eos=add_eos, chat_template=template if isinstance(template, str) else None)


def _pre_tokenizer_candidates() -> Iterator[tuple[str, Any]]:
    """(llama.cpp's name, an equivalent tokenizers pre-tokenizer), most common first. The split patterns
    beyond GPT-2's come from transformers' own GGUF reader, which builds tokenizers from these names."""
    from tokenizers import Regex, pre_tokenizers as pt

    yield "gpt-2", pt.ByteLevel(add_prefix_space=False, use_regex=True)
    yield "smollm", pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS as splits
    except ImportError:  # older transformers: only the two above are recognised
        return
    for name in ("llama-bpe", "qwen2", "gpt-4o", "tekken", *splits):
        if name in splits:
            yield name, pt.Sequence([pt.Split(Regex(splits[name]), behavior="isolated"),
                                     pt.ByteLevel(add_prefix_space=False, use_regex=False)])


def _pre_tokenizer_name(backend: Any) -> str:
    """The llama.cpp name of the tokenizer's pre-tokenizer, found by splitting a probe text both ways: llama.cpp
    splits text by a fixed pattern per name, and a GGUF tokenizes correctly only under the right one."""
    pre = backend.pre_tokenizer
    if pre is None:
        raise ExportError("the tokenizer has no pre-tokenizer; GGUF export writes byte-level BPE tokenizers")
    want = [piece for piece, _ in pre.pre_tokenize_str(_PRE_PROBE)]
    for name, candidate in _pre_tokenizer_candidates():
        if [piece for piece, _ in candidate.pre_tokenize_str(_PRE_PROBE)] == want:
            return name
    raise ExportError("the tokenizer splits text in a way no llama.cpp pre-tokenizer name that cpt knows matches "
                      "(gpt-2, smollm, llama-bpe, qwen2, ...); merge it with `cpt merge` and convert the folder with "
                      "llama.cpp's convert_hf_to_gguf.py, which knows more tokenizers by their hash")


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: Optional[int] = None, chat: bool = False) -> str:
    """Continue `prompt`. temperature 0 is greedy (deterministic). `chat`: the prompt is a user turn through the
    tokenizer's chat template, and the answer stops at the template's end of turn."""
    from cpt.data.chat import chat_prompt_ids, stop_token_ids

    if seed is not None:
        torch.manual_seed(seed)
    device = model_device(model)
    kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat: this tokenizer has no chat template (an sft run saves one with its adapter)")
        ids = torch.tensor([chat_prompt_ids(tokenizer, prompt)], device=device)
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        kw["eos_token_id"] = stop_token_ids(tokenizer)
    else:
        enc = tokenizer(prompt, return_tensors="pt").to(device)
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kw.update(do_sample=False)
    out = model.generate(**enc, **kw)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
