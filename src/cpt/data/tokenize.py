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

    def __init__(self, tokenizer: Any, add_eos: bool = True, num_proc: int = 1, fast: bool = True):
        self.tokenizer = tokenizer
        self.add_eos = add_eos
        self.num_proc = max(1, int(num_proc))
        self.fast = fast
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

    def __getstate__(self) -> dict:
        return {"tokenizer": self.tokenizer, "add_eos": self.add_eos, "num_proc": 1, "fast": self.fast}

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
        out = []
        for i, e in enumerate(ids):
            a = np.empty(len(e) + self.add_eos, dtype=self.dtype)
            a[:len(e)] = e
            if self.add_eos:
                a[-1] = self.eos_id
            out.append(a)
            ids[i] = None  # drop each encoding once converted
        return out

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
