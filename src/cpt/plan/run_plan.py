"""RunPlan: every speed and memory choice of a run, made once at setup and frozen.

`cpt.plan.decide` fills it from the config, the model's shape and the hardware; `cpt.speed` applies
it to the model; it is saved beside the run as `run_plan.json` and shown by `cpt plan`. The user's
config is never rewritten with these choices.

    python -m pytest tests/test_plan.py -q
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FILE = "run_plan.json"


@dataclass(frozen=True)
class RunPlan:
    """What a run does for speed and memory. Layer indices count from the bottom (0: next to embed_tokens)."""

    device: str = "cpu"  # where the model trains: "cpu", "cuda", "cuda:1"
    kernels: str = "none"  # "none" (plain PyTorch), "cpt" (chunked loss, fused LoRA projections), "liger"
    compile: bool = False  # regional torch.compile of every decoder layer's training step
    cuda_graphs: bool = False  # compiled layers replay as CUDA graphs (needs compile)
    checkpointing: str = "off"  # "off" (every layer keeps its activations), "recompute", "offload" (inputs in host memory)
    keep_layers: int = 0  # with checkpointing: the lowest this many layers keep their activations anyway
    host_layers: tuple[int, ...] = ()  # recomputing layers whose MLP gate/up outputs wait in pinned host memory
    split_masters: bool = False  # trained embeddings' float32 masters held as bf16 weight + 16-bit low half
    sparse_embedding_grad: bool = False  # embed_tokens gets a gradient for the rows a batch used only
    offload_embedding_state: bool = False  # those masters' low halves and 8-bit moments live in host memory
    frozen_originals_on_host: bool = False  # peft's frozen copies of trained embeddings wait in host memory
    estimate: dict = field(default_factory=dict)  # cpt plan's numbers for this choice (peak_gib, tokens_per_s, ...)
    reasons: tuple[str, ...] = ()  # one line per choice that was not the config's literal value

    @property
    def recomputes(self) -> bool:
        return self.checkpointing != "off"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["host_layers"] = list(self.host_layers)
        d["reasons"] = list(self.reasons)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunPlan":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["host_layers"] = tuple(d.get("host_layers", ()))
        d["reasons"] = tuple(d.get("reasons", ()))
        return cls(**d)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / FILE
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "RunPlan":
        return cls.from_dict(json.loads((Path(folder) / FILE).read_text()))
