"""Float32 masters held as a bf16 weight + an int16 low half, and their blockwise 8-bit AdamW, in PyTorch.

A trained embedding matrix of a bf16 run needs float32 masters: at lr 1e-6 almost every update is
smaller than half a bf16 step and rounds away (only ~2% of elements would ever change). The usual
answer, a float32 copy beside the bf16 weight or a float32 weight cast for every use, costs 4 bytes
per element plus float32 gradients. Here the float32 value is kept in two 16-bit halves: the bf16
weight the model computes with (the float32 value rounded to nearest) and an int16 remainder that
lives in the optimizer state. Together they are the float32 master bit for bit; autograd sees a bf16
weight, so its gradient is bf16 too. On an 8B model's 1.05B embedding elements this saves 2 GiB of
gradients and the per-step casts, and loses nothing (docs/performance.md, "Float32 split masters").

This module is the representation and the update's definition, in PyTorch operations: the 8-bit
maps (`QuantMaps`, `BucketTable`), the chunked and row-wise updates (dense or row-sparse gradients,
rows set aside with `SKIP`), and their inversion (`UndoLog`, `undo_split_rows`). Every update takes an
optional `kernel`, a faster implementation of the same arithmetic (cpt.optim.adamw8bit.Kernel, Triton
on CUDA) that may decline, in which case the PyTorch operations here run. It imports nothing of
cpt.optim: host_state and adamw8bit build on it.

    python -m pytest tests/test_split_master.py -q
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Protocol

import torch

# The marks themselves belong to the model stage, which sets them on the trained embeddings.
from cpt.model.adapters import ROW_SPARSE, SPLIT_MASTER, mark_split_master  # noqa: F401 (re-exported)

logger = logging.getLogger("cpt")

HOST_KEYS = ("lo", "state1", "state2")  # what a split master may keep in host memory (cpt.optim.host_state)
SKIP = -2  # a slot-table entry (see update_split_rows): the row is left exactly as it is
BLOCK = 256  # elements per quantisation block of the 8-bit states (as bitsandbytes' blockwise optimizers)
CHUNK_ELEMENTS = 1 << 24  # elements the PyTorch update takes at a time: float32 temporaries stay at 64 MiB each


def split_float32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 -> (the nearest bf16, an int16 remainder); join_float32 gives x back bit for bit.

    bf16 is the top half of a float32's bits, so rounding is an integer add on the bit pattern; the
    remainder is what the rounding took away, in [-2**15, 2**15)."""
    bits = x.contiguous().view(torch.int32)
    high = (bits + 0x8000) >> 16
    low = bits - (high << 16)
    return high.to(torch.int16).view(torch.bfloat16), low.to(torch.int16)


def join_float32(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    return ((high.view(torch.int16).to(torch.int32) << 16) + low.to(torch.int32)).view(torch.float32)


class QuantMaps:
    """The 256 values an 8-bit state can take (signed for the first moment, unsigned for the second)
    and the midpoints between neighbours, so that rounding to the nearest value is one bucketize."""

    def __init__(self, signed: torch.Tensor, unsigned: torch.Tensor, device: torch.device):
        for name, m in (("signed", signed), ("unsigned", unsigned)):
            if m.numel() != 256 or bool((m[1:] < m[:-1]).any()):
                raise ValueError(f"the {name} 8-bit map must hold 256 sorted values")
        self.q1, self.q2 = signed.float().to(device), unsigned.float().to(device)
        self.mid1, self.mid2 = (self.q1[1:] + self.q1[:-1]) / 2, (self.q2[1:] + self.q2[:-1]) / 2
        # Where a fresh state starts: the codes of 0. Elements that only pad a block to 256 then stay at
        # exactly 0 and never widen their block's maximum (code 0 of the signed map means -max).
        self.zero1, self.zero2 = int(self.q1.abs().argmin()), int(self.q2.abs().argmin())
        # For the GPU kernel: a table that narrows each rounding down to a step or two (BucketTable).
        self.table1, self.table2 = BucketTable(self.mid1), BucketTable(self.mid2)


class BucketTable:
    """bucketize(x, mid) (the number of midpoints below x) as one table lookup and `steps` compares.

    A float's bit pattern orders its magnitude, so the pattern's top bits (exponent and the leading
    mantissa bits, `shift` bits dropped) name a small interval of values; `start[key]` counts the
    midpoints below the interval, and at most `steps` midpoints lie inside any interval. Magnitudes
    below 2**-e (smaller than every nonzero midpoint) share the first interval and those above 1 the
    last. A binary search makes 8 dependent lookups in the 255 midpoints per element and moment; with
    bitsandbytes' dynamic maps this makes 2 (steps = 1). `steps` None: no table this small exists for
    the map (the kernel keeps its binary search)."""

    MAX_ENTRIES = 8192

    def __init__(self, mid: torch.Tensor):
        mid = mid.detach().float().cpu()
        nonzero = mid[mid != 0].abs()
        e = 126 if nonzero.numel() == 0 else min(126, int(math.ceil(-math.log2(float(nonzero.min())))) + 1)
        self.base = int(torch.tensor(2.0 ** -e).view(torch.int32))
        one = int(torch.tensor(1.0).view(torch.int32))
        self.shift, self.keys, self.steps, self.start = 0, 0, None, None
        self._on: dict = {}
        for shift in range(23, 9, -1):  # the coarsest table with the fewest steps, among small enough ones
            keys = ((one - self.base) >> shift) + 1
            if 2 * keys > self.MAX_ENTRIES:
                break
            lo, hi = self._bounds(shift, keys)
            start = torch.searchsorted(mid, lo)
            steps = int((torch.searchsorted(mid, hi) - start).max())
            if self.steps is None or steps < self.steps:
                self.shift, self.keys, self.steps, self.start = shift, keys, steps, start.to(torch.uint8)
            if steps <= 1:
                break

    def _bounds(self, shift: int, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest and largest value of each key's interval, keys in increasing order of x."""
        j = torch.arange(keys, dtype=torch.int64)
        low = (self.base + (j << shift)).clamp(max=0x7F7FFFFF)
        high = (self.base + ((j + 1) << shift) - 1).clamp(max=0x7F7FFFFF)
        low[0] = 0  # everything smaller shares the first interval
        as_float = lambda bits: bits.to(torch.int32).view(torch.float32)  # noqa: E731
        mag_lo, mag_hi = as_float(low), as_float(high)
        mag_hi[-1] = float("inf")  # and everything larger the last
        # key = keys - 1 - j for -x (the negative side, mirrored), keys + j for +x
        lo = torch.cat([-mag_hi.flip(0), mag_lo])
        hi = torch.cat([-mag_lo.flip(0), mag_hi])
        return lo, hi

    def on(self, device: torch.device) -> torch.Tensor:
        """`start` on the device (copied once per device); one zero when there is no table."""
        if device not in self._on:
            self._on[device] = (self.start if self.start is not None else torch.zeros(1, dtype=torch.uint8)).to(device)
        return self._on[device]

    def key(self, x: torch.Tensor) -> torch.Tensor:
        """Each float32 x's interval (the kernel computes the same from the bits)."""
        bits = x.contiguous().view(torch.int32)
        j = ((bits & 0x7FFFFFFF) - self.base) >> self.shift
        j = j.clamp(0, self.keys - 1)
        return torch.where(bits < 0, self.keys - 1 - j, self.keys + j)

    def bucketize(self, x: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
        """What the kernel computes, in PyTorch: equal to torch.bucketize(x, mid) (tests hold it to that)."""
        i = self.start.to(x.device)[self.key(x).long()].long()
        for _ in range(self.steps):
            nxt = mid[i.clamp(max=mid.numel() - 1)]
            i = torch.where((i < mid.numel()) & (nxt < x), i + 1, i)
        return i


class Kernel(Protocol):
    """A faster implementation of the updates below (cpt.optim.adamw8bit.Kernel: Triton, on CUDA). It
    returns False, having changed nothing, where it cannot run (another device, no Triton, a failure);
    the PyTorch operations then do the work. Arguments as cpt.optim.adamw8bit.adamw8bit_update's."""

    def __call__(self, p: torch.Tensor, lo: Optional[torch.Tensor], g: torch.Tensor, slot: Optional[torch.Tensor],
                 s1: torch.Tensor, s2: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor, maps: QuantMaps,
                 hp: torch.Tensor, *, shape: Optional[tuple[int, int, int]] = None, log: Optional["UndoLog"] = None,
                 base: int = 0, undo_from: Optional[torch.Tensor] = None) -> bool: ...


def hyperparameters(b1: float, b2: float, lr: float, eps: float, weight_decay: float, step: int,
                    device: torch.device) -> torch.Tensor:
    """[beta1, beta2, step size, eps, decay] on the device, bias corrections folded in, without a sync."""
    c1 = 1 - b1 ** step
    c2 = math.sqrt(1 - b2 ** step)
    hp = torch.tensor([b1, b2, -lr * c2 / c1, eps * c2, 1 - lr * weight_decay], dtype=torch.float32)
    return hp.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else hp


def grad_table(p: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(gradient, None) for a dense gradient; (values, slot) for a row-sparse one, slot[row] being the
    row's index in values or -1."""
    if not grad.is_sparse:
        return grad.contiguous(), None
    grad = grad.coalesce()
    slot = torch.full((p.shape[0],), -1, dtype=torch.int64, device=p.device)
    idx = grad.indices()[0]
    slot[idx] = torch.arange(idx.numel(), device=p.device)
    values = grad.values().contiguous()
    if values.numel() == 0:
        values = torch.zeros(1, p.shape[1], dtype=p.dtype, device=p.device)
    return values, slot


def chunk_rows(width: int, elements: int) -> int:
    """Rows per chunk of about `elements`, a whole number of quantisation blocks (chunks start on one)."""
    align = BLOCK // math.gcd(width, BLOCK)
    return max(align, max(1, elements // width) // align * align)


# ---------------------------------------------------------------------------- the blockwise update


def _adamw8bit_blocks(master, g, s1, s2, a1, a2, q1, q2, mid1, mid2, hp, with_step: bool = False):
    """Blockwise 8-bit AdamW on flat float32 `master` and gradient `g` (length a multiple of BLOCK).
    Returns the new master, states and block maxima. hp = [beta1, beta2, step size, eps, decay]:
    the bias corrections are folded into step size and eps, and weight decay multiplies after the
    update, as in bitsandbytes' kernels. with_step: each element's step before decay too (last)."""
    m, v, d = _moments(g, s1, s2, a1, a2, q1, q2, hp)
    new = (master.view(-1, BLOCK) + d) * hp[4]
    n1 = m.abs().amax(1, keepdim=True)
    n2 = v.amax(1, keepdim=True)
    # Each block's moments are scaled by one reciprocal of its maximum (not divided element by element).
    i1 = torch.bucketize(m * (1 / n1.clamp_min(1e-30)), mid1)
    i2 = torch.bucketize(v * (1 / n2.clamp_min(1e-30)), mid2)
    out = new.view(-1), i1.to(torch.uint8).view(-1), i2.to(torch.uint8).view(-1), n1.view(-1), n2.view(-1)
    return (*out, d.view(-1)) if with_step else out


def _moments(g, s1, s2, a1, a2, q1, q2, hp):
    """The blocks' new moments (float32, dequantised) and each element's step before weight decay."""
    b1, b2, step_size, eps = hp[0], hp[1], hp[2], hp[3]
    g = g.float().view(-1, BLOCK)
    m = q1[s1.long()].view(-1, BLOCK) * a1[:, None] * b1 + (1 - b1) * g
    v = q2[s2.long()].view(-1, BLOCK) * a2[:, None] * b2 + (1 - b2) * g * g
    return m, v, step_size * m / (v.sqrt() + eps)


def update_flat(master: torch.Tensor, g: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, a1: torch.Tensor,
                a2: torch.Tensor, maps: QuantMaps, hp: torch.Tensor) -> None:
    """Update a flat float32 buffer (a whole number of blocks) and its states in place, in PyTorch."""
    new, i1, i2, n1, n2 = _adamw8bit_blocks(master, g, s1, s2, a1, a2, maps.q1, maps.q2, maps.mid1, maps.mid2, hp)
    master.copy_(new)
    s1.copy_(i1)
    s2.copy_(i2)
    a1.copy_(n1)
    a2.copy_(n2)


# ---------------------------------------------------------------------------- undoing a split update
#
# An update that may have to be taken back (host_state's early passes: the loop may skip the step)
# needs the old weights. The old low halves and moments are still there (the pass writes new ones
# elsewhere), so only the old high halves are missing, and they follow from the new master and the step:
# master = new / decay - d, computed in float32, lies within a few float32 units of the old master, whose
# low 16 bits are known; the old high half is the one that puts it nearest. The update checks that,
# with a margin, for every element as it goes (`UndoLog.record`) and logs the few it cannot vouch for (a
# step thousands of times the weight, which rounds the weight away) with their old high half; elements
# whose step is not finite are left as they are. Undoing is then exact without a copy of the weights.

UNDO_MARGIN = 1 << 14  # float32 units (of 1 << 16 per bf16 unit) the estimate may be off and still count
UNDO_LOG = 1 << 16  # elements a pass may log per matrix (10 bytes each, on its device)


def _finite(x: torch.Tensor) -> torch.Tensor:
    return x.abs() <= torch.finfo(torch.float32).max


def _invert_split(new: torch.Tensor, old_lo: torch.Tensor, d: torch.Tensor, decay) -> tuple[torch.Tensor, torch.Tensor]:
    """(the old high half's bits as int64, how far the estimate is from the master that half gives, in
    float32 units) for an update that made float32 `new` from a master whose low half was `old_lo`.
    Not finite: a distance beyond any margin."""
    approx = new * (1 / decay) - d
    bits = approx.view(torch.int32).to(torch.int64)
    lo = old_lo.to(torch.int64)
    high = (bits - lo + 0x8000) >> 16
    dist = torch.where(_finite(approx), bits - ((high << 16) + lo), 1 << 30)
    return high, dist


class UndoLog:
    """The elements of one matrix an update could not vouch to undo by inversion (see `_invert_split`):
    their flat index and old high half, up to `capacity`, on the matrix's device. `count` (on the device)
    goes on counting past the capacity; such an undo is not exact, and `apply` says so."""

    def __init__(self, device: torch.device, capacity: int = UNDO_LOG):
        self.capacity = capacity
        self.index = torch.zeros(capacity + 1, dtype=torch.int64, device=device)  # the last: where extras go
        self.high = torch.zeros(capacity + 1, dtype=torch.int16, device=device)
        self.count = torch.zeros(1, dtype=torch.int32, device=device)

    def reset(self) -> None:
        self.count.zero_()

    def record(self, bad: torch.Tensor, index: torch.Tensor, high: torch.Tensor) -> None:
        """Log high[bad] at index[bad] (flat tensors), without waiting for the device."""
        bad = bad.reshape(-1)
        pos = self.count.to(torch.int64) + bad.long().cumsum(0) - 1
        pos = torch.where(bad & (pos < self.capacity), pos, self.capacity)
        self.index.scatter_(0, pos, index.reshape(-1))
        self.high.scatter_(0, pos, high.reshape(-1).to(torch.int16))
        self.count += bad.sum().to(torch.int32)

    def apply(self, p: torch.Tensor) -> None:
        """Put the logged high halves back into bf16 p (waits for the device)."""
        count = int(self.count.item())
        n = min(count, self.capacity)
        if n:
            p.data.view(torch.int16).view(-1).index_copy_(0, self.index[:n], self.high[:n])
        if count > self.capacity:
            logger.warning(
                "undoing the skipped step's early update of a %s trained embedding matrix: %d of its elements could "
                "not be restored bit for bit (more than %d had steps thousands of times their value)",
                "x".join(map(str, p.shape)), count - self.capacity, self.capacity)


# ---------------------------------------------------------------------------- rows of a split master


def _split_chunk(high, low, g, s1, s2, a1, a2, q1, q2, mid1, mid2, hp, undo: Optional[UndoLog] = None, base: int = 0):
    """Update rows of a split master in place; `g` is the dense gradient of those rows. undo: make the
    update undoable (see UndoLog; its flat indices count from `base`)."""
    n = high.numel()
    pad = s1.numel() - n  # only the last chunk of a matrix whose size is not a multiple of BLOCK
    master = join_float32(high, low).view(-1)
    g = g.reshape(-1)
    if pad:
        master, g = torch.nn.functional.pad(master, (0, pad)), torch.nn.functional.pad(g, (0, pad))
    new, i1, i2, n1, n2, *step = _adamw8bit_blocks(master, g, s1, s2, a1, a2, q1, q2, mid1, mid2, hp, undo is not None)
    h, lo = split_float32(new[:n].view(high.shape))
    if undo is not None:
        d = step[0][:n].view(high.shape)
        old_high = high.view(torch.int16)
        est, dist = _invert_split(new[:n].view(high.shape), low, d, hp[4])
        frozen = ~_finite(d)
        bad = ~frozen & ((est != old_high) | (dist.abs() >= UNDO_MARGIN))
        undo.record(bad, base + torch.arange(n, device=high.device), old_high)
        h = torch.where(frozen, high, h)
        lo = torch.where(frozen, low, lo)
    high.copy_(h)
    low.copy_(lo)
    s1.copy_(i1)
    s2.copy_(i2)
    a1.copy_(n1)
    a2.copy_(n2)


def _rows(slot: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Dense gradient rows from a row-sparse one: row i's is values[slot[i]], or zero if slot[i] < 0.
    Rows without a gradient still move (their moments decay), exactly as with a dense zero gradient."""
    return torch.where((slot >= 0)[:, None], values[slot.clamp(min=0)], 0)


def update_split_rows(high, low, g, slot, s1, s2, a1, a2, maps: QuantMaps, hp: torch.Tensor, *,
                      kernel: Optional[Kernel] = None, shape: Optional[tuple[int, int, int]] = None,
                      log: Optional[UndoLog] = None, base: int = 0, chunk_elements: int = CHUNK_ELEMENTS) -> None:
    """Update rows of a split master in place: `kernel` where it runs, else PyTorch by chunks of about
    `chunk_elements`. g: the rows' dense gradient, or (slot given, one entry per row) the values of a
    sparse one: slot[row] is the row's index in g, -1 (no gradient: its moments decay), or SKIP (left as
    it is; rows must then be whole quantisation blocks). shape: the kernel's launch shape.
    log: make the update undoable by `undo_split_rows` (see UndoLog); `high`'s first element is element
    `base` of its matrix."""
    if kernel is not None and kernel(high, low, g, slot, s1, s2, a1, a2, maps, hp, shape=shape, log=log, base=base):
        return
    rows, width = high.shape
    skip = None if slot is None else (slot == SKIP).nonzero().squeeze(1)
    if skip is not None and skip.numel():
        per = width // BLOCK
        kept = [high, low, *(t.view(-1)[:rows * width].view(rows, width) for t in (s1, s2)),
                *(t.view(-1)[:rows * per].view(rows, per) for t in (a1, a2))]
        saved = [t.index_select(0, skip) for t in kept]
    else:
        kept = None
    step_rows = chunk_rows(width, chunk_elements)
    for r0 in range(0, rows, step_rows):
        r1 = min(rows, r0 + step_rows)
        e0, e1 = r0 * width, min(s1.numel(), -(-(r1 * width) // BLOCK) * BLOCK)
        _split_chunk(high[r0:r1], low[r0:r1], _rows(slot[r0:r1], g) if slot is not None else g[r0:r1],
                     s1[e0:e1], s2[e0:e1], a1[e0 // BLOCK:e1 // BLOCK], a2[e0 // BLOCK:e1 // BLOCK],
                     maps.q1, maps.q2, maps.mid1, maps.mid2, hp, log, base + e0)
    if kept is not None:
        for t, v in zip(kept, saved):
            t.index_copy_(0, skip, v)


def undo_split_rows(high, new_lo, old_lo, g, slot, s1, s2, a1, a2, maps: QuantMaps, hp: torch.Tensor, *,
                    kernel: Optional[Kernel] = None, chunk_elements: int = CHUNK_ELEMENTS) -> None:
    """Take back an undoable `update_split_rows` of these rows, but for the elements it logged: `high`
    holds the weights it made and `new_lo` their low halves; `old_lo`, the moments and block maxima
    are those it started from, g, slot and hp what it was given. Writes only `high`."""
    if kernel is not None and kernel(high, new_lo, g, slot, s1, s2, a1, a2, maps, hp, undo_from=old_lo):
        return
    rows, width = high.shape
    step_rows = chunk_rows(width, chunk_elements)
    for r0 in range(0, rows, step_rows):
        r1 = min(rows, r0 + step_rows)
        e0, e1 = r0 * width, min(s1.numel(), -(-(r1 * width) // BLOCK) * BLOCK)
        n = (r1 - r0) * width
        gr = (_rows(slot[r0:r1], g) if slot is not None else g[r0:r1]).reshape(-1)
        if e1 - e0 > n:
            gr = torch.nn.functional.pad(gr, (0, e1 - e0 - n))
        d = _moments(gr, s1[e0:e1], s2[e0:e1], a1[e0 // BLOCK:e1 // BLOCK], a2[e0 // BLOCK:e1 // BLOCK],
                     maps.q1, maps.q2, hp)[2].view(-1)[:n].view(r1 - r0, width)
        h = high[r0:r1]
        est, _ = _invert_split(join_float32(h, new_lo[r0:r1]), old_lo[r0:r1], d, hp[4])
        keep = ~_finite(d)
        if slot is not None:
            keep |= (slot[r0:r1] == SKIP)[:, None]
        h.view(torch.int16).copy_(torch.where(keep, h.view(torch.int16), est.to(torch.int16)))


def split_adamw8bit_step(p: torch.Tensor, grad: torch.Tensor, state: dict, maps: QuantMaps, *, lr: float,
                         betas: tuple[float, float], eps: float, weight_decay: float, step: int,
                         kernel: Optional[Kernel] = None, chunk_elements: int = CHUNK_ELEMENTS) -> None:
    """One AdamW step (8-bit blockwise states) of the float32 master held as bf16 `p` + state["lo"].
    `grad` is dense, or sparse COO over rows (an embedding's gradient: only the rows the batch used)."""
    hp = hyperparameters(betas[0], betas[1], lr, eps, weight_decay, step, p.device)
    g, slot = grad_table(p, grad)
    update_split_rows(p.data, state["lo"], g, slot, state["state1"], state["state2"], state["absmax1"],
                      state["absmax2"], maps, hp, kernel=kernel, chunk_elements=chunk_elements)
