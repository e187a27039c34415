"""Text -> token arrays: the fast tokenizer's Rust batch path, EOS appended, optional worker processes.

    python -c "from transformers import AutoTokenizer; from cpt.data.tokenize import Encoder; \
print(Encoder(AutoTokenizer.from_pretrained('gpt2')).encode(['hello world']))"
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator

import numpy as np

from cpt.data.sources import DataError

log = logging.getLogger(__name__)


def token_dtype(tokenizer: Any) -> np.dtype:
    """uint16 when every id fits (most vocabularies under 64k), else uint32: halves the cache size."""
    return np.dtype(np.uint16) if len(tokenizer) <= 1 << 16 else np.dtype(np.uint32)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Changes when the tokenizer would produce different ids (vocabulary, merges, normalisation)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.eos_token_id, len(tokenizer)]).encode())
    return h.hexdigest()


_WORKER: "Encoder | None" = None


def _worker_init(enc: "Encoder") -> None:
    global _WORKER
    # One process per core already: the tokenizer's own threads would only compete (and warn after fork).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = enc


def _worker_encode(texts: list[str]) -> list[np.ndarray]:
    assert _WORKER is not None
    return _WORKER.encode(texts)


# Where a long document may be cut so that each side gets the ids the whole document gets there: before
# a space or newline that follows a letter or digit. No byte-level pre-tokenizer regex (GPT-2, Llama 3,
# Qwen, ...) puts those two characters in one pre-token, and BPE never merges across pre-tokens.
_CUT_KEEP = re.compile(r"(?<=[^\W_])[ \n]")
# Tokenizers that mark the start of every text with a space (SentencePiece's "▁" prefix): cut at a
# single space between words and drop it, since the prefix marker stands in for it.
_CUT_DROP = re.compile(r"(?<=[^\W_]) (?=[^\W_])")
_PROBES_KEEP = (("The court held", " that the statute applies."), ("line one", "\nline two"),
                ("paragraph", "\n\nNext paragraph."), ("numbers 12345", " 678 and 9"), ("spaces", "   then words"),
                ("mixed", " \n\t tabs"), ("café", " déjà vu"), ("日本語", " テキスト"), ("end", " "))
_PROBES_DROP = (("The court held", " that the statute applies."), ("numbers 12345", " 678 and 9"),
                ("café", " déjà vu"), ("日本語", " テキスト"), ("x", " y"))
_PROBES_FORCED = (("abcdefghij", "klmnopqrst"), ("日本語のテ", "キストです"), ("0123456789", "0123456789"))


class Encoder:
    """Encodes batches of documents to `dtype` arrays, each followed by EOS when `add_eos`.

    Byte-level BPE tokenizers (most open models) go through `FastBPE` (fastbpe.py: tiktoken's
    merge loop, 2.5-3x the Rust `tokenizers` speed, the same ids) when `fast` is on and tiktoken is
    installed. The first document of every batch is also encoded the Hugging Face way; if the two
    ever differ, the fast path is dropped for the rest of the run with a warning (nothing already
    encoded changes: both segmentations decode to the same text). Other fast tokenizers go straight
    to the Rust `encode_batch_fast` (no offsets, no attention masks: the ids of
    `tokenizer(texts, add_special_tokens=False)` at about 1.7x its speed). Both use every core
    through their own threads; `num_proc > 1` adds worker processes, which is what slow (Python)
    tokenizers need.
    """

    def __init__(self, tokenizer: Any, add_eos: bool = True, num_proc: int = 1, fast: bool = True,
                 piece_chars: int = 1 << 16):
        self.tokenizer = tokenizer
        self.add_eos = add_eos
        self.num_proc = max(1, int(num_proc))
        self.fast = fast
        self.piece_chars = max(64, int(piece_chars))
        self.dtype = token_dtype(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        if add_eos and self.eos_id is None:
            raise DataError("data.add_eos is on but the tokenizer has no eos_token: set data.add_eos: false, "
                            "or give the tokenizer an EOS token")
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._fast = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
        self.bpe = None
        self.why_not_fast = "data.fast_tokenizer is off" if not fast else None
        if fast and backend is not None:
            from cpt.data.fastbpe import FastBPE, Unsupported
            try:
                self.bpe = FastBPE.from_tokenizer(tokenizer, num_threads=None if self.num_proc == 1 else 1)
            except (Unsupported, ImportError) as e:
                self.why_not_fast = f"{type(e).__name__}: {e}"
        self._cut, self._drop_cut, self._forced_cut = self._cut_rule()

    def __getstate__(self) -> dict:
        return {"tokenizer": self.tokenizer, "add_eos": self.add_eos, "num_proc": 1, "fast": self.fast,
                "piece_chars": self.piece_chars}

    def _cut_rule(self) -> tuple["re.Pattern | None", bool, bool]:
        """How this tokenizer lets a long document be tokenised in pieces with the whole document's ids:
        (where to cut, whether the character cut at is dropped, whether a cut may fall anywhere in a
        stretch with no such place). Decided by encoding probe texts whole and in two pieces."""
        def ids(t: str) -> list[int]:
            return list(self._encode_hf([t])[0])

        def agree(probes: tuple, drop: bool) -> bool:
            return all(ids(a + b) == ids(a) + ids(b[1:] if drop else b) for a, b in probes)

        try:
            if agree(_PROBES_KEEP, False):
                rule, drop = _CUT_KEEP, False
            elif agree(_PROBES_DROP, True):
                rule, drop = _CUT_DROP, True
            else:
                return None, False, False  # pieces would change the ids: long documents are tokenised whole
            # A stretch of a million characters with no such place (base64, a language without spaces)
            # is cut anyway where the tokenizer decodes the pieces back to the same text.
            forced = not drop and all(self.tokenizer.decode(ids(a) + ids(b)) == a + b for a, b in _PROBES_FORCED)
        except Exception as e:  # a tokenizer that cannot encode the probes: tokenise whole, as before
            log.debug("no piecewise tokenisation (%s: %s)", type(e).__name__, e)
            return None, False, False
        return rule, drop, forced

    def pieces(self, text: str) -> Iterator[str]:
        """`text` in consecutive pieces of about `piece_chars` characters (see `_cut_rule`)."""
        n, size, start = len(text), self.piece_chars, 0
        while n - start > size:
            m = self._cut.search(text, start + size // 2, start + 16 * size) if self._cut is not None else None
            if m is not None:
                yield text[start:m.start()]
                start = m.end() if self._drop_cut else m.start()
            elif self._forced_cut:
                yield text[start:start + size]
                start += size
            else:
                break
        yield text[start:]

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def fingerprint(self) -> str:
        key = f"{tokenizer_fingerprint(self.tokenizer)}|eos={self.add_eos}|fast={self.bpe is not None}"
        return hashlib.sha256(key.encode()).hexdigest()

    def _encode_hf(self, texts: list[str]) -> list[list[int]]:
        if self._fast is not None:
            encodings = self._fast(texts, add_special_tokens=False)
            return [e.ids for e in encodings]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's ids (then EOS). A text longer than `piece_chars` goes through the tokenizer in
        pieces: whole, a one-line 50 MB file took gigabytes of tokenizer state (about 100 bytes a token
        on the Rust side) and one thread; the pieces' ids are the whole text's (see `_cut_rule`)."""
        out: list[np.ndarray] = []
        short: list[str] = []
        for t in texts:
            if len(t) > self.piece_chars and self._cut is not None:
                out.extend(self._with_eos(e) for e in self._ids(short))
                short = []
                out.append(self._with_eos(self._encode_long(t)))
            else:
                short.append(t)
        out.extend(self._with_eos(e) for e in self._ids(short))
        return out

    def _encode_long(self, text: str, batch_chars: int = 1 << 20) -> np.ndarray:
        parts: list[np.ndarray] = []
        batch: list[str] = []
        chars = 0
        for piece in self.pieces(text):
            batch.append(piece)
            chars += len(piece)
            if chars >= batch_chars:
                parts.extend(np.asarray(e, dtype=self.dtype) for e in self._ids(batch))
                batch, chars = [], 0
        parts.extend(np.asarray(e, dtype=self.dtype) for e in self._ids(batch))
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

    def _with_eos(self, e: Any) -> np.ndarray:
        a = np.empty(len(e) + self.add_eos, dtype=self.dtype)
        a[:len(e)] = e
        if self.add_eos:
            a[-1] = self.eos_id
        return a

    def _ids(self, texts: list[str]) -> list:
        """The tokenizer's ids of each text, no EOS: the fast BPE path, checked against the tokenizer."""
        if not texts:
            return []
        ids: list = self.bpe.encode_batch(texts) if self.bpe is not None else self._encode_hf(texts)
        if self.bpe is not None and texts:
            redo = [i for i, x in enumerate(ids) if x is None]
            check = self._encode_hf([texts[0]] + [texts[i] for i in redo])
            if ids[0] is not None and not np.array_equal(ids[0], check[0]):
                log.warning("the fast BPE path gave other ids than the tokenizer for a document starting %r: "
                            "using the tokenizer itself from here on (set data.fast_tokenizer: false to "
                            "never use the fast path)", texts[0][:60])
                self.bpe, self.why_not_fast = None, "it disagreed with the tokenizer on a document"
                ids = self._encode_hf(texts)
            else:
                ids[0] = check[0]
                for i, x in zip(redo, check[1:]):
                    ids[i] = x
        return ids

    def encode_stream(self, batches: Iterable[list[str]]) -> Iterator[list[np.ndarray]]:
        """encode() over an iterable of batches, in order, on `num_proc` processes when > 1."""
        if self.num_proc == 1 and self.bpe is None:
            for b in batches:
                yield self.encode(b)
            return
        if self.num_proc == 1:
            # tiktoken releases the GIL while it merges: one thread encodes batch n while this one reads
            # (parses JSON, filters) batch n + 1. Reading and its errors stay in this thread.
            with ThreadPoolExecutor(1) as ex:
                inflight: collections.deque = collections.deque()
                for b in batches:
                    inflight.append(ex.submit(self.encode, b))
                    if len(inflight) >= 2:
                        yield inflight.popleft().result()
                while inflight:
                    yield inflight.popleft().result()
            return
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        pool = ctx.Pool(self.num_proc, initializer=_worker_init, initargs=(self,))
        try:
            # Reading stays in this thread (its errors surface here, with file and line); a window of
            # batches in flight keeps every worker busy without reading the whole source ahead.
            pending: collections.deque = collections.deque()
            for b in batches:
                pending.append(pool.apply_async(_worker_encode, (b,)))
                if len(pending) >= 2 * self.num_proc:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
            pool.close()
        finally:
            pool.terminate()
            pool.join()

    def encode_docs(self, docs: Iterable[Any]) -> Iterator[tuple[Any, np.ndarray]]:
        """(doc, tokens) for documents with a `.text`, in order; reading runs ahead in batches."""
        pending: collections.deque = collections.deque()

        def texts() -> Iterator[list[str]]:
            for b in batched_texts(docs):
                pending.append(b)
                yield [d.text for d in b]

        for ids in self.encode_stream(texts()):
            yield from zip(pending.popleft(), ids)


def batched_texts(docs: Iterable[Any], max_docs: int = 256, max_chars: int = 1 << 20) -> Iterator[list[Any]]:
    """Group documents (anything with `.text`) into batches big enough to keep the Rust threads busy
    and small enough that a batch's encodings (about 100 bytes a token on the Rust side) stay small."""
    batch: list[Any] = []
    chars = 0
    for d in docs:
        batch.append(d)
        chars += len(d.text)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
