"""Parameter groups by role, each with its learning rate and weight decay.

The names appear in logs and metrics ("lr": {"adapter": ..., "embeddings": ...}).

    python -m pytest tests/test_model.py -q -k groups
"""
from __future__ import annotations

from torch import nn

from cpt.config import EMBEDDING_MODULES, Config

GROUP_ADAPTER = "adapter"
GROUP_NO_DECAY = "adapter_no_decay"
GROUP_EMBEDDINGS = "embeddings"


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Adapter weights at learning_rate (with weight decay), norms and biases without decay,
    embeddings and head at embedding_learning_rate without decay. Tied matrices appear once."""
    t = cfg.train
    emb_lr = t.embedding_learning_rate if t.embedding_learning_rate is not None else t.learning_rate
    groups: dict[str, list] = {GROUP_ADAPTER: [], GROUP_NO_DECAY: [], GROUP_EMBEDDINGS: []}
    names: dict[str, list[str]] = {k: [] for k in groups}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if any(f"{m}." in name or name.endswith(m + ".weight") for m in EMBEDDING_MODULES):
            key = GROUP_EMBEDDINGS
        elif p.ndim < 2 or "norm" in name or name.endswith(".bias"):
            key = GROUP_NO_DECAY
        else:
            key = GROUP_ADAPTER
        groups[key].append(p)
        names[key].append(name)
    spec = {GROUP_ADAPTER: (t.learning_rate, t.weight_decay), GROUP_NO_DECAY: (t.learning_rate, 0.0),
            GROUP_EMBEDDINGS: (emb_lr, 0.0)}
    # Embeddings first: the optimizer's two largest updates start on the GPU while the host is still
    # launching the many small adapter updates.
    order = (GROUP_EMBEDDINGS, GROUP_ADAPTER, GROUP_NO_DECAY)
    return [{"name": k, "params": groups[k], "param_names": names[k], "lr": spec[k][0], "weight_decay": spec[k][1]}
            for k in order if groups[k]]
