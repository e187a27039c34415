"""Evaluation: loss, perplexity and bits per byte over held-out sets, greedy samples, forgetting alarm.

The training loop builds one `Evaluator` and calls `run(model, step)` at the start, every
`eval.eval_steps` and at the end; `cpt eval` evaluates any saved model on any text.

    cpt eval outputs/cpt-run --data domain=held_out.jsonl --data general=wiki.txt --compare HuggingFaceTB/SmolLM2-135M
    python -m pytest tests/test_evaluate.py -q

How bits per byte is counted (`evaluate_texts`):
    every document is tokenized on its own, without the special tokens, and scored as the sequence
        context + document tokens + EOS
    where `context` is what the tokenizer puts in front of a text by default (a BOS token), or the EOS
    token when it puts nothing there (in concatenated training data the previous document's EOS is
    what precedes every document). The context token is never scored; every document token and the
    final EOS are predicted exactly once. Their bytes are the UTF-8 bytes of the document as read
    (not of decoded tokens, so a normalizing tokenizer cannot shrink the count); the EOS carries the
    "document ends here" information and has no bytes. Hence
        bits_per_byte = sum of NLL over the predicted tokens (nats) / ln 2 / sum of UTF-8 bytes,
    a number that does not depend on the tokenizer, so runs with different vocabularies compare.
    Documents longer than `max_seq_length` are cut into windows that overlap by one token: a window
    starting at token s covers tokens s .. s+L-1 and predicts s+1 .. s+L-1, so the next window starts
    at s+L-1 and no token is scored twice or skipped (the context simply restarts at each window).
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from cpt.config import Config, ConfigError, EvalSetConfig, SourceConfig, load_config
from cpt.data import read_documents
from cpt.data.chat import ChatEncoder, chat_prompt_ids, detect_format, iter_conversations, stop_token_ids, unpack_ids
from cpt.data.sources import iter_rows
from cpt.data.sources import SUFFIXES
from cpt.runtime import model_device, to_device

log = logging.getLogger("cpt")

LN2 = math.log(2.0)
METRICS = ("loss", "perplexity", "bits_per_byte", "tokens", "bytes", "documents")


@dataclass
class EvalSet:
    """A named list of held-out documents, or (train.stage=sft) of conversations scored on their answers."""

    name: str
    texts: list[str]
    conversations: list | None = None  # uint32 tokens with the answer mask (cpt.data.chat.pack_ids)


# ---------------------------------------------------------------------------- eval sets


def _source_for(s: EvalSetConfig, streaming: bool) -> SourceConfig:
    # The data module reads SourceConfig; an eval set is the same thing with `subset` for `name`.
    return SourceConfig(path=s.path, dataset=s.dataset, name=s.subset, split=s.split, text_field=s.text_field,
                        streaming=streaming)


def load_eval_sets(cfg: Config, holdout_texts: list[str], holdout_conversations: list | None = None,
                   tokenizer: Any = None) -> list[EvalSet]:
    """Read every `eval.sets` entry; add the automatic held-out slice as "domain" when none is named so.
    Under train.stage=sft a set whose rows are conversations is scored on its answers (and the held-out
    conversations become the set "answers"); text sets keep measuring bits per byte (forgetting)."""
    sets: list[EvalSet] = []
    for i, s in enumerate(cfg.eval.sets):
        where = f"eval.sets[{i}] ({s.name})"
        if any(e.name == s.name for e in sets):
            raise ConfigError(f"{where}: the name {s.name!r} is used by an earlier set; give each set its own name")
        source = _source_for(s, cfg.data.streaming)
        if cfg.train.stage == "sft" and tokenizer is not None and _is_chat_source(source):
            try:
                convs = _read_conversations(cfg, source, tokenizer, s.max_docs)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            if not convs:
                raise ConfigError(f"{where}: no conversations read from {s.path or s.dataset!r}")
            sets.append(EvalSet(s.name, [], convs))
            continue
        try:
            texts = list(read_documents(source, default_text_field=cfg.data.dataset_text_field,
                                        max_docs=s.max_docs, strict=cfg.data.strict))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        if not texts:
            raise ConfigError(f"{where}: no documents read from {s.path or s.dataset!r}")
        sets.append(EvalSet(s.name, texts))
    if holdout_texts and not any(e.name == "domain" for e in sets):
        sets.append(EvalSet("domain", list(holdout_texts)))
    if holdout_conversations and not any(e.name == "answers" for e in sets):
        sets.append(EvalSet("answers", [], list(holdout_conversations)))
    return sets


def _is_chat_source(source: SourceConfig) -> bool:
    for row, _, _ in iter_rows(source):
        return detect_format(row) is not None
    return False


def _read_conversations(cfg: Config, source: SourceConfig, tokenizer: Any, max_docs: int | None) -> list:
    enc = ChatEncoder(tokenizer, cfg)
    convs = iter_conversations(source, cfg.data.chat_format, max_docs=max_docs, strict=cfg.data.strict)
    return [toks for _, toks in enc.encode_docs(convs)]


@torch.no_grad()
def evaluate_answers(model: torch.nn.Module, conversations: list, batch_size: int) -> dict:
    """Mean NLL of the answer tokens (those with loss in training) of held-out conversations, each scored
    alone with its prompt as context: {"loss", "perplexity", "tokens", "documents"}."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        order = sorted(conversations, key=len, reverse=True)
        for i in range(0, len(order), batch_size):
            batch = [unpack_ids(c) for c in order[i:i + batch_size]]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (a, lab) in enumerate(batch):
                ids[r, :len(a)], labels[r, :len(a)], mask[r, :len(a)] = (torch.from_numpy(a), torch.from_numpy(lab), 1)
            ids, labels, mask = to_device(ids, device), to_device(labels, device), to_device(mask, device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for r in range(len(batch)):
                target = labels[r, 1:]
                keep = target != -100
                if keep.any():
                    nll += float(F.cross_entropy(logits[r, :-1][keep].float(), target[keep], reduction="sum"))
                    count += int(keep.sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no answer tokens to evaluate")
    loss = nll / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count, "documents": len(conversations)}


# ---------------------------------------------------------------------------- metrics


def _context_ids(tokenizer) -> list[int]:
    """The token the tokenizer puts before any text by default (BOS), else EOS; see the module docstring."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for i in range(1, len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            # One context token, so that every window scores all its positions but the first; tokenizers
            # put a single BOS there, and of a longer prefix the last token is the one next to the text.
            return [full[i - 1]]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a BOS it adds by default nor an EOS token: documents cannot be "
                         "given a context token, so their first token could not be scored")
    return [tokenizer.eos_token_id]


def _windows(texts: list[str], tokenizer, max_seq_length: int, max_tokens: int | None,
             stats: dict) -> Iterator[list[int]]:
    """Yield token windows document by document, updating `stats` (bytes, documents) as documents start."""
    context = _context_ids(tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; evaluation scores the end of every document")
    step = max_seq_length - 1
    chunk = 64  # tokenize a few documents at a time: batched fast tokenizers, yet stop early on max_tokens
    scored = 0
    for start in range(0, len(texts), chunk):
        batch = [t for t in texts[start:start + chunk] if t]
        if not batch:
            continue
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for text, ids in zip(batch, encoded):
            if max_tokens is not None and scored >= max_tokens:
                return
            seq = context + list(ids) + [eos]
            stats["bytes"] += len(text.encode("utf-8"))
            stats["documents"] += 1
            for s in range(0, len(seq) - 1, step):
                window = seq[s:s + max_seq_length]
                scored += len(window) - 1
                yield window


def _score_batch(model: torch.nn.Module, windows: list[list[int]], pad_id: int, device: torch.device) -> tuple[float, int]:
    """Summed NLL (nats) and count of predicted tokens over right-padded windows; padding never counts."""
    width = max(len(w) for w in windows)
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(windows), width), dtype=torch.long)
    for i, w in enumerate(windows):
        ids[i, :len(w)] = torch.tensor(w, dtype=torch.long)
        mask[i, :len(w)] = 1
    ids, mask = to_device(ids, device), to_device(mask, device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    rows = []
    for i, w in enumerate(windows):
        n = len(w) - 1
        # Upcast one row at a time: float32 log-softmax without a batch-sized float32 copy of the logits.
        rows.append(F.cross_entropy(logits[i, :n].float(), ids[i, 1:n + 1], reduction="sum"))
    # One wait for the device per batch, not one per row; the sum runs in the same order on the host.
    nll = 0.0
    for value in torch.stack(rows).tolist():
        nll += value
    return nll, sum(len(w) - 1 for w in windows)


@torch.no_grad()
def evaluate_texts(model: torch.nn.Module, tokenizer, texts: list[str], *, max_seq_length: int, batch_size: int,
                   max_tokens: int | None = None) -> dict:
    """Loss, perplexity and bits per byte over `texts`, exactly as the module docstring defines them.

    Returns {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "documents"}: loss is the mean NLL
    per predicted token (nats), tokens the number of predicted tokens, bytes the UTF-8 bytes of the
    scored documents. With `max_tokens`, whole documents are taken in order until at least that many
    tokens are scored (the document crossing the limit is scored in full), so every metric still
    covers exactly the documents counted. Empty documents are skipped.
    """
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length must be at least 2 to predict anything, got {max_seq_length}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model_device(model)
    was_training = model.training
    model.eval()
    stats = {"bytes": 0, "documents": 0}
    nll, tokens = 0.0, 0
    def flush(pending: list[list[int]]) -> tuple[float, int]:
        # Windows of similar length batched together waste less compute on padding.
        pending.sort(key=len, reverse=True)
        total, count = 0.0, 0
        for i in range(0, len(pending), batch_size):
            n, c = _score_batch(model, pending[i:i + batch_size], pad_id, device)
            total, count = total + n, count + c
        return total, count

    try:
        pending: list[list[int]] = []
        for window in _windows(texts, tokenizer, max_seq_length, max_tokens, stats):
            pending.append(window)
            if len(pending) == batch_size * 32:
                n, c = flush(pending)
                nll, tokens, pending = nll + n, tokens + c, []
        n, c = flush(pending)
        nll, tokens = nll + n, tokens + c
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no text to evaluate: every document is empty")
    loss = nll / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),  # exp overflows a float past ~709
        "bits_per_byte": nll / LN2 / stats["bytes"] if stats["bytes"] else float("nan"),
        "tokens": tokens,
        "bytes": stats["bytes"],
        "documents": stats["documents"],
    }


# Neutral values of everything that would make generate() differ from plain argmax decoding. They are
# given explicitly because generate() fills every field left at None from the model's own generation
# config (which may ask for sampling, a repetition penalty, a minimum length, ...).
_GREEDY = {"do_sample": False, "num_beams": 1, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0,
           "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
           "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "length_penalty": 1.0,
           "min_new_tokens": 0}


@torch.no_grad()
def generate_samples(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int,
                     chat: bool = False) -> list[dict]:
    """Greedy continuations, one prompt at a time (no padding, so each equals its unbatched run). `chat`: each
    prompt is a user turn through the tokenizer's chat template, and the answer stops at its end of turn."""
    from transformers import GenerationConfig

    if not prompts:
        return []
    device = model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen = GenerationConfig(**_GREEDY, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                           eos_token_id=stop_token_ids(tokenizer) if chat else tokenizer.eos_token_id,
                           bos_token_id=tokenizer.bos_token_id)
    was_training = model.training
    model.eval()
    out: list[dict] = []
    try:
        for prompt in prompts:
            if chat:
                p = torch.tensor([chat_prompt_ids(tokenizer, prompt)], dtype=torch.long)
                enc = {"input_ids": p.to(device), "attention_mask": torch.ones_like(p).to(device)}
            else:
                enc = tokenizer(prompt, return_tensors="pt").to(device)
            ids = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], generation_config=gen)
            new = ids[0, enc["input_ids"].shape[1]:]
            out.append({"prompt": prompt, "completion": tokenizer.decode(new, skip_special_tokens=True),
                        "new_tokens": int(new.numel())})
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------------------- the evaluator


def is_general(name: str) -> bool:
    """Sets whose name starts with 'general' feed the forgetting alarm."""
    return name.lower().startswith("general")


def summarize_records(records: list[dict]) -> list[dict]:
    """Per set: the first (baseline) and last evaluation side by side, with the relative change in
    bits per byte. Shared by `Evaluator.summary_table` and the report, which reads eval.jsonl."""
    by_set: dict[str, list[dict]] = {}
    for r in records:
        if "set" in r and "step" in r:
            by_set.setdefault(str(r["set"]), []).append(r)
    rows = []
    for name, rs in by_set.items():
        rs = sorted(rs, key=lambda r: r["step"])
        before, after = rs[0], rs[-1]
        if len(rs) == 1 and after["step"] > 0:  # not evaluated before training (eval_at_start: false): no baseline
            before = {"step": None}
        row: dict[str, Any] = {"set": name, "step_before": before["step"], "step_after": after["step"]}
        for key in ("loss", "perplexity", "bits_per_byte"):
            row[f"{key}_before"] = before.get(key)
            row[f"{key}_after"] = after.get(key)
        b, a = before.get("bits_per_byte"), after.get("bits_per_byte")
        row["bits_per_byte_change"] = (a - b) / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
        row["tokens"] = after.get("tokens")
        row["forgetting_alarm"] = bool(after.get("forgetting_alarm", False))
        row["alarm_threshold"] = after.get("alarm_threshold")
        rows.append(row)
    return rows


def format_summary(rows: list[dict], show_steps: bool = True) -> str:
    """The before/after table as aligned text, for the CLI and logs."""
    def num(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    head = ["set", "steps", "loss", "ppl", "bits/byte", "change", ""]
    body = []
    for r in rows:
        body.append([
            r["set"],
            f"{'-' if r['step_before'] is None else r['step_before']}->{r['step_after']}",
            f"{num(r['loss_before'], '.4f')} -> {num(r['loss_after'], '.4f')}",
            f"{num(r['perplexity_before'], '.2f')} -> {num(r['perplexity_after'], '.2f')}",
            f"{num(r['bits_per_byte_before'], '.4f')} -> {num(r['bits_per_byte_after'], '.4f')}",
            num(r["bits_per_byte_change"] * 100 if r["bits_per_byte_change"] is not None else None, "+.2f") + ("%" if r["bits_per_byte_change"] is not None else ""),
            "FORGETTING" if r["forgetting_alarm"] else "",
        ])
    if not show_steps:
        head, body = head[:1] + head[2:], [b[:1] + b[2:] for b in body]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body]]
    return "\n".join(lines)


def _read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (a run killed mid-write) is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n} bytes"


class Evaluator:
    """Evaluates the held-out sets and samples the prompts at each call; remembers the first call as
    the baseline. Records already in output_dir/eval.jsonl (a resumed run) are kept, so the baseline
    survives a restart; an evaluation at step N replaces any earlier record at or after step N, which
    a resumed run repeats."""

    def __init__(self, cfg: Config, tokenizer, eval_sets: list[EvalSet], output_dir: str | Path):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.eval_sets = list(eval_sets)
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.eval_path = self.output_dir / "eval.jsonl"
        self.samples_path = self.output_dir / "samples.jsonl"
        self.records = _read_jsonl(self.eval_path)

    def baseline(self, name: str) -> dict | None:
        rs = [r for r in self.records if r.get("set") == name and "step" in r]
        return min(rs, key=lambda r: r["step"]) if rs else None

    def _drop_from(self, path: Path, records: list[dict], step: int) -> list[dict]:
        kept = [r for r in records if not (isinstance(r.get("step"), (int, float)) and r["step"] >= step)]
        if len(kept) != len(records):
            _write_jsonl(path, kept)
        return kept

    def run(self, model: torch.nn.Module, step: int) -> dict[str, dict]:
        """Evaluate every set at `step`; returns {set name: metrics + "forgetting_alarm"}."""
        e = self.cfg.eval
        self.records = self._drop_from(self.eval_path, self.records, step)
        self._drop_from(self.samples_path, _read_jsonl(self.samples_path), step)
        results: dict[str, dict] = {}
        new: list[dict] = []
        t0 = time.perf_counter()
        if self.eval_sets:  # an evaluation on a CPU can take minutes: say what is being scored
            log.info("evaluating at step %d: %s", step, ", ".join(
                f"{s.name} ({len(s.conversations)} conversations)" if s.conversations is not None else
                f"{s.name} ({len(s.texts)} documents, {_size(sum(len(x.encode('utf-8')) for x in s.texts))})"
                for s in self.eval_sets))
        for s in self.eval_sets:
            if s.conversations is not None:
                metrics = evaluate_answers(model, s.conversations, e.per_device_eval_batch_size)
            else:
                metrics = evaluate_texts(model, self.tokenizer, s.texts, max_seq_length=self.cfg.model.max_seq_length,
                                         batch_size=e.per_device_eval_batch_size, max_tokens=e.max_eval_tokens)
            rec: dict[str, Any] = {"step": step, "set": s.name, **metrics, "forgetting_alarm": False}
            base = self.baseline(s.name)
            if base is not None and isinstance(base.get("bits_per_byte"), (int, float)):
                rec["baseline_bits_per_byte"] = base["bits_per_byte"]
                rec["bits_per_byte_change"] = (metrics["bits_per_byte"] - base["bits_per_byte"]) / base["bits_per_byte"]
                if is_general(s.name):
                    threshold = base["bits_per_byte"] * (1 + e.forgetting_limit)
                    rec["alarm_threshold"] = threshold
                    if metrics["bits_per_byte"] > threshold:
                        rec["forgetting_alarm"] = True
                        log.warning(
                            "forgetting alarm: %s bits per byte rose from %.4f (step %s) to %.4f at step %s "
                            "(+%.1f%%, limit %.1f%%)", s.name, base["bits_per_byte"], base["step"],
                            metrics["bits_per_byte"], step, 100 * rec["bits_per_byte_change"], 100 * e.forgetting_limit)
            elif is_general(s.name):
                rec["alarm_threshold"] = metrics["bits_per_byte"] * (1 + e.forgetting_limit)
            self.records.append(rec)
            new.append(rec)
            results[s.name] = {k: v for k, v in rec.items() if k not in ("step", "set")}
        with self.eval_path.open("a", encoding="utf-8") as f:
            for rec in new:
                f.write(json.dumps(rec) + "\n")
        if new:
            log.info("evaluated in %.0f s: %s", time.perf_counter() - t0,
                     ", ".join(f"{r['set']} {r['bits_per_byte']:.4f} bits/byte" if isinstance(r.get("bits_per_byte"), (int, float))
                               else f"{r['set']} loss {r['loss']:.4f}" for r in new))
        samples = generate_samples(model, self.tokenizer, e.prompts, e.max_new_tokens,
                                   chat=self.cfg.train.stage == "sft")
        if samples:
            with self.samples_path.open("a", encoding="utf-8") as f:
                for smp in samples:
                    f.write(json.dumps({"step": step, **smp}, ensure_ascii=False) + "\n")
        return results

    def summary_table(self) -> list[dict]:
        """Per set: baseline vs latest loss, perplexity, bits per byte and the change (see summarize_records)."""
        return summarize_records(self.records)


# ---------------------------------------------------------------------------- cpt eval


def _parse_data_arg(arg: str, args: argparse.Namespace) -> tuple[str, SourceConfig]:
    """`[NAME=]PATH_OR_DATASET`: an existing file, folder or glob is a path; anything else a dataset."""
    name = None
    target = arg
    if "=" in arg and not Path(arg).exists():
        left, _, right = arg.partition("=")
        if left and right and "/" not in left and os.sep not in left:
            name, target = left, right
    is_path = Path(target).exists() or bool(glob.glob(target))
    looks_like_file = target.startswith((".", "/", "~")) or any(
        target.endswith(suffix) or target.endswith(suffix + ".gz") for suffix in SUFFIXES)
    if not is_path and looks_like_file:
        raise ConfigError(f"--data {arg}: no file or folder matches {target!r}")
    if is_path:
        src = SourceConfig(path=target, text_field=args.text_field)
        name = name or Path(target.rstrip("/")).stem or target
    else:
        src = SourceConfig(dataset=target, name=args.subset, split=args.split, text_field=args.text_field,
                           streaming=True if args.max_docs else None)
        name = name or target.rstrip("/").split("/")[-1]
    return name, src


def _load_model(path_or_name: str, gguf_file: str | None, device: str | None):
    from cpt.model import load_for_inference

    return load_for_inference(path_or_name, gguf_file=gguf_file, device=device)


def _eval_sets_from_args(args: argparse.Namespace) -> list[EvalSet]:
    specs: list[tuple[str, SourceConfig]] = []
    if args.data:
        specs = [_parse_data_arg(d, args) for d in args.data]
    else:
        cfg_path = Path(args.model) / "config.yaml"
        if not cfg_path.is_file():
            raise ConfigError("give at least one --data PATH_OR_DATASET (or a run's output folder whose config.yaml lists eval.sets)")
        cfg = load_config(cfg_path)
        if not cfg.eval.sets:
            raise ConfigError(f"{cfg_path}: eval.sets is empty; give --data PATH_OR_DATASET")
        specs = [(s.name, _source_for(s, cfg.data.streaming)) for s in cfg.eval.sets]
    sets: list[EvalSet] = []
    for name, src in specs:
        if any(s.name == name for s in sets):
            raise ConfigError(f"--data: two sets are named {name!r}; name them with NAME=PATH")
        texts = list(read_documents(src, default_text_field=args.text_field or "text", max_docs=args.max_docs))
        if not texts:
            raise ConfigError(f"--data {src.path or src.dataset}: no documents read")
        sets.append(EvalSet(name, texts))
    return sets


def _evaluate_model(path: str, args: argparse.Namespace, sets: list[EvalSet]) -> dict[str, dict]:
    model, tokenizer = _load_model(path, args.gguf_file, args.device)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    seq = args.max_seq_length if args.max_seq_length else min(2048, limit or 2048)
    if limit and seq > limit:
        raise ConfigError(f"--max-seq-length {seq} exceeds the model's max_position_embeddings ({limit})")
    out = {}
    for s in sets:
        out[s.name] = evaluate_texts(model, tokenizer, s.texts, max_seq_length=seq, batch_size=args.batch_size,
                                     max_tokens=args.max_tokens)
    del model
    return out


def eval_main(argv: list[str]) -> int:
    """`cpt eval MODEL_OR_OUTPUT --data [NAME=]PATH_OR_DATASET ... [--compare BASE]`; returns the exit code."""
    p = argparse.ArgumentParser(prog="cpt eval", description="Loss, perplexity and bits per byte of a model "
                                "(base, adapter folder, merged folder, hub name or GGUF) on held-out text.")
    p.add_argument("model", help="Model folder, adapter folder, run output folder or hub name.")
    p.add_argument("--data", action="append", default=[], metavar="[NAME=]PATH_OR_DATASET",
                   help="An eval set: a file, folder or glob, or a datasets name. Repeat for several sets. "
                        "Names starting with 'general' are checked for forgetting with --compare.")
    p.add_argument("--text-field", default=None, help="Text column of jsonl/parquet/csv files and datasets (default: text).")
    p.add_argument("--subset", default=None, help="Dataset configuration name, for --data datasets.")
    p.add_argument("--split", default="train", help="Dataset split, for --data datasets (default: train).")
    p.add_argument("--max-docs", type=int, default=None, help="Read at most this many documents per set.")
    p.add_argument("--max-tokens", type=int, default=None, help="Score about this many tokens per set (whole documents).")
    p.add_argument("--max-seq-length", type=int, default=None, help="Window length (default: min(2048, the model's limit)).")
    p.add_argument("--batch-size", type=int, default=4, help="Windows per forward pass.")
    p.add_argument("--compare", default=None, metavar="BASE", help="A second model, shown as 'before' beside MODEL.")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside MODEL (and BASE).")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: the best available).")
    p.add_argument("--forgetting-limit", type=float, default=0.05, help="With --compare: flag 'general' sets whose bits per byte rose more than this fraction.")
    p.add_argument("--json", action="store_true", help="Print the results as JSON.")
    args = p.parse_args(argv)
    try:
        sets = _eval_sets_from_args(args)
        after = _evaluate_model(args.model, args, sets)
        before = _evaluate_model(args.compare, args, sets) if args.compare else None
    except (ConfigError, ValueError, FileNotFoundError, OSError) as e:
        print(f"cpt eval: error: {e}", file=sys.stderr)
        return 2
    if before is None:
        if args.json:
            print(json.dumps({"model": args.model, "sets": after}, indent=2))
        else:
            print(f"{'set':<16} {'docs':>6} {'tokens':>9} {'bytes':>10} {'loss':>8} {'ppl':>9} {'bits/byte':>9}")
            for name, m in after.items():
                print(f"{name:<16} {m['documents']:>6} {m['tokens']:>9} {m['bytes']:>10} {m['loss']:>8.4f} "
                      f"{m['perplexity']:>9.2f} {m['bits_per_byte']:>9.4f}")
        return 0
    records = []
    for name in after:
        b, a = before[name], after[name]
        alarm = is_general(name) and a["bits_per_byte"] > b["bits_per_byte"] * (1 + args.forgetting_limit)
        records.append({"step": 0, "set": name, **b})
        records.append({"step": 1, "set": name, **a, "forgetting_alarm": alarm})
    rows = summarize_records(records)
    if args.json:
        print(json.dumps({"model": args.model, "base": args.compare, "sets": after, "base_sets": before,
                          "summary": rows}, indent=2))
    else:
        print(f"before: {args.compare}\nafter:  {args.model}")
        print(format_summary(rows, show_steps=False))
    return 0
