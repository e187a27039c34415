"""Packing: documents' tokens back to back, cut into blocks of max_seq_length, turned into model inputs.

Both modes lay tokens out identically (no padding inside the data, nothing truncated: a long
document simply continues in the next block). They differ in what the model is told:

  concat    position_ids = 0..T-1 and labels = input_ids: a block may read across documents.
  document  position_ids restart at 0 at each document start, and the first token of a document
            gets label -100 (in separate computation nothing predicts it). Given position_ids and no
            attention_mask, transformers (>= 4.54, 5.x) derives a block-diagonal causal mask from the
            restarts for sdpa/eager/flex, and flash-attention uses them as varlen boundaries -- but only
            when the model runs with use_cache=False (a KV cache disables the detection).
            `document_attention_mask` builds the same mask explicitly for any other path.

Only the final block of an epoch can be short; it is padded with labels -100.

Whole-document placement (`whole`, used for conversations): no document is split across blocks unless it
is longer than a block, and each block's unused end is padded (labels -100). From the token cache the
documents go into blocks by best-fit decreasing (`best_fit_layout`: longest first, each into the block
whose room fits it most tightly), which fills blocks almost completely: conversations of 200-2,000 tokens
in 2,048-token blocks fill 98.8% instead of 74% in their own order. A stream has no lookahead, so there a
document that does not fit the room left starts the next block. `one_per_block` puts each document in
its own block (packing: none).

Token arrays may carry a loss mask: in uint32 arrays, bit 31 set on a token means "no loss here" (a
conversation's prompt tokens, cpt.data.chat). `collate` clears the bit and gives those tokens label -100;
no vocabulary reaches 2**31, so ordinary uint32 token arrays are unaffected.

    python -m pytest tests/test_data_pack.py -q
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from cpt.data.cache import TokenShards
from cpt.data.sources import DataError

IGNORE_INDEX = -100
NO_LOSS_BIT = np.uint32(1 << 31)


@dataclass
class Block:
    """At most T tokens, and the offsets in the block at which a document starts (sorted, unique)."""

    tokens: np.ndarray
    starts: np.ndarray


class CachedBlocks:
    """A cached source minus its held-out documents, seen as one token sequence cut every T tokens."""

    def __init__(self, shards: TokenShards, seq_len: int, exclude: Sequence[int] = (), whole: bool = False,
                 one_per_block: bool = False):
        self.shards = shards
        self.seq_len = seq_len
        off = np.asarray(shards.offsets, dtype=np.int64)
        self._offsets = off
        ex = sorted({int(i) for i in exclude if 0 <= int(i) < shards.n_docs})
        # Kept documents form a few runs between the excluded ones: [seg_start, seg_end) in the cache.
        bounds = [0]
        for i in ex:
            bounds += [i, i + 1]
        bounds.append(shards.n_docs)
        seg = [(int(off[a]), int(off[b])) for a, b in zip(bounds[::2], bounds[1::2]) if off[b] > off[a]]
        self._seg_start = np.array([s for s, _ in seg], dtype=np.int64)
        self._seg_len = np.array([e - s for s, e in seg], dtype=np.int64)
        self._seg_cum = np.concatenate([[0], np.cumsum(self._seg_len)]).astype(np.int64)
        self.n_docs = shards.n_docs - len(ex)
        self.n_tokens = int(self._seg_cum[-1])
        self._layout: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        if whole or one_per_block:
            keep = np.ones(shards.n_docs, dtype=bool)
            keep[ex] = False
            self._layout = best_fit_layout(np.diff(off)[keep], seq_len, one_per_block)
            self.n_blocks = len(self._layout[2]) - 1
        else:
            self.n_blocks = -(-self.n_tokens // seq_len)

    def block(self, b: int) -> Block:
        if not 0 <= b < self.n_blocks:
            raise IndexError(f"block {b} of {self.n_blocks}")
        if self._layout is None:
            return self._range(b * self.seq_len, min((b + 1) * self.seq_len, self.n_tokens))
        lo, hi, bounds = self._layout
        parts = [self._range(int(lo[i]), int(hi[i])) for i in range(int(bounds[b]), int(bounds[b + 1]))]
        # Each piece starts a document in the block (a long document's later pieces sit alone in theirs).
        offsets = np.cumsum([0] + [len(p.tokens) for p in parts[:-1]])
        starts = np.unique(np.concatenate([np.concatenate([[0], p.starts]) + o for p, o in zip(parts, offsets)]))
        tokens = np.concatenate([p.tokens for p in parts]) if len(parts) > 1 else parts[0].tokens
        return Block(tokens, starts.astype(np.int64))

    def _range(self, a: int, e: int) -> Block:
        """Tokens [a, e) of the kept sequence, and where documents start in them."""
        pieces, starts = [], []
        filled = 0
        s = int(np.searchsorted(self._seg_cum, a, side="right")) - 1
        while a < e:
            lo = self._seg_start[s] + (a - self._seg_cum[s])
            hi = self._seg_start[s] + min(e, self._seg_cum[s + 1]) - self._seg_cum[s]
            pieces.append(self.shards.get(int(lo), int(hi)))
            i0 = int(np.searchsorted(self._offsets, lo, side="left"))
            i1 = int(np.searchsorted(self._offsets, hi, side="left"))
            starts.append(self._offsets[i0:i1] - lo + filled)
            filled += int(hi - lo)
            a += int(hi - lo)
            s += 1
        tokens = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
        st = np.unique(np.concatenate(starts)) if starts else np.zeros(0, np.int64)
        return Block(tokens, st)


def best_fit_layout(lengths: np.ndarray, seq_len: int, one_per_block: bool = False
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Documents of `lengths` (laid back to back) placed into blocks whole: (lo, hi, bounds), where block b
    holds the pieces [lo[i], hi[i]) for i in bounds[b]:bounds[b+1], in the documents' coordinates.

    A document longer than a block is cut into whole blocks and a remainder; every other document (and
    each remainder) goes, longest first, into the open block with the least room that still fits it, or
    a new block (best-fit decreasing). one_per_block: each document (or piece) alone in its block.
    Deterministic: ties go to the earlier document and the earlier block."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    full_lo, items = [], []  # whole blocks of long documents; (length, lo) of pieces to place
    for lo, n in zip(starts.tolist(), lengths.tolist()):
        while n > seq_len:
            full_lo.append(lo)
            lo, n = lo + seq_len, n - seq_len
        if n:
            items.append((n, lo))
    blocks: list[list[int]] = [[lo] for lo in full_lo]
    sizes: dict[int, int] = {lo: seq_len for lo in full_lo}
    order = sorted(range(len(items)), key=lambda i: (-items[i][0], i))
    if one_per_block:
        blocks += [[items[i][1]] for i in sorted(order, key=lambda i: items[i][1])]
    else:
        rooms = _RoomIndex(seq_len)
        placed: list[list[int]] = []
        for i in order:
            n, lo = items[i]
            b = rooms.take(n)  # the open block with the least room >= n, or None
            if b is None:
                b = len(placed)
                placed.append([])
                rooms.add(b, seq_len - n)
            else:
                rooms.add(b, rooms.room[b] - n)
            placed[b].append(lo)
        blocks += [sorted(p) for p in placed]
    for n, lo in items:
        sizes[lo] = n
    lo = np.array([x for blk in blocks for x in blk], dtype=np.int64)
    hi = lo + np.array([sizes[x] for x in lo.tolist()], dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum([len(blk) for blk in blocks])]).astype(np.int64)
    return lo, hi, bounds


class _RoomIndex:
    """Open blocks by the room they have left: the one with the least room >= n in O(log seq_len)
    (a segment tree counting blocks per room value)."""

    def __init__(self, seq_len: int):
        self.size = 1 << max(1, int(seq_len).bit_length())
        self.count = [0] * (2 * self.size)
        self.by_room: dict[int, list[int]] = {}
        self.room: dict[int, int] = {}

    def add(self, block: int, room: int) -> None:
        self.room[block] = room
        if room <= 0:
            return
        heapq.heappush(self.by_room.setdefault(room, []), block)
        self._bump(room, 1)

    def take(self, n: int):
        room = self._first_at_least(n)
        if room is None:
            return None
        block = heapq.heappop(self.by_room[room])
        self._bump(room, -1)
        return block

    def _bump(self, room: int, d: int) -> None:
        i = room + self.size
        while i:
            self.count[i] += d
            i //= 2

    def _first_at_least(self, n: int):
        """The smallest room value >= n that some block has, or None."""
        def first(node: int, lo: int, hi: int):
            if hi < n or not self.count[node]:
                return None
            if lo == hi:
                return lo
            mid = (lo + hi) // 2
            left = first(2 * node, lo, mid)
            return left if left is not None else first(2 * node + 1, mid + 1, hi)
        return first(1, 0, self.size - 1)


class StreamPacker:
    """Blocks from a document stream, packed on the fly; its state is a position in the stream.

    `docs(epoch, loc)` yields `(loc, tokens)` per document from the document at `loc` (None: the
    epoch's start). The state names the document holding the next unread token and how many of its
    tokens are already in blocks, so a resumed run re-reads that one document and goes on from there.
    """

    def __init__(self, docs: Callable[[int, dict | None], Iterator[tuple[dict, np.ndarray]]], seq_len: int,
                 whole: bool = False, one_per_block: bool = False, name: str = "the stream"):
        self._docs = docs
        self.name = name
        self.seq_len = seq_len
        self.whole, self.one_per_block = whole or one_per_block, one_per_block
        self.epoch = 0
        self.blocks = 0
        self._it: Iterator[tuple[dict, np.ndarray]] | None = None
        self._buf: list[list] = []  # [loc, tokens, consumed]
        self._last: tuple[dict | None, int] = (None, 0)  # (loc, tokens) of the last document fully used
        self._resume_skip = 0

    def state_dict(self) -> dict:
        if self._buf:
            loc, toks, used = self._buf[0]
            return {"epoch": self.epoch, "loc": loc, "offset": int(used), "blocks": self.blocks}
        loc, n = self._last
        return {"epoch": self.epoch, "loc": loc, "offset": int(n), "blocks": self.blocks}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.blocks = int(state.get("blocks", 0))
        self._buf = []
        self._last = (None, 0)
        loc = state.get("loc")
        self._it = self._docs(self.epoch, loc)
        self._resume_skip = int(state.get("offset", 0)) if loc is not None else 0

    def _pull(self) -> bool:
        if self._it is None:
            self._it = self._docs(self.epoch, None)
        for loc, toks in self._it:
            used = 0
            if self._resume_skip:
                used = min(self._resume_skip, len(toks))  # the resumed-at document: skip what was used
                self._resume_skip = 0
            if used >= len(toks):
                self._last = (loc, len(toks))
                continue
            self._buf.append([loc, toks, used])
            return True
        return False

    def next_block(self) -> Block:
        pieces, starts, filled, ended = [], [], 0, False
        while filled < self.seq_len:
            if not self._buf and not self._pull():
                ended = True
                break
            entry = self._buf[0]
            loc, toks, used = entry
            if (self.whole and filled and used == 0
                    and (self.one_per_block or len(toks) > self.seq_len - filled)):
                break  # the document starts the next block whole
            if used == 0:
                starts.append(filled)
            take = min(self.seq_len - filled, len(toks) - used)
            pieces.append(toks[used:used + take])
            filled += take
            entry[2] = used + take
            if entry[2] >= len(toks):
                self._buf.pop(0)
                self._last = (loc, len(toks))
        if ended:  # the stream ended: next call starts the next epoch
            self.epoch += 1
            self._it, self._buf, self._last = None, [], (None, 0)
            if filled == 0:
                if self.blocks == 0 and self.epoch > 1:
                    raise DataError(f"{self.name}: the streamed source yields no documents: every row was empty, "
                                    "skipped, filtered out or held out for evaluation. Check the source's path or split, "
                                    "its text field and filters (or data.streaming: false to see the counts)")
                return self.next_block()
        self.blocks += 1
        tokens = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
        return Block(np.asarray(tokens), np.asarray(starts, dtype=np.int64))


def collate(blocks: Sequence[Block], seq_len: int, packing: str, pad_id: int) -> dict[str, torch.Tensor]:
    """Blocks -> input_ids, labels, position_ids (LongTensor [B, T]); short blocks padded, labels -100."""
    n = len(blocks)
    ids = np.full((n, seq_len), pad_id, dtype=np.int64)
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    pos = np.broadcast_to(np.arange(seq_len, dtype=np.int64), (n, seq_len)).copy()
    for r, blk in enumerate(blocks):
        k = len(blk.tokens)
        toks = blk.tokens
        if toks.dtype == np.uint32:
            no_loss = (toks & NO_LOSS_BIT) != 0
            toks = (toks & ~NO_LOSS_BIT).astype(np.int64)
            ids[r, :k] = toks
            labels[r, :k] = np.where(no_loss, IGNORE_INDEX, toks)
        else:
            ids[r, :k] = toks
            labels[r, :k] = toks
        if packing in ("document", "none"):
            starts = blk.starts[blk.starts < k]
            labels[r, starts] = IGNORE_INDEX
            bounds = np.unique(np.concatenate([[0], starts, [k] if k < seq_len else []])).astype(np.int64)
            idx = np.arange(seq_len)
            pos[r] = idx - bounds[np.searchsorted(bounds, idx, side="right") - 1]
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(pos)}


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] index of the packed sequence each token belongs to (a restart = a new sequence)."""
    restart = torch.ones_like(position_ids, dtype=torch.bool)
    restart[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return restart.long().cumsum(-1)


def document_attention_mask(position_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, 1, T, T] additive mask (0 or the dtype's minimum): causal and within one document.

    For attention paths that do not infer packing from position_ids (a model run with a KV cache,
    custom attention); pass it as `attention_mask`.
    """
    doc = document_ids(position_ids)
    T = position_ids.shape[-1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (doc[:, :, None] == doc[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
