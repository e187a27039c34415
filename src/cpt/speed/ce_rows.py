"""Cross-entropy of one chunk of bf16 logits, and its gradient written over them, as one Triton kernel.

The chunked loss (speed/linear_ce.py) turns each chunk of logits into its loss and into the
gradient of the logits. In PyTorch that is a float32 copy of the chunk, a logsumexp with its own
float32 temporary, and four more passes over float32 values before the gradient is cast back:
about 1.2 GiB alive for a 1024-token chunk of a 128k vocabulary, and ~20 bytes of traffic per
logit. Here each program takes one row: a first pass finds its log-sum-exp (running maximum and
sum, in float32), a second writes (softmax - onehot) * scale over the row in place. The chunk's
bf16 logits are the only memory (256 MiB for the chunk above), traffic is 6 bytes per logit.

The arithmetic is the PyTorch path's: float32 from the same bf16 logits, the gradient rounded to
bf16 once at the end. Only the summation order of the log-sum-exp differs.

    python -m pytest tests/test_speed_linear_ce.py -q      (on a CUDA machine)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ce_rows_kernel(x_ptr, stride, t_ptr, loss_ptr, n_cols, scale, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride
    t = tl.load(t_ptr + row)
    m = float("-inf")  # running maximum and sum of exp(x - m), float32 once the loop starts
    s = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    valid = t != -100  # the ignore index (a Triton kernel reads no Python globals)
    safe_t = tl.where(valid, t, 0)
    x_t = tl.load(base + safe_t).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - x_t, 0.0))
    if WRITE_GRAD:
        coef = tl.where(valid, scale, 0.0)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse) - tl.where(cols == safe_t, 1.0, 0.0)
            tl.store(base + cols, (p * coef).to(x_ptr.dtype.element_ty), mask=mask)


def ce_rows_(logits: torch.Tensor, targets: torch.Tensor, scale: float, write_grad: bool) -> torch.Tensor:
    """Per-row loss (float32, 0 where the target is -100) of a (rows, vocab) chunk of logits; with
    write_grad, the logits are replaced by d(scale * sum of losses)/d logits, in their own dtype."""
    if logits.stride(1) != 1:
        raise ValueError("ce_rows_: the logits' last dimension must be contiguous")
    rows, cols = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _ce_rows_kernel[(rows,)](logits, logits.stride(0), targets, loss, cols, float(scale), WRITE_GRAD=write_grad,
                             BLOCK=4096, num_warps=8)
    return loss
