"""The chunked linear + cross-entropy (cpt.speed.linear_ce) gives the plain loss and gradients; its Triton
pass (cpt.speed.ce_rows) gives the PyTorch path's, and a failure of that pass stays with its run.

    python -m pytest tests/test_speed_linear_ce.py -q
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from speed_helpers import rel

from cpt.speed.linear_ce import TritonRows, fused_linear_cross_entropy, shift_labels


def _inputs(n=37, h=16, v=53, seed=0, ignore=5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.3
    bias = torch.randn(v, generator=g) * 0.1
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.randperm(n, generator=g)[:ignore]] = -100
    return hidden, weight, bias, targets


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("use_bias", [False, True])
def test_linear_ce_matches_plain_fp32(chunk, use_bias):
    hidden, weight, bias, targets = _inputs(seed=chunk)
    num_items = 50  # as when the step's tokens span several micro-batches
    ref_args = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    logits = ref_args[0] @ ref_args[1].t() + (ref_args[2] if use_bias else 0)
    ref = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / num_items
    ref.backward()
    args = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = fused_linear_cross_entropy(args[0], args[1], targets, num_items, bias=args[2] if use_bias else None,
                                     chunk_tokens=chunk)
    (out * 3.0).backward()  # a non-unit upstream gradient must scale every gradient
    assert abs(out.item() - ref.item()) < 1e-5 * abs(ref.item())
    assert rel(args[0].grad, 3 * ref_args[0].grad) < 1e-5
    assert rel(args[1].grad, 3 * ref_args[1].grad) < 1e-5
    if use_bias:
        assert rel(args[2].grad, 3 * ref_args[2].grad) < 1e-5
    else:
        assert args[2].grad is None


def test_linear_ce_default_num_items_is_token_mean():
    hidden, weight, _, targets = _inputs()
    out = fused_linear_cross_entropy(hidden, weight, targets)
    ref = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100)
    assert abs(out.item() - ref.item()) < 1e-5


def test_linear_ce_bf16_hidden_with_float32_master():
    """bf16 activations, float32 trained head (the embedding master), under autocast: same loss and
    gradients as the plain bf16 path within bf16 tolerance; the master's gradient stays float32."""
    hidden, weight, _, targets = _inputs(n=64, h=32, v=97, seed=3)
    h_ref = hidden.bfloat16().requires_grad_()
    w_ref = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = h_ref @ w_ref.t()
    ref = F.cross_entropy(logits.float(), targets, ignore_index=-100)
    ref.backward()
    h = hidden.bfloat16().requires_grad_()
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_linear_cross_entropy(h, w, targets, chunk_tokens=16)
    out.backward()
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    assert abs(out.item() - ref.item()) < 1e-2 * ref.item()
    assert rel(h.grad, h_ref.grad) < 2e-2
    assert rel(w.grad, w_ref.grad) < 2e-2


def test_linear_ce_rejects_mismatched_shapes():
    hidden, weight, _, targets = _inputs()
    with pytest.raises(ValueError, match="hidden size"):
        fused_linear_cross_entropy(hidden[:, :5], weight, targets)
    with pytest.raises(ValueError, match="targets"):
        fused_linear_cross_entropy(hidden, weight, targets[:-1])


def test_shift_labels():
    labels = torch.tensor([[1, 2, 3], [4, -100, 6]])
    assert shift_labels(labels).tolist() == [[2, 3, -100], [-100, 6, -100]]


def test_a_failing_triton_pass_is_remembered_by_its_own_run_only(caplog):
    """A Triton loss pass that fails (a machine where it will not build) warns once and leaves that run
    on the PyTorch path; another run's TritonRows tries again. (CPU logits never take the pass: a
    stand-in pass is called through the CUDA check with a fake tensor type here.)"""
    import logging

    calls = []

    def broken(logits, t, scale, need_grad):
        calls.append(1)
        raise RuntimeError("no Triton on this machine")

    class CudaLike:
        is_cuda, dtype = True, torch.bfloat16

    first = TritonRows()
    first._loaded, first.fn = True, broken
    with caplog.at_level(logging.WARNING, logger="cpt"):
        assert first(CudaLike(), None, 1.0, True) is None
        assert first(CudaLike(), None, 1.0, True) is None
    assert len(calls) == 1 and caplog.text.count("the Triton loss kernel failed") == 1
    assert first.failed == "RuntimeError: no Triton on this machine"
    second = TritonRows()
    second._loaded, second.fn = True, broken
    assert second.failed is None and second(CudaLike(), None, 1.0, True) is None and len(calls) == 2
    # CPU logits: the PyTorch path, the pass is never asked.
    assert TritonRows()(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 1.0, True) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with Triton (run on the device)")
@pytest.mark.parametrize("vocab", [1000, 128256])
def test_cuda_ce_rows_kernel_matches_torch_path(vocab):
    """The Triton pass (loss per row, gradient over the bf16 logits) against the PyTorch path of the
    same chunk: losses to float32 rounding, gradients to one bf16 rounding."""
    from cpt.speed.ce_rows import ce_rows_
    from cpt.speed.linear_ce import _loss_and_grad

    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(96, vocab, device="cuda", generator=g) * 4).bfloat16()
    targets = torch.randint(0, vocab, (96,), device="cuda", generator=g)
    targets[::7] = -100
    total = torch.zeros((), device="cuda")
    ref = _loss_and_grad(logits.clone(), targets, 0.01, True, total)
    mine = logits.clone()
    loss = ce_rows_(mine, targets, 0.01, write_grad=True)
    assert (loss[::7] == 0).all()
    assert abs(loss.sum().item() - total.item()) < 1e-5 * total.item()
    assert (mine.float() - ref.float()).abs().max().item() <= 2 ** -7 * ref.float().abs().max().item()  # one bf16 step
    assert rel(mine, ref) < 1e-3
    assert (mine[::7] == 0).all()
    only = logits.clone()
    assert torch.allclose(ce_rows_(only, targets, 0.01, write_grad=False), loss) and torch.equal(only, logits)
    # Through the run's pass object: the same losses, and it stays on the Triton path.
    rows = TritonRows()
    mine2 = logits.clone()
    assert torch.allclose(rows(mine2, targets, 0.01, True), loss) and torch.equal(mine2, mine) and rows.failed is None
