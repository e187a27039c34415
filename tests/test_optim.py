import math

import pytest
import torch

from cpt.config import TrainConfig
from cpt.optim import build_optimizer, lr_lambda, warmup_steps


def test_warmup_ratio_and_steps():
    assert warmup_steps(TrainConfig(warmup_ratio=0.1), 2000) == 200
    assert warmup_steps(TrainConfig(warmup_ratio=0.1, warmup_steps=7), 2000) == 7


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "wsd"])
def test_schedules_shape(kind):
    t = TrainConfig(lr_scheduler_type=kind, warmup_ratio=0.1, decay_ratio=0.2)
    f = lr_lambda(t, 100)
    vals = [f(s) for s in range(100)]
    assert vals[0] < vals[5] < vals[9] <= 1.0  # warmup rises
    assert 0 < vals[0]
    assert max(vals) <= 1.0
    if kind == "constant":
        assert vals[50] == vals[99] == 1.0
    elif kind == "wsd":
        assert vals[10] == vals[79] == 1.0 and vals[99] < 0.1
    else:
        assert vals[10] > vals[50] > vals[99] and vals[99] < 0.05
    if kind == "cosine":
        assert math.isclose(vals[55], 0.5, abs_tol=0.02)


def test_min_lr_floor():
    f = lr_lambda(TrainConfig(lr_scheduler_type="cosine", min_lr_ratio=0.1), 10)
    assert f(10) == pytest.approx(0.1)


def test_groups_keep_their_lr_and_8bit_needs_cuda():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    groups = [{"name": "adapter", "params": [a], "lr": 1e-3, "weight_decay": 0.1},
              {"name": "embeddings", "params": [b], "lr": 1e-4, "weight_decay": 0.0}]
    opt = build_optimizer(groups, TrainConfig(), torch.device("cpu"))
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in opt.param_groups] == [("adapter", 1e-3, 0.1), ("embeddings", 1e-4, 0.0)]
    from cpt.config import ConfigError
    with pytest.raises(ConfigError, match="adamw_8bit"):
        build_optimizer(groups, TrainConfig(optim="adamw_8bit"), torch.device("cpu"))


def test_adamw_8bit_without_syncs_matches_bitsandbytes(monkeypatch):
    """Our AdamW8bit step queues the same updates as bitsandbytes' own (bit for bit, states too)
    without a torch.cuda.synchronize() per tensor (on the GPU when there is one, else on
    bitsandbytes' CPU backend)."""
    bnb = pytest.importorskip("bitsandbytes")
    from cpt.optim import _adamw_8bit_without_syncs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(64, 128, generator=g), torch.randn(128, 64, generator=g), torch.randn(300, generator=g)]
    grads = [[torch.randn(t.shape, generator=g) for t in init] for _ in range(3)]

    def run(cls):
        params = [torch.nn.Parameter(t.clone().to(device)) for t in init]
        opt = cls([{"params": params[:2], "lr": 1e-2, "weight_decay": 0.1}, {"params": params[2:], "lr": 1e-3, "weight_decay": 0.0}],
                  betas=(0.9, 0.999), eps=1e-8)
        syncs = []
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: syncs.append(1))
        for step in grads:
            for p, gr in zip(params, step):
                p.grad = gr.to(device)
            opt.step()
        monkeypatch.undo()
        return params, opt, len(syncs)

    ref, ref_opt, _ = run(bnb.optim.AdamW8bit)
    ours, opt, syncs = run(_adamw_8bit_without_syncs())
    assert syncs == 0
    assert isinstance(opt, bnb.optim.AdamW8bit)
    assert any(s["state1"].dtype == torch.uint8 for s in opt.state.values())  # the 8-bit path ran
    for a, b, t in zip(ours, ref, init):
        assert torch.equal(a, b) and not torch.equal(a.detach().cpu(), t)
    for a, b in zip(ours, ref):
        for k, v in opt.state[a].items():
            assert torch.equal(v, ref_opt.state[b][k]) if torch.is_tensor(v) else v == ref_opt.state[b][k], k
