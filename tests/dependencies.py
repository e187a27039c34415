"""The libraries cpt follows closely, the range of each that the suite was run on (pyproject.toml), and
which features' tests depend on which: so that a failure after a new release says which release broke
what (conftest.py adds this to every failing report, and prints the versions in the header)."""
from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path
from typing import Optional

from packaging.requirements import Requirement
from packaging.version import Version

FAST_MOVING = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel")

# Test module -> (the feature it covers, the libraries that feature rests on).
FEATURES = {
    "test_speed_compile": ("compiled decoder layers (torch.compile, CUDA graphs)", ("torch", "transformers")),
    "test_speed_recompute": ("selective recomputation of decoder layers", ("torch", "transformers")),
    "test_speed_host_activations": ("MLP activations in host memory", ("torch", "transformers")),
    "test_speed_lora": ("LoRA fused into the projection op", ("torch", "peft", "transformers")),
    "test_speed_loss": ("the fused chunked loss on the output head", ("torch", "transformers", "peft")),
    "test_speed_nf4": ("4-bit (NF4) bases and their dequantization", ("bitsandbytes", "torch")),
    "test_speed": ("applying the run plan to a model", ("torch", "transformers", "peft")),
    "test_model": ("adapters and trained embeddings", ("peft", "transformers")),
    "test_build": ("building a model from its run plan", ("peft", "transformers")),
    "test_optim": ("the 8-bit AdamW and its schedules", ("bitsandbytes", "torch")),
    "test_split_master": ("float32 masters held as bf16 + low half", ("bitsandbytes", "torch")),
    "test_distributed": ("DDP and FSDP2", ("accelerate", "torch")),
    "test_train": ("the training loop", ("accelerate", "torch", "transformers", "peft")),
    "test_checkpoint": ("checkpoints and exact resume", ("accelerate", "torch", "peft")),
    "test_families": ("model families beyond Llama (Qwen, Mistral, Gemma, Phi-3, OLMo 2)", ("transformers", "peft", "torch")),
    "test_bench_sft_throughput": ("the instruction stage's benchmark against TRL (CPU dry run)", ("trl", "transformers", "peft")),
    "test_export": ("merge and GGUF export, read back by transformers' GGUF loader", ("transformers", "peft", "torch")),
}


def declared_ranges(pyproject: Optional[Path] = None) -> dict[str, str]:
    """{name: specifier} of the fast-moving libraries as pyproject.toml declares them."""
    text = (pyproject or Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    out = {}
    for line in re.findall(r'"([A-Za-z0-9_.\-]+[<>=!~][^"]*)"', text):
        req = Requirement(line)
        if req.name in FAST_MOVING:
            out.setdefault(req.name, str(req.specifier))
    return out


def installed(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def describe(names) -> str:
    """'transformers 5.25.0 (tested >=4.56,<5.26), ...' for the given libraries."""
    ranges = declared_ranges()
    return ", ".join(f"{n} {installed(n) or 'not installed'} (tested {ranges.get(n, 'any')})" for n in names)


def outside_tested_range() -> list[str]:
    ranges = declared_ranges()
    bad = []
    for name, spec in ranges.items():
        v = installed(name)
        if v is not None and not Requirement(f"{name}{spec}").specifier.contains(Version(v).base_version, prereleases=True):
            at_risk = [f"{what} (tests/{mod}.py)" for mod, (what, libs) in FEATURES.items() if name in libs]
            bad.append(f"{name} {v} is outside the tested range {spec}; what rests on it: " + "; ".join(at_risk))
    return bad
