"""Optimizers and learning-rate schedules.

    python -m pytest tests/test_optim.py -q
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch

from cpt.config import ConfigError, TrainConfig


def build_optimizer(groups: list[dict], t: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the named parameter groups. adamw_torch is fused where the device allows it."""
    param_groups = [{"params": g["params"], "lr": g["lr"], "weight_decay": g["weight_decay"], "name": g["name"]}
                    for g in groups]
    kw = dict(betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    if t.optim == "adamw_8bit":
        # bitsandbytes steps on CUDA, and (0.45+, slowly, in PyTorch operations) on the CPU.
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"train.optim=adamw_8bit needs bitsandbytes: pip install 'cpt[gpu]' ({e}); "
                              "or use train.optim=adamw_torch") from None
        opt = _adamw_8bit_without_syncs()(param_groups, **kw)
        opt.host_split_state = t.offload_embedding_state is True and device.type == "cuda"
        if t.offload_embedding_state is True and not (opt.host_split_state and any(
                getattr(p, SPLIT_MASTER, False) for g in groups for p in g["params"])):
            import logging

            logging.getLogger("cpt").warning(
                "train.offload_embedding_state has nothing to move here: only bf16 runs on a CUDA GPU hold the "
                "trained embeddings as split float32 masters (this run: %s)", device.type)
        return opt
    fused = device.type == "cuda" and all(p.dtype == torch.float32 for g in groups for p in g["params"])
    if t.optim == "adamw_torch_fused" and not fused:
        raise ConfigError("train.optim=adamw_torch_fused needs a CUDA device and float32 trained weights")
    return torch.optim.AdamW(param_groups, fused=fused or None, **kw)


@functools.lru_cache(maxsize=None)
def _adamw_8bit_without_syncs() -> type:
    """bitsandbytes' AdamW8bit with a step that does not wait for the GPU after each tensor.

    bitsandbytes (0.50) calls torch.cuda.synchronize() after every parameter's update, which paged
    optimizers need (their states live in unified memory) and device-resident states do not: the
    updates are queued on one stream in order either way. With ~450 LoRA tensors that serialises the
    host and the GPU for each of them: about 25 ms of an 8B step in which the GPU waits for Python
    (bench/NOTES.md). Same kernels, same arguments, same order, so the same result bit for bit.

    Two paths of our own beside bitsandbytes' per-tensor step, both the same blockwise 8-bit AdamW
    (bitsandbytes' maps and block size; one Triton kernel on CUDA, PyTorch operations elsewhere):
    - parameters marked as split masters (the trained embeddings of a bf16 run, `mark_split_master`)
      take `split_adamw8bit_step`, which updates the float32 value that the bf16 weight and its low
      half in the optimizer state make together (a row-sparse gradient is read as it is);
    - a group's float32 tensors with 8-bit states (the adapters) are laid end to end and updated in
      one launch (`_FlatGroup`), their states staying bitsandbytes-shaped views.
    """
    import bitsandbytes as bnb

    class AdamW8bit(bnb.optim.AdamW8bit):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # The low halves of split masters are integers: loading a checkpoint must not cast them.
            self.non_castable_tensor_keys = set(self.non_castable_tensor_keys) | {"lo"}
            self._flat: Optional[dict[int, _FlatGroup]] = None
            self._flat_groups()  # now, before any forward pass: the parameters become views once
            # train.offload_embedding_state: split masters keep their low halves and moment codes in
            # pinned host memory and stream them through the GPU for each update (cpt.host_state).
            self.host_split_state = False
            self._early = None  # host_state.EarlyStep: passes started before the step
            self._armed: dict[int, dict] = {}  # id(p) -> group: start p's pass when its gradient is complete

        def _flat_groups(self) -> dict[int, "_FlatGroup"]:
            if self._flat is None:
                if "dynamic" not in self.name2qmap:
                    self.fill_qmap()
                self._flat = {}
                for gindex, group in enumerate(self.param_groups):
                    members = [p for p in group["params"] if _flattenable(p, self.args.min_8bit_size)
                               and self.get_config(gindex, 0, group)["optim_bits"] == 8]
                    if len(members) > 1:
                        self._flat[gindex] = _FlatGroup(members, self.state, self._maps(members[0].device))
            return self._flat

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
                        if on_host and k in HOST_KEYS:
                            from cpt.host_state import to_host

                            self.state[p][k] = to_host(v)
                        else:
                            self.state[p][k] = v.to(p.device)

        def state_dict(self):
            if self.host_split_state:
                from cpt import host_state

                for device in {p.device for g in self.param_groups for p in g["params"]}:
                    host_state.drain(device)  # every pass queued (a Feeder may still be queuing one)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # host-resident states: the last update's copies back must be done
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
                from cpt import host_state

                jobs = []
                for group, p in streamed:
                    if early is not None and early.has(p):
                        if early.covers(p):
                            early.commit(p)
                            continue
                        early.drop(p)  # a gradient row the batch's ids did not name: do it all now
                    if p.grad is not None:
                        jobs.append(self._split_step(group, p))
                host_state.launch(jobs, self._maps(streamed[0][1].device))
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
                host_state.wait(streamed[0][1].device)  # weights and host states final from here on
            return loss

        # ------------------------------------------------------------ passes started before the step

        def start_early(self, token_ids: Optional[torch.Tensor], clipping: bool) -> None:
            """Called by the loop just before the last micro-batch's backward pass, with every token id
            of the step's batches (None when unknown) and whether gradients get clipped. Host-resident
            split masters start what does not need their gradient: embed_tokens' rows outside the batch
            (always), lm_head's whole update as soon as its gradient is complete (without clipping).
            The step commits it; abandon_early undoes it."""
            if not self.host_split_state:
                return
            from cpt.host_state import EarlyStep

            for group in self.param_groups:
                for p in group["params"]:
                    if not getattr(p, SPLIT_MASTER, False):
                        continue
                    if self._early is None:
                        self._early = EarlyStep(self, self._maps(p.device))
                    self._split_state(group, p)
                    if getattr(p, ROW_SPARSE, False):
                        if token_ids is not None and p.shape[1] % BLOCK == 0:
                            self._early.start(group, p, token_ids)
                    elif not clipping:
                        if not getattr(p, "_cpt_early_hook", False):
                            p.register_post_accumulate_grad_hook(self._gradient_complete)
                            p._cpt_early_hook = True
                        self._armed[id(p)] = group

        def _gradient_complete(self, p: torch.Tensor) -> None:
            group = self._armed.pop(id(p), None)
            if group is not None:
                self._early.start(group, p, None)

        def abandon_early(self) -> None:
            """The loop skips this step (non-finite loss or gradient): undo what start_early began."""
            self._armed = {}
            if self._early is not None:
                self._early.abandon()

        def _split_step(self, group: dict, p: torch.Tensor):
            """Trained embeddings held as bf16 + low bits (see split_float32): our blockwise update.
            Returns a host_state.Job to launch instead when the state waits in host memory."""
            state = self._split_state(group, p)
            state["step"] += 1
            b1, b2 = group["betas"][0], group["betas"][1]
            kw = {"lr": group["lr"], "betas": (b1, b2), "eps": group["eps"], "weight_decay": group["weight_decay"],
                  "step": state["step"]}
            if self.host_split_state:
                from cpt.host_state import Job

                g, slot = _grad_table(p, p.grad)
                return Job(p, state, state, _hyper(b1, b2, kw["lr"], kw["eps"], kw["weight_decay"], kw["step"], p.device), g, slot)
            split_adamw8bit_step(p, p.grad, state, self._maps(p.device), **kw)
            return None

        def _split_state(self, group: dict, p: torch.Tensor) -> dict:
            """A split master's state: made on first use, migrated from an older layout, and placed
            (host or device) as train.offload_embedding_state says."""
            state = self.state[p]
            if state and "lo" not in state:
                # A checkpoint of a run that held this matrix as a float32 tensor: the model tensor was
                # loaded rounded to bf16 and its moments were kept by bitsandbytes' per-tensor path.
                # Carry on from the rounded value (its low half is lost) with the moments it had.
                import logging

                logging.getLogger("cpt").warning(
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
                    from cpt.host_state import host_tensor

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
                from cpt.host_state import to_host

                for k in HOST_KEYS:
                    state[k] = to_host(state[k])
            else:
                for k in HOST_KEYS:
                    state[k] = state[k].to(p.device)
            return state

        def _maps(self, device: torch.device) -> "QuantMaps":
            if "dynamic" not in self.name2qmap:
                self.fill_qmap()
            key = ("maps", device)
            if key not in self.name2qmap:
                self.name2qmap[key] = QuantMaps(self.name2qmap["dynamic"], self.name2qmap["udynamic"], device)
            return self.name2qmap[key]

    return AdamW8bit


# ---------------------------------------------------------------------------- split float32 masters
#
# A trained embedding matrix of a bf16 run needs float32 masters: at lr 1e-6 almost every update is
# smaller than half a bf16 step and rounds away (gpu_anchor.md: 2% of elements ever change). The usual
# answer, a float32 copy beside the bf16 weight or a float32 weight cast for every use, costs 4 bytes
# per element plus float32 gradients. Here the float32 value is kept in two 16-bit halves: the bf16
# weight the model computes with (the float32 value rounded to nearest) and an int16 remainder that
# lives in the optimizer state. Together they are the float32 master bit for bit; autograd sees a bf16
# weight, so its gradient is bf16 too. On an 8B model's 1.05B embedding elements this saves 2 GiB of
# gradients and the per-step casts, and loses nothing.

SPLIT_MASTER = "_cpt_split_master"
HOST_KEYS = ("lo", "state1", "state2")  # what a split master may keep in host memory (cpt.host_state)
ROW_SPARSE = "_cpt_row_sparse"  # a split master whose gradient covers only the rows a batch used (embed_tokens)
SKIP = -2  # a slot-table entry (see _update_split_rows): the row is left exactly as it is
BLOCK = 256  # elements per quantisation block of the 8-bit states (as bitsandbytes' blockwise optimizers)
_CHUNK_ELEMENTS = 1 << 24  # elements updated per call: float32 temporaries stay at 64 MiB each


def mark_split_master(p: torch.Tensor) -> None:
    """Let the 8-bit optimizer treat this bf16 parameter as the high half of a float32 master."""
    if p.dtype != torch.bfloat16 or p.ndim != 2:
        raise ValueError(f"split masters are 2-d bf16 weights, not {p.dtype} {tuple(p.shape)}")
    setattr(p, SPLIT_MASTER, True)


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
    last. The kernel's binary search made 8 dependent lookups in the 255 midpoints per element and
    moment; with bitsandbytes' dynamic maps this makes 2 (steps = 1). `steps` None: no table this
    small exists for the map (the kernel keeps its binary search)."""

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


# ---------------------------------------------------------------------------- undoing a split update
#
# An update that may have to be taken back (cpt.host_state's early passes: the loop may skip the step)
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
            import logging

            logging.getLogger("cpt").warning(
                "undoing the skipped step's early update of a %s trained embedding matrix: %d of its elements could "
                "not be restored bit for bit (more than %d had steps thousands of times their value)",
                "x".join(map(str, p.shape)), count - self.capacity, self.capacity)


def _split_chunk(high, low, g, s1, s2, a1, a2, q1, q2, mid1, mid2, hp, log: "Optional[UndoLog]" = None, base: int = 0):
    """Update rows of a split master in place; `g` is the dense gradient of those rows. log: make the
    update undoable (see UndoLog; its flat indices count from `base`)."""
    n = high.numel()
    pad = s1.numel() - n  # only the last chunk of a matrix whose size is not a multiple of BLOCK
    master = join_float32(high, low).view(-1)
    g = g.reshape(-1)
    if pad:
        master, g = torch.nn.functional.pad(master, (0, pad)), torch.nn.functional.pad(g, (0, pad))
    new, i1, i2, n1, n2, *step = _adamw8bit_blocks(master, g, s1, s2, a1, a2, q1, q2, mid1, mid2, hp, log is not None)
    h, lo = split_float32(new[:n].view(high.shape))
    if log is not None:
        d = step[0][:n].view(high.shape)
        old_high = high.view(torch.int16)
        est, dist = _invert_split(new[:n].view(high.shape), low, d, hp[4])
        frozen = ~_finite(d)
        bad = ~frozen & ((est != old_high) | (dist.abs() >= UNDO_MARGIN))
        log.record(bad, base + torch.arange(n, device=high.device), old_high)
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


def _dense_chunk(master, g, s1, s2, a1, a2, q1, q2, mid1, mid2, hp):
    """Update a flat float32 buffer (a whole number of blocks) in place."""
    new, i1, i2, n1, n2 = _adamw8bit_blocks(master, g, s1, s2, a1, a2, q1, q2, mid1, mid2, hp)
    master.copy_(new)
    s1.copy_(i1)
    s2.copy_(i2)
    a1.copy_(n1)
    a2.copy_(n2)


_TRITON: dict = {}  # device type -> the Triton update, or None once it failed (then PyTorch runs)
_GATHER: dict = {}  # "ok": False once the adapters' one-launch update failed (then they update in chunks)


def _triton_update(device: torch.device) -> Optional[Callable]:
    """cpt.kernels.adamw8bit's one-pass kernel on CUDA when Triton is there; None elsewhere."""
    if device.type != "cuda":
        return None
    if "cuda" not in _TRITON:
        try:
            from cpt.kernels.adamw8bit import adamw8bit_update
        except ImportError:
            adamw8bit_update = None
        _TRITON["cuda"] = adamw8bit_update
    return _TRITON["cuda"]


def _try_triton(device: torch.device, *args, **kw) -> bool:
    """Run the Triton update; False (and a warning, once) if there is none or it fails."""
    fn = _triton_update(device)
    if fn is None:
        return False
    try:
        fn(*args, **kw)
        return True
    except Exception as e:  # noqa: BLE001 - a kernel that will not build must not stop training
        import logging

        logging.getLogger("cpt").warning("the Triton 8-bit AdamW kernel failed (%s: %s); updating with PyTorch operations",
                                         type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        _TRITON["cuda"] = None
        return False


def _hyper(b1: float, b2: float, lr: float, eps: float, weight_decay: float, step: int, device: torch.device) -> torch.Tensor:
    """[beta1, beta2, step size, eps, decay] on the device, bias corrections folded in, without a sync."""
    c1 = 1 - b1 ** step
    c2 = math.sqrt(1 - b2 ** step)
    hp = torch.tensor([b1, b2, -lr * c2 / c1, eps * c2, 1 - lr * weight_decay], dtype=torch.float32)
    return hp.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else hp


def _grad_table(p: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
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


def _chunk_rows(width: int, elements: int) -> int:
    """Rows per chunk of about `elements`, a whole number of quantisation blocks (chunks start on one)."""
    align = BLOCK // math.gcd(width, BLOCK)
    return max(align, max(1, elements // width) // align * align)


def _update_split_rows(high, low, g, slot, s1, s2, a1, a2, maps: QuantMaps, hp: torch.Tensor, shape=None,
                       log: Optional[UndoLog] = None, base: int = 0) -> None:
    """Update rows of a split master in place: the Triton kernel on CUDA, else PyTorch by chunks.
    g: the rows' dense gradient, or (slot given, one entry per row) the values of a sparse one: slot[row]
    is the row's index in g, -1 (no gradient: its moments decay), or SKIP (left as it is; rows must then
    be whole quantisation blocks). shape: the Triton kernel's launch shape (cpt.kernels.adamw8bit).
    log: make the update undoable by `_undo_split_rows` (see UndoLog); `high`'s first element is element
    `base` of its matrix."""
    if _try_triton(high.device, high, low, g, slot, s1, s2, a1, a2, maps, hp, shape=shape, log=log, base=base):
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
    step_rows = _chunk_rows(width, _CHUNK_ELEMENTS)
    for r0 in range(0, rows, step_rows):
        r1 = min(rows, r0 + step_rows)
        e0, e1 = r0 * width, min(s1.numel(), -(-(r1 * width) // BLOCK) * BLOCK)
        _split_chunk(high[r0:r1], low[r0:r1], _rows(slot[r0:r1], g) if slot is not None else g[r0:r1],
                     s1[e0:e1], s2[e0:e1], a1[e0 // BLOCK:e1 // BLOCK], a2[e0 // BLOCK:e1 // BLOCK],
                     maps.q1, maps.q2, maps.mid1, maps.mid2, hp, log, base + e0)
    if kept is not None:
        for t, v in zip(kept, saved):
            t.index_copy_(0, skip, v)


def _undo_split_rows(high, new_lo, old_lo, g, slot, s1, s2, a1, a2, maps: QuantMaps, hp: torch.Tensor) -> None:
    """Take back an undoable `_update_split_rows` of these rows, but for the elements it logged: `high`
    holds the weights it made and `new_lo` their low halves; `old_lo`, the moments and block maxima
    are those it started from, g, slot and hp what it was given. Writes only `high`."""
    if _try_triton(high.device, high, new_lo, g, slot, s1, s2, a1, a2, maps, hp, undo_from=old_lo):
        return
    rows, width = high.shape
    step_rows = _chunk_rows(width, _CHUNK_ELEMENTS)
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
                         betas: tuple[float, float], eps: float, weight_decay: float, step: int) -> None:
    """One AdamW step (8-bit blockwise states) of the float32 master held as bf16 `p` + state["lo"].
    `grad` is dense, or sparse COO over rows (an embedding's gradient: only the rows the batch used)."""
    hp = _hyper(betas[0], betas[1], lr, eps, weight_decay, step, p.device)
    g, slot = _grad_table(p, grad)
    _update_split_rows(p.data, state["lo"], g, slot, state["state1"], state["state2"], state["absmax1"],
                       state["absmax2"], maps, hp)


# ---------------------------------------------------------------------------- one pass over many adapter tensors
#
# An 8B model's LoRA has ~450 tensors; bitsandbytes updates them one launch (and one Python call) each,
# which with recompute-free GPU work of ~16 ms takes ~30 ms of host time per step. A _FlatGroup lays a
# group's float32 tensors end to end in one buffer (each parameter becomes a view into it, each padded
# to whole quantisation blocks) with their 8-bit states likewise, and updates the lot in one launch on
# CUDA (each member's gradient read where it lies), elsewhere in chunks through a flat gradient buffer.
# Each parameter's state stays a view with bitsandbytes' own keys and shapes, so
# checkpoints are interchangeable with the per-tensor path, which also serves any step in which some
# member has no gradient.


def _flattenable(p: torch.Tensor, min_8bit_size: int) -> bool:
    import torch.distributed as dist

    return (p.dtype == torch.float32 and p.requires_grad and p.numel() >= min_8bit_size
            and not getattr(p, SPLIT_MASTER, False) and not (dist.is_available() and dist.is_initialized()))


class _FlatGroup:
    def __init__(self, members: list, state: dict, maps: "QuantMaps"):
        self.members = set(members)
        self.order = members
        device = members[0].device
        sizes = [-(-p.numel() // BLOCK) * BLOCK for p in members]  # each padded to whole blocks
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        # Chunks of whole members, about _CHUNK_ELEMENTS each: the gradient buffer one pass needs.
        self.chunk_members, fill = [[]], 0
        for i, size in enumerate(sizes):
            if fill and fill + size > _CHUNK_ELEMENTS:
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
        self.gathered = None  # cpt.kernels.adamw8bit.GatheredGrads, made at the first one-launch update
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
                hps[step] = _hyper(group["betas"][0], group["betas"][1], group["lr"], group["eps"],
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
        if _triton_update(self.master.device) is None or not _GATHER.get("ok", True):
            return False
        grads = [p.grad for p in self.order]
        if any(g.dtype != torch.float32 or not g.is_contiguous() for g in grads):
            return False
        try:
            from cpt.kernels.adamw8bit import GatheredGrads, adamw8bit_update

            if self.gathered is None:
                self.gathered = GatheredGrads(self.offsets, self.sizes, [p.numel() for p in self.order],
                                              self.master.device)
            self.gathered.point_at(grads)
            adamw8bit_update(self.master, None, None, None, self.s1, self.s2, self.a1, self.a2, self.maps, hp,
                             members=self.gathered)
            return True
        except Exception as e:  # noqa: BLE001 - the chunked update below does the same work
            import logging

            logging.getLogger("cpt").warning("the one-launch adapter update failed (%s: %s); updating in chunks",
                                             type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            _GATHER["ok"] = False
            return False

    def _update(self, a: int, b: int, g: torch.Tensor, hp: torch.Tensor) -> None:
        chunk = (self.master[a:b], g, self.s1[a:b], self.s2[a:b], self.a1[a // BLOCK:b // BLOCK], self.a2[a // BLOCK:b // BLOCK])
        if not _try_triton(self.master.device, chunk[0], None, g, None, *chunk[2:], self.maps, hp):
            _dense_chunk(*chunk, self.maps.q1, self.maps.q2, self.maps.mid1, self.maps.mid2, hp)

def master_weight(p: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The float32 value the optimizer trains for p: for a split master the weight and its low half."""
    state = getattr(optimizer, "optimizer", optimizer).state.get(p, {})
    if getattr(p, SPLIT_MASTER, False) and "lo" in state:
        lo = state["lo"]
        if lo.device != p.device:  # host-resident: the last update's copy back must have landed
            from cpt.host_state import drain

            drain(p.device)
            torch.cuda.synchronize(p.device)
            lo = lo.to(p.device)
        return join_float32(p.detach(), lo)
    return p.detach()


def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ (2-norm over all gradients), also over row-sparse gradients, whose
    repeated rows are summed first. Returns the norm before clipping."""
    # The dense gradients' norms are queued first: summing a sparse gradient's rows waits for the GPU
    # (the backward pass's end), and the host work of hundreds of norms then ran while the GPU idled
    # (bench/NOTES.md, session 15). Each tensor's norm is its own, so the result is the same either way.
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    norms: list = [None] * len(params)
    dense: dict[torch.dtype, list] = {}
    for i, p in enumerate(params):
        if not p.grad.is_sparse:
            dense.setdefault(p.grad.dtype, []).append(i)
    for idx in dense.values():
        for i, n in zip(idx, torch._foreach_norm([params[i].grad for i in idx])):
            norms[i] = n
    grads = []
    for i, p in enumerate(params):
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            norms[i] = torch._foreach_norm([p.grad._values()])[0]
        grads.append(p.grad._values() if p.grad.is_sparse else p.grad)
    by_dtype: dict[torch.dtype, list] = {}
    for g, n in zip(grads, norms):
        by_dtype.setdefault(g.dtype, []).append((g, n))
    total = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(torch.stack([n for _, n in gn]).float()) for gn in by_dtype.values()]))
    if math.isinf(max_norm):  # no clipping: the norm is for logging and the non-finite check only
        return total
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for gn in by_dtype.values():
        torch._foreach_mul_([g for g, _ in gn], coef.to(gn[0][0].dtype))
    return total


def warmup_steps(t: TrainConfig, total_steps: int) -> int:
    return t.warmup_steps if t.warmup_steps > 0 else int(math.ceil(t.warmup_ratio * total_steps))


def lr_lambda(t: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of each group's peak lr at a given optimizer step (0-based)."""
    warm = warmup_steps(t, total_steps)
    floor = t.min_lr_ratio
    kind = t.lr_scheduler_type
    decay_start = total_steps - max(1, int(round(t.decay_ratio * total_steps))) if kind == "wsd" else warm

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)  # never exactly 0: the first step still learns a little
        if kind == "constant":
            return 1.0
        if kind == "wsd" and step < decay_start:
            return 1.0
        span = max(1, total_steps - decay_start)
        progress = min(1.0, (step - decay_start) / span)
        if kind == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * (1 - progress)  # linear, and wsd's decay

    return f


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t, total_steps))
