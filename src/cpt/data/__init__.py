"""cpt.data: sources -> tokens (cached) -> packed blocks -> a resumable, mixed, sharded training stream.

`data` knows a tokenizer, never a model. The stages, one module each:
  sources.py   read documents (files, folders, globs, `datasets`, streams), filters, bad-row accounting
  tokenize.py  text -> token arrays (Rust batch path), EOS appended
  cache.py     memory-mapped token shards keyed by source + tokenizer + settings
  pack.py      blocks of max_seq_length, concat or document packing, batch tensors
  mix.py       weights -> which source fills each block slot
  sampler.py   TokenStream: deterministic order, rank sharding, O(1) position
  inspect.py   `cpt inspect`: fields, lengths, verdict (unlabeled / labeled pairs / classification), budget
  chat.py      instruction data (train.stage=sft): formats, chat templates, the answer mask

    python -m pytest tests/test_data.py tests/test_data_stream.py tests/test_data_pack.py -q
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from cpt.config import Config, SourceConfig
from cpt.data.cache import TokenShards, cache_root, open_or_build
from cpt.data.chat import ChatEncoder, has_answer, iter_conversations
from cpt.data.pack import IGNORE_INDEX, CachedBlocks, StreamPacker, document_attention_mask
from cpt.data.sampler import TokenStream
from cpt.data.sources import (DataError, DataWarning, ReadReport, is_streaming, iter_docs, load_hf,
                              parse_filters, read_documents, resolve_files, source_fingerprint, source_label)
from cpt.data.tokenize import Encoder

__all__ = ["DataBundle", "DataError", "DataWarning", "TokenStream", "build_data", "read_documents",
           "document_attention_mask", "holdout_indices", "IGNORE_INDEX"]


@dataclass
class DataBundle:
    train: TokenStream
    holdout_texts: list[str]
    stats: dict = field(default_factory=dict)
    # train.stage=sft: held-out conversations as uint32 tokens with the answer mask (cpt.data.chat.pack_ids)
    holdout_conversations: list[np.ndarray] = field(default_factory=list)


# ---------------------------------------------------------------------------- holdout

_HOLDOUT_SALT = 0x5EED_C0DE_2024_0003


def _unit_hash(idx: np.ndarray) -> np.ndarray:
    """splitmix64(idx ^ salt) / 2**64: a fixed uniform number per document index."""
    with np.errstate(over="ignore"):
        z = (idx.astype(np.uint64) ^ np.uint64(_HOLDOUT_SALT)) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def holdout_indices(fraction: float, max_docs: int, n_docs: int | None = None) -> list[int]:
    """Documents held out: index i when its fixed hash is below `fraction`, the first `max_docs` such.

    Independent of the training seed (held-out sets stay comparable across runs) and of the
    document count (a stream knows which documents to hold out before it has read them all).
    With a known count, at least one document is held out when fraction > 0 and n_docs >= 2.
    """
    if fraction <= 0 or max_docs <= 0:
        return []
    out: list[int] = []
    start, chunk = 0, 1 << 16
    while len(out) < max_docs and (n_docs is None or start < n_docs):
        stop = start + chunk if n_docs is None else min(start + chunk, n_docs)
        idx = np.arange(start, stop, dtype=np.int64)
        out.extend(int(i) for i in idx[_unit_hash(idx) < fraction][: max_docs - len(out)])
        start = stop
    if not out and n_docs is not None and n_docs >= 2:
        out = [int(np.argmin(_unit_hash(np.arange(n_docs))))]
    return out


def _holdout_texts(source: Any, wanted: list[int], text_field: str, max_docs: int | None, strict: bool,
                   loaded: Any = None) -> list[str]:
    if not wanted:
        return []
    want, last, texts = set(wanted), max(wanted), {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)  # the training pass reports skipped rows once
        for d in iter_docs(source, text_field, max_docs=max_docs, strict=strict, streaming=loaded is None,
                           loaded=loaded):
            if d.index in want:
                texts[d.index] = d.text
            if d.index >= last:
                break
    return [texts[i] for i in sorted(texts)]


def _holdout_conversations(source: Any, wanted: list[int], encoder: ChatEncoder, cfg: Config,
                           loaded: Any = None) -> list[np.ndarray]:
    if not wanted:
        return []
    want, last, out = set(wanted), max(wanted), {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        for c in iter_conversations(source, cfg.data.chat_format, max_docs=cfg.data.max_docs, strict=cfg.data.strict,
                                    streaming=loaded is None, loaded=loaded):
            if c.index in want:
                out[c.index] = encoder.encode(c.messages, pair=c.pair)
            if c.index >= last:
                break
    return [out[i] for i in sorted(out)]


def _conversation_key(tokens: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(tokens).tobytes(), digest_size=16).digest()


# ---------------------------------------------------------------------------- build


def _as_sources(cfg: Config, train_dataset: Any) -> list[tuple[str, Any, str, float, bool]]:
    """(name, source, text field, weight, streaming) for each training source."""
    d = cfg.data
    if train_dataset is not None:
        return [("train_dataset", train_dataset, d.dataset_text_field, 1.0, is_streaming(train_dataset))]
    if not d.sources:
        raise DataError("data.sources is empty: give data.path (a file, folder or glob) or data.dataset")
    out, seen = [], set()
    for i, s in enumerate(d.sources):
        name = source_label(s)
        if name in seen:
            name = f"{name}#{i}"
        seen.add(name)
        out.append((name, s, s.text_field or d.dataset_text_field, s.weight, is_streaming(s, d.streaming)))
    return out


def _wants_holdout(cfg: Config, sft: bool) -> bool:
    """Whether the first source gives up documents for the held-out set (no eval set of that name given)."""
    held_name = "answers" if sft else "domain"  # sft holds out conversations, scored on their answers
    return cfg.eval.holdout_fraction > 0 and not any(s.name == held_name for s in cfg.eval.sets)


def training_texts(cfg: Config, train_dataset: Any = None) -> Iterator[str]:
    """The training sources' documents, source after source (filters applied, bad rows skipped, data.max_docs
    per source), without the documents held out for evaluation: what vocabulary extension learns from.
    Under train.stage=sft a document is one conversation's message contents, a line each (the chat
    template's own tokens are added as special tokens, not learned)."""
    sft = cfg.train.stage == "sft"
    for i, (_, source, field_, _, streaming) in enumerate(_as_sources(cfg, train_dataset)):
        if sft:
            docs: Iterable[str] = ("\n".join(str(m["content"]) for m in c.messages) for c in iter_conversations(
                source, cfg.data.chat_format, max_docs=cfg.data.max_docs, strict=cfg.data.strict))
        else:
            docs = read_documents(source, field_, max_docs=cfg.data.max_docs, strict=cfg.data.strict)
        if i > 0 or not _wants_holdout(cfg, sft=sft):
            yield from docs
            continue
        texts = list(docs)
        n_docs = None if streaming else len(texts)
        held = set(holdout_indices(cfg.eval.holdout_fraction, cfg.eval.holdout_max_docs, n_docs))
        if n_docs is not None and len(held) >= n_docs:  # build_dataset holds nothing out then
            held = set()
        yield from (t for j, t in enumerate(texts) if j not in held)


def _text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _stream_docs(source: Any, name: str, index: int, text_field: str, encoder: Encoder | ChatEncoder, cfg: Config,
                 exclude: set[bytes]):
    """The `docs(epoch, loc)` factory a StreamPacker reads from: documents tokenized on the fly.

    Held-out documents are recognised by their text (`exclude` holds hashes), not by position: a
    streamed source's files are reshuffled per epoch, so positions move; copies of a held-out
    document are kept out of training too.
    """
    d = cfg.data
    n_files = len(resolve_files(source.path)) if isinstance(source, SourceConfig) and source.path else 0

    def docs(epoch: int, loc: dict | None) -> Iterator[tuple[dict, np.ndarray]]:
        order = None
        if d.shuffle and n_files > 1:  # a stream cannot be shuffled globally; its files can, per epoch
            order = [int(x) for x in np.random.default_rng([cfg.train.seed, index, epoch]).permutation(n_files)]
        report = ReadReport(name, strict=d.strict)
        if isinstance(encoder, ChatEncoder):
            for conv, toks in encoder.encode_docs(iter_conversations(
                    source, d.chat_format, max_docs=d.max_docs, strict=d.strict, streaming=True, start=loc,
                    report=report, file_order=order)):
                if len(toks) and not (exclude and _conversation_key(toks) in exclude):
                    yield conv.loc, toks
            report.warn()
            encoder.warn(name)
            return
        it = iter_docs(source, text_field, max_docs=d.max_docs, strict=d.strict, streaming=True, start=loc,
                       report=report, file_order=order)
        kept = (doc for doc in it if not exclude or _text_key(doc.text) not in exclude)
        for doc, toks in encoder.encode_docs(kept):
            if len(toks):
                yield doc.loc, toks
        report.warn()

    return docs


def build_data(cfg: Config, tokenizer: Any, *, train_dataset: Any = None, rank: int = 0,
               world_size: int = 1) -> DataBundle:
    """Training stream, held-out documents and statistics for `cfg` (see the package docstring).

    Cached sources are tokenized once (`dataset_num_proc` worker processes) into the token cache;
    streamed ones are tokenized on the fly, in this process. Held-out documents come from the first source and are never in
    the training stream.
    """
    d, T = cfg.data, cfg.model.max_seq_length
    sft = cfg.train.stage == "sft"
    encoder: Encoder | ChatEncoder
    if sft:
        # Conversations through the tokenizer's chat template (cpt.data.chat), the answer mask in bit 31.
        encoder = stream_encoder = ChatEncoder(tokenizer, cfg)
    else:
        encoder = Encoder(tokenizer, add_eos=cfg.add_eos, num_proc=d.dataset_num_proc, fast=d.fast_tokenizer)
        # Streams tokenize in this process (the Rust tokenizer's own threads): worker processes tied to a
        # generator's lifetime could outlive a resumed or abandoned stream.
        stream_encoder = Encoder(tokenizer, add_eos=cfg.add_eos, num_proc=1, fast=d.fast_tokenizer)
    whole, one_per_block = sft or cfg.packing == "none", cfg.packing == "none"
    sources = _as_sources(cfg, train_dataset)
    want_holdout = _wants_holdout(cfg, sft)
    root = cache_root(d.cache_dir)

    blocks: list[CachedBlocks | StreamPacker] = []
    per_source: list[dict] = []
    holdout_texts: list[str] = []
    holdout_convs: list[np.ndarray] = []
    for i, (name, src, text_field, weight, streaming) in enumerate(sources):
        filters = list(src.filters) if isinstance(src, SourceConfig) else []
        parse_filters(filters)  # a malformed filter fails before any reading
        info: dict[str, Any] = {"name": name, "weight": weight, "streaming": streaming}
        n_docs = None
        loaded = None
        if not streaming:
            if isinstance(src, SourceConfig) and src.dataset:
                loaded = load_hf(src, streaming=False)
            key = {"source": source_fingerprint(src, loaded),
                   "tokenizer": encoder.fingerprint(), "text_field": text_field, "filters": filters,
                   "max_docs": d.max_docs}
            report = ReadReport(name, strict=d.strict)
            if sft:
                key.update(text_field=None, chat_format=d.chat_format)
                read = lambda: iter_conversations(src, d.chat_format, max_docs=d.max_docs, strict=d.strict,  # noqa: E731
                                                  report=report, loaded=loaded)
            else:
                read = lambda: iter_docs(src, text_field, max_docs=d.max_docs, strict=d.strict,  # noqa: E731
                                         report=report, loaded=loaded)
            shards, hit = open_or_build(root, key, read, encoder, report, name,
                                        extra_meta=lambda: {"verdict": _verdict(src, text_field)})
            if sft:
                encoder.warn(name)
            _rewarn(shards, name)
            info["verdict"] = shards.meta.get("verdict") or _verdict(src, text_field)
            n_docs = shards.n_docs
            info.update(cached=hit, cache_path=str(shards.path), skipped=shards.meta["skipped"],
                        filtered=shards.meta["filtered"])
        held = holdout_indices(cfg.eval.holdout_fraction, cfg.eval.holdout_max_docs, n_docs) \
            if (want_holdout and i == 0) else []
        if held and n_docs is not None and len(held) >= n_docs:
            warnings.warn(f"{name}: only {n_docs} document(s): nothing held out for evaluation", DataWarning)
            held = []
        if held and sft:
            holdout_convs = _holdout_conversations(src, held, encoder, cfg, loaded)
            held = held[: len(holdout_convs)]
        elif held:
            holdout_texts = _holdout_texts(src, held, text_field, d.max_docs, d.strict, loaded)
            held = held[: len(holdout_texts)]  # a short source has fewer documents than indices asked for
        info["holdout_documents"] = len(held)
        if want_holdout and i == 0 and n_docs is None and not held:
            warnings.warn(f"{name}: the stream ended before any of its documents fell in the held-out share "
                          f"(eval.holdout_fraction={cfg.eval.holdout_fraction}): nothing held out for evaluation; "
                          "raise eval.holdout_fraction, or name a held-out file in eval.sets", DataWarning)
        if streaming:
            info["verdict"] = _verdict(src, text_field)
            exclude = ({_conversation_key(t) for t in holdout_convs} if sft else {_text_key(t) for t in holdout_texts}) \
                if held else set()
            blocks.append(StreamPacker(_stream_docs(src, name, i, text_field, stream_encoder, cfg, exclude), T,
                                       whole=whole, one_per_block=one_per_block, name=name))
            info.update(documents=None, tokens=None, blocks=None)
        else:
            cb = CachedBlocks(shards, T, exclude=held, whole=whole, one_per_block=one_per_block)
            if cb.n_tokens == 0:
                raise DataError(f"{name}: no training tokens left after holding out {len(held)} documents")
            blocks.append(cb)
            info.update(documents=cb.n_docs, tokens=cb.n_tokens, blocks=cb.n_blocks)
        per_source.append(info)

    if holdout_convs:  # held out of training either way; scored only where the cut left an answer to score
        scored = [c for c in holdout_convs if has_answer(c)]
        if len(scored) < len(holdout_convs):
            warnings.warn(f"{len(holdout_convs) - len(scored)} of the {len(holdout_convs)} held-out conversations lost "
                          f"every answer token to the cut at model.max_seq_length={T}: they are not scored"
                          + ("" if scored else "; nothing is left to score the answers on: raise model.max_seq_length"),
                          DataWarning)
        holdout_convs = scored

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (encoder.eos_id or 0)
    stream = TokenStream(blocks, [s[3] for s in sources], seq_len=T, packing=cfg.packing, pad_id=pad_id,
                         seed=cfg.train.seed, shuffle=d.shuffle, rank=rank, world_size=world_size,
                         names=[s[0] for s in sources])
    any_stream = any(s["streaming"] for s in per_source)
    labeled = [s for s in per_source if s["verdict"]["kind"] in ("labeled_pairs", "classification")]
    shown = labeled[0] if labeled else per_source[0]
    stats = {
        # what `cpt train` warns about: the first source that looks like fine-tuning data, else the first
        "verdict": {**shown["verdict"], "source": shown["name"]},
        "n_documents": None if any_stream else sum(s["documents"] for s in per_source),
        "n_tokens": None if any_stream else sum(s["tokens"] for s in per_source),
        "per_source_tokens": {s["name"]: s["tokens"] for s in per_source},
        "sources": per_source,
        "holdout_documents": len(holdout_convs) if sft else len(holdout_texts),
        "blocks_per_epoch": stream.blocks_per_epoch,
        "tokens_per_epoch": stream.tokens_per_epoch,
        "packing": cfg.packing,
        "stage": cfg.train.stage,
        "max_seq_length": T,
    }
    return DataBundle(train=stream, holdout_texts=holdout_texts, stats=stats, holdout_conversations=holdout_convs)


def _verdict(source: Any, text_field: str) -> dict:
    """The inspection verdict (unlabeled / labeled pairs / classification) from a few hundred rows."""
    from cpt.data.inspect import inspect_source

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)
            return inspect_source(source, sample_rows=200, text_field=text_field)["verdict"]
    except Exception as e:  # advisory only: a source the training pass can read must not fail here
        return {"kind": "unknown", "label": "not inspected", "evidence": [f"inspection failed: {type(e).__name__}: {e}"]}


def _rewarn(shards: TokenShards, name: str) -> None:
    """A cache hit reads no rows; repeat the skipped-rows warning its build recorded."""
    r = ReadReport(name)
    r.counts, r.first = dict(shards.meta.get("skipped", {})), dict(shards.meta.get("first_skipped", {}))
    r.warn()
