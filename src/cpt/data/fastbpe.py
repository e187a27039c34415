"""Byte-level BPE at tiktoken's speed, giving the ids of the Hugging Face tokenizer it was built from.

Most open models (GPT-2, SmolLM, Llama 3, Qwen, Mistral-Nemo, ...) use byte-level BPE: split the
text with a regex, map each piece to bytes, merge byte pairs by the merge list's order. The Rust
`tokenizers` library does this at about 1.2M tokens/s on one of our cores; most of that time goes
to its general machinery (normalised strings, offsets, per-token strings), not to the merging.
tiktoken runs the same algorithm without that machinery, 2.5-3x faster. This module turns a
tokenizer.json into a tiktoken `Encoding`:

- ranks: the 256 single bytes first, then each merge's product in merge order, so the pair that
  tiktoken merges first is the pair whose merge comes first in the list;
- a lookup table from those ranks to the tokenizer's own ids, and the added tokens (`<|endoftext|>`,
  ...) as tiktoken special tokens, split out of the text as the Hugging Face tokenizer does;
- the pre-tokenizer's regex (ByteLevel's GPT-2 pattern, or a `Split` regex before a regex-free ByteLevel).

Anything else (normalisers, SentencePiece-style Metaspace, byte fallback, dropout, added tokens
with strip flags, ...) is refused by `FastBPE.from_tokenizer` with the reason, and the caller keeps
the Hugging Face path. The two algorithms agree when every token's bytes are reached through its own
merge; tokenizers trained by BPE have this property in practice, but it is not guaranteed, so the
caller checks (see `Encoder` in tokenize.py): every batch's first document is also encoded the
Hugging Face way and compared, and on a difference the fast path is dropped for the rest of the run.
A document whose bytes include one missing from the vocabulary goes to the Hugging Face tokenizer.

    python -c "from transformers import AutoTokenizer; from cpt.data.fastbpe import FastBPE; \
f = FastBPE.from_tokenizer(AutoTokenizer.from_pretrained('gpt2')); print(f.encode_batch(['hello world']))"
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np

# GPT-2's pre-tokenizer regex: what ByteLevel(use_regex=True) applies.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _byte_decoder() -> dict[str, int]:
    """ByteLevel's printable stand-in character for each byte, reversed (character -> byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class Unsupported(ValueError):
    """The tokenizer is not plain byte-level BPE: the message says which part."""


def _pattern(pre: Optional[dict]) -> str:
    """The regex the pre-tokenizer splits with, or Unsupported."""
    if pre is None:
        raise Unsupported("no pre-tokenizer")
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise Unsupported("ByteLevel add_prefix_space")
        if not pre.get("use_regex", True):
            raise Unsupported("ByteLevel without a regex")
        return GPT2_PATTERN
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
                and "Regex" in (steps[0].get("pattern") or {}) and steps[0].get("behavior") == "Isolated"
                and not steps[0].get("invert") and not steps[1].get("use_regex", True)
                and not steps[1].get("add_prefix_space")):
            return steps[0]["pattern"]["Regex"]
    raise Unsupported(f"pre-tokenizer {pre.get('type')}")


class FastBPE:
    """`encode_batch(texts)` -> one int array of the tokenizer's ids per text (no special tokens added)."""

    def __init__(self, encoding: Any, ids: np.ndarray, missing_ranks: np.ndarray, num_threads: int):
        self.encoding = encoding
        self.ids = ids                      # tiktoken rank -> tokenizer id (-1: not in the vocabulary)
        self.missing_ranks = missing_ranks  # the ranks that have no id
        self.num_threads = num_threads

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, num_threads: Optional[int] = None) -> "FastBPE":
        """Build from a transformers fast tokenizer (or a `tokenizers.Tokenizer`); Unsupported if it is
        not plain byte-level BPE, ImportError without tiktoken."""
        import tiktoken

        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if not hasattr(backend, "to_str"):
            raise Unsupported("not a fast (Rust) tokenizer")
        spec = json.loads(backend.to_str())
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise Unsupported(f"model {model.get('type')}")
        for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
            if model.get(key):
                raise Unsupported(f"BPE {key}={model[key]!r}")
        if spec.get("normalizer") not in (None, {"type": "Sequence", "normalizers": []}):
            raise Unsupported(f"normalizer {spec['normalizer'].get('type')}")
        pattern = _pattern(spec.get("pre_tokenizer"))

        to_byte = _byte_decoder()
        # Behind the ByteLevel pre-tokenizer (checked by _pattern) byte fallback acts only on a byte
        # character missing from the vocabulary, and only with <0xNN> tokens to fall back to.
        vocab = model.get("vocab") or {}
        if model.get("byte_fallback") and not (all(ch in vocab for ch in to_byte)
                                               or not any(f"<0x{b:02X}>" in vocab for b in range(256))):
            raise Unsupported("byte fallback")

        def as_bytes(token: str) -> bytes:
            try:
                return bytes(to_byte[ch] for ch in token)
            except KeyError:
                raise Unsupported(f"token {token!r} is not in ByteLevel's alphabet") from None

        ranks: dict[bytes, int] = {bytes([b]): b for b in range(256)}
        for merge in model.get("merges") or []:
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            product = as_bytes(left) + as_bytes(right)
            if product in ranks:
                # Two merges make the same token: tiktoken could only rank one of them.
                raise Unsupported(f"two merges produce {product!r}")
            ranks[product] = len(ranks)

        ids = np.full(len(ranks), -1, dtype=np.int64)
        for token, i in (model.get("vocab") or {}).items():
            r = ranks.get(as_bytes(token))
            if r is not None:
                ids[r] = i

        special: dict[str, int] = {}
        contents = [a["content"] for a in spec.get("added_tokens") or []]
        for a in spec.get("added_tokens") or []:
            if a.get("lstrip") or a.get("rstrip") or a.get("single_word"):
                raise Unsupported(f"added token {a['content']!r} strips or matches single words")
            if any(other != a["content"] and other.startswith(a["content"]) for other in contents):
                raise Unsupported(f"added token {a['content']!r} is a prefix of another")
            special[a["content"]] = len(ranks) + len(special)
        ids = np.concatenate([ids, np.array([a["id"] for a in spec.get("added_tokens") or []], dtype=np.int64)])

        encoding = tiktoken.Encoding("cpt-bpe", pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
        if num_threads is None:
            num_threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return cls(encoding, ids, np.flatnonzero(ids < 0), max(1, num_threads))

    def encode_batch(self, texts: list[str]) -> list[Optional[np.ndarray]]:
        """The ids of each text as int64 arrays; None for a text that needs a byte the vocabulary
        lacks (the Hugging Face tokenizer decides what happens to it)."""
        out: list[Optional[np.ndarray]] = []
        ranks = self.encoding.encode_batch(texts, num_threads=self.num_threads, allowed_special="all")
        for r in ranks:
            ids = self.ids[np.array(r, dtype=np.int64)]
            out.append(None if self.missing_ranks.size and (ids < 0).any() else ids)
        return out
