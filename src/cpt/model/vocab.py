"""Vocabulary extension: new byte-level BPE tokens learned from domain text, and their rows initialised
from the tokens the old tokenizer split them into.

A model whose tokenizer barely knows a language spends several tokens per character on it. Learning
new merges on the domain text, continuing the tokenizer's own BPE from where its merge list ends, gives
that text whole-word and whole-character tokens while everything else stays as it was:

- the corpus is split with the tokenizer's own normaliser and pre-tokeniser, each piece is tokenised
  with the old merges, then the most frequent adjacent pair is merged, again and again (BPE training
  started from the old tokenisation, not from bytes);
- the new merges are appended after the old ones. BPE applies merges by rank, so on any text the old
  merges all fire first, exactly as before, and a new merge can only join tokens the old tokenizer
  left side by side. With `protect_ascii` (the default) no new merge joins two pieces that are both
  ASCII: text in ASCII (English, code, markup) then tokenises to exactly the old ids, and only words
  with characters beyond ASCII can change;
- each new token is, by construction, the concatenation of old tokens (its "pieces"). Its input row
  starts as the mean of its pieces' input rows and its output row as the mean of their output rows
  (`init: subword`), instead of transformers' default of sampling every new row around the mean of all
  rows (`init: mean`), which tells the model nothing about which token is which.

The extended tokenizer is an ordinary Hugging Face tokenizer folder plus `vocab_extension.json`
(each new token's id and pieces), which is what lets a run resize and initialise the model at setup.

Tokens a user lists (`vocab.tokens`, `vocab.special_tokens`: markers, tags, terms that must stay whole)
are added the other way, as the tokenizer's added tokens: matched in the text before any other rule, so
text that contains them tokenises differently from before. Their rows start the same way, from the tokens
the old tokenizer split them into.

    cpt vocab extend --data corpus/ --model HuggingFaceTB/SmolLM2-135M --add 8000 --out tok-zh/
    python -m pytest tests/test_vocab.py -q
"""
from __future__ import annotations

import argparse
import heapq
import json
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import nn

from cpt.config import ConfigError

EXTENSION_FILE = "vocab_extension.json"
INITS = ("subword", "mean")


def _byte_of_char() -> dict[str, int]:
    """ByteLevel's printable stand-in character for each byte, reversed (character -> byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            out[chr(256 + extra)] = b
            extra += 1
    return out


_BYTE = _byte_of_char()


def _is_ascii(piece: str) -> bool:
    return all(_BYTE.get(c, 255) < 128 for c in piece)


def _has_byte_level(node: Optional[dict]) -> bool:
    if not node:
        return False
    if node.get("type") == "ByteLevel":
        return True
    return any(_has_byte_level(n) for n in node.get("pretokenizers", node.get("decoders", [])) or [])


def _byte_fallback_is_inert(spec: dict) -> bool:
    """Behind a ByteLevel pre-tokenizer, byte fallback can only act on a byte character missing from the
    vocabulary, and only with `<0xNN>` tokens to fall back to: without either it changes nothing.
    (transformers 5.17 builds a GGUF's "gpt2" tokenizer with byte fallback switched on.)"""
    vocab = (spec.get("model") or {}).get("vocab") or {}
    return _has_byte_level(spec.get("pre_tokenizer")) and (
        all(c in vocab for c in _BYTE) or not any(f"<0x{b:02X}>" in vocab for b in range(256)))


def byte_level_spec(tokenizer: Any, where: str = "the tokenizer") -> dict:
    """The tokenizer.json of a byte-level BPE tokenizer (GPT-2, Llama 3, Qwen, SmolLM, ...), or a
    ConfigError saying what it is instead: new merges are only exact for that scheme."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"{where} is a slow (Python) tokenizer; vocabulary extension needs a fast tokenizer "
                          "(tokenizer.json) with byte-level BPE")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ConfigError(f"{where} is a {model.get('type')} tokenizer (SentencePiece-style models such as Llama 2 and "
                          "Mistral are Unigram or BPE with byte fallback); vocabulary extension supports byte-level BPE "
                          "only (GPT-2, Llama 3, Qwen, SmolLM)")
    if (model.get("byte_fallback") and not _byte_fallback_is_inert(spec)) or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        raise ConfigError(f"{where} is BPE with byte fallback or word prefixes/suffixes (SentencePiece style); "
                          "vocabulary extension supports byte-level BPE only (GPT-2, Llama 3, Qwen, SmolLM)")
    if model.get("dropout"):
        raise ConfigError(f"{where} uses BPE dropout; vocabulary extension needs deterministic merges")
    if not _has_byte_level(spec.get("pre_tokenizer")) or not _has_byte_level(spec.get("decoder")):
        raise ConfigError(f"{where} has no ByteLevel pre-tokenizer and decoder; vocabulary extension supports "
                          "byte-level BPE only (GPT-2, Llama 3, Qwen, SmolLM)")
    return spec


@dataclass
class Extension:
    """New tokens (byte-level strings) in id order from `first_id`, the old ids each is made of, and how
    often the learning corpus used each merge."""
    first_id: int
    tokens: list[str] = field(default_factory=list)
    pieces: list[list[int]] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    merges: list[tuple[str, str]] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.first_id + len(self.tokens)

    def to_json(self) -> dict:
        return {"format": 1, "first_id": self.first_id, "size": self.size,
                "tokens": [{"id": self.first_id + i, "token": t, "pieces": p, "count": c}
                           for i, (t, p, c) in enumerate(zip(self.tokens, self.pieces, self.counts))]}


def _words(tokenizer: Any, texts: Iterable[str], max_chars: Optional[int]) -> tuple[Counter, int]:
    """Pre-tokenised pieces of the corpus (ByteLevel characters) with their counts, and the characters read."""
    backend = tokenizer.backend_tokenizer
    norm, pre = backend.normalizer, backend.pre_tokenizer
    words: Counter = Counter()
    read = 0
    for text in texts:
        if max_chars is not None and read >= max_chars:
            break
        text = text[: max_chars - read] if max_chars is not None else text
        read += len(text)
        if norm is not None:
            text = norm.normalize_str(text)
        words.update(w for w, _ in pre.pre_tokenize_str(text))
    return words, read


def learn_extension(tokenizer: Any, texts: Iterable[str], add: int, *, min_frequency: int = 2,
                    protect_ascii: bool = True, max_chars: Optional[int] = None) -> Extension:
    """Up to `add` new tokens learned from `texts` by continuing the tokenizer's BPE (module docstring).
    Stops early when no pair occurs `min_frequency` times. The tokenizer itself is not changed."""
    if add < 1:
        raise ConfigError(f"the number of tokens to add must be >= 1, got {add}")
    spec = byte_level_spec(tokenizer)
    vocab: dict[str, int] = spec["model"]["vocab"]
    model = tokenizer.backend_tokenizer.model
    counts, _ = _words(tokenizer, texts, max_chars)
    if not counts:
        raise ConfigError("no text to learn new tokens from: the corpus is empty")
    # Each distinct piece as its old tokenisation; merging works on these lists in place.
    words = [[t.value for t in model.tokenize(w)] for w in counts]
    freq = list(counts.values())
    pair_count: Counter = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    static: dict[tuple[str, str], bool] = {}

    def allowed(pair: tuple[str, str]) -> bool:
        ok = static.get(pair)
        if ok is None:
            a, b = pair
            ok = static[pair] = a + b not in vocab and not (protect_ascii and _is_ascii(a) and _is_ascii(b))
        return ok

    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            if allowed(pair):
                pair_count[pair] += freq[i]
                where.setdefault(pair, set()).add(i)
    # Max-heap by count, ties by the pair itself (deterministic); stale entries are skipped when popped.
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    first_id = max(len(tokenizer), max(vocab.values()) + 1)
    ext = Extension(first_id=first_id)
    pieces_of: dict[str, list[int]] = {}
    new_ids: set[str] = set()
    while heap and len(ext.tokens) < add:
        c, pair = heapq.heappop(heap)
        if -c != pair_count.get(pair, 0):
            if pair_count.get(pair, 0) > 0:
                heapq.heappush(heap, (-pair_count[pair], pair))
            continue
        if -c < min_frequency:
            break
        a, b = pair
        merged = a + b
        del pair_count[pair]
        if merged in new_ids:  # the same string reached from other pieces: one token, made by its first merge
            continue
        new_ids.add(merged)
        pieces_of[merged] = pieces_of.get(a, [vocab[a]] if a in vocab else []) + pieces_of.get(b, [vocab[b]] if b in vocab else [])
        ext.tokens.append(merged)
        ext.pieces.append(pieces_of[merged])
        ext.counts.append(-c)
        ext.merges.append(pair)
        touched: set[tuple[str, str]] = set()
        for i in where.pop(pair, ()):
            words[i], delta = _merge_word(words[i], a, b, merged)
            f = freq[i]
            for p, d in delta:
                if p != pair and allowed(p):
                    pair_count[p] += d * f
                    if d > 0:
                        where.setdefault(p, set()).add(i)
                        touched.add(p)
        for p in touched:
            if pair_count.get(p, 0) > 0:
                heapq.heappush(heap, (-pair_count[p], p))
    return ext


def _merge_word(w: list[str], a: str, b: str, merged: str) -> tuple[list[str], list[tuple[tuple[str, str], int]]]:
    """`w` with every (a, b) merged left to right, and the changes to its pair counts (neighbours only)."""
    out: list[str] = []
    delta: list[tuple[tuple[str, str], int]] = []
    i, n = 0, len(w)
    while i < n:
        if i + 1 < n and w[i] == a and w[i + 1] == b:
            if out:
                delta.append(((out[-1], a), -1))
                delta.append(((out[-1], merged), 1))
            if i + 2 < n:
                delta.append(((b, w[i + 2]), -1))
                delta.append(((merged, w[i + 2]), 1))
            out.append(merged)
            i += 2
        else:
            out.append(w[i])
            i += 1
    return out, delta


def extended_tokenizer(tokenizer: Any, ext: Extension) -> Any:
    """A new Hugging Face tokenizer: the old one with `ext`'s tokens and merges appended."""
    from transformers import AutoTokenizer

    spec = byte_level_spec(tokenizer)
    tmp = Path(tempfile.mkdtemp(prefix="cpt-vocab-"))
    try:
        tokenizer.save_pretrained(tmp)
        _write_spec(tmp, spec, ext)
        return AutoTokenizer.from_pretrained(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_spec(folder: Path, spec: dict, ext: Extension) -> None:
    model = spec["model"]
    as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
    for i, t in enumerate(ext.tokens):
        model["vocab"][t] = ext.first_id + i
    model["merges"].extend(f"{a} {b}" if as_strings else [a, b] for a, b in ext.merges)
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))


def save_extension(tokenizer: Any, ext: Extension, out: str | Path, stats: Optional[dict] = None) -> Any:
    """Write the extended tokenizer folder (tokenizer files + vocab_extension.json); returns the tokenizer
    loaded back from it. The folder is written under a hidden name and renamed when whole."""
    from transformers import AutoTokenizer

    out = Path(out).expanduser()
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder for the extended tokenizer")
    spec = byte_level_spec(tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tokenizer.save_pretrained(tmp)
        _write_spec(tmp, spec, ext)
        (tmp / EXTENSION_FILE).write_text(json.dumps({**ext.to_json(), "stats": stats or {}}, ensure_ascii=False, indent=1))
        if out.is_dir():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return AutoTokenizer.from_pretrained(out)


def read_extension(folder: str | Path | None) -> Optional[dict]:
    """vocab_extension.json of an extended tokenizer folder (None when there is none)."""
    if not folder:
        return None
    p = Path(str(folder)).expanduser() / EXTENSION_FILE
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        return {"first_id": int(data["first_id"]), "size": int(data["size"]),
                "pieces": [[int(x) for x in t["pieces"]] for t in data["tokens"]]}
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{p}: not a vocabulary extension file ({type(e).__name__}: {e}); "
                          "write it again with `cpt vocab extend`") from None


def check_unchanged(old: Any, new: Any, texts: Iterable[str], batch: int = 256) -> Optional[str]:
    """The first text whose ids differ between the two tokenizers, or None."""
    texts = list(texts)
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        a = old(chunk, add_special_tokens=False)["input_ids"]
        b = new(chunk, add_special_tokens=False)["input_ids"]
        for t, x, y in zip(chunk, a, b):
            if x != y:
                return t
    return None


@torch.no_grad()
def extend_model(model: nn.Module, extension: dict, init: str = "subword") -> None:
    """Resize the model's embeddings to the extended vocabulary and start the new rows. `subword`: each
    new row is the mean of its pieces' rows (input and output side alike); `mean`: transformers' default
    (rows drawn around the mean of all old rows). Tied models stay tied (one matrix, one initialisation)."""
    if init not in INITS:
        raise ConfigError(f"vocab.init: {init!r} is not one of {', '.join(INITS)}")
    first, size, pieces = extension["first_id"], extension["size"], extension["pieces"]
    rows = model.get_input_embeddings().weight.shape[0]
    if any(p >= first or p < 0 for ps in pieces for p in ps) or first > rows:
        raise ConfigError(f"the vocabulary extension (new ids from {first}) does not fit this model's {rows} embedding "
                          "rows: it was learned for another tokenizer; extend this model's own tokenizer")
    model.resize_token_embeddings(max(rows, size), mean_resizing=(init == "mean"))
    sides = [model.get_input_embeddings()]
    out = model.get_output_embeddings()
    if out is not None and out.weight is not sides[0].weight:
        sides.append(out)
    if init == "mean":
        # New ids that land on rows the model already had (an embedding padded past its tokenizer, as Qwen's
        # is) were not touched by the resize: they start at the mean of the real rows too.
        for emb in sides if first < min(rows, size) else []:
            emb.weight[first:min(rows, size)] = emb.weight[:first].float().mean(0).to(emb.weight.dtype)
        return
    index = torch.tensor([p for ps in pieces for p in ps], dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(pieces)), torch.tensor([len(ps) for ps in pieces]))
    for emb in sides:
        w = emb.weight
        sums = torch.zeros(len(pieces), w.shape[1], dtype=torch.float32, device=w.device)
        sums.index_add_(0, owner.to(w.device), w[index.to(w.device)].float())
        counts = torch.tensor([len(ps) for ps in pieces], dtype=torch.float32, device=w.device)[:, None]
        w[first:first + len(pieces)] = (sums / counts).to(w.dtype)


def unknown_tokens(tokenizer: Any, tokens: Iterable[str], special: bool = False) -> list[str]:
    """The strings of `tokens` (each once, in order) that the tokenizer lacks: not among its tokens and, unless
    they are to be special, not already tokenised as one token."""
    known = tokenizer.get_vocab()
    return [t for t in dict.fromkeys(tokens) if t not in known
            and (special or len(tokenizer(t, add_special_tokens=False)["input_ids"]) != 1)]


@torch.no_grad()
def add_listed_tokens(model: nn.Module, tokenizer: Any, tokens: list[str], *, special: bool = False,
                      init: str = "subword", where: str = "vocab.tokens") -> list[str]:
    """Add the strings of `tokens` that the tokenizer lacks as whole tokens (special: kept out of decoded
    text by skip_special_tokens, as chat markers are), grow the model's embeddings and start each new row
    as `extend_model` does, from the tokens the text was split into before. Returns the tokens added, in
    order. `where` names the list in error messages."""
    for i, t in enumerate(tokens):
        if not isinstance(t, str) or not t.strip():
            raise ConfigError(f"{where}[{i}]: {t!r} is not a token; give non-empty strings")
    new = unknown_tokens(tokenizer, tokens, special)
    if not new:
        return []
    pieces = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in new]
    first = len(tokenizer)
    tokenizer.add_tokens(new, special_tokens=special)
    ids = tokenizer.convert_tokens_to_ids(new)
    if ids != list(range(first, first + len(new))):
        raise ConfigError(f"{where}: the tokenizer gave the new tokens ids {ids[:4]}..., not the next free ids from "
                          f"{first}; add them to the tokenizer folder yourself and resize the model to match")
    extend_model(model, {"first_id": first, "size": first + len(new), "pieces": pieces}, init)
    return new


# ---------------------------------------------------------------------------- the command


def vocab_main(argv: list[str], read_texts: Any = None, measure: Any = None) -> int:
    """`cpt vocab extend --data PATH (--model M | --tokenizer T) --add N --out DIR`. The command line face
    passes `read_texts(path, text_field, max_docs)` (the data stage's reader) and `measure(tokenizer, texts)`
    (tokens per byte and character), which this stage does not import."""
    p = argparse.ArgumentParser(prog="cpt vocab", description="Extend a byte-level BPE tokenizer with tokens learned from a corpus.")
    sub = p.add_subparsers(dest="verb", required=True)
    e = sub.add_parser("extend", help="learn new tokens from the corpus and write an extended tokenizer folder")
    e.add_argument("--data", required=True, help="file, folder or glob of the domain text (as data.sources' path)")
    e.add_argument("--model", help="model name or folder (or GGUF file) whose tokenizer to extend")
    e.add_argument("--tokenizer", help="tokenizer name or folder, when it differs from --model's")
    e.add_argument("--gguf-file", help="GGUF file inside --model's folder")
    e.add_argument("--add", type=int, required=True, help="number of new tokens to learn")
    e.add_argument("--out", required=True, help="new folder for the extended tokenizer")
    e.add_argument("--text-field", default="text", help="column holding the text in JSONL/Parquet/CSV (default text)")
    e.add_argument("--max-docs", type=int, default=None, help="read at most this many documents")
    e.add_argument("--max-chars", type=int, default=50_000_000, help="characters read to learn from (default 50M)")
    e.add_argument("--min-frequency", type=int, default=2, help="a pair must occur this often to become a token")
    e.add_argument("--merge-ascii", action="store_true",
                   help="also merge two ASCII pieces (English or code text may then tokenise differently)")
    args = p.parse_args(argv)
    from cpt.config import ModelConfig
    from cpt.model.load import load_tokenizer

    if not (args.model or args.tokenizer):
        p.error("give --model or --tokenizer")
    try:
        mcfg = ModelConfig(name_or_path=args.model or args.tokenizer, gguf_file=args.gguf_file,
                           tokenizer=args.tokenizer)
        tok = load_tokenizer(mcfg)
        texts = list(read_texts(args.data, args.text_field, args.max_docs))
        ext = learn_extension(tok, texts, args.add, min_frequency=args.min_frequency,
                              protect_ascii=not args.merge_ascii, max_chars=args.max_chars)
        new = extended_tokenizer(tok, ext)
        before, after = measure(tok, texts), measure(new, texts)
        stats = {"data": args.data, "documents": len(texts), "added": len(ext.tokens), "before": before, "after": after,
                 "fewer_tokens": before["tokens"] / max(after["tokens"], 1)}
        save_extension(tok, ext, args.out, stats)
    except (ConfigError, FileExistsError, FileNotFoundError) as err:
        print(f"cpt vocab: {err}", file=sys.stderr)
        return 2
    print(f"{len(ext.tokens)} new tokens (ids {ext.first_id}-{ext.size - 1}) -> {args.out}")
    print(f"tokens per byte {before['tokens_per_byte']:.4f} -> {after['tokens_per_byte']:.4f}, per character "
          f"{before['tokens_per_char']:.4f} -> {after['tokens_per_char']:.4f} ({stats['fewer_tokens']:.2f}x fewer tokens)")
    print(f"train with model.tokenizer={args.out} (the model is resized and the new rows start from their pieces)")
    return 0
