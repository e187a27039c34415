"""Export: merge an adapter into its base model (a plain HF folder), and sample text from any model.

    cpt merge outputs/run outputs/run-merged
    cpt generate outputs/run --prompt "The court held that"
    python -m pytest tests/test_model.py tests/test_bad_input_model.py -q
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger("cpt")


def merge(adapter_dir: str | Path, out_dir: str | Path, dtype: Optional[str] = None, device: Optional[str] = None) -> Path:
    """Fold LoRA into the base weights and the trained embeddings into place; write a folder that
    AutoModelForCausalLM.from_pretrained loads on its own. `adapter_dir`: a run's output folder, a
    checkpoint-N folder or an adapter folder. dtype defaults to the base's dtype. The folder is written
    beside `out_dir` under a hidden name and renamed when whole: a failed merge leaves nothing behind."""
    from cpt.model.load import NotAModelError, load_for_inference, resolve_inference_source

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
    for stale in out.parent.glob(f".tmp-{out.name}-*"):  # left by a merge that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        # Merge in float32 so that the base + delta sum is not rounded twice.
        model, tokenizer = load_for_inference(str(source.adapter), device=device or "cpu", dtype=torch.float32)
        merged = model.merge_and_unload()
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


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: Optional[int] = None, chat: bool = False) -> str:
    """Continue `prompt`. temperature 0 is greedy (deterministic). `chat`: the prompt is a user turn through the
    tokenizer's chat template, and the answer stops at the template's end of turn."""
    from cpt.data.chat import chat_prompt_ids, stop_token_ids

    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
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
