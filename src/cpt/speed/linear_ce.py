"""Fused, chunked linear + cross-entropy for a trained output head: the full logits never exist.

With a 128k vocabulary the logits of one 2 x 2048 micro-batch are 4096 x 128256 values: 1 GiB in
bf16, 2 GiB once upcast to float32 for the loss, and as much again for their gradient. Here the
tokens are cut into chunks; each chunk's logits are made, turned into the loss and into the
gradient of the logits at once (softmax minus one-hot, scaled), and that gradient is pushed
straight into the gradients of the hidden states and of the head's weight. Only one chunk of
logits is alive at a time, so peak memory drops by gigabytes and the backward pass has nothing
left to do but scale by the incoming gradient. On CUDA a Triton pass (speed/ce_rows.py) makes the
loss and the gradient from the bf16 logits in place; elsewhere PyTorch operations in float32 do.
Whether that pass works on this machine is remembered by a `TritonRows` object that the run owns
(cpt.speed.Speed): one failure sends that run to the PyTorch path, never another run.

Gemma 2 soft-caps its logits (cap * tanh(logits / cap)) before the loss: with `softcap` each chunk is
capped in float32 and its gradient carries the tanh's derivative. Those chunks take the PyTorch path
(the Triton pass knows no cap).

The head's weight may be a float32 master (the trained lm_head copy) while hidden states are
bf16: the weight is cast once per call to the compute dtype, and its gradient is accumulated in
the weight's own dtype, so a float32 master gets a float32 gradient.

    python -m pytest tests/test_speed_linear_ce.py -q
"""
from __future__ import annotations

import math
from typing import Optional

import torch

IGNORE_INDEX = -100
# Logits per chunk: 256 MiB in bf16 on CUDA (where the Triton pass works on them in place; the
# PyTorch path holds about five times that), large enough that a chunk's three matmuls run at full rate.
_CHUNK_ELEMENTS = 1 << 27


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on, else the hidden states'."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                targets: torch.Tensor, scale: float, compute_dtype: torch.dtype, chunk: int,
                rows: "TritonRows", softcap: Optional[float]) -> torch.Tensor:
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        n = hidden.shape[0]
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        grad_h = torch.empty_like(hidden) if need_h else None
        # A float32 master gets a float32 gradient; a bf16 weight accumulates in bf16 across
        # chunks (each chunk's matmul accumulates in float32 inside).
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=hidden.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk):
                end = min(start + chunk, n)
                h = hidden[start:end].to(compute_dtype)
                t = targets[start:end]
                logits = h @ w.t()
                if b is not None:
                    logits = logits + b
                need_grad = need_h or need_w or need_b
                per_row = rows(logits, t, scale, need_grad) if not softcap else None
                if softcap:
                    g = _capped_loss_and_grad(logits, t, scale, need_grad, total, softcap)
                elif per_row is not None:  # one Triton pass per row: the loss, the gradient written over the logits
                    total += per_row.sum()
                    g = logits
                else:
                    g = _loss_and_grad(logits, t, scale, need_grad, total)
                del logits
                if not need_grad:
                    continue
                if need_h:
                    grad_h[start:end] = (g @ w).to(hidden.dtype)
                if need_w:
                    if grad_w.dtype == compute_dtype:
                        grad_w.addmm_(g.t(), h)
                    else:
                        grad_w.add_(g.t() @ h)
                if need_b:
                    grad_b += g.float().sum(0)
                del g
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return total * scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        # The loss is a scalar at the very end of the graph: grad_out is almost always 1 (or the
        # fp16 loss scale); scale in place rather than allocating another gigabyte. On a GPU the
        # scaling always runs (about 0.5 ms for an 8B model's head): asking whether grad_out is 1 would
        # make the host wait for the whole forward pass here, and the backward pass would start with
        # nothing queued (docs/performance.md, keeping the host ahead).
        if grad_out.device.type != "cpu" or not (grad_out.numel() == 1 and float(grad_out) == 1.0):
            for g in (grad_h, grad_w, grad_b):
                if g is not None:
                    g.mul_(grad_out.to(g.dtype))
        if grad_b is not None:
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def _capped_loss_and_grad(logits: torch.Tensor, t: torch.Tensor, scale: float, need_grad: bool, total: torch.Tensor,
                          cap: float) -> Optional[torch.Tensor]:
    """`_loss_and_grad` of cap * tanh(logits / cap): the loss of the capped logits, the gradient times
    the cap's derivative 1 - tanh^2, in the logits' dtype."""
    dtype = logits.dtype
    th = torch.tanh(logits.float() / cap)
    g = _loss_and_grad(th * cap, t, scale, need_grad, total)
    if g is None:
        return None
    return g.mul_(th.square_().neg_().add_(1.0)).to(dtype)


def _loss_and_grad(logits: torch.Tensor, t: torch.Tensor, scale: float, need_grad: bool,
                   total: torch.Tensor) -> Optional[torch.Tensor]:
    """The PyTorch path of one chunk: adds its summed loss to `total`, returns d loss / d logits
    ((softmax - onehot) * scale, zero on ignored positions) in the logits' dtype."""
    dtype = logits.dtype
    logits = logits.float()
    valid = t != IGNORE_INDEX
    safe_t = torch.where(valid, t, torch.zeros_like(t))
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
    total += ((lse - target_logit) * valid).sum()
    if not need_grad:
        return None
    probs = logits.sub_(lse[:, None]).exp_()
    probs.scatter_add_(1, safe_t[:, None], -torch.ones_like(lse)[:, None])
    probs.mul_((valid.to(probs.dtype) * scale)[:, None])
    return probs.to(dtype)


class TritonRows:
    """speed/ce_rows.py's pass for CUDA logits in 16-bit, with its own memory of whether it works here:
    None (then the PyTorch path runs) where there is no Triton, or after it failed once (a warning)."""

    def __init__(self) -> None:
        self.fn = None
        self.failed: Optional[str] = None
        self._loaded = False

    def __call__(self, logits: torch.Tensor, t: torch.Tensor, scale: float, need_grad: bool) -> Optional[torch.Tensor]:
        """The per-row losses of one chunk (the gradient written over the logits), or None."""
        if not logits.is_cuda or logits.dtype not in (torch.bfloat16, torch.float16) or self.failed is not None:
            return None
        if not self._loaded:
            self._loaded = True
            try:
                from cpt.speed.ce_rows import ce_rows_
            except ImportError:
                ce_rows_ = None
            self.fn = ce_rows_
        if self.fn is None:
            return None
        try:
            return self.fn(logits, t, scale, need_grad)
        except Exception as e:  # noqa: BLE001 - a kernel that will not build must not stop training
            import logging

            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            logging.getLogger("cpt").warning("the Triton loss kernel failed (%s); the loss runs as PyTorch operations",
                                             self.failed)
            return None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               num_items: Optional[int | torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                               chunk_tokens: Optional[int] = None, rows: Optional[TritonRows] = None,
                               softcap: Optional[float] = None) -> torch.Tensor:
    """Sum over positions of cross_entropy(hidden @ weight.T + bias, targets), divided by num_items
    (default: the number of targets that are not -100), without materialising the logits.

    hidden: (..., H); weight: (V, H); targets: (...) aligned with hidden (already shifted). rows: the
    run's Triton pass (default: a new one for this call). softcap: the logits are softcap *
    tanh(logits / softcap) (Gemma 2's final_logit_softcapping).
    """
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match the head's weight {tuple(weight.shape)}")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if t.shape[0] != h.shape[0]:
        raise ValueError(f"{t.shape[0]} targets for {h.shape[0]} hidden states")
    if num_items is None:
        num_items = int((t != IGNORE_INDEX).sum())
    if isinstance(num_items, torch.Tensor):
        num_items = int(num_items.item())
    scale = 1.0 / max(int(num_items), 1)
    chunk = chunk_tokens or max(1, min(h.shape[0], _CHUNK_ELEMENTS // weight.shape[0]))
    # Equal chunks: a ragged last chunk would make the matmul library plan one more shape.
    chunk = math.ceil(h.shape[0] / math.ceil(h.shape[0] / chunk))
    return _ChunkedLinearCrossEntropy.apply(h, weight, bias, t, scale, _compute_dtype(hidden), chunk,
                                            rows if rows is not None else TritonRows(), softcap or None)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with each position: the next token's label, -100 after the last position."""
    pad = torch.full_like(labels[..., :1], IGNORE_INDEX)
    return torch.cat([labels[..., 1:], pad], dim=-1)
