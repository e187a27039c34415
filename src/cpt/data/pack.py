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

Whole-document placement (`whole`, used for conversations): a document that does not fit the room left
in a block starts the next one, which is padded (labels -100) instead; only a document longer than a
block is cut. `one_per_block` puts each document in its own block (packing: none).

Token arrays may carry a loss mask: in uint32 arrays, bit 31 set on a token means "no loss here" (a
conversation's prompt tokens, cpt.data.chat). `collate` clears the bit and gives those tokens label -100;
no vocabulary reaches 2**31, so ordinary uint32 token arrays are unaffected.

    python -m pytest tests/test_data_pack.py -q
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from cpt.data.cache import TokenShards

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
        self._bounds: np.ndarray | None = None
        if whole or one_per_block:
            keep = np.ones(shards.n_docs, dtype=bool)
            keep[ex] = False
            self._bounds = whole_document_bounds(np.diff(off)[keep], seq_len, one_per_block)
            self.n_blocks = len(self._bounds) - 1
        else:
            self.n_blocks = -(-self.n_tokens // seq_len)

    def block(self, b: int) -> Block:
        if not 0 <= b < self.n_blocks:
            raise IndexError(f"block {b} of {self.n_blocks}")
        if self._bounds is not None:
            a, e = int(self._bounds[b]), int(self._bounds[b + 1])
        else:
            a, e = b * self.seq_len, min((b + 1) * self.seq_len, self.n_tokens)
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


def whole_document_bounds(lengths: np.ndarray, seq_len: int, one_per_block: bool = False) -> np.ndarray:
    """Block starts (and the end) over documents of `lengths` laid back to back, so that no document
    is split unless it is longer than a block: one that does not fit the room left starts a new block."""
    bounds, fill, pos = [0], 0, 0
    for n in lengths.tolist():
        if fill and (one_per_block or fill + n > seq_len):
            bounds.append(pos)
            fill = 0
        fill += n
        while fill > seq_len:  # only a document longer than a block
            bounds.append(bounds[-1] + seq_len)
            fill -= seq_len
        pos += n
    if pos > bounds[-1]:
        bounds.append(pos)
    return np.asarray(bounds, dtype=np.int64)


class StreamPacker:
    """Blocks from a document stream, packed on the fly; its state is a position in the stream.

    `docs(epoch, loc)` yields `(loc, tokens)` per document from the document at `loc` (None: the
    epoch's start). The state names the document holding the next unread token and how many of its
    tokens are already in blocks, so a resumed run re-reads that one document and goes on from there.
    """

    def __init__(self, docs: Callable[[int, dict | None], Iterator[tuple[dict, np.ndarray]]], seq_len: int,
                 whole: bool = False, one_per_block: bool = False):
        self._docs = docs
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
                    raise RuntimeError("the stream yields no documents")
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
