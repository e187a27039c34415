import math

import pytest
import torch

from cpt.config import TrainConfig
from cpt.optim import build_optimizer, lr_lambda, warmup_steps

# bitsandbytes' CUDA kernels on a GPU, its CPU backend (PyTorch operations) elsewhere.
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


def test_groups_keep_their_lr_and_8bit_needs_bitsandbytes(monkeypatch):
    import sys

    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    groups = [{"name": "adapter", "params": [a], "lr": 1e-3, "weight_decay": 0.1},
              {"name": "embeddings", "params": [b], "lr": 1e-4, "weight_decay": 0.0}]
    opt = build_optimizer(groups, TrainConfig(), torch.device("cpu"))
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in opt.param_groups] == [("adapter", 1e-3, 0.1), ("embeddings", 1e-4, 0.0)]
    # The offload decision is the run plan's (a bool), never the config's "auto"; the 8-bit optimizer's
    # knobs are not silently dropped by another optimizer.
    with pytest.raises(TypeError, match="run plan's decision"):
        build_optimizer(groups, TrainConfig(), torch.device("cpu"), offload_embedding_state="auto")
    with pytest.raises(TypeError, match="gather: options of train.optim=adamw_8bit"):
        build_optimizer(groups, TrainConfig(), torch.device("cpu"), gather=False)
    from cpt.config import ConfigError
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(ConfigError, match="adamw_8bit needs bitsandbytes.*adamw_torch"):
        build_optimizer(groups, TrainConfig(optim="adamw_8bit"), torch.device("cpu"))


def _relative_gap(ours, ref, start) -> float:
    """How far our total update is from bitsandbytes', relative to its size. Both quantise the moments
    to the same 256 values; where a value lies almost halfway between two, the two implementations may
    round it differently, and that element's later updates differ by about one quantisation step (a
    few percent of the update). An error in the algorithm itself (bias correction, decay, the maps)
    shows as tens of percent."""
    ours, ref, start = (x.detach().float().cpu() for x in (ours, ref, start))
    return float((ours - ref).norm() / (ref - start).norm())


def test_adamw_8bit_without_syncs_matches_bitsandbytes(monkeypatch):
    """Our AdamW8bit step queues the same updates as bitsandbytes' own (bit for bit, states too)
    without a torch.cuda.synchronize() per tensor (on the GPU when there is one, else on
    bitsandbytes' CPU backend)."""
    bnb = pytest.importorskip("bitsandbytes")
    from cpt.optim.adamw8bit import AdamW8bit

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
    ours, opt, syncs = run(AdamW8bit)
    assert syncs == 0
    assert isinstance(opt, bnb.optim.AdamW8bit)
    assert any(s["state1"].dtype == torch.uint8 for s in opt.state.values())  # the 8-bit path ran
    # The two large float32 tensors of the first group go through the flat pass (our update, compared
    # with bitsandbytes in the tests below); the rest is bitsandbytes' own step, bit for bit.
    flat = set().union(*(f.members for f in opt._flat.values()))
    assert len(flat) == 2
    for a, b, t in zip(ours, ref, init):
        assert not torch.equal(a.detach().cpu(), t)
        if a in flat:
            assert _relative_gap(a, b, t) < 0.02
            continue
        assert torch.equal(a, b)
        for k, v in opt.state[a].items():
            assert torch.equal(v, ref_opt.state[b][k]) if torch.is_tensor(v) else v == ref_opt.state[b][k], k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes' CUDA kernels are the reference: its CPU backend "
                    "rounds moments differently (0 does not map to the code of 0)")
def test_split_masters_follow_bitsandbytes_on_float32_copies():
    """The trained-embedding path (bf16 weight + low half, our compiled blockwise update, sparse rows)
    tracks bitsandbytes' AdamW8bit run on float32 copies of the same matrices."""
    bnb = pytest.importorskip("bitsandbytes")
    from cpt.optim import mark_split_master
    from cpt.optim.adamw8bit import AdamW8bit
    from cpt.optim.split_master import join_float32

    g = torch.Generator().manual_seed(0)
    init = [torch.randn(1000, 96, generator=g) * 0.02, torch.randn(517, 64, generator=g) * 0.02]
    init = [t.bfloat16().float().to(DEV) for t in init]  # start from values bf16 holds exactly
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    ours = [torch.nn.Parameter(t.bfloat16()) for t in init]
    for p in ours:
        mark_split_master(p)
    kw = dict(betas=(0.9, 0.999), eps=1e-8)
    ref_opt = bnb.optim.AdamW8bit([{"params": ref, "lr": 1e-4, "weight_decay": 0.01}], **kw)
    opt = AdamW8bit([{"params": ours, "lr": 1e-4, "weight_decay": 0.01}], **kw)
    for _ in range(4):
        rows = torch.randint(0, 1000, (300,), generator=g)
        vals = torch.randn(300, 96, generator=g).bfloat16().to(DEV)
        sparse = torch.sparse_coo_tensor(rows[None].to(DEV), vals, (1000, 96))
        dense = torch.randn(517, 64, generator=g).bfloat16().to(DEV)
        ref[0].grad, ref[1].grad = sparse.coalesce().to_dense().float(), dense.float()
        ours[0].grad, ours[1].grad = sparse, dense
        ref_opt.step()
        opt.step()
    for p, r, start in zip(ours, ref, init):
        master = join_float32(p.detach(), opt.state[p]["lo"])
        assert _relative_gap(master, r, start) < 0.02
        assert (master != start).float().mean() > 0.5
    state = opt.state_dict()
    opt2 = AdamW8bit([{"params": ours, "lr": 1e-4, "weight_decay": 0.01}], **kw)
    opt2.load_state_dict(state)
    assert opt2.state[ours[0]]["lo"].dtype == torch.int16
    assert torch.equal(opt2.state[ours[0]]["lo"], opt.state[ours[0]]["lo"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes' CUDA kernels are the reference: its CPU backend "
                    "rounds moments differently (0 does not map to the code of 0)")
def test_flat_adapter_update_follows_bitsandbytes_and_its_checkpoints_are_interchangeable():
    """Many float32 tensors updated in one flat pass track bitsandbytes' per-tensor AdamW8bit; a state
    saved by one path loads into the other; a step where one tensor has no gradient uses the views."""
    bnb = pytest.importorskip("bitsandbytes")
    from cpt.optim.adamw8bit import AdamW8bit

    g = torch.Generator().manual_seed(0)
    shapes = [(128, 96), (64, 128), (300, 17), (40, 200), (8, 16)]  # the last is below min_8bit_size
    init = [torch.randn(s, generator=g).to(DEV) * 0.02 for s in shapes]
    kw = dict(betas=(0.9, 0.999), eps=1e-8)

    def make(cls, params):
        return cls([{"params": params, "lr": 1e-3, "weight_decay": 0.1}], **kw)

    ref = [torch.nn.Parameter(t.clone()) for t in init]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref_opt, opt = make(bnb.optim.AdamW8bit, ref), make(AdamW8bit, ours)
    assert opt._flat and len(next(iter(opt._flat.values())).members) == 4
    grads = [[torch.randn(s, generator=g).to(DEV) for s in shapes] for _ in range(4)]
    for k, step in enumerate(grads):
        for p, r, gr in zip(ours, ref, step):
            p.grad, r.grad = gr.clone(), gr.clone()
        if k == 2:
            ours[1].grad = ref[1].grad = None  # not every member has a gradient: the per-tensor path
        ref_opt.step()
        opt.step()
    for p, r, t in zip(ours, ref, init):
        assert _relative_gap(p, r, t) < 0.02
        assert opt.state[p]["step"] == ref_opt.state[r]["step"]
    # ours -> bnb and bnb -> ours
    other = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    plain = make(bnb.optim.AdamW8bit, other)
    plain.load_state_dict(opt.state_dict())
    back = make(AdamW8bit, [torch.nn.Parameter(r.detach().clone()) for r in ref])
    back.load_state_dict(ref_opt.state_dict())
    for p in back.param_groups[0]["params"][:4]:
        assert back.state[p]["state1"].data_ptr() != 0 and p.data.data_ptr() >= back._flat[0].master.data_ptr()
    gr = [torch.randn(s, generator=g).to(DEV) for s in shapes]
    for ps in (other, back.param_groups[0]["params"], ours):
        for p, x in zip(ps, gr):
            p.grad = x.clone()
    plain.step()
    back.step()
    opt.step()
    for a, b, c, t in zip(other, back.param_groups[0]["params"], ours, init):
        assert _relative_gap(a, c, t) < 0.02 and _relative_gap(b, c, t) < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the one-launch update is a CUDA kernel")
def test_flat_adapter_update_in_one_launch_equals_the_chunked_update():
    """The adapters' one-launch update (each member's gradient read where it lies) gives bit for bit what
    the chunked update through a flat gradient buffer gives, over several chunks and odd member sizes."""
    pytest.importorskip("triton")
    pytest.importorskip("bitsandbytes")
    from cpt.optim.adamw8bit import AdamW8bit
    g = torch.Generator().manual_seed(3)
    shapes = [(128, 96), (64, 129), (300, 17), (40, 200), (1, 4100)]
    init = [torch.randn(s, generator=g).to(DEV) * 0.02 for s in shapes]
    grads = [[torch.randn(s, generator=g).to(DEV) for s in shapes] for _ in range(3)]
    results = []
    for one_launch in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = AdamW8bit([{"params": params, "lr": 1e-3, "weight_decay": 0.1}], betas=(0.9, 0.999), eps=1e-8,
                        gather=one_launch, chunk_elements=4096)  # several chunks
        flat = opt._flat[0]
        assert len(flat.chunk_members) > 1
        for step in grads:
            for p, gr in zip(params, step):
                p.grad = gr.clone()
            opt.step()
        assert (flat.gathered is not None) == one_launch and opt.kernel.gather == one_launch
        assert all(not torch.equal(p.detach(), t) for p, t in zip(params, init))  # every member moved
        results.append([flat.master.clone(), flat.s1.clone(), flat.s2.clone(), flat.a1.clone(), flat.a2.clone()])
    for a, b in zip(*results):
        assert torch.equal(a, b)
