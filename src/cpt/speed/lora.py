"""LoRA projections as one opaque op: the base GEMM and the adapter's update in one output buffer.

peft computes `result + lora_B(lora_A(x)) * scaling`: the rank-r product is written out at full
width, read back to be scaled, written again, read again to be added to the base output, and
written a third time (for 4-bit bases the base output is also cloned first). Two paths replace it.

Plain projections (a `torch.nn.Linear` base without bias: every Llama-style projection in bf16
or float32) call the custom op `cpt::lora_linear`. It computes `x @ W.T` into a fresh buffer
and adds `(x @ A.T) @ B.T * scaling` into that buffer in place with `addmm_`: the base GEMM
writes the full-width output, and the LoRA GEMM reads and rewrites it once in its epilogue
(float32 accumulation inside cuBLAS). The op has to be opaque: ATen's out-of-place `addmm` first
copies its input (the base output) into the result, and under torch.compile functionalization
turns an in-place `addmm_` on a graph intermediate back into that copy (422 device copies per
step, about 10 ms of a 370 ms 8B step on an H200). Four compiled, recomputing 8B-shaped layers
(2 x 2048 tokens, r=128) went from 54 device copies per step to 2 and from 38.2 to 37.6 ms of GPU
time. The price is host time: a custom op is a few Python calls per use (its autograd and
dispatch wrappers, then the body), 0.1-0.2 ms more than inductor's own code per projection's
forward and backward at toy sizes, which the GPU work hides at 8B shapes (step 44.0 -> 43.1 ms).

Its backward is a second op, `cpt::lora_linear_backward`: the input gradient `g @ W` with the
rank-r term `(g @ B * scaling) @ A` added in place, and the adapter's two gradients. The base
weight gets no gradient (it is frozen). The op saves only its inputs; the rank-r middle
`x @ A.T` is recomputed in backward. That matters under selective recomputation
(speed/compile.py): a saved op output would make backward rerun the whole op, base GEMM
included, in projections whose output backward never needs (down_proj).

Under autocast the four inputs are cast to the autocast dtype before the op, outside it, so the
float32 LoRA weights get their gradients back through the casts as with autocast's own. Without
autocast the op runs only when all four share a dtype.

4-bit bases (bitsandbytes `Linear4bit`, bias-free, computing in the autocast dtype) call
`cpt::lora_linear_4bit`: the same two ops over the weight dequantized inside them (in the forward
pass and again in backward, as bitsandbytes does; only the packed weight and its statistics are
saved). At training batch sizes bitsandbytes itself dequantizes and runs a plain GEMM, so the
result is its own; what goes is the copy of the base output and the separate sum of the input
gradient's two terms.

In a decoder layer that recomputes in backward (`FusedLoRA.recomputed`, set by cpt.speed.apply), a
4-bit projection is two ops instead: `cpt::dequantize_4bit`, then `cpt::lora_linear` over its output.
The recompute reruns the dequantization once, and the recomputed forward and the backward op share
its output, so backward dequantizes each weight once where it did twice (in the compiled backward
graph: 7 dequantizations for the 6 reruns and 7 gradient ops). The price is the layer's weights
held in bf16 during its backward (~0.4 GiB for an 8B layer); layers that keep their activations
keep the one op, so that nothing dequantized waits there from the forward pass to backward. On an
8B QLoRA step capped at 0.65x of the baseline's memory: 608 -> 448 dequantizations, 10,827 ->
11,218 tokens/s (docs/performance.md).

Every other base (bitsandbytes 8-bit, a Linear with bias) keeps the earlier fused
path: the second LoRA matmul adds itself into the base output inside cuBLAS,
`addmm(result, lora_A(x), B.T, alpha=scaling)`, reading the base output once and writing the sum
once.

Either path is used only for the plain adapter (one active adapter, no dropout, no DoRA or other
variant, no LoRA bias); anything else runs peft's own forward.

    python -m pytest tests/test_speed_lora.py -q
"""
from __future__ import annotations

import types
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from cpt.speed.patch import replace_forward


# Explicit schemas: torch 2.4 cannot read the string annotations of `from __future__ import annotations`.
@torch.library.custom_op("cpt::lora_linear", mutates_args=(),
                         schema="(Tensor x, Tensor w, Tensor a, Tensor b, float scale) -> Tensor")
def lora_linear(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """`x @ w.T + (x @ a.T) @ b.T * scale` for x (..., in), w (out, in), a (r, in), b (out, r)."""
    return _forward(x, w, a, b, scale)


def _forward(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.mm(x2, w.t())
    out.addmm_(torch.mm(x2, a.t()), b.t(), alpha=scale)
    return out.view(*x.shape[:-1], w.shape[0])


@lora_linear.register_fake
def _lora_linear_fake(x, w, a, b, scale):
    return x.new_empty(*x.shape[:-1], w.shape[0])


@torch.library.custom_op("cpt::lora_linear_backward", mutates_args=(),
                         schema="(Tensor g, Tensor x, Tensor w, Tensor a, Tensor b, float scale) -> (Tensor, Tensor, Tensor)")
def lora_linear_backward(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of lora_linear's output gradient `g` with respect to x, a and b."""
    return _backward(g, x, w, a, b, scale)


def _backward(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g2 = g.reshape(-1, g.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    # `scale` rides in the GEMMs' epilogue (beta=0: the empty buffer is never read): six launches,
    # no separate scaling kernels.
    gt = g2.new_empty(g2.shape[0], b.shape[1]).addmm_(g2, b, beta=0, alpha=scale)  # n x r
    gx = torch.mm(g2, w)
    gx.addmm_(gt, a)
    ga = torch.mm(gt.t(), x2)
    gb = b.new_empty(b.shape).addmm_(g2.t(), torch.mm(x2, a.t()), beta=0, alpha=scale)
    return gx.view(x.shape), ga, gb


@lora_linear_backward.register_fake
def _lora_linear_backward_fake(g, x, w, a, b, scale):
    return x.new_empty(x.shape), a.new_empty(a.shape), b.new_empty(b.shape)


def _lora_linear_setup_context(ctx, inputs, output):
    x, w, a, b, scale = inputs
    ctx.save_for_backward(x, w, a, b)
    ctx.scale = scale


def _lora_linear_grad(ctx, g):
    x, w, a, b = ctx.saved_tensors
    gx, ga, gb = torch.ops.cpt.lora_linear_backward(g, x, w, a, b, ctx.scale)
    return gx, None, ga, gb, None


torch.library.register_autograd("cpt::lora_linear", _lora_linear_grad, setup_context=_lora_linear_setup_context)


# 4-bit bases (bitsandbytes Linear4bit, QLoRA): the same op over a weight that is dequantized inside it.
# bitsandbytes itself dequantizes and calls a plain GEMM at training batch sizes on Hopper
# (its fused 4-bit kernel is for a few rows), so numerics are its own; what changes is that the LoRA
# term lands in the output buffer in place and the input gradient's two terms in one buffer, with no
# copies. The weight is dequantized in the forward pass and again in backward (as bitsandbytes does),
# never saved: the op saves its packed inputs only. `absmax2` / `code2` / `offset` are the nested
# statistics (double quantization); empty tensors when there are none. `code` is the NF4 table on the
# weight's device for cpt's own dequantization kernel (speed/nf4.py), or an empty tensor for
# bitsandbytes' functions (no Triton, not CUDA, FP4, or the run's option nf4_kernel=False).
try:
    from cpt.speed import nf4 as _nf4
except ImportError:  # no Triton
    _nf4 = None
_4BIT_SCHEMA = ("Tensor w, Tensor absmax, Tensor absmax2, Tensor code2, Tensor offset, Tensor code, int blocksize, "
                "int blocksize2, str quant_type, int out_features")


def _dequantize(w: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor, code2: torch.Tensor, offset: torch.Tensor,
                code: torch.Tensor, blocksize: int, blocksize2: int, quant_type: str, out_features: int, in_features: int,
                dtype: torch.dtype) -> torch.Tensor:
    if code.numel() and _nf4 is not None and _nf4.supported(w, quant_type, blocksize, absmax, dtype, code):
        # one launch, the same numbers
        return _nf4.dequantize_nf4(w, absmax if absmax2.numel() else absmax.float(), absmax2, code2, offset, code,
                                   blocksize, blocksize2, (out_features, in_features), dtype)
    if absmax2.numel():  # nested: the 8-bit block maxima first
        absmax = torch.ops.bitsandbytes.dequantize_blockwise(absmax, absmax2, code2, blocksize2, torch.float32) + offset
    return torch.ops.bitsandbytes.dequantize_4bit(w, absmax.float(), blocksize, quant_type, [out_features, in_features], dtype)


@torch.library.custom_op("cpt::dequantize_4bit", mutates_args=(),
                         schema=f"({_4BIT_SCHEMA}, int in_features, ScalarType dtype) -> Tensor")
def dequantize_4bit(w: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor, code2: torch.Tensor, offset: torch.Tensor,
                    code: torch.Tensor, blocksize: int, blocksize2: int, quant_type: str, out_features: int,
                    in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The 4-bit weight as an (out_features, in_features) matrix of `dtype`, for recomputing layers
    (see `_fused_forward`): a separate op, so that the backward pass dequantizes once for both the
    recomputed forward and the gradient."""
    return _dequantize(w, absmax, absmax2, code2, offset, code, blocksize, blocksize2, quant_type, out_features,
                       in_features, dtype)


@dequantize_4bit.register_fake
def _dequantize_4bit_fake(w, absmax, absmax2, code2, offset, code, blocksize, blocksize2, quant_type, out_features,
                          in_features, dtype):
    return w.new_empty((out_features, in_features), dtype=dtype)


@torch.library.custom_op("cpt::lora_linear_4bit", mutates_args=(),
                         schema=f"(Tensor x, {_4BIT_SCHEMA}, Tensor a, Tensor b, float scale) -> Tensor")
def lora_linear_4bit(x: torch.Tensor, w: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor, code2: torch.Tensor,
                     offset: torch.Tensor, code: torch.Tensor, blocksize: int, blocksize2: int, quant_type: str,
                     out_features: int, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """lora_linear with W = the dequantized 4-bit weight (out_features x x.shape[-1], in x's dtype)."""
    wd = _dequantize(w, absmax, absmax2, code2, offset, code, blocksize, blocksize2, quant_type, out_features,
                     x.shape[-1], x.dtype)
    return _forward(x, wd, a, b, scale)


@lora_linear_4bit.register_fake
def _lora_linear_4bit_fake(x, w, absmax, absmax2, code2, offset, code, blocksize, blocksize2, quant_type, out_features,
                           a, b, scale):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("cpt::lora_linear_4bit_backward", mutates_args=(),
                         schema=f"(Tensor g, Tensor x, {_4BIT_SCHEMA}, Tensor a, Tensor b, float scale) -> (Tensor, Tensor, Tensor)")
def lora_linear_4bit_backward(g: torch.Tensor, x: torch.Tensor, w: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor,
                              code2: torch.Tensor, offset: torch.Tensor, code: torch.Tensor, blocksize: int,
                              blocksize2: int, quant_type: str, out_features: int, a: torch.Tensor, b: torch.Tensor,
                              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    wd = _dequantize(w, absmax, absmax2, code2, offset, code, blocksize, blocksize2, quant_type, out_features,
                     x.shape[-1], g.dtype)
    return _backward(g, x, wd, a, b, scale)


@lora_linear_4bit_backward.register_fake
def _lora_linear_4bit_backward_fake(g, x, w, absmax, absmax2, code2, offset, code, blocksize, blocksize2, quant_type,
                                    out_features, a, b, scale):
    return x.new_empty(x.shape), a.new_empty(a.shape), b.new_empty(b.shape)


def _lora_linear_4bit_setup_context(ctx, inputs, output):
    x, w, absmax, absmax2, code2, offset, code, blocksize, blocksize2, quant_type, out_features, a, b, scale = inputs
    ctx.save_for_backward(x, w, absmax, absmax2, code2, offset, code, a, b)
    ctx.consts = (blocksize, blocksize2, quant_type, out_features)
    ctx.scale = scale


def _lora_linear_4bit_grad(ctx, g):
    x, w, absmax, absmax2, code2, offset, code, a, b = ctx.saved_tensors
    gx, ga, gb = torch.ops.cpt.lora_linear_4bit_backward(g, x, w, absmax, absmax2, code2, offset, code, *ctx.consts, a, b,
                                                         ctx.scale)
    return gx, None, None, None, None, None, None, None, None, None, None, ga, gb, None


torch.library.register_autograd("cpt::lora_linear_4bit", _lora_linear_4bit_grad, setup_context=_lora_linear_4bit_setup_context)


def _4bit_args(base: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype, code: torch.Tensor) -> Optional[tuple]:
    """The op's weight arguments for a bitsandbytes Linear4bit base computing in `dtype` (`code`: the
    NF4 table or an empty tensor), or None where it is not the op's case (a bias, another compute
    dtype, no quantization state yet)."""
    if type(base).__name__ != "Linear4bit" or not type(base).__module__.startswith("bitsandbytes") or base.bias is not None:
        return None
    qs = getattr(base.weight, "quant_state", None)
    if qs is None or qs.dtype != dtype or len(qs.shape) != 2 or qs.shape[1] != x.shape[-1]:
        return None
    if qs.nested:
        absmax2, code2, blocksize2 = qs.state2.absmax, qs.state2.code, qs.state2.blocksize
        offset = qs.offset if torch.is_tensor(qs.offset) else torch.tensor(float(qs.offset), device=qs.absmax.device)
    else:
        absmax2 = code2 = offset = qs.absmax.new_empty(0, dtype=torch.float32)
        blocksize2 = 0
    return (base.weight, qs.absmax, absmax2, code2, offset, code, qs.blocksize, blocksize2, qs.quant_type, qs.shape[0])


class FusedLoRA:
    """One peft LoRA layer's fused forward and what it reads: peft's own forward (the fallback), whether
    plain and 4-bit bases take the cpt ops (`linear_op`; False: the addmm epilogue, to compare), the NF4
    table for 4-bit bases (`code`), and whether its decoder layer recomputes in backward (`recomputed`).

    It is kept on the LoRA layer as `_cpt_lora` because the compiled decoder layer step reads it while
    tracing: every layer's projections then trace the same code and share one graph."""

    def __init__(self, module: torch.nn.Module, linear_op: bool, code: torch.Tensor):
        self.plain = module.forward
        self.linear_op = linear_op
        self.code = code
        self.recomputed = False
        self.is_4bit = type(getattr(module, "base_layer", None)).__name__ == "Linear4bit"


def _fused_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    state: FusedLoRA = self._cpt_lora
    if args or kwargs or self.disable_adapters or self.merged:
        return state.plain(x, *args, **kwargs)
    active = self.active_adapters
    if len(active) != 1:
        return state.plain(x, *args, **kwargs)
    name = active[0]
    if (name not in self.lora_A or name in getattr(self, "lora_variant", {}) or self.use_dora.get(name, False)
            or not isinstance(self.lora_dropout[name], torch.nn.Identity) or self.lora_B[name].bias is not None):
        return state.plain(x, *args, **kwargs)
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    base = self.base_layer
    if state.linear_op and type(base) is torch.nn.Linear and base.bias is None:
        w = base.weight
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            return torch.ops.cpt.lora_linear(x.to(dtype), w.to(dtype), a.to(dtype), b.to(dtype), float(self.scaling[name]))
        if x.dtype == w.dtype == a.dtype == b.dtype:
            return torch.ops.cpt.lora_linear(x, w, a, b, float(self.scaling[name]))
        return state.plain(x, *args, **kwargs)
    if state.linear_op and state.is_4bit:
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        args4 = _4bit_args(base, x, dtype, state.code)
        if args4 is not None and (autocast or x.dtype == a.dtype == b.dtype):
            scale = float(self.scaling[name])
            if state.recomputed:
                # A recomputing layer: the dequantized weight is an op output that the recomputed forward
                # and the backward op share, so backward dequantizes once instead of twice.
                wd = torch.ops.cpt.dequantize_4bit(*args4, x.shape[-1], dtype)
                out = torch.ops.cpt.lora_linear(x.to(dtype), wd, a.to(dtype), b.to(dtype), scale)
            else:
                out = torch.ops.cpt.lora_linear_4bit(x.to(dtype), *args4, a.to(dtype), b.to(dtype), scale)
            return out.to(x.dtype)
    if not torch.is_autocast_enabled(x.device.type):
        # Without autocast, mixed dtypes need peft's casts.
        base_w = getattr(self.base_layer, "weight", None)
        if not (x.dtype == a.dtype == b.dtype and isinstance(self.base_layer, torch.nn.Linear) and base_w.dtype == x.dtype):
            return state.plain(x, *args, **kwargs)
    result = self.base_layer(x)
    t = F.linear(x, a)
    out = torch.addmm(result.reshape(-1, result.shape[-1]), t.reshape(-1, t.shape[-1]), b.t(), alpha=self.scaling[name])
    return out.view(result.shape)


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """peft's LoRA Linear / Linear4bit / Linear8bitLt layers of `model`."""
    return [m for m in model.modules() if type(m).__module__.startswith("peft.tuners.lora")
            and type(m).__name__ in ("Linear", "Linear4bit", "Linear8bitLt")]


def fuse_lora_projections(model: torch.nn.Module, linear_op: bool = True,
                          nf4_code: Optional[Callable[[torch.device], torch.Tensor]] = None) -> tuple[list[FusedLoRA], Callable[[], None]]:
    """Give every peft LoRA layer of `model` the fused forward. nf4_code(device): the NF4 table for
    4-bit bases on that CUDA device (None: bitsandbytes' dequantization). Returns each layer's
    FusedLoRA and the function that puts peft's forwards back."""
    fused, undo = [], []
    for mod in lora_layers(model):
        if "_cpt_lora" in mod.__dict__:
            continue  # fused by another run that is still open
        w = getattr(getattr(mod, "base_layer", None), "weight", None)
        state = FusedLoRA(mod, linear_op, torch.empty(0, device=w.device if w is not None else "cpu"))
        if state.is_4bit and nf4_code is not None and w.is_cuda:
            code = nf4_code(w.device)
            if code is not None:
                state.code = code
        mod._cpt_lora = state
        restore = replace_forward(mod, types.MethodType(_fused_forward, mod))

        def undo_one(mod=mod, restore=restore) -> None:
            restore()
            mod.__dict__.pop("_cpt_lora", None)

        fused.append(state)
        undo.append(undo_one)

    def unfuse() -> None:
        for u in reversed(undo):
            u()

    return fused, unfuse


def _lora_input_cast_hook(module: torch.nn.Module, args: tuple) -> None:
    if torch.compiler.is_compiling():
        # Inside a compiled layer the flag would be a side effect that breaks the graph (and the
        # fused LoRA forward, which compiled layers use, never casts anyway).
        return
    x = args[0] if args else None
    # Under autocast the LoRA matmuls run in bf16 whatever the input: peft's upcast of the input
    # to the float32 adapter dtype is a full-size copy that autocast immediately undoes (exactly:
    # bf16 -> float32 -> bf16 is lossless). Outside autocast the upcast is needed, so keep it.
    if torch.is_tensor(x):
        module.cast_input_dtype_enabled = not torch.is_autocast_enabled(x.device.type)


def skip_lora_input_upcast(model: torch.nn.Module) -> tuple[int, Callable[[], None]]:
    """Stop peft from copying every LoRA input to float32 while autocast is on (about 10% of an
    8B bf16 step on an H200: two full-size casts per projection, forward, recompute and backward).
    Returns the number of LoRA layers hooked and the function that puts peft's upcast back."""
    hooked = [(mod, mod.cast_input_dtype_enabled, mod.register_forward_pre_hook(_lora_input_cast_hook))
              for mod in model.modules() if hasattr(mod, "cast_input_dtype_enabled") and hasattr(mod, "lora_A")]

    def undo() -> None:
        for mod, flag, handle in hooked:
            handle.remove()
            mod.cast_input_dtype_enabled = flag

    return len(hooked), undo
