"""NF4 dequantization as one Triton kernel (CUDA): bitsandbytes' numbers, in one pass, near the memory's speed.

A QLoRA step dequantizes every frozen 4-bit weight twice (forward, and once more in backward:
speed/lora.py): 448 times per step for an 8B model, ~35 GB of traffic. bitsandbytes does it in two
launches, the nested 8-bit block maxima first (a float32 tensor of 1/64 the weight's size, written and
read back) and then the 4-bit codes, at about half the memory's bandwidth (bench/dequant_4bit.py).
Here each program reads a run of packed bytes, rebuilds each 64-element block's maximum from its 8-bit
code on the spot (code2[q] * absmax2 + offset) and writes both of each byte's values. The arithmetic is
bitsandbytes': the block maximum is a float32 product and then a float32 sum (contraction into one
fused multiply-add is turned off, it would round once instead of twice), each value is the NF4 table's
float32 entry times that maximum, rounded once to the output dtype. So the result equals
`bitsandbytes.functional.dequantize_4bit` bit for bit (tests/test_speed_nf4.py, on a CUDA machine).

speed/lora.py calls `dequantize_nf4` for NF4 weights on CUDA when Triton is installed and the run put
the NF4 table on the weight's device (`code_table`, when cpt.speed.apply converts the model; the
option nf4_kernel=False leaves it out); FP4 weights, and CPUs, keep bitsandbytes' own functions.

    python bench/dequant_4bit.py                       (times both, checks they agree)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BYTES_PER_PROGRAM = 2048  # 4096 values; bench/dequant_4bit.py --sweep times the others
NUM_WARPS = 4

# The NF4 code: bitsandbytes' table, the float32 values its CUDA kernel hard-codes.
_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0)


def code_table(device: torch.device) -> torch.Tensor:
    """The NF4 table on `device`, for the kernel's `code` argument. Made when the model is converted,
    never inside a step: made there, it would be a copy from host memory inside a CUDA graph's capture,
    or a block of a compiled step's graph memory pool that the pool does not know of (compiling the
    layers then failed, and the step fell back to the plain layers at half the speed)."""
    return torch.tensor(_NF4, dtype=torch.float32, device=device)


@triton.jit
def _dequant_nf4_kernel(w_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr, n_bytes,
                        BLOCK_BYTES: tl.constexpr, BLOCK2: tl.constexpr, NESTED: tl.constexpr, BYTES: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BYTES + tl.arange(0, BYTES)
    inside = offs < n_bytes
    byte = tl.load(w_ptr + offs, mask=inside, other=0).to(tl.int32)
    blk = offs // BLOCK_BYTES  # both of a byte's values lie in one quantization block
    if NESTED:  # the block maximum from its 8-bit code: code2[q] * absmax2[blk // BLOCK2], then + offset
        q = tl.load(absmax_ptr + blk, mask=inside, other=0).to(tl.int32)
        a = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + blk // BLOCK2, mask=inside, other=0.0)
        a = a + tl.load(offset_ptr)
    else:
        a = tl.load(absmax_ptr + blk, mask=inside, other=0.0)
    hi = tl.load(code_ptr + (byte >> 4)) * a  # the first value of the pair is the high nibble
    lo = tl.load(code_ptr + (byte & 15)) * a
    vals = tl.reshape(tl.join(hi, lo), [2 * BYTES])
    o = pid * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + o, vals.to(out_ptr.dtype.element_ty), mask=o < 2 * n_bytes)


def supported(w: torch.Tensor, quant_type: str, blocksize: int, absmax: torch.Tensor, dtype: torch.dtype,
              code: torch.Tensor) -> bool:
    """Whether the kernel can dequantize `w` with the table `code` (an empty tensor: the run left it out)."""
    return (quant_type == "nf4" and code.numel() == len(_NF4) and code.device == w.device and blocksize % 2 == 0
            and dtype in (torch.bfloat16, torch.float16, torch.float32) and w.is_contiguous() and absmax.is_contiguous())


def dequantize_nf4(w: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor, code2: torch.Tensor,
                   offset: torch.Tensor, code: torch.Tensor, blocksize: int, blocksize2: int, shape: tuple,
                   dtype: torch.dtype, bytes_per_program: int | None = None) -> torch.Tensor:
    """The NF4 weight `w` (packed bytes, two values each, in any dtype's storage) as a `shape` tensor
    of `dtype`. absmax: the float32 block maxima, or (nested, absmax2 non-empty) their 8-bit codes
    into `code2`, scaled per `blocksize2` codes by absmax2, plus `offset`. code: `code_table(w.device)`."""
    w = w.reshape(-1).view(torch.uint8)  # packed in another dtype's storage (bnb_4bit_quant_storage): its bytes
    n = 1
    for s in shape:
        n *= int(s)
    if w.numel() * 2 != n:
        raise ValueError(f"dequantize_nf4: {w.numel()} packed bytes hold {2 * w.numel()} values, the shape {tuple(shape)} "
                         f"needs {n}")
    out = torch.empty(shape, dtype=dtype, device=w.device)
    nested = absmax2.numel() > 0
    nb = int(bytes_per_program or BYTES_PER_PROGRAM)
    dummy = absmax  # unread when not nested
    _dequant_nf4_kernel[(triton.cdiv(w.numel(), nb),)](
        w, absmax, absmax2 if nested else dummy, code2 if nested else dummy, offset if nested else dummy,
        code, out, w.numel(), BLOCK_BYTES=blocksize // 2, BLOCK2=max(int(blocksize2), 1), NESTED=nested,
        BYTES=nb, num_warps=NUM_WARPS, enable_fp_fusion=False)
    return out
