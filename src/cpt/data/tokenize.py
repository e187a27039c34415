"""Text -> token arrays: the fast tokenizer's Rust batch path, EOS appended, optional worker processes.

    python -c "from transformers import AutoTokenizer; from cpt.data.tokenize import Encoder; \
print(Encoder(AutoTokenizer.from_pretrained('gpt2')).encode(['hello world']))"
"""
from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing as mp
import os
from typing import Any, Iterable, Iterator

import numpy as np

from cpt.data.sources import DataError


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

    Fast tokenizers go straight to the Rust `encode_batch_fast` (no offsets, no attention masks:
    the ids are identical to `tokenizer(texts, add_special_tokens=False)`, at about 1.7x the speed),
    which already uses every core through its own thread pool; `num_proc > 1` adds worker
    processes, which is what slow (Python) tokenizers need.
    """

    def __init__(self, tokenizer: Any, add_eos: bool = True, num_proc: int = 1):
        self.tokenizer = tokenizer
        self.add_eos = add_eos
        self.num_proc = max(1, int(num_proc))
        self.dtype = token_dtype(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        if add_eos and self.eos_id is None:
            raise DataError("data.add_eos is on but the tokenizer has no eos_token: set data.add_eos: false, "
                            "or give the tokenizer an EOS token")
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._fast = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)

    def __getstate__(self) -> dict:
        return {"tokenizer": self.tokenizer, "add_eos": self.add_eos, "num_proc": 1}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{tokenizer_fingerprint(self.tokenizer)}|eos={self.add_eos}".encode()).hexdigest()

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        if self._fast is not None:
            encodings = self._fast(texts, add_special_tokens=False)
        else:
            encodings = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        out = []
        tail = [self.eos_id] if self.add_eos else []
        for i, e in enumerate(encodings):
            out.append(np.array((e.ids if self._fast is not None else e) + tail, dtype=self.dtype))
            encodings[i] = None  # drop each Rust encoding (ids, offsets, token strings) once converted
        return out

    def encode_stream(self, batches: Iterable[list[str]]) -> Iterator[list[np.ndarray]]:
        """encode() over an iterable of batches, in order, on `num_proc` processes when > 1."""
        if self.num_proc == 1:
            for b in batches:
                yield self.encode(b)
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
