"""The trained embeddings' optimizer states in host memory (the run plan's offload_embedding_state).

A split master (cpt.optim.split_master) keeps, per element, a 16-bit low half and two 8-bit moment
codes: 4 bytes, 3.9 GiB for an 8B model's 1.05B embedding elements. Here they live in pinned host
memory; only the block maxima (1/64 of that) stay on the GPU. An update streams the rows through
three staging chunks: while chunk i is updated, chunk i+1 comes in on one copy stream and chunk i-1
goes back on another, all on side streams, so the GPU meanwhile does whatever the caller queues next.
The cost is the copies, 4 bytes each way per element at the host link's speed (docs/performance.md,
"Embedding optimizer states in host memory").

Most of that cost can hide behind the backward pass, because most of the work is known before the
gradients are (`EarlyStep`):
- embed_tokens' gradient covers only the rows the step's batches used, and every other row takes a
  gradient-free update (its moments decay, its weight moves by the decayed moments). That pass can
  run while the backward pass runs. The batch's rows are marked in the pass's slot table (on the GPU,
  so the host need not wait for anything to start it) and left alone; at the step they are read back
  (weights from the GPU, states from the new host buffers) and updated with the gradient, clipped or not.
- lm_head's gradient is complete when the loss is (the chunked loss makes it in the forward pass);
  without gradient clipping, its whole update can run during the backward pass too.
Nothing done early is final: the new states go to a second set of host buffers, so a step the loop
skips (a non-finite loss or gradient) is undone (`EarlyStep.abandon`) and a finite one is committed
(`EarlyStep.commit`) by swapping buffers. The weights are undone without a copy of them (which cost
2 bytes per element over the host link every step): the update is inverted from the weights it made
and the old states, and the few elements inversion cannot vouch for are logged on the GPU as the pass
goes (split_master.UndoLog).

On a GPU the early passes are queued by a helper thread (`Feeder`), a few chunks ahead of the copies
in flight. Queued from the loop's own thread they took it tens of milliseconds (hundreds of copies)
just when it should launch the backward pass, and their gigabytes of copies, queued all at once, sat
in the host link's queue ahead of anything else that had to cross it soon (host layers' activations
on their way back).

Each optimizer owns one `HostStream`: its staging buffers, side streams and Feeder threads, made at
first use, kept for the run and let go of by `close()` or when the optimizer is garbage.

    python -m pytest tests/test_split_master.py -q -k "host or early or feeder"
"""
from __future__ import annotations

import collections
import queue
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from cpt.optim.split_master import (BLOCK, HOST_KEYS, SKIP, Kernel, QuantMaps, UndoLog, chunk_rows, grad_table,
                                    hyperparameters, undo_split_rows, update_split_rows)
from cpt.runtime import host_tensor, to_device

DEVICE_KEYS = ("absmax1", "absmax2")
CHUNK_ELEMENTS = 1 << 23  # 32 MiB of staged state per chunk, three in flight (cpt.plan counts them)
# A paced pass (the Feeder's) queues a chunk's copies in only when at most this many chunks' copies in
# are still waiting or running: about a millisecond of the host link each.
AHEAD = 2


@dataclass
class Job:
    """One split master's pass: update `p` (bf16, rows x width, on the device) from the states in
    `src` into `dst` (the same dict for an update in place)."""
    p: torch.Tensor
    src: dict
    dst: dict
    hp: torch.Tensor
    g: torch.Tensor  # dense gradient, or the values of a row-sparse one (with slot)
    slot: Optional[torch.Tensor]  # row -> index in g, -1 (no gradient: the row decays) or SKIP (left alone)
    log: Optional[UndoLog] = None  # make the pass undoable (split_master.UndoLog)
    keep: Optional["KeptRows"] = None  # rows the pass leaves alone, updated at the step


@dataclass
class KeptRows:
    """Rows of a split master whose update waits for the gradient: marked SKIP in the early pass's slot
    table, so the pass leaves their weight, states and block maxima as they were."""
    slot: torch.Tensor  # the pass's slot table (rows,): SKIP for these rows, -1 for the others

    def index(self) -> torch.Tensor:
        return (self.slot == SKIP).nonzero().squeeze(1)  # waits for the GPU: called at the step


# ---------------------------------------------------------------------------- the helper thread


class _FeedState:
    """What a Feeder's thread shares with the loop's thread (not the Feeder itself: the thread must
    not keep its owner alive)."""

    def __init__(self):
        self.busy = 0
        self.error: Optional[BaseException] = None
        self.done = threading.Condition()


def _feed(device: torch.device, jobs: queue.Queue, state: _FeedState) -> None:
    while True:
        fn = jobs.get()
        if fn is None:  # closed
            return
        try:
            if state.error is None:  # after a failure, nothing more runs until drain reports it
                if device.type == "cuda":
                    with torch.cuda.device(device):
                        fn()
                else:
                    fn()
        except BaseException as e:  # noqa: BLE001 - handed to the loop's thread by drain
            state.error = e
        finally:
            # Let go of the pass (and the gradient it read) now: held until the next pass arrived,
            # lm_head's 1 GiB gradient of an 8B model outlived its step into the next one's loss.
            fn = None
            with state.done:
                state.busy -= 1
                state.done.notify_all()


def _stop(jobs: queue.Queue, thread: threading.Thread) -> None:
    jobs.put(None)  # after every pass handed over: they run first
    if thread is not threading.current_thread():
        thread.join()


class Feeder:
    """A thread that queues passes on a device's side streams for the loop's thread (see the module
    docstring), in the order given. `drain` waits until everything handed over is queued, and raises
    what went wrong in the thread. `close` (or the Feeder's end) lets the thread finish and joins it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.jobs: queue.Queue = queue.Queue()
        self._state = _FeedState()
        self.thread = threading.Thread(target=_feed, args=(device, self.jobs, self._state),
                                       name=f"cpt-host-state-{device}", daemon=True)
        self.thread.start()
        self._close = weakref.finalize(self, _stop, self.jobs, self.thread)
        self._close.atexit = False  # at exit a daemon thread just stops, as any other

    def submit(self, fn: Callable[[], None]) -> None:
        if not self._close.alive:
            raise RuntimeError(f"the host-state feeder of {self.device} is closed")
        with self._state.done:
            self._state.busy += 1
        self.jobs.put(fn)

    def drain(self) -> None:
        state = self._state
        with state.done:
            state.done.wait_for(lambda: state.busy == 0)
            error, state.error = state.error, None
        if error is not None:
            raise RuntimeError(f"the early update of the host-resident embedding states failed on {self.device}: "
                               f"{type(error).__name__}: {error}") from error

    def close(self) -> None:
        self._close()


# ---------------------------------------------------------------------------- one optimizer's streaming


class HostStream:
    """Streams split masters' host-resident states through the GPU for one optimizer: per device three
    staging buffers, three side streams (copy in, work, copy out) and a Feeder thread, made at first use
    and kept for the run.

    kernel: the update's fast implementation (cpt.optim.adamw8bit.Kernel) or None (PyTorch only); it also
    moves rows through mapped host memory where it can. side_shape: the kernel's launch shape for these
    passes (None: its own). chunk_elements: elements staged per chunk. feeder_on_cpu: run the Feeder's
    thread on the CPU too (there it does the work itself; tests use it to run the GPU's order of events
    on the CPU). update_rows: the rows' update (split_master.update_split_rows; a benchmark passes a
    variant to time what the update itself costs beside the copies)."""

    def __init__(self, kernel: Optional[Kernel] = None, *, side_shape: Optional[tuple[int, int, int]] = None,
                 chunk_elements: int = CHUNK_ELEMENTS, feeder_on_cpu: bool = False,
                 update_rows: Optional[Callable] = None):
        self.kernel = kernel
        self.side_shape = side_shape
        self.chunk_elements = chunk_elements
        self.feeder_on_cpu = feeder_on_cpu
        self.update_rows = update_rows or update_split_rows
        self._staging: dict = {}  # device -> (elements, buffers): reused every step
        self._streams: dict = {}
        self.feeders: dict[torch.device, Feeder] = {}

    def close(self) -> None:
        """Let the Feeder threads finish what they were handed and end; drop buffers and streams (made
        again if the object is used on)."""
        for f in self.feeders.values():
            f.close()
        self.feeders.clear()
        self._staging.clear()
        self._streams.clear()

    def _staging_buffers(self, device: torch.device, elements: int) -> list:
        have = self._staging.get(device)
        if have is None or have[0] < elements:
            self._staging[device] = (elements, [dict(lo=torch.empty(elements, dtype=torch.int16, device=device),
                                                     s1=torch.empty(elements + BLOCK, dtype=torch.uint8, device=device),
                                                     s2=torch.empty(elements + BLOCK, dtype=torch.uint8, device=device))
                                                for _ in range(3)])
        return self._staging[device][1]

    def streams(self, device: torch.device) -> Optional[tuple]:
        """(copy in, work, copy out) side streams of a CUDA device; None elsewhere (everything synchronous)."""
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = tuple(torch.cuda.Stream(device) for _ in range(3))
        return self._streams[device]

    def feeder(self, device: torch.device, make: bool = True) -> Optional[Feeder]:
        """The device's Feeder (made if `make`, on a GPU or with feeder_on_cpu); None without one."""
        if device not in self.feeders and make and (device.type == "cuda" or self.feeder_on_cpu):
            self.feeders[device] = Feeder(device)
        return self.feeders.get(device)

    def drain(self, device: torch.device) -> None:
        """Wait until every pass handed to the device's Feeder is queued (on the CPU: done)."""
        f = self.feeder(device, make=False)
        if f is not None:
            f.drain()

    def launch(self, jobs: list, maps: QuantMaps, paced: bool = False) -> None:
        """Run the jobs' passes. On CUDA they go on side streams that first wait for the current stream
        (the gradients, the weights); the caller makes its stream wait for `work` before using the weights
        (`wait`). paced: a Feeder queues them, a few chunks ahead of the copies (early passes)."""
        if not jobs:
            return
        device = jobs[0].p.device
        feeder = self.feeder(device) if paced else None
        if feeder is None:
            self.drain(device)  # the staging buffers and streams are shared: the Feeder's passes are queued first
        s = self.streams(device)
        if s is None:
            if feeder is not None:
                feeder.submit(lambda: self._run(jobs, maps, device, None))
            else:
                self._run(jobs, maps, device, None)
            return
        cin, work, cout = s
        caller = torch.cuda.current_stream(device)
        work.wait_stream(caller)  # here, in the caller's order: what the passes read is ready
        for j in jobs:  # read on `work` after the caller may have let go of them
            _used_on(work, j.g, j.slot)

        def run() -> None:
            with torch.cuda.stream(work):
                self._run(jobs, maps, device, s, paced=feeder is not None)

        if feeder is not None:
            feeder.submit(run)
        else:
            run()

    def wait(self, device: torch.device) -> None:
        """Make the current stream wait for everything launched on the side streams (updates and copies)."""
        self.drain(device)
        s = self.streams(device)
        if s is not None:
            for x in s:
                torch.cuda.current_stream(device).wait_stream(x)

    def _run(self, jobs: list, maps: QuantMaps, device: torch.device, s: Optional[tuple], paced: bool = False) -> None:
        cuda = s is not None
        arrived: collections.deque = collections.deque()  # paced: one event per chunk whose copies in are queued
        steps = [chunk_rows(j.p.shape[1], self.chunk_elements) for j in jobs]
        bufs = self._staging_buffers(device, max(r * j.p.shape[1] for r, j in zip(steps, jobs)))
        if cuda:
            cin, work, cout = s
            cin.wait_stream(cout)  # the previous pass has written its states back and left the buffers
            cin.wait_stream(work)
        freed: list = [None] * len(bufs)
        i = 0
        for j, step_rows in zip(jobs, steps):
            rows, width = j.p.shape
            src = [j.src[k].view(-1) for k in HOST_KEYS]
            dst = [j.dst[k].view(-1) for k in HOST_KEYS]
            if j.dst is not j.src:
                for k in DEVICE_KEYS:  # block maxima are updated in place: start the new ones from the old
                    j.dst[k].copy_(j.src[k])
            for r0 in range(0, rows, step_rows):
                r1 = min(rows, r0 + step_rows)
                e0, e1 = r0 * width, min(src[1].numel(), -(-(r1 * width) // BLOCK) * BLOCK)
                b = bufs[i % len(bufs)]
                staged = [b["lo"][:(r1 - r0) * width], b["s1"][:e1 - e0], b["s2"][:e1 - e0]]
                spans = [(0, r1 * width - e0), (0, e1 - e0), (0, e1 - e0)]
                if cuda:
                    if paced:
                        while len(arrived) >= AHEAD:  # the link's queue holds a few chunks, not gigabytes
                            arrived.popleft().synchronize()
                    with torch.cuda.stream(cin):
                        if freed[i % len(bufs)] is not None:
                            cin.wait_event(freed[i % len(bufs)])  # this buffer's previous chunk is back home
                        for d, h, (a, z) in zip(staged, src, spans):
                            d.copy_(h[e0 + a:e0 + z], non_blocking=True)
                        if paced:
                            arrived.append(cin.record_event())
                    work.wait_stream(cin)
                else:
                    for d, h, (a, z) in zip(staged, src, spans):
                        d.copy_(h[e0 + a:e0 + z])
                if j.log is not None and r0 == 0:
                    j.log.reset()
                a_lo, a_hi = e0 // BLOCK, e1 // BLOCK
                self.update_rows(j.p.data[r0:r1], staged[0].view(r1 - r0, width),
                                 j.g if j.slot is not None else j.g[r0:r1],
                                 j.slot[r0:r1] if j.slot is not None else None, staged[1], staged[2],
                                 j.dst["absmax1"][a_lo:a_hi], j.dst["absmax2"][a_lo:a_hi], maps, j.hp,
                                 kernel=self.kernel, shape=self.side_shape, log=j.log, base=r0 * width)
                outs = [(h[e0 + a:e0 + z], d) for d, h, (a, z) in zip(staged, dst, spans)]
                if cuda:
                    cout.wait_stream(work)
                    with torch.cuda.stream(cout):
                        for h, d in outs:
                            h.copy_(d, non_blocking=True)
                        freed[i % len(bufs)] = cout.record_event()
                else:
                    for h, d in outs:
                        h.copy_(d)
                i += 1

    def finish_kept(self, p: torch.Tensor, grad: torch.Tensor, keep: KeptRows, dst: dict, maps: QuantMaps,
                    hp: torch.Tensor) -> None:
        """The step's update of the kept rows (with their gradient), written where the early pass wrote the
        rest. The pass left them as they were: their weight is read from p, their states from dst."""
        rows, width = p.shape
        # Both host syncs first (the kept rows' count, the gradient's rows), while nothing is queued behind
        # them: everything after them is queued at once, and the GPU meanwhile updates the adapters.
        index = keep.index()
        k = index.numel()
        if not k:
            return
        values, slot = grad_table(p, grad)
        per = width // BLOCK
        kp = p.data.index_select(0, index)
        lo = self._gather_from_host(dst["lo"].view(rows, width), index)
        s1 = self._gather_from_host(dst["state1"].view(-1)[:rows * width].view(rows, width), index).view(-1)
        s2 = self._gather_from_host(dst["state2"].view(-1)[:rows * width].view(rows, width), index).view(-1)
        a1 = dst["absmax1"].view(-1)[:rows * per].view(rows, per).index_select(0, index).view(-1)
        a2 = dst["absmax2"].view(-1)[:rows * per].view(rows, per).index_select(0, index).view(-1)
        if slot is None:  # a dense gradient: the kept rows' own rows of it
            values, kslot = values.index_select(0, index), torch.arange(k, device=p.device)
        else:
            kslot = slot.index_select(0, index)
        self.update_rows(kp, lo, values, kslot, s1, s2, a1, a2, maps, hp, kernel=self.kernel)
        p.data.index_copy_(0, index, kp)
        dst["absmax1"].view(-1)[:rows * per].view(rows, per).index_copy_(0, index, a1.view(-1, per))
        dst["absmax2"].view(-1)[:rows * per].view(rows, per).index_copy_(0, index, a2.view(-1, per))
        self._scatter_to_host(dst["lo"].view(rows, width), index, lo)
        self._scatter_to_host(dst["state1"].view(-1)[:rows * width].view(rows, width), index, s1.view(-1, width))
        self._scatter_to_host(dst["state2"].view(-1)[:rows * width].view(rows, width), index, s2.view(-1, width))

    def _gather_from_host(self, host: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """host[index] on index's device, host in (pinned) host memory: the GPU reads the rows itself (a
        Triton kernel through the mapped host memory), without waiting on the host."""
        if index.device.type == "cpu":
            return host.index_select(0, index)
        try:
            out = torch.empty(index.numel(), host.shape[1], dtype=host.dtype, device=index.device)
            self.kernel.gather_rows(host, index, out)
            return out
        except Exception:  # noqa: BLE001 - no Triton, or it cannot address host memory: gather on the host
            return host.index_select(0, index.cpu()).to(index.device)

    def _scatter_to_host(self, host: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
        """host[index] = rows, host in (pinned) host memory, rows on the device: the GPU writes them there
        itself (a Triton kernel through the mapped host memory), without waiting on the host."""
        if rows.device.type == "cpu":
            host.index_copy_(0, index, rows)
            return
        try:
            self.kernel.scatter_rows(host, index, rows)
        except Exception:  # noqa: BLE001 - no Triton, or it cannot address host memory: copy and scatter on the host
            host.index_copy_(0, index.cpu(), rows.cpu())


def _used_on(stream, *tensors) -> None:
    """Keep the caller's tensors (sparse ones included) alive until `stream` is done with them."""
    for t in tensors:
        if t is None:
            continue
        for part in ((t._indices(), t._values()) if t.is_sparse else (t,)):
            part.record_stream(stream)


# ---------------------------------------------------------------------------- passes started before the step


class EarlyStep:
    """The part of a step's host-state updates started before the step (see the module docstring), for
    the optimizer whose `state` holds the split masters' states."""

    def __init__(self, optimizer, maps: QuantMaps, host: HostStream):
        self.opt, self.maps, self.host = optimizer, maps, host
        self.pending: dict = {}  # id(p) -> (p, group, Job)
        self.spares: dict = {}  # id(p) -> second host buffers and device block maxima, and an UndoLog

    def _spare(self, p: torch.Tensor, state: dict) -> dict:
        if id(p) not in self.spares:
            self.spares[id(p)] = {**{k: host_tensor(state[k].shape, state[k].dtype) for k in HOST_KEYS},
                                  **{k: torch.empty_like(state[k]) for k in DEVICE_KEYS},
                                  "log": UndoLog(p.device)}
        return self.spares[id(p)]

    def start(self, group: dict, p: torch.Tensor, ids: Optional[torch.Tensor]) -> None:
        """Start p's pass now: the rows no id names (ids = the step's token ids, on p's device; the
        named rows are set aside), or the whole update with p.grad (ids None). Nothing here waits for
        the GPU: the host goes straight on to launch the backward pass."""
        state = self.opt.state[p]
        spare = self._spare(p, state)
        b1, b2 = group["betas"]
        hp = hyperparameters(b1, b2, group["lr"], group["eps"], group["weight_decay"], state["step"] + 1, p.device)
        if ids is None:
            g, slot = grad_table(p, p.grad)
            keep = None
        else:
            n = p.shape[0]
            g = torch.zeros(1, p.shape[1], dtype=p.dtype, device=p.device)
            table = torch.full((n + 1,), -1, dtype=torch.int64, device=p.device)  # entry n takes ids out of range
            ids = to_device(ids.reshape(-1), p.device).long()
            table.index_fill_(0, torch.where((ids >= 0) & (ids < n), ids, n), SKIP)
            slot = table[:n]
            keep = KeptRows(slot)
        dst = {k: spare[k] for k in (*HOST_KEYS, *DEVICE_KEYS)}
        job = Job(p, state, dst, hp, g, slot, log=spare["log"], keep=keep)
        self.host.launch([job], self.maps, paced=True)
        self.pending[id(p)] = (p, group, job)

    def has(self, p: torch.Tensor) -> bool:
        return id(p) in self.pending

    def covers(self, p: torch.Tensor) -> bool:
        """Whether p's gradient touches only rows the early pass set aside (then commit is exact). A row
        the batch's token ids did not name would have been updated without its gradient."""
        job = self.pending[id(p)][2]
        if job.keep is None or p.grad is None:
            return True
        if not p.grad.is_sparse:
            return False
        return bool((job.keep.slot[p.grad._indices()[0]] == SKIP).all())

    def drop(self, p: torch.Tensor) -> None:
        """Undo p's early pass (its weight by inverting the update; the old states stay live)."""
        self._undo(p, self.pending.pop(id(p))[2])

    def commit(self, p: torch.Tensor) -> None:
        """The step is finite: finish p's kept rows with their (clipped) gradient and make the new
        states the live ones."""
        job = self.pending.pop(id(p))[2]
        state = self.opt.state[p]
        self.host.drain(p.device)  # the pass is queued whole before anything is queued after it
        if job.keep is not None:
            grad = p.grad if p.grad is not None else torch.sparse_coo_tensor(
                torch.zeros(1, 0, dtype=torch.int64, device=p.device), torch.zeros(0, p.shape[1], dtype=p.dtype, device=p.device), p.shape)
            s = self.host.streams(p.device)
            if s is not None:
                _, work, cout = s
                work.wait_stream(torch.cuda.current_stream(p.device))  # the gradient is final (clipped)
                work.wait_stream(cout)  # the pass's copies back are done: the kept rows' go over them
                _used_on(work, grad)
                with torch.cuda.stream(work):
                    self.host.finish_kept(p, grad, job.keep, job.dst, self.maps, job.hp)
            else:
                self.host.finish_kept(p, grad, job.keep, job.dst, self.maps, job.hp)
        spare = self.spares[id(p)]
        for k in (*HOST_KEYS, *DEVICE_KEYS):
            state[k], spare[k] = job.dst[k], state[k]
        state["step"] += 1

    def abandon(self) -> None:
        """The step is skipped: put every weight the early passes moved back, keep the old states."""
        for p, _, job in self.pending.values():
            self._undo(p, job)
            self.host.wait(p.device)  # the weights are back before anything reads them
        self.pending.clear()

    def _undo(self, p: torch.Tensor, job: Job) -> None:
        """p's weights as they were before the pass, from the weights it made, the old states (still
        live) and the new low halves (split_master.UndoLog): no copy of the weights was kept."""
        self.host.drain(p.device)
        rows, width = p.shape
        old, new = job.src, job.dst
        kernel = self.host.kernel
        s = self.host.streams(p.device)
        if s is None:
            undo_split_rows(p.data, new["lo"], old["lo"], job.g, job.slot, old["state1"], old["state2"],
                            old["absmax1"], old["absmax2"], self.maps, job.hp, kernel=kernel)
            job.log.apply(p)
            return
        _, work, cout = s
        work.wait_stream(cout)  # the pass's new low halves have landed in host memory
        with torch.cuda.stream(work):  # rare (a skipped step): one chunk at a time, nothing overlapped
            step_rows = chunk_rows(width, self.host.chunk_elements)
            for r0 in range(0, rows, step_rows):
                r1 = min(rows, r0 + step_rows)
                e0, e1 = r0 * width, min(old["state1"].numel(), -(-(r1 * width) // BLOCK) * BLOCK)
                new_lo, old_lo = (to_device(t.view(rows, width)[r0:r1], p.device) for t in (new["lo"], old["lo"]))
                s1, s2 = (to_device(old[k].view(-1)[e0:e1], p.device) for k in ("state1", "state2"))
                undo_split_rows(p.data[r0:r1], new_lo, old_lo, job.g if job.slot is not None else job.g[r0:r1],
                                job.slot[r0:r1] if job.slot is not None else None, s1, s2,
                                old["absmax1"][e0 // BLOCK:e1 // BLOCK], old["absmax2"][e0 // BLOCK:e1 // BLOCK],
                                self.maps, job.hp, kernel=kernel)
            job.log.apply(p)
