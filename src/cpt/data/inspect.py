"""`cpt inspect SOURCE`: what is in a data set, whether it is CPT material, and what training on it costs.

For any source (file, folder, glob, `datasets` name or folder): its fields and their types, the row
count, the text field's length in characters and tokens (min, median, p95, max), empty and
duplicate rows, and a verdict with its evidence -- *unlabeled* (one free-text field plus metadata:
continued-pretraining material), *labeled pairs* (instruction/prompt-response, or chat messages:
fine-tuning material) or *classification* (text + label). With a config it adds the training
budget: tokens in the data, tokens per optimizer step, steps per epoch, epochs that max_steps means.

    cpt inspect data/corpus.jsonl --tokenizer HuggingFaceTB/SmolLM2-135M
    cpt inspect --config run.yaml --json
    python -m cpt.data.inspect tests/data.jsonl
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from cpt.config import Config, ConfigError, SourceConfig, load_config
from cpt.data.sources import (SUFFIXES, DataWarning, FileText, ReadReport, csv_header_problem, is_datasets_folder,
                              iter_rows, load_hf, other_files, parquet_file, parse_filters, read_documents, resolve_files,
                              shorten, source_label)

PROMPT_FIELDS = ("instruction", "prompt", "question", "query", "input", "context", "problem", "human", "user")
RESPONSE_FIELDS = ("output", "response", "answer", "completion", "chosen", "target", "solution", "assistant",
                   "rejected", "reply")
CHAT_FIELDS = ("messages", "conversations", "conversation", "dialog", "dialogue", "chat", "turns")
LABEL_FIELDS = ("label", "labels", "class", "category", "sentiment", "target", "y", "intent", "topic")
META_HINTS = ("id", "url", "uri", "source", "date", "time", "dump", "file", "path", "lang", "language", "score",
              "count", "hash", "meta", "license", "title", "domain", "length", "quality")


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "string"
    if isinstance(v, (list, tuple)):
        return "list"
    if isinstance(v, dict):
        return "dict"
    return type(v).__name__


def _quantiles(xs: list[int]) -> dict | None:
    if not xs:
        return None
    a = np.asarray(xs)
    return {"min": int(a.min()), "median": float(np.median(a)), "p95": float(np.percentile(a, 95)),
            "max": int(a.max()), "mean": float(a.mean())}


def _as_source(source: Any) -> Any:
    if isinstance(source, (str, Path)):
        s = str(source)
        p = Path(s).expanduser()
        if is_datasets_folder(p):
            return SourceConfig(dataset=s)
        if p.exists():
            return SourceConfig(path=s)
        looks_like_path = s.startswith(("/", ".", "~")) or any(
            s.lower().endswith(x) or s.lower().endswith(x + ".gz") for x in SUFFIXES)
        if looks_like_path or any(c in s for c in "*?["):
            return SourceConfig(path=s)  # so a typo reads "no such file", not a Hub lookup
        return SourceConfig(dataset=s)
    return source


def _row_count(source: Any) -> int | None:
    """The exact row count where it is cheap (Parquet metadata, line counts, datasets length)."""
    if isinstance(source, SourceConfig) and source.path:
        total = 0
        for f in resolve_files(source.path):
            name = f.name.lower()
            if name.endswith((".txt", ".md", ".txt.gz", ".md.gz")):
                total += 1
            elif name.endswith(".parquet"):
                total += parquet_file(f).metadata.num_rows
            elif name.endswith(".jsonl"):
                try:
                    with open(f, "rb") as fh:
                        n, last = 0, b"\n"
                        for chunk in iter(lambda: fh.read(1 << 24), b""):
                            n += chunk.count(b"\n")
                            last = chunk[-1:]
                except OSError:
                    return None  # the count is advisory; reading the rows names an unreadable file
                total += n + (last != b"\n")  # blank lines are counted too: an upper bound then
            else:
                return None
        return total
    ds = source
    if isinstance(source, SourceConfig):
        return None
    try:
        return len(ds)
    except TypeError:
        return None


# ---------------------------------------------------------------------------- verdict


def _verdict(fields: dict[str, dict], text_field: str | None, text_chars: list[int], n: int) -> dict:
    names = {k.lower(): k for k in fields}
    evidence: list[str] = []

    chat = [names[c] for c in CHAT_FIELDS if c in names and fields[names[c]]["chat_like"]]
    if chat:
        f = chat[0]
        roles = ", ".join(sorted(fields[f]["roles"])) or "role/content turns"
        evidence.append(f"field {f!r} holds lists of chat turns ({roles})")
        return {"kind": "labeled_pairs", "label": "labeled pairs (chat messages)", "evidence": evidence}

    prompts = [names[c] for c in PROMPT_FIELDS if c in names and fields[names[c]]["types"].get("string")]
    responses = [names[c] for c in RESPONSE_FIELDS if c in names and fields[names[c]]["types"].get("string")]
    if prompts and responses:
        evidence.append(f"prompt-like field {prompts[0]!r} and response-like field {responses[0]!r}")
        return {"kind": "labeled_pairs", "label": "labeled pairs (instruction / prompt-response)", "evidence": evidence}

    labels = [names[c] for c in LABEL_FIELDS if c in names and c != (text_field or "").lower()]
    for lab in labels:
        info = fields[lab]
        distinct = info["distinct"]
        short = info["types"].get("int") or info["types"].get("bool") or info["max_str_len"] <= 40
        if short and distinct is not None and 0 < distinct <= max(20, n // 20):
            evidence.append(f"field {lab!r} takes {distinct} distinct short values over {n} rows "
                            f"(e.g. {', '.join(map(repr, info['examples'][:4]))})")
            if text_field:
                evidence.append(f"next to the text field {text_field!r}")
            return {"kind": "classification", "label": "classification (text + label)", "evidence": evidence}

    strings = [k for k, v in fields.items() if v["types"].get("string") and v["mean_str_len"] >= 64]
    if text_field and text_chars:
        med = float(np.median(text_chars))
        evidence.append(f"one free-text field {text_field!r} (median {med:.0f} characters)")
        others = [k for k in fields if k != text_field]
        meta = [k for k in others if any(h in k.lower() for h in META_HINTS)]
        if meta:
            evidence.append(f"metadata fields: {', '.join(map(_short_name, meta))}")
        rest = [k for k in others if k not in meta]
        if rest:
            evidence.append(f"other fields: {', '.join(map(_short_name, rest))} "
                            "(no prompt/response, chat or label pattern)")
        long_others = [k for k in strings if k != text_field]
        if long_others:
            evidence.append(f"note: {', '.join(map(_short_name, long_others))} also hold long text")
        return {"kind": "unlabeled", "label": "unlabeled (continued-pretraining material)", "evidence": evidence}
    evidence.append("no usable text field" + (f"; long string fields: {', '.join(map(_short_name, strings))}"
                                              if strings else ""))
    return {"kind": "unknown", "label": "unknown (no text field found)", "evidence": evidence}


def labeled_warning(verdict: dict) -> str | None:
    """The warning `cpt train` prints when its data looks like fine-tuning data, with the evidence."""
    if not verdict or verdict.get("kind") not in ("labeled_pairs", "classification"):
        return None
    return (f"this data looks like {verdict['label']}: {'; '.join(verdict['evidence'])}. Continued pretraining "
            "learns from raw text; labeled data is fine-tuning material (its structure becomes plain text here): "
            "`cpt sft CONFIG` (train.stage=sft) trains on it with the loss on the answers. "
            "Run `cpt inspect` on it for details.")


# ---------------------------------------------------------------------------- inspection


def inspect_source(source: Any, tokenizer: Any = None, cfg: Config | None = None, sample_rows: int = 2000,
                   text_field: str | None = None) -> dict:
    """Fields, counts, lengths, verdict and (with `cfg`) training budget of one source, as a dict.

    The text field: `text_field`, else the source's own, else the config's dataset_text_field, else "text".
    """
    source = _as_source(source)
    default_field = cfg.data.dataset_text_field if cfg else "text"
    text_field = text_field or (source.text_field if isinstance(source, SourceConfig) and source.text_field
                                else None) or default_field
    filters = parse_filters(source.filters if isinstance(source, SourceConfig) else [])
    report = ReadReport(source_label(source))
    fields: dict[str, dict] = {}
    chars: list[int] = []
    tokens: list[int] | None = [] if tokenizer is not None else None
    pending: list[str] = []  # texts waiting to be tokenised: counts are kept, never the sampled texts
    encoder = None
    if tokenizer is not None:
        from cpt.data.tokenize import Encoder

        encoder = Encoder(tokenizer, add_eos=False)

    rates: dict = {}

    def count_tokens() -> None:
        if encoder is not None and pending:
            tokens.extend(len(x) for x in encoder.encode(pending))
            _add_rates(rates, token_rates(tokenizer, pending))
        pending.clear()

    files = resolve_files(source.path) if isinstance(source, SourceConfig) and source.path else []
    problem = None
    pending_chars = n = 0
    n_empty = n_nonstr = n_filtered = 0
    seen: set[bytes] = set()
    dups = 0
    is_files = False
    exhausted = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        loaded = None
        if isinstance(source, SourceConfig) and source.dataset:
            loaded = load_hf(source, streaming=bool(source.streaming))
        for row, where, loc in iter_rows(source, report=report, loaded=loaded, streaming=True):
            if n >= sample_rows:
                exhausted = False
                break
            n += 1
            is_files = isinstance(row, FileText)
            if n == 1 and files and files[loc["file"]].name.lower().endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
                problem = csv_header_problem(files[loc["file"]], list(row), [text_field])
            for k, v in row.items():
                info = fields.setdefault(k, {"types": Counter(), "non_null": 0, "values": Counter(), "max_str_len": 0,
                                             "str_len_sum": 0, "str_n": 0, "chat_like": False, "roles": set()})
                t = _type_name(v)
                info["types"][t] += 1
                if v is not None:
                    info["non_null"] += 1
                if isinstance(v, str):
                    info["max_str_len"] = max(info["max_str_len"], len(v))
                    info["str_len_sum"] += len(v)
                    info["str_n"] += 1
                if isinstance(v, str) and len(v) > 40:
                    info["values"]["\0overflow"] += 1  # free text: distinct values mean nothing
                elif isinstance(v, (str, int, bool)):
                    if len(info["values"]) < 1000:
                        info["values"][v] += 1
                    else:
                        info["values"]["\0overflow"] += 1
                if isinstance(v, list) and v and all(isinstance(t_, dict) for t_ in v[:4]):
                    keys = set().union(*(t_.keys() for t_ in v[:4]))
                    if {"role", "content"} <= keys or {"from", "value"} <= keys:
                        info["chat_like"] = True
                        info["roles"].update(str(t_.get("role", t_.get("from"))) for t_ in v[:8])
            if filters and all(f.column in row for f in filters) and not all(f(row, where) for f in filters):
                n_filtered += 1
                continue
            text = row.get("text") if is_files else row.get(text_field)
            if not isinstance(text, str):
                n_nonstr += text_field in row or is_files
                continue
            if not text.strip():
                n_empty += 1
                continue
            h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if h in seen:
                dups += 1
            seen.add(h)
            chars.append(len(text))
            pending.append(text)
            pending_chars += len(text)
            if pending_chars >= 1 << 20:
                count_tokens()
                pending_chars = 0
        count_tokens()

    field_out: dict[str, dict] = {}
    for k, info in fields.items():
        overflow = "\0overflow" in info["values"]
        distinct = None if overflow or not info["values"] else len(info["values"])
        field_out[k] = {"types": dict(info["types"]), "non_null": info["non_null"], "distinct": distinct,
                        "max_str_len": info["max_str_len"],
                        "mean_str_len": info["str_len_sum"] / info["str_n"] if info["str_n"] else 0.0,
                        "chat_like": info["chat_like"], "roles": sorted(info["roles"]),
                        "examples": [v for v, _ in info["values"].most_common(6) if v != "\0overflow"]}
    has_text = is_files or text_field in fields
    tokens = tokens or None
    rows = n if exhausted else _row_count(loaded if loaded is not None else source)
    verdict = _verdict(field_out, ("text" if is_files else text_field) if has_text else None, chars, n)
    result: dict[str, Any] = {
        "source": source_label(source),
        "text_field": "text (whole file)" if is_files else text_field,
        "text_field_found": has_text,
        "rows": rows,
        "rows_exact": exhausted or rows is not None,
        "sampled_rows": n,
        "fully_read": exhausted,
        "fields": {k: {kk: vv for kk, vv in v.items() if kk not in ("examples",)} | {"examples": [str(e)[:40] for e in v["examples"]]}
                   for k, v in field_out.items()},
        "text_chars": _quantiles(chars),
        "text_tokens": _quantiles(tokens) if tokens else None,
        "token_rates": _with_rates(rates) if rates else None,
        "empty_rows": n_empty,
        "non_string_rows": n_nonstr,
        "filtered_rows": n_filtered,
        "bad_rows": dict(report.counts),
        "duplicate_rows": dups,
        "verdict": verdict,
    }
    if not has_text:
        cands = [k for k, v in field_out.items() if v["types"].get("string")]
        result["text_field_candidates"] = [_short_name(k) for k in
                                           sorted(cands, key=lambda k: -field_out[k]["mean_str_len"])]
    if problem:
        result["problem"] = problem
    if files and Path(source.path).expanduser().is_dir():
        ignored = other_files(Path(source.path).expanduser())
        if ignored:
            result["ignored_files"] = [str(f) for f in ignored]
    if cfg is not None:
        result["budget"] = _budget(result, cfg, tokens, len(chars))
    return result


# ---------------------------------------------------------------------------- tokens per byte and per script

# Unicode ranges of the scripts a tokenizer may know well or badly; anything else that is a letter is "other",
# and digits, punctuation and spaces are "common" (they take the script of no word).
_SCRIPTS = (
    ("Latin", ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F), (0x1E00, 0x1EFF))),
    ("Greek", ((0x370, 0x3FF), (0x1F00, 0x1FFF))),
    ("Cyrillic", ((0x400, 0x52F), (0x1C80, 0x1C8F), (0x2DE0, 0x2DFF), (0xA640, 0xA69F))),
    ("Armenian", ((0x530, 0x58F),)),
    ("Hebrew", ((0x590, 0x5FF),)),
    ("Arabic", ((0x600, 0x6FF), (0x750, 0x77F), (0x8A0, 0x8FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF))),
    ("Devanagari", ((0x900, 0x97F),)),
    ("Bengali", ((0x980, 0x9FF),)),
    ("Tamil", ((0xB80, 0xBFF),)),
    ("Thai", ((0xE00, 0xE7F),)),
    ("Georgian", ((0x10A0, 0x10FF),)),
    ("Hangul", ((0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7AF))),
    ("Kana", ((0x3040, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F))),
    ("Han", ((0x2E80, 0x2FDF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3134F))),
)
_STARTS = sorted((lo, hi, name) for name, ranges in _SCRIPTS for lo, hi in ranges)


def script_of(ch: str) -> str:
    """The script of one character: a name from _SCRIPTS, "other" for other letters, "common" otherwise."""
    import bisect

    cp = ord(ch)
    i = bisect.bisect_right(_STARTS, (cp, 0x10FFFF, "~")) - 1
    if i >= 0 and _STARTS[i][0] <= cp <= _STARTS[i][1]:
        return _STARTS[i][2]
    return "other" if ch.isalpha() else "common"


def token_rates(tokenizer: Any, texts: list[str], batch: int = 256) -> dict:
    """Tokens per byte and per character of `texts`, overall and per script. A token counts for the script of
    the first letter it covers (digits, punctuation and spaces count for the script of the letters around
    them; a text of only those is "common"); bytes and characters for the script of their own letter."""
    tokens = n_bytes = n_chars = 0
    per: dict[str, dict[str, int]] = {}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    for i in range(0, len(texts), batch):
        chunk = texts[i:i + batch]
        if backend is not None:
            encs = backend.encode_batch(chunk, add_special_tokens=False)
            offsets = [e.offsets for e in encs]
        else:
            out = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            offsets = out["offset_mapping"]
        for text, offs in zip(chunk, offsets):
            tokens += len(offs)
            n_chars += len(text)
            scripts = [script_of(c) for c in text]
            last = "common"
            for s, c in zip(scripts, text):
                if s != "common":
                    last = s
                b = len(c.encode("utf-8", "surrogatepass"))
                d = per.setdefault(s if s != "common" else last, {"tokens": 0, "bytes": 0, "chars": 0})
                d["bytes"] += b
                d["chars"] += 1
                n_bytes += b
            last = "common"
            for start, end in offs:
                s = next((scripts[j] for j in range(start, min(end, len(text))) if scripts[j] != "common"), None)
                if s is None:
                    s = last
                else:
                    last = s
                per.setdefault(s, {"tokens": 0, "bytes": 0, "chars": 0})["tokens"] += 1
    def rates(d: dict) -> dict:
        return {**d, "tokens_per_byte": d["tokens"] / d["bytes"] if d["bytes"] else 0.0,
                "tokens_per_char": d["tokens"] / d["chars"] if d["chars"] else 0.0}
    scripts_out = {k: rates(v) for k, v in sorted(per.items(), key=lambda kv: -kv[1]["bytes"])}
    return {**rates({"tokens": tokens, "bytes": n_bytes, "chars": n_chars}), "scripts": scripts_out}


def _add_rates(total: dict, part: dict) -> None:
    for key in ("tokens", "bytes", "chars"):
        total[key] = total.get(key, 0) + part[key]
    for name, d in part["scripts"].items():
        t = total.setdefault("scripts", {}).setdefault(name, {"tokens": 0, "bytes": 0, "chars": 0})
        for key in ("tokens", "bytes", "chars"):
            t[key] += d[key]


def _with_rates(d: dict) -> dict:
    def one(x: dict) -> dict:
        return {"tokens": x["tokens"], "bytes": x["bytes"], "chars": x["chars"],
                "tokens_per_byte": x["tokens"] / x["bytes"] if x["bytes"] else 0.0,
                "tokens_per_char": x["tokens"] / x["chars"] if x["chars"] else 0.0}
    return {**one(d), "scripts": {k: one(v) for k, v in sorted(d.get("scripts", {}).items(), key=lambda kv: -kv[1]["bytes"])}}


def extension_estimate(tokenizer: Any, texts: list[str], add: int, extender: Any) -> dict:
    """What `add` new tokens would give: learned (by `extender`, the model stage's learner handed in by the
    command line face) on nine in ten of `texts`, measured on the tenth, before and after."""
    learn = [t for i, t in enumerate(texts) if i % 10 != 9] or texts
    held = [t for i, t in enumerate(texts) if i % 10 == 9] or texts
    new = extender(tokenizer, learn, add)
    before, after = token_rates(tokenizer, held), token_rates(new, held)
    return {"add": add, "added": len(new) - len(tokenizer), "learned_on_docs": len(learn), "measured_on_docs": len(held),
            "before": before, "after": after, "fewer_tokens": before["tokens"] / max(after["tokens"], 1)}


def _short_name(k: Any) -> str:
    """A field name for display: a CSV whose first line is a document has that document as a field name."""
    return k if isinstance(k, str) and len(k) <= 40 else shorten(k, 40)


def _budget(result: dict, cfg: Config, tokens: list[int] | None, n_docs_sampled: int) -> dict:
    t = cfg.train
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps * cfg.model.max_seq_length
    out: dict[str, Any] = {"tokens_per_step": per_step, "max_steps": t.max_steps,
                           "per_device_train_batch_size": t.per_device_train_batch_size,
                           "gradient_accumulation_steps": t.gradient_accumulation_steps,
                           "max_seq_length": cfg.model.max_seq_length, "data_tokens": None,
                           "data_tokens_exact": False, "steps_per_epoch": None, "epochs_for_max_steps": None}
    if tokens is None or not n_docs_sampled:
        out["note"] = "give a tokenizer (--tokenizer, or a config whose model has one) to count tokens"
        return out
    eos = 1 if cfg.add_eos else 0
    sampled = sum(tokens) + eos * len(tokens)
    docs_total = result["rows"]
    if result["fully_read"]:
        total = sampled
    elif docs_total:
        # rows without usable text (empty, filtered) are assumed as common as in the sample
        total = int(round(sampled / result["sampled_rows"] * docs_total))
    else:
        total = None
    out["data_tokens"] = total
    out["data_tokens_exact"] = bool(result["fully_read"])
    if total:
        out["steps_per_epoch"] = total / per_step
        if t.max_steps > 0:
            out["epochs_for_max_steps"] = t.max_steps * per_step / total
        else:
            out["epochs_for_max_steps"] = t.num_train_epochs
    return out


# ---------------------------------------------------------------------------- output


def _num(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _fmt_q(q: dict | None) -> str:
    if not q:
        return "-"
    return f"{q['min']:,} / {q['median']:,.0f} / {q['p95']:,.0f} / {q['max']:,}"


def render_inspection(result: dict, console: Any) -> None:
    """Print `inspect_source`'s result as rich tables."""
    from rich.markup import escape
    from rich.table import Table

    rows = result["rows"]
    rows_s = f"{rows:,}" if rows is not None else f">= {result['sampled_rows']:,}"
    if not result["fully_read"]:
        rows_s += f" (statistics from the first {result['sampled_rows']:,})"
    console.print(f"[bold]{result['source']}[/bold]: {rows_s} rows, text field [cyan]{result['text_field']}[/cyan]"
                  + ("" if result["text_field_found"] else " [red](not found)[/red]"))
    ft = Table(title="fields", show_lines=False)
    for c in ("field", "types", "non-null", "distinct", "examples"):
        ft.add_column(c)
    for k, v in result["fields"].items():
        types = ", ".join(f"{t} ({n})" if len(v["types"]) > 1 else t for t, n in v["types"].items())
        ft.add_row(_short_name(k), types, f"{v['non_null']:,}", "-" if v["distinct"] is None else f"{v['distinct']:,}",
                   ", ".join(v["examples"][:3]) if v["distinct"] is not None and v["max_str_len"] <= 40 else "")
    console.print(ft)
    lt = Table(title="text field length (min / median / p95 / max)")
    lt.add_column("unit")
    lt.add_column("length")
    lt.add_row("characters", _fmt_q(result["text_chars"]))
    lt.add_row("tokens", _fmt_q(result["text_tokens"]) if result["text_tokens"] else "- (no tokenizer)")
    console.print(lt)
    _render_rates(result.get("token_rates"), result.get("extension"), console)
    bad = ", ".join(f"{n} {k}" for k, n in result["bad_rows"].items())
    console.print(f"empty rows: {result['empty_rows']:,}   non-string text: {result['non_string_rows']:,}   "
                  f"duplicates: {result['duplicate_rows']:,}   filtered out: {result['filtered_rows']:,}"
                  + (f"   unreadable: {bad}" if bad else ""))
    if result.get("problem"):
        console.print(f"[yellow]{escape(result['problem'])}[/yellow]")
    elif result.get("text_field_candidates"):
        console.print(f"[yellow]text field not found; string fields: "
                      f"{escape(', '.join(result['text_field_candidates']))}[/yellow]")
    if result.get("ignored_files"):
        ig = result["ignored_files"]
        console.print(f"[yellow]ignored {len(ig)} file(s) cpt does not read, e.g. {escape(ig[0])}; it reads "
                      f"{' '.join(SUFFIXES)} (optionally .gz)[/yellow]")
    v = result["verdict"]
    color = {"unlabeled": "green", "labeled_pairs": "yellow", "classification": "yellow"}.get(v["kind"], "red")
    console.print(f"verdict: [bold {color}]{v['label']}[/bold {color}]")
    for e in v["evidence"]:
        console.print(f"  - {e}")
    if v["kind"] == "labeled_pairs":
        console.print("  -> instruction fine-tuning material: train on it with [bold]cpt sft CONFIG[/bold] "
                      "(train.stage=sft: chat template, loss on the answers)")
    b = result.get("budget")
    if b:
        bt = Table(title="training budget")
        bt.add_column("quantity")
        bt.add_column("value")
        approx = "" if b["data_tokens_exact"] else "~"
        bt.add_row("tokens in the data", f"{approx}{b['data_tokens']:,}" if b["data_tokens"] else "-")
        bt.add_row("tokens per optimizer step",
                   f"{b['tokens_per_step']:,} ({b['per_device_train_batch_size']} x {b['gradient_accumulation_steps']} "
                   f"x {b['max_seq_length']})")
        bt.add_row("steps per epoch", f"{approx}{_num(b['steps_per_epoch'])}" if b["steps_per_epoch"] else "-")
        if b["max_steps"] and b["max_steps"] > 0:
            bt.add_row(f"epochs in max_steps={b['max_steps']}",
                       f"{approx}{_num(b['epochs_for_max_steps'])}" if b["epochs_for_max_steps"] else "-")
        console.print(bt)
        if b.get("note"):
            console.print(f"[dim]{b['note']}[/dim]")
    warn = labeled_warning(v)
    if warn:
        console.print(f"[yellow]warning:[/yellow] {warn}")


def _render_rates(rates: dict | None, extension: dict | None, console: Any) -> None:
    from rich.table import Table

    if not rates:
        return
    t = Table(title="tokens per byte and per character" + (f" (with {extension['added']:,} new tokens: measured on "
                                                          f"{extension['measured_on_docs']} held-out documents)" if extension else ""))
    for c in ("script", "share of bytes", "tokens/byte", "tokens/char") + (("tokens/byte after", "tokens/char after") if extension else ()):
        t.add_column(c, justify="left" if c == "script" else "right")
    after = extension["after"] if extension else None
    for name, d in [("all", rates), *rates["scripts"].items()]:
        row = [name, f"{d['bytes'] / max(rates['bytes'], 1):.1%}", f"{d['tokens_per_byte']:.3f}", f"{d['tokens_per_char']:.3f}"]
        if after is not None:
            a = after if name == "all" else after["scripts"].get(name)
            row += [f"{a['tokens_per_byte']:.3f}", f"{a['tokens_per_char']:.3f}"] if a else ["-", "-"]
        t.add_row(*row)
    console.print(t)
    if extension:
        console.print(f"{extension['added']:,} new tokens: {extension['fewer_tokens']:.2f}x fewer tokens for the same text "
                      f"(before {extension['before']['tokens_per_byte']:.3f}, after {extension['after']['tokens_per_byte']:.3f} "
                      "tokens/byte); `cpt vocab extend` writes such a tokenizer")


def _load_tokenizer(name: str, gguf_file: str | None = None) -> Any:
    from transformers import AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(name, **kw)


def inspect_main(argv: list[str], extender: Any = None) -> int:
    """`cpt inspect [SOURCE] [--config C] [--text-field F] [--tokenizer T] [--json] [--max-rows N] [--vocab-add N]`.
    `extender(tokenizer, texts, n)`: an extended tokenizer (the model stage's learner, passed in by the face)."""
    p = argparse.ArgumentParser(prog="cpt inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="?", help="file, folder, glob, datasets name or folder (default: the config's sources)")
    p.add_argument("--config", help="run config: its text field, filters, tokenizer and training budget")
    p.add_argument("--text-field", help="column holding the text (default: the config's, else 'text')")
    p.add_argument("--tokenizer", help="tokenizer name or folder for token counts (default: the config's model)")
    p.add_argument("--gguf-file", help="GGUF file inside --tokenizer's folder")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--max-rows", type=int, default=2000, help="rows read for statistics (default 2000)")
    p.add_argument("--vocab-add", type=int, default=None, metavar="N",
                   help="also show what N new tokens learned from this text would give (see cpt vocab extend)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config) if args.config else None
        if args.source:
            sources = [_as_source(args.source)]
        elif cfg is not None and cfg.data.sources:
            sources = list(cfg.data.sources)
        else:
            p.error("give a SOURCE or a --config with data sources")
        tok = None
        name = args.tokenizer or (cfg and (cfg.model.tokenizer or cfg.model.name_or_path))
        gguf = args.gguf_file or (cfg.model.gguf_file if cfg and not args.tokenizer else None)
        if name:
            try:
                tok = _load_tokenizer(name, gguf)
            except Exception as e:  # offline, or no such tokenizer: the rest of the report still stands
                print(f"cpt inspect: no token counts (tokenizer {name!r} did not load: {type(e).__name__})",
                      file=sys.stderr)
        results = []
        for s in sources:
            if args.text_field and isinstance(s, SourceConfig):
                s.text_field = args.text_field
            results.append(inspect_source(s, tokenizer=tok, cfg=cfg, sample_rows=args.max_rows))
            if args.vocab_add is not None:
                if tok is None or extender is None:
                    raise ConfigError("--vocab-add needs a tokenizer (--tokenizer, or a config's model) and the cpt command")
                field_ = results[-1]["text_field"] if isinstance(s, SourceConfig) else "text"
                texts = list(read_documents(s, field_.split(" ")[0], max_docs=args.max_rows))
                results[-1]["extension"] = extension_estimate(tok, texts, args.vocab_add, extender)
    except ConfigError as e:
        print(f"cpt inspect: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=1, default=str))
    else:
        from rich.console import Console

        console = Console()
        for r in results:
            render_inspection(r, console)
    return 0


if __name__ == "__main__":
    raise SystemExit(inspect_main(sys.argv[1:]))
