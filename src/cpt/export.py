"""Export: merge an adapter into its base model (a plain HF folder), and sample text from any model.

    cpt merge outputs/run outputs/run-merged
    cpt generate outputs/run --prompt "The court held that"
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger("cpt")


def merge(adapter_dir: str | Path, out_dir: str | Path, dtype: Optional[str] = None, device: Optional[str] = None) -> Path:
    """Fold LoRA into the base weights and the trained embeddings into place; write a folder that
    AutoModelForCausalLM.from_pretrained loads on its own. dtype defaults to the base's dtype."""
    from cpt.model import load_for_inference

    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json: pass a run's output_dir or a checkpoint's adapter folder")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder for the merged model")
    # Merge in float32 so that the base + delta sum is not rounded twice.
    model, tokenizer = load_for_inference(str(adapter_dir), device=device or "cpu", dtype=torch.float32)
    merged = model.merge_and_unload()
    target = getattr(torch, dtype) if dtype else _base_dtype(merged)
    merged.to(target)
    if getattr(merged.config, "tie_word_embeddings", False):
        merged.tie_weights()
    merged.config.use_cache = True
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    log.info("merged model written to %s (%s)", out, target)
    return out


def _base_dtype(model: Any) -> torch.dtype:
    d = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else torch.float32


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: Optional[int] = None) -> str:
    """Continue `prompt`. temperature 0 is greedy (deterministic)."""
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    kw: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kw.update(do_sample=False)
    out = model.generate(**enc, **kw)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
