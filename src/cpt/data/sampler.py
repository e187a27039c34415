"""The training stream: global block slots -> source blocks -> per-rank batches, with an O(1) position.

Slot g (0, 1, 2, ... over the whole run, all ranks together) is filled by the source that
`MixPattern` names, with that source's k-th block in its own endless order: epoch e = k // n is a
permutation of its blocks seeded by (train.seed, source, e), so each epoch is reshuffled and the
same seed gives the same order. Rank r of W takes the slots with g % W == r, so ranks never share
a block, and a batch round of B*W slots gives every rank exactly B blocks.

The state is the next slot (plus, for streamed sources, their position in the stream). Loading it
costs one permutation per source, never a replay of batches; a changed world size or batch size
continues from the same slot.

    python -m pytest tests/test_data.py -q -k resume
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch

from cpt.data.mix import MixPattern
from cpt.data.pack import Block, CachedBlocks, StreamPacker, collate

STATE_VERSION = 1


class _CachedOrder:
    """The k-th block of a cached source in its endless, per-epoch-shuffled order."""

    def __init__(self, blocks: CachedBlocks, seed: int, source_index: int, shuffle: bool):
        self.blocks = blocks
        self.seed, self.index, self.shuffle = seed, source_index, shuffle
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def block(self, k: int) -> Block:
        n = self.blocks.n_blocks
        epoch, i = divmod(k, n)
        if not self.shuffle:
            return self.blocks.block(i)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, self.index, epoch]).permutation(n)
            self._perm_epoch = epoch
        return self.blocks.block(int(self._perm[i]))


class TokenStream:
    """Endless batches of packed blocks for one rank, resumable from `state_dict()` in O(1).

    `blocks_per_epoch` and `tokens_per_epoch` count the whole world (all ranks); an epoch ends
    when the first source has given all its blocks once (for one source: each block once).
    Both are None when any source is streamed.
    """

    def __init__(self, sources: Sequence[CachedBlocks | StreamPacker], weights: Sequence[float], *,
                 seq_len: int, packing: str, pad_id: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, names: Sequence[str] | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.seq_len, self.packing, self.pad_id = seq_len, packing, pad_id
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.names = list(names) if names else [f"source{i}" for i in range(len(sources))]
        self.mix = MixPattern(list(weights))
        self._sources: list[Any] = [
            _CachedOrder(s, seed, i, shuffle) if isinstance(s, CachedBlocks) else s for i, s in enumerate(sources)]
        self._slot = 0  # next global slot
        self.streaming = any(isinstance(s, StreamPacker) for s in sources)
        if self.streaming:
            self.blocks_per_epoch = None
            self.tokens_per_epoch = None
        else:
            self.blocks_per_epoch = int(min(self.mix.slots_to_exhaust(i, s.n_blocks) for i, s in enumerate(sources)))
            per = self.mix.blocks_before(self.blocks_per_epoch)
            self.tokens_per_epoch = int(round(sum(p * s.n_tokens / s.n_blocks for p, s in zip(per, sources))))

    # ------------------------------------------------------------------ iteration

    def _fill(self, slot: int) -> tuple[int, Block | None]:
        s, k = self.mix.locate(slot)
        src = self._sources[s]
        mine = slot % self.world_size == self.rank
        if isinstance(src, StreamPacker):
            if src.blocks != k:
                raise RuntimeError(f"stream {self.names[s]} is at block {src.blocks}, slot {slot} wants block {k}")
            blk = src.next_block()  # every rank reads every streamed block: identical positions everywhere
            return s, blk if mine else None
        return s, src.block(k) if mine else None

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Endless batches of `batch_size` blocks for this rank; see the class docstring."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        while True:
            round_ = self.world_size * batch_size
            blocks = []
            for g in range(self._slot, self._slot + round_):
                _, blk = self._fill(g)
                if blk is not None:
                    blocks.append(blk)
            self._slot += round_  # before the yield: state_dict() then names the position after this batch
            yield collate(blocks, self.seq_len, self.packing, self.pad_id)

    def source_counts(self, slots: int | None = None) -> dict[str, int]:
        """Blocks each source has given in the first `slots` slots (default: so far)."""
        counts = self.mix.blocks_before(self._slot if slots is None else slots)
        return dict(zip(self.names, counts))

    # ------------------------------------------------------------------ position

    def state_dict(self) -> dict:
        """The position after the last batch yielded (JSON-serialisable; the same on every rank)."""
        return {"version": STATE_VERSION, "slot": self._slot, "seed": self.seed, "shuffle": self.shuffle,
                "packing": self.packing, "seq_len": self.seq_len, "sources": self.names,
                "weights": self.mix.weights,
                "streams": {self.names[i]: s.state_dict() for i, s in enumerate(self._sources)
                            if isinstance(s, StreamPacker)}}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly after the saved position; fails clearly when the data plan changed."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r} is not {STATE_VERSION}")
        for key in ("seed", "shuffle", "packing", "seq_len", "sources", "weights"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(f"cannot resume the data position: {key} was {state.get(key)!r} and is now {mine!r} "
                                 "(the checkpoint's blocks would not be the ones the run trained on)")
        self._slot = int(state["slot"])
        for i, s in enumerate(self._sources):
            if isinstance(s, StreamPacker):
                st = state["streams"].get(self.names[i])
                if st is None:
                    raise ValueError(f"the data state has no stream position for {self.names[i]}")
                s.load_state_dict(st)
