"""Float32 masters held as bf16 weight + int16 low half, their blockwise 8-bit AdamW update, and
row-sparse embedding gradients (cpt.optim.split_master, host_state, adamw8bit; cpt.model)."""
import pytest
import torch

import cpt.optim.split_master as sm
from cpt.optim import ROW_SPARSE, SPLIT_MASTER, build_optimizer, clip_grad_norm_, mark_split_master
from cpt.optim.split_master import QuantMaps, join_float32, split_adamw8bit_step, split_float32

SIGNED = torch.cat([torch.linspace(-1, 0, 128), torch.linspace(0, 1, 129)[1:]])  # code 127 is exactly 0
UNSIGNED = torch.linspace(0, 1, 256) ** 2


def _maps():
    return QuantMaps(SIGNED, UNSIGNED, torch.device("cpu"))


def _kernel(device):
    """The optimizer's Triton kernel on CUDA (the updates' PyTorch operations elsewhere)."""
    if torch.device(device).type != "cuda":
        return None
    pytest.importorskip("triton")
    pytest.importorskip("bitsandbytes")
    from cpt.optim.adamw8bit import Kernel

    return Kernel()


def test_split_is_exact_and_its_high_half_is_the_nearest_bf16():
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    x = torch.cat([x[torch.isfinite(x)], torch.tensor([0.0, -0.0, 1e-40, -1e-40, 3.0e38, -3.0e38, 1.0, -1.0])])
    high, low = split_float32(x)
    assert high.dtype == torch.bfloat16 and low.dtype == torch.int16
    assert torch.equal(join_float32(high, low).view(torch.int32), x.view(torch.int32))
    tie = (x.view(torch.int32) & 0xFFFF) == 0x8000  # exactly halfway: we round up in magnitude, torch to even
    assert torch.equal(high[~tie].float(), x[~tie].bfloat16().float())
    assert ((high.float() - x).abs() <= (x.bfloat16().float() - x).abs() * 1.0001 + (x == 0)).all() or tie.any()


def _reference_step(master, grad, m, v, lr, betas, eps, wd, step):
    """Blockwise 8-bit AdamW written plainly: float64, a loop over blocks, nearest value by argmin."""
    b1, b2 = betas
    out_master = master.double().clone().view(-1)
    flat_g = grad.double().reshape(-1)
    n = flat_g.numel()
    q1, q2 = SIGNED.double(), UNSIGNED.double()
    idx1, idx2 = torch.zeros(len(m["q"]), dtype=torch.uint8), torch.zeros(len(v["q"]), dtype=torch.uint8)
    max1, max2 = torch.zeros(len(m["max"]), dtype=torch.float64), torch.zeros(len(v["max"]), dtype=torch.float64)
    for blk in range(len(m["max"])):
        sl = slice(blk * 256, min(n, blk * 256 + 256))
        k = sl.stop - sl.start
        mm = q1[m["q"][blk * 256:blk * 256 + k].long()] * m["max"][blk] * b1 + (1 - b1) * flat_g[sl]
        vv = q2[v["q"][blk * 256:blk * 256 + k].long()] * v["max"][blk] * b2 + (1 - b2) * flat_g[sl] ** 2
        c1, c2 = 1 - b1 ** step, (1 - b2 ** step) ** 0.5
        out_master[sl] = (out_master[sl] - lr * c2 / c1 * mm / (vv.sqrt() + eps * c2)) * (1 - lr * wd)
        max1[blk], max2[blk] = mm.abs().max(), vv.max()
        idx1[blk * 256:blk * 256 + k] = (mm[:, None] / max(max1[blk], 1e-30) - q1[None]).abs().argmin(1).to(torch.uint8)
        idx2[blk * 256:blk * 256 + k] = (vv[:, None] / max(max2[blk], 1e-30) - q2[None]).abs().argmin(1).to(torch.uint8)
    return out_master.view(master.shape), {"q": idx1, "max": max1}, {"q": idx2, "max": max2}


@pytest.mark.parametrize("shape", [(64, 32), (37, 24)])  # the second is not a whole number of blocks
def test_update_matches_a_plain_blockwise_8bit_adamw(shape):
    g = torch.Generator().manual_seed(1)
    master = torch.randn(shape, generator=g) * 0.02
    high, low = split_float32(master)
    p = torch.nn.Parameter(high.clone())
    state = {}
    ref_master = master.clone()
    blocks = -(-master.numel() // 256)
    ref_m = {"q": torch.full((blocks * 256,), 127, dtype=torch.uint8), "max": torch.zeros(blocks, dtype=torch.float64)}
    ref_v = {"q": torch.zeros(blocks * 256, dtype=torch.uint8), "max": torch.zeros(blocks, dtype=torch.float64)}
    for step in range(1, 4):
        grad = torch.randn(shape, generator=g).bfloat16()
        if not state:
            n = blocks * 256
            state = {"state1": torch.full((n,), 127, dtype=torch.uint8), "state2": torch.zeros(n, dtype=torch.uint8),
                     "absmax1": torch.zeros(blocks), "absmax2": torch.zeros(blocks), "lo": low.clone()}
        split_adamw8bit_step(p, grad, state, _maps(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, step=step,
                             chunk_elements=300)  # several chunks per matrix
        ref_master, ref_m, ref_v = _reference_step(ref_master, grad, ref_m, ref_v, 1e-3, (0.9, 0.999), 1e-8, 0.1, step)
        ref_master = ref_master.float()
        n = master.numel()
        assert (state["state1"][:n] == ref_m["q"][:n]).float().mean() > 0.995
        assert (state["state2"][:n] == ref_v["q"][:n]).float().mean() > 0.995
        torch.testing.assert_close(state["absmax1"].double(), ref_m["max"], rtol=1e-5, atol=1e-9)
        ours = join_float32(p.detach(), state["lo"])
        diff = (ours - ref_master).abs()  # a state rounded to the other neighbour moves an element by a little
        assert (diff <= 2e-6).float().mean() > 0.995 and diff.max() < 1e-4
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), split_float32(ours)[0])
        assert (state["state1"][n:] == 127).all() and (state["state2"][n:] == 0).all()  # padding stays at 0
    assert not torch.equal(ours, master)


def _fresh_state(shape):
    blocks = -(-shape[0] * shape[1] // 256)
    return {"state1": torch.full((blocks * 256,), 127, dtype=torch.uint8), "state2": torch.zeros(blocks * 256, dtype=torch.uint8),
            "absmax1": torch.zeros(blocks), "absmax2": torch.zeros(blocks), "lo": torch.zeros(shape, dtype=torch.int16)}


def test_sparse_row_gradient_gives_exactly_the_dense_update():
    """Rows outside the batch still move (their moments decay), as with a dense zero gradient."""
    shape = (50, 16)
    g = torch.Generator().manual_seed(2)
    start = (torch.randn(shape, generator=g) * 0.02).bfloat16()
    dense_p, sparse_p = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    dense_s, sparse_s = _fresh_state(shape), _fresh_state(shape)
    for step in range(1, 4):
        rows = torch.randint(0, shape[0], (12,), generator=g)  # repeats: the sparse tensor is uncoalesced
        vals = torch.randn(12, shape[1], generator=g).bfloat16()
        sparse = torch.sparse_coo_tensor(rows[None], vals, shape)
        dense = sparse.coalesce().to_dense()  # repeated rows summed as the optimizer sums them
        kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, step=step, chunk_elements=256)
        split_adamw8bit_step(dense_p, dense, dense_s, _maps(), **kw)
        split_adamw8bit_step(sparse_p, sparse, sparse_s, _maps(), **kw)
        assert torch.equal(dense_p, sparse_p)
        for k in dense_s:
            assert torch.equal(dense_s[k], sparse_s[k]), k
    assert not torch.equal(dense_p.detach(), start)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the Triton kernel runs on CUDA"))])
def test_rows_marked_skip_stay_exactly_as_they_were(device):
    """A slot of SKIP (the rows an early pass sets aside for the step) leaves the row's weight, low half,
    moment codes and block maxima untouched; every other row gets the update it gets without them. On
    CUDA the Triton kernel, on the CPU the PyTorch operations (chunked, so skipped rows span chunks)."""
    kernel = _kernel(device)
    shape = (20, 512)
    gen = torch.Generator().manual_seed(9)
    start = (torch.randn(shape, generator=gen) * 0.02).bfloat16()
    maps = QuantMaps(SIGNED, UNSIGNED, torch.device(device))
    p_skip, p_ref = (start.clone().to(device) for _ in range(2))
    s_skip, s_ref = ({k: v.to(device) for k, v in _fresh_state(shape).items()} for _ in range(2))
    values = torch.randn(6, shape[1], generator=gen).bfloat16().to(device)
    for step in range(1, 4):
        slot = torch.full((shape[0],), -1, dtype=torch.int64)
        slot[torch.tensor([1, 4, 7, 9, 15, 18])] = torch.arange(6)
        skip = torch.tensor([0, 4, 5, 11, 12, 13, 19])  # with and without a gradient, at chunk edges
        marked = slot.clone()
        marked[skip] = sm.SKIP
        before = [t.clone() for t in (p_skip, s_skip["lo"], s_skip["state1"], s_skip["state2"], s_skip["absmax1"], s_skip["absmax2"])]
        hp = sm.hyperparameters(0.9, 0.999, 1e-3, 1e-8, 0.1, step, torch.device(device))
        for p, st, sl in ((p_skip, s_skip, marked), (p_ref, s_ref, slot)):
            sm.update_split_rows(p, st["lo"], values, sl.to(device), st["state1"], st["state2"], st["absmax1"], st["absmax2"],
                                 maps, hp, kernel=kernel, chunk_elements=256 * 3)
        live = torch.ones(shape[0], dtype=torch.bool)
        live[skip] = False
        rows = [(before[0], p_skip, p_ref), (before[1], s_skip["lo"], s_ref["lo"])]
        rows += [(b.view(shape[0], -1), s_skip[k].view(shape[0], -1), s_ref[k].view(shape[0], -1))
                 for b, k in zip(before[2:], ("state1", "state2", "absmax1", "absmax2"))]
        for b, got, ref in rows:
            assert torch.equal(got[skip.to(device)], b[skip.to(device)]), step
            assert torch.equal(got[live.to(device)], ref[live.to(device)]), step
        # the reference moved the skipped rows: skipping is not a no-op by accident
        assert not torch.equal(p_ref[skip.to(device)], before[0][skip.to(device)])
        p_ref[skip.to(device)] = p_skip[skip.to(device)]
        for k in ("lo", "state1", "state2", "absmax1", "absmax2"):
            s_ref[k].view(shape[0], -1)[skip.to(device)] = s_skip[k].view(shape[0], -1)[skip.to(device)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the Triton kernel runs on CUDA"))])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "row_sparse"])
def test_an_undoable_update_is_taken_back_bit_for_bit_without_a_copy(device, sparse, caplog):
    """split_master.UndoLog: an update made undoable changes nothing in what it writes (but elements whose
    step is not finite, left as they were), and `undo_split_rows` + `UndoLog.apply` give every weight
    back bit for bit from the weights it made, the new low halves and the old states. The weights
    include zeros, signed zeros, subnormals and values far below the step (which the update rounds away:
    those are logged), a weight decay, SKIP rows, and NaN and infinite gradients. A log too small for
    them all restores the rest and says how many it could not."""
    kw = dict(kernel=_kernel(device), chunk_elements=256 * 3)
    dev = torch.device(device)
    shape = (12, 512)
    gen = torch.Generator().manual_seed(4)
    start = torch.randn(shape, generator=gen) * 0.02
    start[0, :8] = torch.tensor([0.0, -0.0, 1e-12, -1e-20, 1e-40, -3e-41, 1e-9, -2e-8])
    start[5, 100:400] *= 1e-6  # a stretch of weights smaller than the step
    maps = QuantMaps(SIGNED, UNSIGNED, dev)
    hi, lo = split_float32(start)
    p_undo, p_ref = hi.clone().to(dev), hi.clone().to(dev)
    st_undo, st_ref = ({k: v.to(dev) for k, v in _fresh_state(shape).items()} for _ in range(2))
    st_ref["lo"], st_undo["lo"] = lo.clone().to(dev), lo.clone().to(dev)
    for step in range(1, 4):
        g = torch.randn(shape, generator=gen).bfloat16()
        if step == 3:
            g[2, 7], g[3, :300], g[8, 5] = float("nan"), float("inf"), -float("inf")
        slot = None
        if sparse:
            slot = torch.full((shape[0],), -1, dtype=torch.int64)
            slot[torch.tensor([0, 2, 3, 5, 8])] = torch.arange(5)
            slot[torch.tensor([1, 9])] = sm.SKIP
            g = g[torch.tensor([0, 2, 3, 5, 8])]
            slot = slot.to(dev)
        g = g.to(dev)
        hp = sm.hyperparameters(0.9, 0.999, 1e-2, 1e-8, 0.1, step, dev)
        old = {k: v.clone() for k, v in st_undo.items()}
        before = p_undo.clone()
        log = sm.UndoLog(dev, capacity=4096 if step < 3 else 40)
        sm.update_split_rows(p_undo, st_undo["lo"], g, slot, st_undo["state1"], st_undo["state2"],
                             st_undo["absmax1"], st_undo["absmax2"], maps, hp, log=log, **kw)
        sm.update_split_rows(p_ref, st_ref["lo"], g, slot, st_ref["state1"], st_ref["state2"],
                             st_ref["absmax1"], st_ref["absmax2"], maps, hp, **kw)
        count = int(log.count.item())
        frozen = torch.zeros(shape, dtype=torch.bool)
        if step == 3:
            frozen[2, 7], frozen[3, :300], frozen[8, 5] = True, True, True
        frozen = frozen.to(dev)
        # what an undoable update writes: the plain update's, but where the step is not finite
        assert torch.equal(p_undo[~frozen], p_ref[~frozen]) and torch.equal(p_undo[frozen], before[frozen])
        assert torch.equal(st_undo["lo"][~frozen], st_ref["lo"][~frozen])
        for k in ("state1", "state2", "absmax1", "absmax2"):  # (NaN maxima in step 3: compared as bits)
            assert torch.equal(st_undo[k].view(torch.uint8), st_ref[k].view(torch.uint8)), k
        assert count > 200 or step > 1  # the small stretch is rounded away (in the first step at least)
        made = p_undo.clone()
        sm.undo_split_rows(p_undo, st_undo["lo"], old["lo"], g, slot, old["state1"], old["state2"],
                           old["absmax1"], old["absmax2"], maps, hp, **kw)
        with caplog.at_level("WARNING", logger="cpt"):
            log.apply(p_undo)
        if count <= log.capacity:
            assert torch.equal(p_undo.view(torch.int16), before.view(torch.int16)), step
        else:  # step 3: the log held 40 of them
            wrong = (p_undo.view(torch.int16) != before.view(torch.int16)).sum().item()
            assert 0 < wrong <= count - 40 and f"{count - 40} of its elements could not be restored" in caplog.text
        # the test goes on from the update, as a committed step would
        p_undo.copy_(made)
        st_ref["lo"].copy_(st_undo["lo"])
        p_ref.copy_(made)


def test_tiny_updates_land_in_the_master_not_in_a_bf16_copy():
    """lr 1e-6 on weights of ~0.02: each update is ~1/40 of a bf16 step."""
    g = torch.Generator().manual_seed(3)
    start = (torch.randn(64, 64, generator=g) * 0.02).bfloat16()
    p = torch.nn.Parameter(start.clone())
    state = _fresh_state(tuple(start.shape))
    plain = torch.nn.Parameter(start.clone())
    plain_opt = torch.optim.AdamW([plain], lr=1e-6, weight_decay=0.0)
    for step in range(1, 6):
        grad = torch.randn(start.shape, generator=g).bfloat16()
        split_adamw8bit_step(p, grad, state, _maps(), lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, step=step)
        plain.grad = grad.clone()
        plain_opt.step()
    master = join_float32(p.detach(), state["lo"])
    assert (master != start.float()).float().mean() > 0.99
    assert (plain.detach() != start).float().mean() < 0.2


def _cuda_grad(shape, step: int, g: torch.Generator) -> torch.Tensor:
    """A bf16 gradient on the GPU: dense on odd steps, row-sparse over a third of the rows (some
    repeated) on even ones."""
    if step % 2:
        return torch.randn(shape, generator=g).bfloat16().cuda()
    rows = torch.randint(0, shape[0], (shape[0] // 3,), generator=g)
    return torch.sparse_coo_tensor(rows[None], torch.randn(len(rows), shape[1], generator=g).bfloat16(), shape).cuda()


def test_clip_grad_norm_sums_repeated_rows_first():
    g = torch.Generator().manual_seed(4)
    a = torch.nn.Parameter(torch.zeros(10, 4))
    b = torch.nn.Parameter(torch.zeros(3, 3))
    rows = torch.tensor([1, 1, 7])
    vals = torch.randn(3, 4, generator=g)
    a.grad = torch.sparse_coo_tensor(rows[None], vals, (10, 4))
    b.grad = torch.randn(3, 3, generator=g)
    a_dense, b_dense = torch.nn.Parameter(torch.zeros(10, 4)), torch.nn.Parameter(torch.zeros(3, 3))
    a_dense.grad, b_dense.grad = a.grad.to_dense(), b.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_([a_dense, b_dense], 0.5)
    got = clip_grad_norm_([a, b], 0.5)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(a.grad.to_dense(), a_dense.grad)
    torch.testing.assert_close(b.grad, b_dense.grad)
    # Without clipping (max_norm inf) the norm is all it does: no gradient is written (an early pass on a
    # side stream may be reading lm_head's while the loop takes the norm).
    version = b.grad._version
    torch.testing.assert_close(clip_grad_norm_([a, b], float("inf")), torch.linalg.vector_norm(
        torch.cat([a.grad.to_dense().reshape(-1), b.grad.reshape(-1)])))
    assert b.grad._version == version


def test_clip_grad_norm_queues_the_dense_norms_before_summing_sparse_rows(monkeypatch):
    """Summing a sparse gradient's repeated rows waits for the GPU; the dense gradients' norms (hundreds
    of adapter tensors) must already be queued by then. Also takes a generator of parameters, and gives
    the same norm for the same gradients in another order."""
    g = torch.Generator().manual_seed(5)
    emb = torch.nn.Parameter(torch.zeros(10, 4))
    emb.grad = torch.sparse_coo_tensor(torch.tensor([[2, 2, 5]]), torch.randn(3, 4, generator=g), (10, 4))
    dense = [torch.nn.Parameter(torch.zeros(3, 3)) for _ in range(2)] + [torch.nn.Parameter(torch.zeros(5, dtype=torch.bfloat16))]
    for q in dense:
        q.grad = torch.randn(q.shape, generator=g).to(q.dtype)
    seen = []
    norm, coalesce = torch._foreach_norm, torch.Tensor.coalesce
    monkeypatch.setattr(torch, "_foreach_norm", lambda ts, *a, **k: seen.append(("norm", len(ts))) or norm(ts, *a, **k))
    monkeypatch.setattr(torch.Tensor, "coalesce", lambda t: seen.append(("coalesce",)) or coalesce(t))
    got = clip_grad_norm_((q for q in [emb, *dense]), float("inf"))
    assert seen[:3] == [("norm", 2), ("norm", 1), ("coalesce",)] and seen[3:] == [("norm", 1)]
    monkeypatch.undo()
    shuffled = clip_grad_norm_([dense[2], dense[0], emb, dense[1]], float("inf"))
    torch.testing.assert_close(got, shuffled)


def test_model_holds_split_masters_and_sparse_embedding_gradients(tiny_model_dir):
    """bf16 LoRA with the 8-bit optimizer: bf16 trained copies marked as split masters, a row-sparse
    embed_tokens gradient, the same loss as float32 masters within bf16 rounding; one update lands."""
    from transformers import AutoModelForCausalLM

    from cpt.config import load_config
    from cpt.model import add_adapters, sparse_gradients, trained_embedding_modules

    def build(split: bool):  # split: what the run plan asks for with train.optim=adamw_8bit in bf16
        cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "adapter.r=8", "model.max_seq_length=64",
                                 "adapter.use_gradient_checkpointing=false"])
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
        for q in base.parameters():
            q.requires_grad_(False)
        return add_adapters(base, cfg.adapter, torch.bfloat16, split_masters=split, sparse_embedding_grad=split)

    split = build(True)
    plain = build(False)
    mods = trained_embedding_modules(split)
    assert all(m.weight.dtype == torch.bfloat16 and getattr(m.weight, SPLIT_MASTER, False) for m in mods.values())
    assert mods["embed_tokens"].sparse and sparse_gradients(split) and not sparse_gradients(plain)
    assert all(m.weight.dtype == torch.float32 for m in trained_embedding_modules(plain).values())
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(5))
    losses = []
    for model in (split, plain):
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss.item())
    assert abs(losses[0] - losses[1]) < 0.02 * abs(losses[1])
    emb, head = mods["embed_tokens"].weight, mods["lm_head"].weight
    assert emb.grad.is_sparse and set(emb.grad.coalesce().indices()[0].tolist()) == set(ids.unique().tolist())
    assert not head.grad.is_sparse and head.grad.dtype == torch.bfloat16
    for w in (emb, head):
        state = _fresh_state(tuple(w.shape))
        before = w.detach().clone()
        nonzero = w.grad.to_dense() != 0  # every element with a gradient moves by ~lr, the others stay
        split_adamw8bit_step(w, w.grad, state, _maps(), lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, step=1)
        moved = join_float32(w.detach(), state["lo"]) != before.float()
        assert torch.equal(moved, nonzero) and nonzero.float().mean() > (0.1 if w is emb else 0.9)
        assert (w.detach() != before).float().mean() < 0.1  # the bf16 weight alone would have lost it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on CUDA")
def test_triton_kernel_gives_the_pytorch_update():
    """cpt.optim.adamw8bit's kernel against the PyTorch definition: split masters with dense and row-sparse
    gradients (matrix sizes that are not whole blocks included), and plain float32 buffers."""
    kernel = _kernel("cuda")
    from cpt.optim.adamw8bit import adamw8bit_update

    cuda = torch.device("cuda")
    maps = QuantMaps(SIGNED, UNSIGNED, cuda)
    g = torch.Generator().manual_seed(7)
    # (300, 512): rows of whole blocks (the kernel reads one slot per block), as for an 8B model's embed_tokens
    for shape in [(640, 96), (37, 24), (1000, 64), (300, 512)]:
        start = (torch.randn(shape, generator=g) * 0.02).bfloat16().cuda()
        ref_p, p = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
        ref_s, s = ({k: v.cuda() for k, v in _fresh_state(shape).items()} for _ in range(2))
        for step in range(1, 5):
            grad = _cuda_grad(shape, step, g)
            kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, step=step)
            split_adamw8bit_step(ref_p, grad, ref_s, maps, **kw)  # the PyTorch operations
            split_adamw8bit_step(p, grad, s, maps, kernel=kernel, **kw)
            assert not kernel.failed
            ours, ref = join_float32(p.detach(), s["lo"]), join_float32(ref_p.detach(), ref_s["lo"])
            # The GPU's division and square root round differently from PyTorch's in the last bit, which
            # can move a moment that lies on a midpoint to the neighbouring value: rare, and small.
            assert ((ours - ref).abs() <= 1e-7).float().mean() > 0.99
            assert float((ours - ref).norm() / (ref - start.float()).norm()) < 0.01
            assert (s["state1"] == ref_s["state1"]).float().mean() > 0.999
            assert (s["state2"] == ref_s["state2"]).float().mean() > 0.999
    n = 5000
    npad = -(-n // 256) * 256
    a = torch.zeros(npad, device=cuda)
    a[:n] = torch.randn(n, generator=g).cuda() * 0.02
    b = a.clone()
    sa = ([torch.full((npad,), 127, dtype=torch.uint8, device=cuda), torch.zeros(npad, dtype=torch.uint8, device=cuda)]
          + [torch.zeros(npad // 256, device=cuda) for _ in range(2)])
    sb = [t.clone() for t in sa]
    for step in range(1, 4):
        gr = torch.zeros(npad, device=cuda)
        gr[:n] = torch.randn(n, generator=g).cuda()
        hp = sm.hyperparameters(0.9, 0.999, 1e-3, 1e-8, 0.0, step, cuda)
        sm.update_flat(a, gr, *sa, maps, hp)
        adamw8bit_update(b, None, gr, None, *sb, maps, hp)
        assert ((a - b).abs() <= 1e-7).float().mean() > 0.99 and (sa[0] == sb[0]).float().mean() > 0.999
        assert not a[n:].any() and not b[n:].any()  # padding starts at the code of 0 and stays 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on CUDA")
@pytest.mark.parametrize("shape", [(4, 4, 0), (2, 2, 0), (1, 1, 7), (2, 1, 300)])
def test_triton_kernel_launch_shapes_give_the_same_update(shape):
    """cpt.optim.adamw8bit's kernel launched with other blocks per program, warps, or a fixed number of
    looping programs (AdamW8bit's launch and side_launch) does bit for bit what the default launch does,
    for split masters with dense and row-sparse gradients."""
    _kernel("cuda")
    from cpt.optim.adamw8bit import LAUNCH, adamw8bit_update

    cuda = torch.device("cuda")
    maps = QuantMaps(SIGNED, UNSIGNED, cuda)
    g = torch.Generator().manual_seed(11)
    for size in [(640, 96), (37, 24), (300, 512)]:
        start = (torch.randn(size, generator=g) * 0.02).bfloat16().cuda()
        hi = [start.clone(), start.clone()]
        st = [{k: v.cuda() for k, v in _fresh_state(size).items()} for _ in range(2)]
        for step in range(1, 4):
            grad = _cuda_grad(size, step, g)
            values, slot = sm.grad_table(hi[0], grad)
            hp = sm.hyperparameters(0.9, 0.999, 1e-3, 1e-8, 0.1, step, cuda)
            for h, s, launch in zip(hi, st, (LAUNCH, shape)):
                adamw8bit_update(h, s["lo"], values, slot, s["state1"], s["state2"], s["absmax1"], s["absmax2"], maps, hp,
                                 shape=launch)
        assert not torch.equal(hi[1], start)
        assert torch.equal(hi[0], hi[1]) and all(torch.equal(st[0][k], st[1][k]) for k in st[0])


def _dynamic_maps():
    bnb = pytest.importorskip("bitsandbytes.functional")
    return bnb.create_dynamic_map(signed=True).float().sort()[0], bnb.create_dynamic_map(signed=False).float().sort()[0]


@pytest.mark.parametrize("which", ["linear", "dynamic"])
def test_bucket_table_rounds_exactly_as_bucketize(which):
    """The GPU kernel rounds a moment to its 8-bit code with split_master.BucketTable (a lookup keyed by the
    value's leading bits, then a compare or two) instead of a binary search: the same arithmetic in
    PyTorch gives torch.bucketize's answer for every midpoint, its neighbouring floats, both zeros,
    +-1, subnormals, values beyond the map, and a spread of magnitudes down to 1e-35."""
    from cpt.optim.split_master import BucketTable

    signed, unsigned = (SIGNED, UNSIGNED) if which == "linear" else _dynamic_maps()
    maps = QuantMaps(signed, unsigned, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    for table, mid in ((maps.table1, maps.mid1), (maps.table2, maps.mid2)):
        assert table.steps is not None and table.steps <= 2 and 2 * table.keys <= BucketTable.MAX_ENTRIES
        assert torch.equal(table.on(torch.device("cpu")), table.start) and table.start.numel() == 2 * table.keys
        x = torch.cat([mid, -mid, torch.nextafter(mid, torch.tensor(2.0)), torch.nextafter(mid, torch.tensor(-2.0)),
                       torch.rand(50000, generator=g) * 2 - 1,
                       torch.exp(-80 * torch.rand(50000, generator=g)) * torch.randn(50000, generator=g).sign(),
                       torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1e-38, 3.0, -3.0, float("inf"), float("-inf")])])
        assert torch.equal(table.bucketize(x, mid), torch.bucketize(x, mid))


def test_8bit_loop_with_split_masters_learns_and_resumes_exactly(tiny_model_dir, corpus_dir, tmp_path):
    """The whole loop on the CPU with adamw_8bit in bf16: split embedding masters, a row-sparse
    embed_tokens gradient clipped with the rest, the flat adapter pass (r=64 makes adapter tensors of
    4096 elements). The loss falls; a run stopped after its step-4 checkpoint and resumed in a new
    Trainer matches the uninterrupted run step for step and bit for bit (the low halves come back
    from optimizer.pt)."""
    pytest.importorskip("bitsandbytes")
    import json

    from safetensors.torch import load_file

    from cpt.api import run_training
    from cpt.config import load_config

    def cfg(out, steps):
        return load_config(None, [
            f"model.name_or_path={tiny_model_dir}", "model.max_seq_length=32", "model.dtype=bfloat16", f"data.path={corpus_dir}",
            "adapter.r=64", "adapter.lora_alpha=16", "adapter.use_gradient_checkpointing=false", "train.optim=adamw_8bit",
            "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=2", "train.learning_rate=5e-3",
            "train.embedding_learning_rate=1e-3", "train.warmup_ratio=0", "train.lr_scheduler_type=constant",
            "train.max_grad_norm=1.0", f"train.max_steps={steps}",
            f"output.output_dir={out}", "output.logging_steps=1", "output.save_steps=4", "output.report=false",
            "eval.eval_at_start=false"])

    def losses(out):
        return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_training(cfg(whole, 8))
    run_training(cfg(parts, 4))
    run_training(cfg(parts, 8))  # resumes from checkpoint-4
    a, b = losses(whole), losses(parts)
    assert list(a) == list(range(1, 9)) and a[8] < a[1]
    assert all(a[s] == b[s] for s in range(1, 9)), (a, b)
    saved = repr(torch.load(parts / "checkpoint-4" / "optimizer.pt", weights_only=False))
    assert "'lo': tensor(" in saved and "dtype=torch.int16" in saved  # the low halves are in the checkpoint
    wa, wb = load_file(str(whole / "adapter_model.safetensors")), load_file(str(parts / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any("embed_tokens" in k and wa[k].dtype == torch.bfloat16 for k in wa)


def test_host_resident_state_streams_to_the_same_update():
    """train.offload_embedding_state: the low halves and moment codes wait in host memory and pass
    through staging chunks (here many chunks and every staging buffer reused several times, one
    matrix that is not a whole number of blocks, one row-sparse gradient): bit for bit the update
    made where the states live."""
    from cpt.optim import host_state

    stream = host_state.HostStream(chunk_elements=200)
    g = torch.Generator().manual_seed(11)
    shapes = [(37, 24), (50, 16)]
    starts = [(torch.randn(s, generator=g) * 0.02).bfloat16() for s in shapes]
    here = [torch.nn.Parameter(s.clone()) for s in starts]
    streamed = [torch.nn.Parameter(s.clone()) for s in starts]
    here_s, streamed_s = [_fresh_state(s) for s in shapes], [_fresh_state(s) for s in shapes]
    for step in range(1, 5):
        dense = torch.randn(shapes[0], generator=g).bfloat16()
        rows = torch.randint(0, shapes[1][0], (9,), generator=g)
        sparse = torch.sparse_coo_tensor(rows[None], torch.randn(9, shapes[1][1], generator=g).bfloat16(), shapes[1])
        kws = [dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd, step=step) for wd in (0.1, 0.0)]
        for p, grad, s, kw in zip(here, (dense, sparse), here_s, kws):
            split_adamw8bit_step(p, grad, s, _maps(), chunk_elements=256, **kw)
        jobs = []
        for p, grad, st, kw in zip(streamed, (dense, sparse), streamed_s, kws):
            g_, slot = sm.grad_table(p, grad)
            hp = sm.hyperparameters(*kw["betas"], kw["lr"], kw["eps"], kw["weight_decay"], kw["step"], p.device)
            jobs.append(host_state.Job(p, st, st, hp, g_, slot))
        stream.launch(jobs, _maps())
        for a, b, sa, sb in zip(here, streamed, here_s, streamed_s):
            assert torch.equal(a, b)
            for k in sa:
                assert torch.equal(sa[k], sb[k]), (step, k)
    assert all(not torch.equal(p.detach(), s) for p, s in zip(streamed, starts))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-resident states stream to a CUDA device")
def test_optimizer_keeps_embedding_states_in_host_memory_and_checkpoints_them():
    pytest.importorskip("bitsandbytes")
    from cpt.optim.adamw8bit import AdamW8bit

    g = torch.Generator().manual_seed(12)
    shapes = [(3000, 128), (3000, 128)]
    starts = [(torch.randn(s, generator=g) * 0.02).bfloat16().cuda() for s in shapes]

    def make(host):
        ps = [torch.nn.Parameter(s.clone()) for s in starts]
        for p in ps:
            mark_split_master(p)
        return ps, AdamW8bit([{"params": ps, "lr": 1e-3, "weight_decay": 0.0}], host_split_state=host)

    def grads(step):
        gen = torch.Generator().manual_seed(100 + step)
        dense = torch.randn(shapes[0], generator=gen).bfloat16().cuda()
        rows = torch.randint(0, shapes[1][0], (500,), generator=gen)
        sparse = torch.sparse_coo_tensor(rows[None], torch.randn(500, shapes[1][1], generator=gen).bfloat16(), shapes[1]).cuda()
        return dense, sparse

    (dev_p, dev_opt), (host_p, host_opt) = make(False), make(True)
    for step in range(1, 4):
        for ps, opt in ((dev_p, dev_opt), (host_p, host_opt)):
            for p, gr in zip(ps, grads(step)):
                p.grad = gr
            opt.step()
        torch.cuda.synchronize()
        for a, b in zip(dev_p, host_p):
            assert torch.equal(a, b)
            sa, sb = dev_opt.state[a], host_opt.state[b]
            for k in sm.HOST_KEYS:
                assert sb[k].device.type == "cpu" and sb[k].is_pinned() and sa[k].is_cuda
                assert torch.equal(sa[k].cpu(), sb[k]), k
            assert sb["absmax1"].is_cuda and torch.equal(sa["absmax1"], sb["absmax1"])
    # A checkpoint round trip: the states go back to host memory, never through the GPU, and go on alike.
    saved = host_opt.state_dict()
    (res_p, res_opt) = make(True)
    for p, q in zip(res_p, host_p):
        p.data.copy_(q.data)
    res_opt.load_state_dict({k: v for k, v in saved.items()})
    for p in res_p:
        st = res_opt.state[p]
        assert all(st[k].device.type == "cpu" and st[k].is_pinned() for k in sm.HOST_KEYS) and st["absmax2"].is_cuda
    for ps, opt in ((host_p, host_opt), (res_p, res_opt)):
        for p, gr in zip(ps, grads(9)):
            p.grad = gr
        opt.step()
    torch.cuda.synchronize()
    for a, b in zip(host_p, res_p):
        assert torch.equal(a, b) and torch.equal(host_opt.state[a]["lo"], res_opt.state[b]["lo"])


def test_offload_switch_says_when_it_has_nothing_to_move(caplog):
    """On the CPU (or without split masters) the states already live where the weights do: a warning, and
    the optimizer keeps them there."""
    pytest.importorskip("bitsandbytes")
    from cpt.config import TrainConfig

    p = torch.nn.Parameter(torch.zeros(64, 64, dtype=torch.bfloat16))
    mark_split_master(p)
    t = TrainConfig(optim="adamw_8bit")
    with caplog.at_level("WARNING", logger="cpt"):
        opt = build_optimizer([{"params": [p], "lr": 1e-3, "weight_decay": 0.0, "name": "embeddings"}], t,
                              torch.device("cpu"), offload_embedding_state=True)
    assert not opt.host_split_state
    assert "offload_embedding_state has nothing to move" in caplog.text


def _early_case(host: bool, seed: int = 21, device: str = "cpu", **knobs):
    """Two split masters as in a model: a row-sparse embedding (a whole number of blocks per row) and
    a dense head, their gradients made by autograd (so that gradient hooks fire)."""
    pytest.importorskip("bitsandbytes")
    from cpt.optim.adamw8bit import AdamW8bit

    g = torch.Generator().manual_seed(seed)
    vocab, width = 40, 256
    w = torch.randn(2, vocab, width, generator=g) * 0.02
    w[:, 3, :6] = torch.tensor([0.0, -0.0, 1e-30, -1e-12, 1e-9, -1e-40])  # rounded away by a step (undo logs them)
    emb, head = (torch.nn.Parameter(x.bfloat16().to(device)) for x in w)
    for p in (emb, head):
        mark_split_master(p)
    setattr(emb, ROW_SPARSE, True)
    opt = AdamW8bit([{"params": [emb, head], "lr": 1e-3, "weight_decay": 0.0}], host_split_state=host, **knobs)
    return emb, head, opt


def _forward(emb, head, ids):
    h = torch.nn.functional.embedding(ids, emb, sparse=True).float()
    return torch.logsumexp(h @ head.float().T, -1).mean()


@pytest.mark.parametrize("device", ["cpu", "cpu_thread", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="side streams, pinned memory and the Triton scatter need CUDA"))])
def test_early_passes_give_the_step_bit_for_bit_and_a_skipped_step_leaves_everything(device):
    """cpt.optim.host_state.EarlyStep on the CPU (the same code the GPU runs on side streams): embed_tokens'
    rows outside the batch updated before the backward pass, lm_head's update as soon as its gradient
    is complete (no clipping) or at the step (clipping), the batch's rows at the step; a skipped step
    undone (after an early lm_head update, one of them with a NaN loss) without a copy of the weights;
    a gradient row the ids did not name done at the step. Weights and states equal, bit for bit,
    those of the same optimizer updating in place. cpu_thread: the early passes run in the Feeder's
    thread, as they are queued on a GPU, beside the backward pass."""
    thread = device == "cpu_thread"
    device = "cpu" if thread else device
    ref_emb, ref_head, ref = _early_case(False, device=device)
    # several chunks, buffers reused
    emb, head, opt = _early_case(True, device=device, staging_elements=256 * 7, feeder_on_cpu=thread)
    gen = torch.Generator().manual_seed(5)
    logged = 0
    for step in range(8):
        ids = torch.randint(0, 40, (3, 5), generator=gen).to(device)
        clipping = step % 2 == 1
        skipped = step in (0, 2, 3, 4)  # 0: lm_head's tiny weights are rounded away by the early update
        named = ids if step != 5 else ids[:, :2]  # step 5: the loop names fewer rows than the batch uses
        before = (emb.detach().clone(), head.detach().clone(),
                  {k: v.clone() for k, v in opt.state[emb].items() if isinstance(v, torch.Tensor)},
                  {k: v.clone() for k, v in opt.state[head].items() if isinstance(v, torch.Tensor)})
        losses = [_forward(e, h, ids) for e, h in ((ref_emb, ref_head), (emb, head))]
        if step == 4:
            losses[1] = losses[1] * float("nan")  # every gradient NaN: the early lm_head update leaves it
        opt.start_early(named, clipping)  # as the loop does: after the forward pass, before the backward
        for loss in losses:
            loss.backward()
        if skipped:
            opt.host_stream.wait(emb.device)
            assert not torch.equal(emb, before[0]) or step == 0  # the early pass did move them (step 0: no moments yet)
            assert torch.equal(head, before[1]) == (clipping or step == 4)  # lm_head's too, unless clipped or NaN
            logged += sum(int(x["log"].count.item()) for x in opt._early.spares.values())
            opt.abandon_early()
            assert torch.equal(emb.view(torch.int16), before[0].view(torch.int16))
            assert torch.equal(head.view(torch.int16), before[1].view(torch.int16))
            for p, b in ((emb, before[2]), (head, before[3])):
                assert all(torch.equal(opt.state[p][k], v) for k, v in b.items())
        else:
            ref.step()
            opt.step()
        for o in (ref, opt):
            o.zero_grad(set_to_none=True)
        if skipped:
            continue
        for a, b in ((ref_emb, emb), (ref_head, head)):
            assert torch.equal(a, b), step
            for k in ("lo", "state1", "state2", "absmax1", "absmax2"):
                assert torch.equal(ref.state[a][k].cpu(), opt.state[b][k].cpu()), (step, k)
            if device == "cuda":
                assert opt.state[b]["lo"].is_pinned() and opt.state[b]["absmax1"].is_cuda
            assert ref.state[a]["step"] == opt.state[b]["step"]
    assert opt._early is not None and not opt._early.pending and logged > 0
    assert (opt.host_stream.feeder(emb.device, make=False) is not None) == (thread or device == "cuda")


def test_feeder_keeps_order_and_hands_a_failure_to_the_loop():
    """host_state.Feeder: passes run in the order handed over, drain waits for them, and an error in
    the thread comes back to the loop's thread (once), naming the device; later passes run again."""
    from cpt.optim import host_state

    f = host_state.Feeder(torch.device("cpu"))
    seen = []
    gate = __import__("threading").Event()
    f.submit(lambda: (gate.wait(5), seen.append(1)))
    f.submit(lambda: seen.append(2))
    assert seen == []  # the first waits for the gate: nothing ran ahead of it
    gate.set()
    f.drain()
    assert seen == [1, 2]

    def boom():
        raise ValueError("staging buffer")
    f.submit(boom)
    f.submit(lambda: seen.append(3))  # after a failure nothing more runs until drain reports it
    with pytest.raises(RuntimeError, match="host-resident embedding states failed on cpu: ValueError: staging buffer"):
        f.drain()
    assert seen == [1, 2]
    f.submit(lambda: seen.append(4))
    f.drain()
    assert seen == [1, 2, 4]

    # A pass and what it holds (a step's gradient) are let go of once it has run, not when the next
    # pass arrives.
    import gc
    import weakref

    class Grad:
        pass

    g = Grad()
    gone = weakref.ref(g)
    f.submit(lambda g=g: seen.append(g))
    f.drain()
    seen.pop()
    del g
    gc.collect()
    assert gone() is None


@pytest.mark.parametrize("end", ["close", "garbage"])
def test_an_optimizer_takes_its_feeder_thread_with_it(end):
    """The host-state thread, staging buffers and gradient hooks belong to one optimizer: close() ends
    the thread, and so does letting go of the optimizer (the parameters it trained do not keep it)."""
    import gc
    import weakref

    emb, head, opt = _early_case(True, feeder_on_cpu=True)
    ids = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(1))
    loss = _forward(emb, head, ids)
    opt.start_early(ids, False)
    loss.backward()
    opt.step()
    thread = opt.host_stream.feeder(emb.device, make=False).thread
    assert thread.is_alive()
    if end == "close":
        opt.close()
        assert not opt.host_stream.feeders
    else:
        gone = weakref.ref(opt)
        del opt
        gc.collect()
        assert gone() is None
    thread.join(5)
    assert not thread.is_alive()


@pytest.mark.parametrize("thread", [False, True], ids=["inline", "feeder_thread"])
def test_8bit_loop_with_host_resident_states_matches_the_plain_loop(tiny_wide_model_dir, corpus_dir, tmp_path, monkeypatch, thread, request):
    """The loop's side of train.offload_embedding_state (start the early passes before the last
    micro-batch's backward, commit at the step, resume from optimizer.pt), run on the CPU by letting
    the optimizer treat host memory as 'off the device': losses and adapter bit for bit those of the
    plain run, a stopped-and-resumed run included; with the early passes in the Feeder's thread too."""
    pytest.importorskip("bitsandbytes")
    if thread:
        # On the CPU the Feeder's passes really run beside the backward pass, and two threads in
        # ATen at once can split a reduction differently (the last bits of a loss): one intra-op
        # thread keeps both runs' arithmetic the same. (On a GPU the Feeder only queues work.)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        request.addfinalizer(lambda: torch.set_num_threads(threads))
    import json

    from safetensors.torch import load_file

    import cpt.train as cpt_train
    from cpt.api import run_training
    from cpt.config import load_config

    def cfg(out, steps, width):
        return load_config(None, [
            f"model.name_or_path={tiny_wide_model_dir}", "model.max_seq_length=32", "model.dtype=bfloat16", f"data.path={corpus_dir}",
            "adapter.r=8", "adapter.lora_alpha=16", "adapter.use_gradient_checkpointing=false", "train.optim=adamw_8bit",
            "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=2", "train.learning_rate=5e-3",
            "train.embedding_learning_rate=1e-3", "train.warmup_ratio=0", "train.lr_scheduler_type=constant",
            f"train.max_grad_norm={width}", f"train.max_steps={steps}",
            f"output.output_dir={out}", "output.logging_steps=1", "output.save_steps=3", "output.report=false",
            "eval.eval_at_start=false"])

    def losses(out):
        return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}

    from cpt.optim import host_state

    plain_build = cpt_train.build_optimizer
    started = []
    plain_start = host_state.EarlyStep.start

    def counted_start(self, group, p, rows):
        started.append("rows" if rows is not None else "whole")
        return plain_start(self, group, p, rows)

    monkeypatch.setattr(host_state.EarlyStep, "start", counted_start)

    built = []

    def host_build(groups, t, device, **kw):
        # the states "off the device" on the CPU too; the early passes in the Feeder's thread or inline
        opt = plain_build(groups, t, device, feeder_on_cpu=thread, **kw)
        opt.host_split_state = True
        built.append(opt)
        return opt

    for clip in (1.0, 0.0):
        plain, host = tmp_path / f"plain{clip}", tmp_path / f"host{clip}"
        run_training(cfg(plain, 6, clip))
        monkeypatch.setattr(cpt_train, "build_optimizer", host_build)
        run_training(cfg(host, 3, clip))
        run_training(cfg(host, 6, clip))  # resumes from checkpoint-3
        monkeypatch.setattr(cpt_train, "build_optimizer", plain_build)
        a, b = losses(plain), losses(host)
        assert list(a) == list(range(1, 7)) and all(a[s] == b[s] for s in a), (clip, a, b)
        # embed_tokens' rows outside the batch every step; lm_head's whole update only without clipping
        assert started.count("rows") == 6 and started.count("whole") == (6 if clip == 0.0 else 0), started
        started.clear()
        wa, wb = load_file(str(plain / "adapter_model.safetensors")), load_file(str(host / "adapter_model.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
        # the loop runs on a GPU where there is one
        assert all(bool(o.host_stream.feeders) == (thread or torch.cuda.is_available()) for o in built) and built
        built.clear()
