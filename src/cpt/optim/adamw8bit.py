"""The 8-bit AdamW optimizer (train.optim=adamw_8bit) and its Triton kernel.

`AdamW8bit` is bitsandbytes' AdamW8bit with a step that does not wait for the GPU after each tensor,
and two paths of its own beside bitsandbytes' per-tensor step, both the same blockwise 8-bit AdamW
(bitsandbytes' maps and block size; this module's Triton kernel on CUDA, the PyTorch operations of
cpt.optim.split_master elsewhere):
- parameters marked as split masters (the trained embeddings of a bf16 run, `mark_split_master`)
  update the float32 value that the bf16 weight and its low half in the optimizer state make
  together (a row-sparse gradient is read as it is); with `host_split_state` their states live in
  host memory and stream through the GPU (cpt.optim.host_state), mostly beside the backward pass;
- a group's float32 tensors with 8-bit states (the adapters) are laid end to end and updated in one
  launch (`_FlatGroup`), their states staying bitsandbytes-shaped views.

The kernel: each program takes NB quantisation blocks of 256 elements: it dequantises both moments
through the 256-entry maps, adds the gradient, updates the float32 master (plain, or held split as
bf16 weight + int16 low half), takes each block's new maximum, and rounds the moments back to the
nearest map value: a lookup in a table keyed by the value's leading bits and one compare with
bitsandbytes' maps (split_master.BucketTable), where an 8-step binary search over the 255 midpoints
made 8 dependent lookups. A row-sparse gradient (an embedding's) is read through a row -> slot table,
so the rows the batch did not use are updated with a zero gradient without ever being made dense; a
row whose slot is -2 is left untouched (set aside for later). The adapters' many float32 tensors,
laid end to end, are updated in one launch that reads each member's gradient where it lies
(`GatheredGrads`). A split master's update can be made undoable (it logs the few elements whose old
weight cannot be recomputed from the new one, split_master.UndoLog) and taken back by the same
kernel (UNDO 1 and 2). About 14 bytes of traffic per element, against ~100 for the same update
written as separate PyTorch operations.

The work is mostly lookups and arithmetic, not traffic: one warp per block (the default launch, NB=1
and one warp) ran 1.23x faster on an 8B model's embeddings than four warps on four blocks, and a
block's moments are scaled by one reciprocal of its maximum (`python bench/optim_step.py --sweep`;
docs/performance.md, "The Triton 8-bit AdamW").

Import this module only for train.optim=adamw_8bit: it needs bitsandbytes (Triton is optional).

    python -m pytest tests/test_optim.py tests/test_split_master.py -q      (the kernel's tests on CUDA)
"""
from __future__ import annotations

import logging
import weakref
from typing import Callable, Optional

import bitsandbytes as bnb
import torch
import torch.distributed as dist

from cpt.optim.host_state import CHUNK_ELEMENTS as STAGING_ELEMENTS
from cpt.optim.host_state import EarlyStep, HostStream, Job
from cpt.optim.split_master import (BLOCK, CHUNK_ELEMENTS, HOST_KEYS, ROW_SPARSE, SPLIT_MASTER, BucketTable, QuantMaps,
                                    grad_table, hyperparameters, split_adamw8bit_step, update_flat)
from cpt.runtime import host_tensor, to_host

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU: the PyTorch operations do every update
    triton = tl = None

logger = logging.getLogger("cpt")

LAUNCH = (1, 1, 0)  # the kernel's launch shape: blocks per program, warps, programs (0: one per group of blocks)


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _bucketize(x, mid_ptr, t_ptr, NB: tl.constexpr, BASE: tl.constexpr, SHIFT: tl.constexpr, KEYS: tl.constexpr,
               STEPS: tl.constexpr):
    if STEPS >= 0:  # split_master.BucketTable: the interval's count from the table, then STEPS compares
        bits = x.to(tl.int32, bitcast=True)
        j = ((bits & 0x7FFFFFFF) - BASE) >> SHIFT
        j = tl.minimum(tl.maximum(j, 0), KEYS - 1)
        i = tl.load(t_ptr + tl.where(bits < 0, KEYS - 1 - j, KEYS + j)).to(tl.int32)
        for _ in tl.static_range(STEPS):
            nxt = tl.load(mid_ptr + tl.minimum(i, 254))
            i = tl.where((i < 255) & (nxt < x), i + 1, i)
    else:  # branch-free binary search over the 255 sorted midpoints
        i = tl.zeros([NB, 256], dtype=tl.int32)
        for k in tl.static_range(8):
            half = 128 >> k
            i = tl.where(tl.load(mid_ptr + i + (half - 1)) < x, i + half, i)
    return i


@_jit
def _adamw8bit_kernel(p_ptr, lo_ptr, g_ptr, slot_ptr, s1_ptr, s2_ptr, a1_ptr, a2_ptr, q1_ptr, q2_ptr, mid1_ptr, mid2_ptr,
                      t1_ptr, t2_ptr, hp_ptr, n, width, x_ptr, li_ptr, lh_ptr, lc_ptr, base, cap, UNDO: tl.constexpr,
                      SPLIT: tl.constexpr, SPARSE: tl.constexpr, ROW_BLOCKS: tl.constexpr,
                      GATHER: tl.constexpr, NB: tl.constexpr, RECIP: tl.constexpr, PERSIST: tl.constexpr,
                      T1_BASE: tl.constexpr, T1_SHIFT: tl.constexpr, T1_KEYS: tl.constexpr,
                      T1_STEPS: tl.constexpr, T2_BASE: tl.constexpr, T2_SHIFT: tl.constexpr, T2_KEYS: tl.constexpr,
                      T2_STEPS: tl.constexpr):
    b1 = tl.load(hp_ptr)
    b2 = tl.load(hp_ptr + 1)
    step_size = tl.load(hp_ptr + 2)
    eps = tl.load(hp_ptr + 3)
    decay = tl.load(hp_ptr + 4)
    if PERSIST:  # a fixed number of programs, each taking every num_programs-th group of NB blocks
        for pid in range(tl.program_id(0), tl.cdiv(n, 256 * NB), tl.num_programs(0)):
            _update_blocks(pid, p_ptr, lo_ptr, g_ptr, slot_ptr, s1_ptr, s2_ptr, a1_ptr, a2_ptr, q1_ptr, q2_ptr, mid1_ptr,
                           mid2_ptr, t1_ptr, t2_ptr, n, width, b1, b2, step_size, eps, decay, x_ptr, li_ptr, lh_ptr,
                           lc_ptr, base, cap, UNDO, SPLIT, SPARSE, ROW_BLOCKS,
                           GATHER, NB, RECIP, T1_BASE, T1_SHIFT, T1_KEYS, T1_STEPS, T2_BASE, T2_SHIFT, T2_KEYS, T2_STEPS)
    else:
        _update_blocks(tl.program_id(0), p_ptr, lo_ptr, g_ptr, slot_ptr, s1_ptr, s2_ptr, a1_ptr, a2_ptr, q1_ptr, q2_ptr,
                       mid1_ptr, mid2_ptr, t1_ptr, t2_ptr, n, width, b1, b2, step_size, eps, decay, x_ptr, li_ptr,
                       lh_ptr, lc_ptr, base, cap, UNDO, SPLIT, SPARSE,
                       ROW_BLOCKS, GATHER, NB, RECIP, T1_BASE, T1_SHIFT, T1_KEYS, T1_STEPS, T2_BASE, T2_SHIFT, T2_KEYS,
                       T2_STEPS)


@_jit
def _update_blocks(pid, p_ptr, lo_ptr, g_ptr, slot_ptr, s1_ptr, s2_ptr, a1_ptr, a2_ptr, q1_ptr, q2_ptr, mid1_ptr, mid2_ptr,
                   t1_ptr, t2_ptr, n, width, b1, b2, step_size, eps, decay, x_ptr, li_ptr, lh_ptr, lc_ptr, base, cap,
                   UNDO: tl.constexpr, SPLIT: tl.constexpr, SPARSE: tl.constexpr,
                   ROW_BLOCKS: tl.constexpr, GATHER: tl.constexpr, NB: tl.constexpr, RECIP: tl.constexpr,
                   T1_BASE: tl.constexpr, T1_SHIFT: tl.constexpr, T1_KEYS: tl.constexpr, T1_STEPS: tl.constexpr,
                   T2_BASE: tl.constexpr, T2_SHIFT: tl.constexpr, T2_KEYS: tl.constexpr, T2_STEPS: tl.constexpr):
    blk = (pid * NB + tl.arange(0, NB)).to(tl.int64)  # block numbers fit int32; element offsets may not
    offs = blk[:, None] * 256 + tl.arange(0, 256)[None, :]
    mask = offs < n
    in_range = blk * 256 < n
    if SPARSE:
        if ROW_BLOCKS:  # rows are whole blocks: one row (and slot) per block, no division per element
            row_b = (blk * 256) // width
            slot_b = tl.load(slot_ptr + row_b, mask=in_range, other=-1)
            row = row_b[:, None]
            slot = slot_b[:, None]
        else:
            row = offs // width
            slot = tl.load(slot_ptr + row, mask=mask, other=-1)
        g = tl.load(g_ptr + slot * width + (offs - row * width), mask=mask & (slot >= 0), other=0.0).to(tl.float32)
        # slot -2 (split_master.SKIP): a row set aside for later, left exactly as it is (blocks lie within rows)
        live = mask & (slot != -2)
    elif GATHER:  # each member's own gradient: slot[block] is the block's member, g_ptr [3, width] the
        # members' gradient addresses, first elements and sizes (members start on whole blocks)
        member = tl.load(slot_ptr + blk, mask=in_range, other=0)
        addr = tl.load(g_ptr + member)
        first = tl.load(g_ptr + width + member)
        size = tl.load(g_ptr + 2 * width + member)
        local = offs - first[:, None]
        src = addr[:, None].to(tl.pointer_type(tl.float32)) + local
        g = tl.load(src, mask=mask & (local < size[:, None]), other=0.0)
        live = mask
    else:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        live = mask
    c1 = tl.load(s1_ptr + offs, mask=mask, other=0).to(tl.int32)
    c2 = tl.load(s2_ptr + offs, mask=mask, other=0).to(tl.int32)
    am1 = tl.load(a1_ptr + blk, mask=in_range, other=0.0)
    am2 = tl.load(a2_ptr + blk, mask=in_range, other=0.0)
    m = tl.load(q1_ptr + c1) * am1[:, None] * b1 + (1 - b1) * g
    v = tl.load(q2_ptr + c2) * am2[:, None] * b2 + (1 - b2) * g * g
    m = tl.where(mask, m, 0.0)
    v = tl.where(mask, v, 0.0)
    d = step_size * m / (tl.sqrt(v) + eps)
    if UNDO == 2:  # take an undoable update back (split_master.undo_split_rows): p and lo hold what it made
        hi = tl.load(p_ptr + offs, mask=mask, other=0)
        lo = tl.load(lo_ptr + offs, mask=mask, other=0)
        old_lo = tl.load(x_ptr + offs, mask=mask, other=0)
        made = ((hi.to(tl.int32) << 16) + lo.to(tl.int32)).to(tl.float32, bitcast=True)
        est, dist = _invert(made, old_lo, d, decay)
        tl.store(p_ptr + offs, est.to(tl.int16), mask=live & (tl.abs(d) <= 3.4028234663852886e38))
    else:
        if SPLIT:
            hi = tl.load(p_ptr + offs, mask=mask, other=0)
            lo = tl.load(lo_ptr + offs, mask=mask, other=0)
            master = ((hi.to(tl.int32) << 16) + lo.to(tl.int32)).to(tl.float32, bitcast=True)
        else:
            master = tl.load(p_ptr + offs, mask=mask, other=0.0)
        new = (master + d) * decay
        n1 = tl.max(tl.abs(m), axis=1)
        n2 = tl.max(v, axis=1)
        if RECIP:  # one division per block (split_master._adamw8bit_blocks scales the same way)
            x1 = m * (1.0 / tl.maximum(n1, 1e-30))[:, None]
            x2 = v * (1.0 / tl.maximum(n2, 1e-30))[:, None]
        else:
            x1 = m / tl.maximum(n1, 1e-30)[:, None]
            x2 = v / tl.maximum(n2, 1e-30)[:, None]
        # index = number of midpoints below x (bucketize's convention)
        i1 = _bucketize(x1, mid1_ptr, t1_ptr, NB, T1_BASE, T1_SHIFT, T1_KEYS, T1_STEPS)
        i2 = _bucketize(x2, mid2_ptr, t2_ptr, NB, T2_BASE, T2_SHIFT, T2_KEYS, T2_STEPS)
        blk_live = in_range & (tl.max(live.to(tl.int32), axis=1) > 0)
        tl.store(s1_ptr + offs, i1.to(tl.uint8), mask=live)
        tl.store(s2_ptr + offs, i2.to(tl.uint8), mask=live)
        tl.store(a1_ptr + blk, n1, mask=blk_live)
        tl.store(a2_ptr + blk, n2, mask=blk_live)
        if SPLIT:
            bits = new.to(tl.int32, bitcast=True)
            high = (bits + 0x8000) >> 16
            moved = live
            if UNDO == 1:  # undoable (split_master.UndoLog): log what inverting would not give back
                est, dist = _invert(new, lo, d, decay)
                moved = live & (tl.abs(d) <= 3.4028234663852886e38)  # a step that is not finite: leave it
                bad = moved & ((est != hi.to(tl.int32)) | (tl.abs(dist) >= 16384))  # split_master.UNDO_MARGIN
                if tl.sum(bad.to(tl.int32)) > 0:  # rare: most programs log nothing
                    pos = tl.atomic_add(lc_ptr + tl.zeros([NB, 256], dtype=tl.int32), 1, mask=bad)
                    pos = tl.where(bad & (pos < cap), pos, cap)
                    tl.store(li_ptr + pos, offs + base, mask=bad)
                    tl.store(lh_ptr + pos, hi, mask=bad)
            tl.store(p_ptr + offs, high.to(tl.int16), mask=moved)
            tl.store(lo_ptr + offs, (bits - (high << 16)).to(tl.int16), mask=moved)
        else:
            tl.store(p_ptr + offs, new, mask=live)


@_jit
def _invert(new, old_lo, d, decay):
    """split_master._invert_split in int32 (it wraps only where the estimate is not finite, which fails the
    check anyway): the old high half and the estimate's distance from the master it gives."""
    approx = new * (1.0 / decay) - d  # one reciprocal: the margin covers its rounding
    bits = approx.to(tl.int32, bitcast=True)
    lo = old_lo.to(tl.int32)
    high = (bits - lo + 0x8000) >> 16
    dist = tl.where(tl.abs(approx) <= 3.4028234663852886e38, bits - ((high << 16) + lo), 1 << 30)
    return high, dist



def adamw8bit_update(p: torch.Tensor, lo, g: torch.Tensor, slot, s1, s2, a1, a2, maps: QuantMaps, hp: torch.Tensor,
                     members: "GatheredGrads | None" = None, shape: Optional[tuple[int, int, int]] = None, log=None,
                     base: int = 0, undo_from: "torch.Tensor | None" = None, *, tables: bool = True,
                     row_blocks: bool = True, recip: bool = True) -> None:
    """In place: p is a float32 master, or (lo given) the bf16 high half of one. g is dense like p, or
    (slot given) the values of a row-sparse gradient, slot[row] its row in g or -1; or (members given,
    g and slot None) p is a flat buffer of float32 members whose gradients `members` points at.
    `shape`: (blocks per program, warps, programs), LAUNCH when None; programs 0 is one per group of
    blocks, more makes that many programs loop over the groups (fewer SMs held at a time). Split masters only: `log` (a
    split_master.UndoLog, p's first element being its element `base`) makes the update undoable;
    `undo_from` (the old low halves) takes one back instead (p and lo hold what it made; only p is
    written). The shortcuts, each the same result and on by default (off only to time them): `tables`
    rounds moments through split_master.BucketTable (off: a binary search over the midpoints);
    `row_blocks` reads one slot per block where a row-sparse gradient's rows are whole blocks; `recip`
    scales a block's moments by one reciprocal of its maximum (off: a division per element)."""
    n = p.numel()
    width = p.shape[-1] if p.ndim > 1 else n
    split, sparse = lo is not None, slot is not None
    target = p.view(torch.int16) if split else p
    if members is not None:
        g, slot, width = members.table, members.block_member, members.count
    nb, warps, programs = shape or LAUNCH
    groups = triton.cdiv(triton.cdiv(n, BLOCK), nb)
    grid = (min(groups, programs) if programs else groups,)
    t1, t2 = maps.table1, maps.table2
    undo = 2 if undo_from is not None else 1 if log is not None else 0
    if undo and not split:
        raise ValueError("only a split master's update can be made undoable")
    x = undo_from if undo_from is not None else s1
    li, lh, lc, cap = (log.index, log.high, log.count, log.capacity) if log is not None else (s1, s1, s1, 0)
    _adamw8bit_kernel[grid](target, lo if split else target, g, slot if slot is not None else s1, s1, s2, a1, a2,
                            maps.q1, maps.q2, maps.mid1, maps.mid2, t1.on(p.device), t2.on(p.device), hp, n, width,
                            x, li, lh, lc, base, cap, UNDO=undo, SPLIT=split, SPARSE=sparse,
                            ROW_BLOCKS=row_blocks and sparse and width % BLOCK == 0,
                            GATHER=members is not None, NB=nb, RECIP=recip, PERSIST=bool(programs),
                            T1_BASE=t1.base, T1_SHIFT=t1.shift, T1_KEYS=max(t1.keys, 1), T1_STEPS=_steps(t1, tables),
                            T2_BASE=t2.base, T2_SHIFT=t2.shift, T2_KEYS=max(t2.keys, 1), T2_STEPS=_steps(t2, tables),
                            num_warps=warps)


def _steps(table: BucketTable, tables: bool) -> int:
    return -1 if not tables or table.steps is None or table.steps > 4 else table.steps  # -1: binary search


class GatheredGrads:
    """Where the kernel finds each member's gradient when a flat buffer of many float32 tensors (the
    adapters, `_FlatGroup`) is updated in one launch, without first copying the gradients into one flat
    buffer: per block its member, per member its gradient's address, first element and size."""

    def __init__(self, offsets: list[int], sizes: list[int], numels: list[int], device: torch.device):
        self.count = len(offsets)
        per_block = [torch.full((s // BLOCK,), i, dtype=torch.int32) for i, s in enumerate(sizes)]
        self.block_member = torch.cat(per_block).to(device)
        self.fixed = torch.tensor([offsets, numels], dtype=torch.int64)
        self.table = None

    def point_at(self, grads: list[torch.Tensor]) -> None:
        """This step's gradients (contiguous float32, one per member, in order): their addresses go to
        the GPU with the members' layout, without waiting for it."""
        addr = torch.tensor([[g.data_ptr() for g in grads]], dtype=torch.int64)
        host = torch.cat([addr, self.fixed]).pin_memory()
        self.table = host.to(self.block_member.device, non_blocking=True)


@_jit
def _move_rows_kernel(dst_ptr, src_ptr, idx_ptr, width, SCATTER: tl.constexpr, BLOCK_W: tl.constexpr):
    # Row i of the compact side is row idx[i] of the other: dst[idx[i]] = src[i] (SCATTER) or dst[i] = src[idx[i]].
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    mask = cols < width
    row = tl.load(idx_ptr + i)
    if SCATTER:
        src_row = i
        dst_row = row
    else:
        src_row = row
        dst_row = i
    values = tl.load(src_ptr + src_row * width + cols, mask=mask)
    tl.store(dst_ptr + dst_row * width + cols, values, mask=mask)




def _move_rows(dst: torch.Tensor, src: torch.Tensor, index: torch.Tensor, scatter: bool) -> None:
    if triton is None:
        raise RuntimeError("moving rows through mapped host memory needs Triton")
    k, width = (src if scatter else dst).shape
    if k:
        _move_rows_kernel[(k, triton.cdiv(width, 1024))](dst, src, index, width, SCATTER=scatter, BLOCK_W=1024)


def gather_rows(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """out[i] = src[index[i]] for a row-major src anywhere the GPU can address, pinned host memory
    included (the rows host_state set aside, read back at the step without a host sync)."""
    _move_rows(out, src, index, scatter=False)


def scatter_rows(dst: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """dst[index[i]] = rows[i] for a row-major dst anywhere the GPU can address, pinned host memory
    included (host_state writes the kept rows' states home this way, without a host sync)."""
    _move_rows(dst, rows.contiguous(), index, scatter=True)


class Kernel:
    """The Triton update as one optimizer runs it: its launch shape and shortcuts (see
    `adamw8bit_update`; the defaults are the fastest measured), and whether it works here.

    Called as split_master.Kernel: True when it made the update; False, having written nothing, off
    CUDA, without Triton, or once it has failed (with a warning): from then on this optimizer's updates
    run as PyTorch operations. `gather`: the adapters' one-launch update (`_FlatGroup`), likewise turned
    off for good by a failure (they then update in chunks through a gradient buffer)."""

    def __init__(self, *, launch: tuple[int, int, int] = LAUNCH, tables: bool = True, row_blocks: bool = True,
                 recip: bool = True, gather: bool = True):
        self.launch = tuple(launch)
        self.tables, self.row_blocks, self.recip, self.gather = tables, row_blocks, recip, gather
        self.failed = triton is None

    def runs_on(self, device: torch.device) -> bool:
        return device.type == "cuda" and not self.failed

    def __call__(self, p, lo, g, slot, s1, s2, a1, a2, maps: QuantMaps, hp: torch.Tensor, *,
                 shape: Optional[tuple[int, int, int]] = None, members: Optional[GatheredGrads] = None,
                 log=None, base: int = 0, undo_from: Optional[torch.Tensor] = None) -> bool:
        if not self.runs_on(p.device):
            return False
        try:
            self.launch_update(p, lo, g, slot, s1, s2, a1, a2, maps, hp, shape=shape, members=members, log=log,
                               base=base, undo_from=undo_from)
            return True
        except Exception as e:  # noqa: BLE001 - a kernel that will not build must not stop training
            logger.warning("the Triton 8-bit AdamW kernel failed (%s: %s); updating with PyTorch operations",
                           type(e).__name__, _first_line(e))
            self.failed = True
            return False

    def launch_update(self, p, lo, g, slot, s1, s2, a1, a2, maps: QuantMaps, hp: torch.Tensor, *,
                      shape: Optional[tuple[int, int, int]] = None, **kw) -> None:
        """`adamw8bit_update` with this kernel's settings; raises what it raises."""
        adamw8bit_update(p, lo, g, slot, s1, s2, a1, a2, maps, hp, shape=shape or self.launch, tables=self.tables,
                         row_blocks=self.row_blocks, recip=self.recip, **kw)

    gather_rows = staticmethod(gather_rows)
    scatter_rows = staticmethod(scatter_rows)


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else ""


# ---------------------------------------------------------------------------- one pass over many adapter tensors
#
# An 8B model's LoRA has ~450 tensors; bitsandbytes updates them one launch (and one Python call) each,
# which with recompute-free GPU work of ~16 ms takes ~30 ms of host time per step. A _FlatGroup lays a
# group's float32 tensors end to end in one buffer (each parameter becomes a view into it, each padded
# to whole quantisation blocks) with their 8-bit states likewise, and updates the lot in one launch on
# CUDA (each member's gradient read where it lies), elsewhere in chunks through a flat gradient buffer.
# Each parameter's state stays a view with bitsandbytes' own keys and shapes, so checkpoints are
# interchangeable with the per-tensor path, which also serves any step in which some member has no
# gradient.


def _flattenable(p: torch.Tensor, min_8bit_size: int) -> bool:
    return (p.dtype == torch.float32 and p.requires_grad and p.numel() >= min_8bit_size
            and not getattr(p, SPLIT_MASTER, False) and not (dist.is_available() and dist.is_initialized()))


class _FlatGroup:
    def __init__(self, members: list, state: dict, maps: QuantMaps, kernel: Kernel, chunk_elements: int):
        self.members = set(members)
        self.order = members
        self.kernel = kernel
        device = members[0].device
        sizes = [-(-p.numel() // BLOCK) * BLOCK for p in members]  # each padded to whole blocks
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        # Chunks of whole members, about chunk_elements each: the gradient buffer one pass needs.
        self.chunk_members, fill = [[]], 0
        for i, size in enumerate(sizes):
            if fill and fill + size > chunk_elements:
                self.chunk_members.append([])
                fill = 0
            self.chunk_members[-1].append(i)
            fill += size
        self.sizes = sizes
        total = sum(sizes)
        self.master = torch.zeros(total, dtype=torch.float32, device=device)
        self.maps = maps
        self.s1 = torch.full((total,), self.maps.zero1, dtype=torch.uint8, device=device)
        self.s2 = torch.full((total,), self.maps.zero2, dtype=torch.uint8, device=device)
        self.a1 = torch.zeros(total // BLOCK, dtype=torch.float32, device=device)
        self.a2 = torch.zeros(total // BLOCK, dtype=torch.float32, device=device)
        self.state = state
        self.gathered: Optional[GatheredGrads] = None  # made at the first one-launch update
        with torch.no_grad():
            for p, off in zip(members, self.offsets):
                n, b = p.numel(), -(-p.numel() // BLOCK)
                view = self.master[off:off + n]
                view.copy_(p.detach().reshape(-1))
                p.data = view.view_as(p)
                old = state.get(p) or {}
                st = {"step": old.get("step", 0), "qmap1": maps.q1, "qmap2": maps.q2,
                      "state1": self.s1[off:off + n].view(p.shape), "state2": self.s2[off:off + n].view(p.shape),
                      "absmax1": self.a1[off // BLOCK:off // BLOCK + b], "absmax2": self.a2[off // BLOCK:off // BLOCK + b]}
                for k in ("state1", "state2", "absmax1", "absmax2"):
                    if k in old and old[k].numel() == st[k].numel() and old[k].dtype == st[k].dtype:
                        st[k].copy_(old[k].reshape(st[k].shape))
                state[p] = {**old, **st}

    def ready(self) -> bool:
        return all(p.grad is not None and not p.grad.is_sparse for p in self.order)

    def step(self, group: dict) -> None:
        for p in self.order:
            self.state[p]["step"] += 1
        hps: dict[int, torch.Tensor] = {}

        def hp(step: int) -> torch.Tensor:  # bias corrections follow each tensor's own step count
            if step not in hps:
                hps[step] = hyperparameters(group["betas"][0], group["betas"][1], group["lr"], group["eps"],
                                            group["weight_decay"], step, self.master.device)
            return hps[step]

        steps = {self.state[p]["step"] for p in self.order}
        if len(steps) == 1 and self._gathered(hp(steps.pop())):
            return
        for idx in self.chunk_members:
            e0, e1 = self.offsets[idx[0]], self.offsets[idx[-1]] + self.sizes[idx[-1]]
            g = torch.zeros(e1 - e0, dtype=torch.float32, device=self.master.device)
            views = [g[self.offsets[i] - e0:self.offsets[i] - e0 + self.order[i].numel()] for i in idx]
            torch._foreach_copy_(views, [self.order[i].grad.reshape(-1) for i in idx])
            steps = {self.state[self.order[i]]["step"] for i in idx}
            # One launch for the chunk; per tensor where their step counts differ (one of them missed a
            # step without a gradient).
            spans = [(e0, e1, steps.pop())] if len(steps) == 1 else [
                (self.offsets[i], self.offsets[i] + self.sizes[i], self.state[self.order[i]]["step"]) for i in idx]
            for a, b, step in spans:
                self._update(a, b, g[a - e0:b - e0], hp(step))

    def _gathered(self, hp: torch.Tensor) -> bool:
        """On CUDA: the whole group in one launch that reads each member's gradient where it is (no
        gradient buffer to fill, ~20 launches fewer for an 8B model's adapters). False: not here."""
        if not self.kernel.runs_on(self.master.device) or not self.kernel.gather:
            return False
        grads = [p.grad for p in self.order]
        if any(g.dtype != torch.float32 or not g.is_contiguous() for g in grads):
            return False
        try:
            if self.gathered is None:
                self.gathered = GatheredGrads(self.offsets, self.sizes, [p.numel() for p in self.order],
                                              self.master.device)
            self.gathered.point_at(grads)
            self.kernel.launch_update(self.master, None, None, None, self.s1, self.s2, self.a1, self.a2, self.maps, hp,
                                      members=self.gathered)
            return True
        except Exception as e:  # noqa: BLE001 - the chunked update below does the same work
            logger.warning("the one-launch adapter update failed (%s: %s); updating in chunks",
                           type(e).__name__, _first_line(e))
            self.kernel.gather = False
            return False

    def _update(self, a: int, b: int, g: torch.Tensor, hp: torch.Tensor) -> None:
        chunk = (self.master[a:b], g, self.s1[a:b], self.s2[a:b], self.a1[a // BLOCK:b // BLOCK], self.a2[a // BLOCK:b // BLOCK])
        if not self.kernel(chunk[0], None, g, None, *chunk[2:], self.maps, hp):
            update_flat(*chunk, self.maps, hp)


# ---------------------------------------------------------------------------- the optimizer


def _weak_hook(method: Callable) -> Callable:
    """A gradient hook that calls `method` while its object lives: the parameter must not keep the
    optimizer (and its host buffers and threads) alive."""
    ref = weakref.WeakMethod(method)

    def hook(p: torch.Tensor) -> None:
        m = ref()
        if m is not None:
            m(p)

    return hook


class AdamW8bit(bnb.optim.AdamW8bit):
    """bitsandbytes' AdamW8bit (same arguments, same checkpoints) with a step that does not wait for the
    GPU after each tensor, split float32 masters, and the adapters' flat one-launch pass (see the module
    docstring).

    bitsandbytes (0.50) calls torch.cuda.synchronize() after every parameter's update, which paged
    optimizers need (their states live in unified memory) and device-resident states do not: the
    updates are queued on one stream in order either way. With ~450 LoRA tensors that serialises the
    host and the GPU for each of them: about 25 ms of an 8B step in which the GPU waits for Python.
    Same kernels, same arguments, same order, so the same result bit for bit.

    What the training loop uses beyond torch.optim.Optimizer:
    - `host_split_state` (bool): split masters keep their low halves and moment codes in pinned host
      memory and stream them through the GPU (cpt.optim.host_state); only on CUDA. It may change
      between steps (a resumed run moves the states where it says).
    - `start_early(input_ids, clipping)`: with `host_split_state`, call it after the last
      micro-batch's forward pass and before its backward pass, with every token id of the step's
      micro-batches (on any device; None when unknown) and whether gradients get clipped. What needs
      no gradient starts then, beside the backward pass: embed_tokens' rows outside the batch, and
      without clipping lm_head's whole update as soon as its gradient is complete. `step()` commits it.
    - `abandon_early()`: call it instead of `step()` when the loop skips the step (a non-finite loss or
      gradient): it undoes what `start_early` began, and the weights and states are as before.
    - `close()`: stops the host-state threads and frees their buffers (also done when the optimizer
      is garbage).

    Keyword arguments beyond bitsandbytes' (defaults: the shipped, fastest measured settings; the
    others time alternatives or exercise edge cases in tests): `launch`, `tables`, `row_blocks`,
    `recip`, `gather` set up the Triton `Kernel`; `chunk_elements` is what the PyTorch update and the
    adapters' chunked pass take at a time; `side_launch` (the kernel's launch shape for host-state
    passes), `staging_elements`, `feeder_on_cpu` and `host_update` go to host_state.HostStream."""

    def __init__(self, params, *args, host_split_state: bool = False, launch: tuple[int, int, int] = LAUNCH,
                 tables: bool = True, row_blocks: bool = True, recip: bool = True, gather: bool = True,
                 chunk_elements: int = CHUNK_ELEMENTS, side_launch: Optional[tuple[int, int, int]] = None,
                 staging_elements: int = STAGING_ELEMENTS, feeder_on_cpu: bool = False,
                 host_update: Optional[Callable] = None, **kwargs):
        super().__init__(params, *args, **kwargs)
        # The low halves of split masters are integers: loading a checkpoint must not cast them.
        self.non_castable_tensor_keys = set(self.non_castable_tensor_keys) | {"lo"}
        self.kernel = Kernel(launch=launch, tables=tables, row_blocks=row_blocks, recip=recip, gather=gather)
        self.chunk_elements = chunk_elements
        self.host_split_state = host_split_state
        self.host_stream = HostStream(self.kernel, side_shape=side_launch, chunk_elements=staging_elements,
                                      feeder_on_cpu=feeder_on_cpu, update_rows=host_update)
        self._flat: Optional[dict[int, _FlatGroup]] = None
        self._flat_groups()  # now, before any forward pass: the parameters become views once
        self._early: Optional[EarlyStep] = None  # passes started before the step
        self._armed: dict[int, dict] = {}  # id(p) -> group: start p's pass when its gradient is complete
        self._hooks: dict[int, torch.utils.hooks.RemovableHandle] = {}

    def _flat_groups(self) -> dict[int, _FlatGroup]:
        if self._flat is None:
            if "dynamic" not in self.name2qmap:
                self.fill_qmap()
            self._flat = {}
            for gindex, group in enumerate(self.param_groups):
                members = [p for p in group["params"] if _flattenable(p, self.args.min_8bit_size)
                           and self.get_config(gindex, 0, group)["optim_bits"] == 8]
                if len(members) > 1:
                    self._flat[gindex] = _FlatGroup(members, self.state, self._maps(members[0].device), self.kernel,
                                                    self.chunk_elements)
        return self._flat

    def close(self) -> None:
        """Stop the host-state threads, free their staging buffers and remove the gradient hooks (made
        again if the optimizer steps on)."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self.host_stream.close()

    def load_state_dict(self, state_dict, move_to_device=True):
        # Loaded where torch.load put them (the host); then each tensor goes where it lives, so a
        # host-resident embedding state never passes through GPU memory.
        super().load_state_dict(state_dict, move_to_device=False)
        if move_to_device:
            self.to_gpu()
        self._flat = None  # loaded states replaced the flat buffers' views: gather them again
        self._flat_groups()
        self._armed, self._early = {}, None

    def to_gpu(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.device.type == "cpu" or p not in self.state:
                    continue
                on_host = self.host_split_state and getattr(p, SPLIT_MASTER, False)
                for k, v in self.state[p].items():
                    if not isinstance(v, torch.Tensor) or getattr(v, "is_paged", False):
                        continue
                    self.state[p][k] = to_host(v) if on_host and k in HOST_KEYS else v.to(p.device)

    def finish_host_updates(self, device: Optional[torch.device] = None) -> None:
        """Wait until every update of host-resident states (on `device`, or all) has landed in host
        memory, so that they can be read."""
        devices = {p.device for g in self.param_groups for p in g["params"]} if device is None else {device}
        for d in devices:
            self.host_stream.drain(d)  # every pass queued (a Feeder may still be queuing one)
        if torch.cuda.is_available():
            if device is None:
                torch.cuda.synchronize()
            elif device.type == "cuda":
                torch.cuda.synchronize(device)

    def state_dict(self):
        if self.host_split_state:
            self.finish_host_updates()
        return super().state_dict()

    @torch.no_grad()
    def step(self, closure=None):
        if self.is_paged:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        flat_groups = self._flat_groups()
        # Split masters whose states wait in host memory go first, on side streams (one pipelined
        # pass of copies and updates), so that the GPU updates the adapters meanwhile; what an
        # early pass already did is committed.
        early, self._armed = self._early, {}
        streamed = [] if not self.host_split_state else [
            (group, p) for group in self.param_groups for p in group["params"]
            if getattr(p, SPLIT_MASTER, False) and (p.grad is not None or (early is not None and early.has(p)))]
        if streamed:
            jobs = []
            for group, p in streamed:
                if early is not None and early.has(p):
                    if early.covers(p):
                        early.commit(p)
                        continue
                    early.drop(p)  # a gradient row the batch's ids did not name: do it all now
                if p.grad is not None:
                    jobs.append(self._split_step(group, p))
            self.host_stream.launch(jobs, self._maps(streamed[0][1].device))
        streamed_ids = {id(p) for _, p in streamed}
        for gindex, group in enumerate(self.param_groups):
            flat = flat_groups.get(gindex)
            if flat is not None and flat.ready():
                flat.step(group)  # every member has a gradient: one pass over the group's buffer
                handled = flat.members
            else:
                handled = ()
            for pindex, p in enumerate(group["params"]):
                if p.grad is None or p in handled or id(p) in streamed_ids:
                    continue
                if getattr(p, SPLIT_MASTER, False):
                    self._split_step(group, p)
                    continue
                if not self.state[p]:
                    self.init_state(group, p, gindex, pindex)
                self.update_step(group, p, gindex, pindex)  # on flat members' views, in place
        if streamed:
            self.host_stream.wait(streamed[0][1].device)  # weights and host states final from here on
        return loss

    # ------------------------------------------------------------ passes started before the step

    def start_early(self, input_ids: Optional[torch.Tensor], clipping: bool) -> None:
        """Start what the step's host-resident updates can do before the gradients are complete (see the
        class docstring); nothing without `host_split_state`."""
        if not self.host_split_state:
            return
        for group in self.param_groups:
            for p in group["params"]:
                if not getattr(p, SPLIT_MASTER, False):
                    continue
                if self._early is None:
                    self._early = EarlyStep(self, self._maps(p.device), self.host_stream)
                self._split_state(group, p)
                if getattr(p, ROW_SPARSE, False):
                    if input_ids is not None and p.shape[1] % BLOCK == 0:
                        self._early.start(group, p, input_ids)
                elif not clipping:
                    if id(p) not in self._hooks:
                        self._hooks[id(p)] = p.register_post_accumulate_grad_hook(_weak_hook(self._gradient_complete))
                    self._armed[id(p)] = group

    def _gradient_complete(self, p: torch.Tensor) -> None:
        group = self._armed.pop(id(p), None)
        if group is not None:
            self._early.start(group, p, None)

    def abandon_early(self) -> None:
        """The loop skips this step: undo what start_early began."""
        self._armed = {}
        if self._early is not None:
            self._early.abandon()

    def _split_step(self, group: dict, p: torch.Tensor) -> Optional[Job]:
        """Trained embeddings held as bf16 + low bits (see split_master): our blockwise update.
        Returns a host_state.Job to launch instead when the state waits in host memory."""
        state = self._split_state(group, p)
        state["step"] += 1
        b1, b2 = group["betas"][0], group["betas"][1]
        kw = {"lr": group["lr"], "betas": (b1, b2), "eps": group["eps"], "weight_decay": group["weight_decay"],
              "step": state["step"]}
        if self.host_split_state:
            g, slot = grad_table(p, p.grad)
            hp = hyperparameters(b1, b2, kw["lr"], kw["eps"], kw["weight_decay"], kw["step"], p.device)
            return Job(p, state, state, hp, g, slot)
        split_adamw8bit_step(p, p.grad, state, self._maps(p.device), kernel=self.kernel,
                             chunk_elements=self.chunk_elements, **kw)
        return None

    def _split_state(self, group: dict, p: torch.Tensor) -> dict:
        """A split master's state: made on first use, migrated from an older layout, and placed
        (host or device) as `host_split_state` says."""
        state = self.state[p]
        if state and "lo" not in state:
            # A checkpoint of a run that held this matrix as a float32 tensor: the model tensor was
            # loaded rounded to bf16 and its moments were kept by bitsandbytes' per-tensor path.
            # Carry on from the rounded value (its low half is lost) with the moments it had.
            logger.warning(
                "the checkpoint holds no low half for a trained embedding matrix (written by an earlier "
                "layout); its float32 master resumes from the bf16 value")
            state["lo"] = torch.zeros(p.shape, dtype=torch.int16, device=p.device)
            maps, padded = self._maps(p.device), -(-p.numel() // BLOCK) * BLOCK
            for k, zero in (("state1", maps.zero1), ("state2", maps.zero2)):
                flat = state[k].reshape(-1)
                fill = torch.full((padded - flat.numel(),), zero, dtype=flat.dtype, device=flat.device)
                state[k] = torch.cat([flat, fill])
        on_host = self.host_split_state
        if not state:
            n = p.numel()
            padded = -(-n // BLOCK) * BLOCK
            state["step"] = 0
            maps = self._maps(p.device)
            if on_host:
                state["state1"] = host_tensor((padded,), torch.uint8, maps.zero1)
                state["state2"] = host_tensor((padded,), torch.uint8, maps.zero2)
                state["lo"] = host_tensor(p.shape, torch.int16)
            else:
                state["state1"] = torch.full((padded,), maps.zero1, dtype=torch.uint8, device=p.device)
                state["state2"] = torch.full((padded,), maps.zero2, dtype=torch.uint8, device=p.device)
                state["lo"] = torch.zeros(p.shape, dtype=torch.int16, device=p.device)
            state["absmax1"] = torch.zeros(padded // BLOCK, dtype=torch.float32, device=p.device)
            state["absmax2"] = torch.zeros(padded // BLOCK, dtype=torch.float32, device=p.device)
        if on_host:  # the switch may have changed since the checkpoint was written
            for k in HOST_KEYS:
                state[k] = to_host(state[k])
        else:
            for k in HOST_KEYS:
                state[k] = state[k].to(p.device)
        return state

    def _maps(self, device: torch.device) -> QuantMaps:
        if "dynamic" not in self.name2qmap:
            self.fill_qmap()
        key = ("maps", device)
        if key not in self.name2qmap:
            self.name2qmap[key] = QuantMaps(self.name2qmap["dynamic"], self.name2qmap["udynamic"], device)
        return self.name2qmap[key]
