"""The small rules of the run plan (cpt.plan.rules): pure functions of the config and the launch.

    python -m pytest tests/test_plan_rules.py -q
"""
from __future__ import annotations

import torch

from cpt.plan.rules import HOST_LEAD, checkpointing_mode, host_layer_indices, use_compile, use_cuda_graphs


def test_use_compile_resolution():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_compile("auto", "cpt", cuda) and use_compile("auto", "none", cuda)
    assert not use_compile("auto", "cpt", cpu) and not use_compile("auto", "none", "cpu")
    assert not use_compile("auto", "liger", cuda) and not use_compile("auto", "cpt", cuda, fsdp=True)
    assert use_compile(True, "cpt", cpu) and use_compile("true", "liger", cuda)
    assert not use_compile(False, "cpt", cuda) and not use_compile("false", "cpt", cuda)


def test_use_cuda_graphs_resolution(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert use_cuda_graphs("auto", cuda) and not use_cuda_graphs("auto", cpu)
    assert not use_cuda_graphs("auto", cuda, fsdp=True)
    assert use_cuda_graphs(True, cpu) and use_cuda_graphs("true", cuda) and not use_cuda_graphs("false", cuda)
    assert not use_cuda_graphs("auto", cuda, world_size=2) and use_cuda_graphs(True, cuda, world_size=2)
    monkeypatch.setenv("WORLD_SIZE", "2")  # several processes (DDP): not measured, so auto stays off
    assert not use_cuda_graphs("auto", cuda) and use_cuda_graphs(True, cuda)


def test_checkpointing_mode():
    assert checkpointing_mode(False) == checkpointing_mode("false") == "off"
    assert checkpointing_mode(True) == checkpointing_mode("true") == "recompute"
    assert checkpointing_mode("offload") == checkpointing_mode("unsloth") == "offload"  # Unsloth's offloaded mode


def test_host_layer_indices_spread_and_skip_the_top():
    assert host_layer_indices(list(range(32)), 32, 0) == []
    got = host_layer_indices(list(range(32)), 32, 10)
    assert len(got) == 10 and HOST_LEAD < min(got) and max(got) < 32 - HOST_LEAD
    gaps = [b - a for a, b in zip(got, got[1:])]
    assert max(gaps) - min(gaps) <= 1  # evenly spread
    assert host_layer_indices(list(range(5, 32)), 32, 100) == list(range(5, 32 - HOST_LEAD))
    assert host_layer_indices(list(range(32)), 32, 100) == list(range(HOST_LEAD + 1, 32 - HOST_LEAD))
    assert host_layer_indices([31, 0, 1], 32, 3) == []
