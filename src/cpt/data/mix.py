"""Mixing sources by weight: which source fills each global block slot, computable in O(1).

Weights are shares of training tokens (every block holds max_seq_length tokens, so shares of
blocks are shares of tokens). The weights are apportioned to integer counts over a round of
`period` slots, and inside a round the slots are dealt by smooth weighted round-robin, so every
prefix of the run is within one block per source of its exact share -- a replay source at 25%
really is 25% over any stretch of training, not only on average.

    python -c "from cpt.data.mix import MixPattern; m = MixPattern([3, 1]); print([m.locate(g) for g in range(8)])"
"""
from __future__ import annotations

import warnings

import numpy as np

from cpt.data.sources import DataError


def apportion(weights: list[float], total: int) -> list[int]:
    """Integer counts summing to `total` proportional to `weights` (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return [int(c) for c in counts]


def _rational_period(weights: list[float], limit: int = 1000) -> int:
    """The smallest period <= limit whose apportionment is exact (3:1 -> 4), else `limit`."""
    w = np.asarray(weights, dtype=np.float64)
    p = w / w.sum()
    for period in range(1, limit + 1):
        if np.allclose(p * period, np.round(p * period), atol=1e-9, rtol=0):
            return period
    return limit


class MixPattern:
    """Global slot g -> (source index, how many blocks that source gave before g)."""

    def __init__(self, weights: list[float], period: int | None = None):
        if not weights or any(w <= 0 for w in weights):
            raise DataError("every data source needs a weight > 0")
        self.weights = [float(w) for w in weights]
        self.period = period or _rational_period(self.weights)
        self.counts = apportion(self.weights, self.period)
        for i, c in enumerate(self.counts):
            if c == 0:
                warnings.warn(f"data.sources[{i}] has weight {weights[i]} -- too small to get any block "
                              f"in {self.period}; it will not be used", stacklevel=2)
        # Smooth weighted round-robin: each slot goes to the source furthest behind its share.
        pattern = np.zeros(self.period, dtype=np.int64)
        credit = np.zeros(len(weights), dtype=np.int64)
        for j in range(self.period):
            credit += self.counts
            s = int(np.argmax(credit))
            credit[s] -= self.period
            pattern[j] = s
        self.pattern = pattern
        onehot = np.eye(len(weights), dtype=np.int64)[pattern]
        self.prefix = np.concatenate([np.zeros((1, len(weights)), np.int64), np.cumsum(onehot, axis=0)])

    def locate(self, g: int) -> tuple[int, int]:
        r, j = divmod(int(g), self.period)
        s = int(self.pattern[j])
        return s, r * self.counts[s] + int(self.prefix[j, s])

    def blocks_before(self, g: int) -> list[int]:
        """Blocks each source has given in slots [0, g)."""
        r, j = divmod(int(g), self.period)
        return [r * c + int(self.prefix[j, s]) for s, c in enumerate(self.counts)]

    def slots_to_exhaust(self, source: int, n_blocks: int) -> int:
        """Slots until `source` has given `n_blocks` blocks (the end of its first pass)."""
        c = self.counts[source]
        if c == 0:
            return 1 << 62
        q, rem = divmod(n_blocks, c)
        if rem == 0:
            # the round's last block of this source may sit before the round's end
            j = int(np.searchsorted(self.prefix[:, source], c, side="left"))
            return (q - 1) * self.period + j
        j = int(np.searchsorted(self.prefix[:, source], rem, side="left"))
        return q * self.period + j
