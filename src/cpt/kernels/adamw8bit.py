"""Blockwise 8-bit AdamW as one Triton kernel (CUDA): the update cpt.optim defines, in one pass.

Each program takes NB quantisation blocks of 256 elements: it dequantises both moments through the
256-entry maps, adds the gradient, updates the float32 master (plain, or held split as bf16 weight +
int16 low half), takes each block's new maximum, and rounds the moments back to the nearest map value:
a lookup in a table keyed by the value's leading bits and one compare with bitsandbytes' maps
(cpt.optim.BucketTable), where an 8-step binary search over the 255 midpoints made 8 dependent
lookups. A row-sparse gradient (an embedding's) is read through a row -> slot table, so the rows the
batch did not use are updated with a zero gradient without ever being made dense; a row whose slot
is -2 is left untouched (set aside for later). The adapters' many float32 tensors, laid end to end
(cpt.optim._FlatGroup), are updated in one launch that reads each member's gradient where it lies
(`GatheredGrads`). A split master's update can be made undoable (it logs the few elements whose old
weight cannot be recomputed from the new one, cpt.optim.UndoLog) and taken back by the same kernel
(UNDO 1 and 2). About 14 bytes of traffic per element, against ~100 for the same update written as
separate PyTorch operations.

The work is mostly lookups and arithmetic, not traffic: one warp per block (NB=1, NUM_WARPS=1) ran
1.23x faster on an 8B model's embeddings than four warps on four blocks, and a block's moments are
scaled by one reciprocal of its maximum (bench/optim_step.py --sweep; bench/NOTES.md, session 12).

cpt.optim calls `adamw8bit_update` on CUDA when Triton is installed; `_adamw8bit_blocks` there is
the same computation in PyTorch (CPU, and the reference the GPU test compares against).

    python -m pytest tests/test_optim.py -q -k triton      (on a CUDA machine)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256
BLOCKS_PER_PROGRAM = 1
# The two shortcuts below can be turned off to time the kernel without them (bench/optim_step.py).
TABLES = True  # round moments through cpt.optim.BucketTable (False: binary search over the midpoints)
ROW_BLOCKS = True  # a row-sparse gradient whose rows are whole blocks: one slot lookup per block
RECIP = True  # scale a block's moments by one reciprocal of its maximum instead of a division per element
NUM_WARPS = 1  # with BLOCKS_PER_PROGRAM: bench/optim_step.py --sweep times the other shapes


@triton.jit
def _bucketize(x, mid_ptr, t_ptr, NB: tl.constexpr, BASE: tl.constexpr, SHIFT: tl.constexpr, KEYS: tl.constexpr,
               STEPS: tl.constexpr):
    if STEPS >= 0:  # cpt.optim.BucketTable: the interval's count from the table, then STEPS compares
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


@triton.jit
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


@triton.jit
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
        # slot -2 (cpt.optim.SKIP): a row set aside for later, left exactly as it is (blocks lie within rows)
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
    if UNDO == 2:  # take an undoable update back (cpt.optim._undo_split_rows): p and lo hold what it made
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
        if RECIP:  # one division per block (cpt.optim._adamw8bit_blocks scales the same way)
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
            if UNDO == 1:  # undoable (cpt.optim.UndoLog): log what inverting would not give back
                est, dist = _invert(new, lo, d, decay)
                moved = live & (tl.abs(d) <= 3.4028234663852886e38)  # a step that is not finite: leave it
                bad = moved & ((est != hi.to(tl.int32)) | (tl.abs(dist) >= 16384))  # cpt.optim.UNDO_MARGIN
                if tl.sum(bad.to(tl.int32)) > 0:  # rare: most programs log nothing
                    pos = tl.atomic_add(lc_ptr + tl.zeros([NB, 256], dtype=tl.int32), 1, mask=bad)
                    pos = tl.where(bad & (pos < cap), pos, cap)
                    tl.store(li_ptr + pos, offs + base, mask=bad)
                    tl.store(lh_ptr + pos, hi, mask=bad)
            tl.store(p_ptr + offs, high.to(tl.int16), mask=moved)
            tl.store(lo_ptr + offs, (bits - (high << 16)).to(tl.int16), mask=moved)
        else:
            tl.store(p_ptr + offs, new, mask=live)


@triton.jit
def _invert(new, old_lo, d, decay):
    """cpt.optim._invert_split in int32 (it wraps only where the estimate is not finite, which fails the
    check anyway): the old high half and the estimate's distance from the master it gives."""
    approx = new * (1.0 / decay) - d  # one reciprocal: the margin covers its rounding
    bits = approx.to(tl.int32, bitcast=True)
    lo = old_lo.to(tl.int32)
    high = (bits - lo + 0x8000) >> 16
    dist = tl.where(tl.abs(approx) <= 3.4028234663852886e38, bits - ((high << 16) + lo), 1 << 30)
    return high, dist


def adamw8bit_update(p: torch.Tensor, lo, g: torch.Tensor, slot, s1, s2, a1, a2, maps, hp: torch.Tensor,
                     members: "GatheredGrads | None" = None, shape: "tuple[int, int, int] | None" = None,
                     log=None, base: int = 0, undo_from: "torch.Tensor | None" = None) -> None:
    """In place: p is a float32 master, or (lo given) the bf16 high half of one. g is dense like p, or
    (slot given) the values of a row-sparse gradient, slot[row] its row in g or -1; or (members given,
    g and slot None) p is a flat buffer of float32 members whose gradients `members` points at.
    `shape`: (blocks per program, warps, programs) instead of the defaults; programs 0 is one per
    group of blocks, more makes that many programs loop over the groups (fewer SMs held at a time).
    Split masters only: `log` (a cpt.optim.UndoLog, p's first element being its element `base`) makes
    the update undoable; `undo_from` (the old low halves) takes one back instead (p and lo hold what it
    made; only p is written)."""
    n = p.numel()
    width = p.shape[-1] if p.ndim > 1 else n
    split, sparse = lo is not None, slot is not None
    target = p.view(torch.int16) if split else p
    if members is not None:
        g, slot, width = members.table, members.block_member, members.count
    nb, warps, programs = shape or (BLOCKS_PER_PROGRAM, NUM_WARPS, 0)
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
                            x, li, lh, lc, base, cap, UNDO=undo, SPLIT=split, SPARSE=sparse, ROW_BLOCKS=ROW_BLOCKS and sparse and width % BLOCK == 0,
                            GATHER=members is not None, NB=nb, RECIP=RECIP, PERSIST=bool(programs),
                            T1_BASE=t1.base, T1_SHIFT=t1.shift, T1_KEYS=max(t1.keys, 1), T1_STEPS=_steps(t1),
                            T2_BASE=t2.base, T2_SHIFT=t2.shift, T2_KEYS=max(t2.keys, 1), T2_STEPS=_steps(t2),
                            num_warps=warps)


class GatheredGrads:
    """Where the kernel finds each member's gradient when a flat buffer of many float32 tensors (the
    adapters, cpt.optim._FlatGroup) is updated in one launch, without first copying the gradients into
    one flat buffer: per block its member, per member its gradient's address, first element and size."""

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


def _steps(table) -> int:
    return -1 if not TABLES or table.steps is None or table.steps > 4 else table.steps  # -1: binary search


@triton.jit
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
    k, width = (src if scatter else dst).shape
    if k:
        _move_rows_kernel[(k, triton.cdiv(width, 1024))](dst, src, index, width, SCATTER=scatter, BLOCK_W=1024)


def gather_rows(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """out[i] = src[index[i]] for a row-major src anywhere the GPU can address, pinned host memory
    included (the rows cpt.host_state set aside, read back at the step without a host sync)."""
    _move_rows(out, src, index, scatter=False)


def scatter_rows(dst: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """dst[index[i]] = rows[i] for a row-major dst anywhere the GPU can address, pinned host memory
    included (cpt.host_state writes the kept rows' states home this way, without a host sync)."""
    _move_rows(dst, rows.contiguous(), index, scatter=True)
