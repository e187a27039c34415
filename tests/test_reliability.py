"""The reliability guarantees of issue #6, each on a tiny random Llama on CPU (docs/reliability.md
maps every guarantee to its test here or in tests/test_checkpoint.py).

    python -m pytest tests/test_reliability.py -q
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cpt import checkpoint as ckpt
from cpt.api import run_training
from cpt.cli import main as cli_main
from cpt.config import ConfigError, load_config

# Metrics that must match bitwise between an interrupted and an uninterrupted run (timings and
# memory legitimately differ).
EXACT_KEYS = ("step", "loss", "grad_norm", "lr", "tokens", "nonfinite_skipped", "epoch")


def _overrides(model_dir, corpus_dir, out, *extra) -> list[str]:
    return [f"model.name_or_path={model_dir}", "model.max_seq_length=32", f"data.path={corpus_dir}",
            "adapter.r=8", "adapter.lora_dropout=0.1", "adapter.use_gradient_checkpointing=false",
            "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=2",
            "train.learning_rate=5e-3", "train.embedding_learning_rate=1e-3", "train.warmup_steps=2",
            "train.max_steps=8", "train.deterministic=true", f"output.output_dir={out}", "output.logging_steps=1",
            "output.save_steps=4", "output.report=false", "output.report_to=[]", "eval.eval_at_start=false",
            *extra]


def _cfg(model_dir, corpus_dir, out, *extra):
    return load_config(None, _overrides(model_dir, corpus_dir, out, *extra))


def _metrics(out: Path) -> list[dict]:
    return [{k: r.get(k) for k in EXACT_KEYS} for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    """The adapter, every trained tensor and the optimizer state of the last checkpoint."""
    last = ckpt.latest_checkpoint(out)
    state = {f"adapter/{k}": v for k, v in load_file(str(out / "adapter_model.safetensors")).items()}
    state.update({f"trainable/{k}": v for k, v in load_file(str(last / "trainable.safetensors")).items()})
    opt = ckpt.load_torch(last / "optimizer.pt")
    for pid, s in opt["state"].items():
        for k, v in s.items():
            state[f"optim/{pid}/{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    state["optim/lrs"] = torch.tensor([g["lr"] for g in opt["param_groups"]], dtype=torch.float64)
    return state


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


class _Crash(Exception):
    """Stands in for a process dying in the middle of a step."""


def _wrap_loss(monkeypatch, on_call):
    """Count micro-batch loss calls across Trainer instances; `on_call(n)` runs before call n (1-based)."""
    import cpt.train as train_mod

    calls = {"n": 0}
    real_init = train_mod.Trainer.__init__

    def init(self, cfg, bundle, *a, **k):
        real_fn = bundle.loss_fn

        def loss_fn(*args, **kw):
            calls["n"] += 1
            on_call(calls["n"])
            return real_fn(*args, **kw)

        bundle.loss_fn = loss_fn
        real_init(self, cfg, bundle, *a, **k)

    monkeypatch.setattr(train_mod.Trainer, "__init__", init)
    return calls


@pytest.fixture(scope="module")
def reference(tiny_model_dir, corpus, tmp_path_factory):
    """An uninterrupted 8-step run (dropout on, accumulation 2, deterministic) to compare against."""
    root = tmp_path_factory.mktemp("reference")
    corpus_dir = root / "corpus"
    corpus_dir.mkdir()
    for i, doc in enumerate(corpus):
        (corpus_dir / f"doc{i:03d}.txt").write_text(doc)
    out = root / "run"
    run_training(_cfg(tiny_model_dir, corpus_dir, out))
    return {"corpus": corpus_dir, "out": out, "metrics": _metrics(out), "state": _final_state(out)}


# ---------------------------------------------------------------------------- 1. exact resume


def test_1_exact_resume_is_bitwise(reference, tiny_model_dir, tmp_path, monkeypatch):
    """Die in step 6 (after checkpoint-4, with steps 5 logged), resume: per-step losses, adapter,
    trained tensors and optimizer state equal the uninterrupted run bit for bit."""
    out = tmp_path / "run"
    accum = 2

    def crash(n):
        if n == 5 * accum + 1:  # first micro-batch of step 6
            raise _Crash()

    _wrap_loss(monkeypatch, crash)
    with pytest.raises(_Crash):
        run_training(_cfg(tiny_model_dir, reference["corpus"], out))
    monkeypatch.undo()
    assert [r["step"] for r in _metrics(out)] == [1, 2, 3, 4, 5]
    assert ckpt.latest_checkpoint(out).name == "checkpoint-4"

    summary = run_training(_cfg(tiny_model_dir, reference["corpus"], out))
    assert summary["step"] == 8 and not summary["interrupted"]
    assert _metrics(out) == reference["metrics"]  # step 5 once, from the resumed run
    _assert_bitwise_equal(_final_state(out), reference["state"])
