"""Instruction data: rows of the formats users have -> conversations -> template-rendered ids with an answer mask.

Formats (data.chat_format, or recognised per row from its fields):
  messages           {"messages": [{"role": "system|user|assistant", "content": ...}, ...]} (OpenAI)
  sharegpt           {"conversations": [{"from": "system|human|gpt", "value": ...}, ...]}
  alpaca             {"instruction": ..., "input": ... (optional), "output": ...}
  prompt_completion  {"prompt": ..., "completion": ...} (strings, or lists of messages)
Every format becomes a list of role/content messages and goes through one chat template: the tokenizer's
own, or a built-in (chatml, llama-3, alpaca) for base tokenizers that have none.

The answer mask is found by rendering: for each assistant turn, the conversation up to it with the
generation prompt, then with the answer. The text between the two is the answer; it carries loss up to
and including its end-of-turn token (the last special token in it), and whatever the template writes
after that (chatml's newline) does not. Each piece is tokenized on its own, so the prompt's ids are
exactly what `apply_chat_template(..., add_generation_prompt=True)` gives at inference.

The template decides where answers end; `data.add_eos: true` also ends each conversation with the tokenizer's
EOS (carrying loss) where the template's answers do not already end with it.

Tokens without loss travel with bit 31 set (cpt.data.pack.NO_LOSS_BIT), through the same token cache,
packing and sampler as continued pretraining; collate turns them into labels -100.

    python -m pytest tests/test_chat.py -q
"""
from __future__ import annotations

import hashlib
import json
import warnings
from typing import Any, Iterator, NamedTuple

import numpy as np

from cpt.config import Config, SourceConfig
from cpt.data.pack import IGNORE_INDEX, NO_LOSS_BIT
from cpt.data.sources import (DataError, DataWarning, ReadReport, _names, check_filter_columns, iter_rows,
                              parse_filters, source_label)
from cpt.data.tokenize import tokenizer_fingerprint

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "chatgpt": "assistant", "model": "assistant"}

TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
               "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
               "{% endif %}"),
    "llama-3": ("{{ bos_token if bos_token else '' }}{% for message in messages %}{{ '<|start_header_id|>' + "
                "message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
                "{% endif %}"),
    "alpaca": ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
               "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
               "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"),
}
# Special tokens each built-in template writes (its end-of-turn token last); added to a vocabulary that lacks them.
TEMPLATE_TOKENS = {"chatml": ["<|im_start|>", "<|im_end|>"],
                   "llama-3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                   "alpaca": []}

# Rows that are not usable examples, with the words ReadReport prints for them.
ReadReport.LABELS.update({"not_a_conversation": "not a conversation", "unknown_role": "unknown role",
                          "empty_answer": "empty answer", "no_final_answer": "not ending with an assistant answer"})


class Conversation(NamedTuple):
    messages: list[dict]
    index: int    # conversations produced so far by this source
    loc: dict     # where it starts; iter_conversations(start=loc) yields it first
    pair: bool = False  # a prompt/completion row (data.completion_only_loss applies)


class Malformed(ValueError):
    """A row that is not a usable example: `kind` is a ReadReport kind."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


# ---------------------------------------------------------------------------- formats


def detect_format(row: dict) -> str | None:
    """The format a row's fields say it is in, or None."""
    if isinstance(row.get("messages"), list):
        return "messages"
    if isinstance(row.get("conversations"), list):
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    return None


def _turns(items: Any, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise Malformed("not_a_conversation", "no turns")
    out = []
    for i, m in enumerate(items):
        if not isinstance(m, dict):
            raise Malformed("not_a_conversation", f"turn {i} is a {type(m).__name__}, not a mapping")
        # A ShareGPT file written with role/content (or the reverse) is common enough to accept.
        rk, ck = (role_key, content_key) if role_key in m else ("role", "content") if "role" in m else ("from", "value")
        role = roles.get(str(m.get(rk, "")).lower())
        if role is None:
            raise Malformed("unknown_role", f"turn {i} has role {m.get(rk)!r}")
        content = m.get(ck)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise Malformed("non_string", f"turn {i} content is a {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def to_messages(row: dict, fmt: str) -> list[dict]:
    """One row as role/content messages ending with an assistant answer; raises Malformed."""
    if fmt == "messages":
        msgs = _turns(row.get("messages"), "role", "content", {r: r for r in ROLES})
    elif fmt == "sharegpt":
        msgs = _turns(row.get("conversations"), "from", "value", _SHAREGPT_ROLES)
    elif fmt == "alpaca":
        ins, inp, out = row.get("instruction"), row.get("input") or "", row.get("output")
        if not all(isinstance(x, str) for x in (ins, inp)) or not isinstance(out, (str, type(None))):
            raise Malformed("non_string", "instruction, input and output must be strings")
        if not ins.strip():
            raise Malformed("not_a_conversation", "empty instruction")
        msgs = [{"role": "user", "content": ins + (f"\n\n{inp}" if inp.strip() else "")},
                {"role": "assistant", "content": out or ""}]
    elif fmt == "prompt_completion":
        p, c = row.get("prompt"), row.get("completion")
        prompt = _turns(p, "role", "content", {r: r for r in ROLES}) if isinstance(p, list) else \
            [{"role": "user", "content": p}] if isinstance(p, str) else None
        answer = _turns(c, "role", "content", {r: r for r in ROLES}) if isinstance(c, list) else \
            [{"role": "assistant", "content": c}] if isinstance(c, str) else [{"role": "assistant", "content": ""}] \
            if c is None else None
        if prompt is None or answer is None:
            raise Malformed("non_string", "prompt and completion must be strings or lists of messages")
        msgs = prompt + answer
    else:
        raise ValueError(f"unknown chat format {fmt!r}")
    if msgs[-1]["role"] != "assistant":
        raise Malformed("no_final_answer", f"the last turn is {msgs[-1]['role']!r}")
    for m in msgs:
        if m["role"] == "assistant" and not m["content"].strip():
            raise Malformed("empty_answer", "an assistant turn is empty")
    return msgs


def iter_conversations(source: SourceConfig | Any, fmt: str = "auto", *, max_docs: int | None = None,
                       strict: bool = False, streaming: bool | None = None, start: dict | None = None,
                       report: ReadReport | None = None, file_order: list[int] | None = None,
                       loaded: Any = None) -> Iterator[Conversation]:
    """A source's rows as conversations; malformed rows are counted and skipped (an error under `strict`).
    A source whose first row is in no known format is an error: its fields are named."""
    filters = parse_filters(source.filters if isinstance(source, SourceConfig) else [])
    report = report or ReadReport(source_label(source), strict=strict)
    report.strict = strict
    index = int(start.get("doc", 0)) if start else 0
    if max_docs is not None and index >= max_docs:
        return
    first = start is None
    for row, where, loc in iter_rows(source, streaming=streaming, report=report, start=start, file_order=file_order,
                                     loaded=loaded):
        row_fmt = detect_format(row) if fmt == "auto" else fmt
        if first and (row_fmt is None or (fmt != "auto" and detect_format(row) not in (fmt, None))):
            raise DataError(f"{where}: not a {fmt if fmt != 'auto' else 'chat'} row; the fields are: {_names(row)}. "
                            "Instruction data holds messages (role/content), conversations (from/value), "
                            "instruction/input/output or prompt/completion; set data.chat_format to the one it uses")
        if first:
            check_filter_columns(filters, row, where)
        first = False
        if filters and not all(f(row, where) for f in filters):
            report.filtered += 1
            continue
        if row_fmt is None:
            report.skip("not_a_conversation", where, f"fields {_names(row)}")
            continue
        try:
            msgs = to_messages(row, row_fmt)
        except Malformed as e:
            report.skip(e.kind, where, str(e))
            continue
        yield Conversation(msgs, index, {**loc, "doc": index}, row_fmt == "prompt_completion")
        index += 1
        if max_docs is not None and index >= max_docs:
            break


# ---------------------------------------------------------------------------- templates


def resolve_template(tokenizer: Any, name: str) -> tuple[str, list[str]]:
    """(Jinja template, the special tokens it writes) for data.chat_template."""
    if name == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, str) and own.strip():
            return own, []
        name = "chatml"
    if name in TEMPLATES:
        return TEMPLATES[name], list(TEMPLATE_TOKENS[name])
    if "{%" in name or "{{" in name:
        return name, []
    raise DataError(f"data.chat_template: {name!r} is not auto, a built-in template ({', '.join(TEMPLATES)}) or a "
                    "Jinja template string")


def apply_template(tokenizer: Any, name: str) -> list[str]:
    """Give `tokenizer` the chat template `name` and the special tokens it lacks; returns the tokens added
    (the model then needs rows for them: cpt.model.adapters.add_token_rows)."""
    template, tokens = resolve_template(tokenizer, name)
    tokenizer.chat_template = template
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return missing


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _special_strings(tokenizer: Any) -> list[str]:
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(tok, "special", False):
            specials.add(str(tok))
    return sorted((s for s in specials if s), key=len, reverse=True)


def segments(tokenizer: Any, messages: list[dict], train_on_all: bool = False) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, carries loss) pieces; see the module docstring."""
    out: list[tuple[str, bool]] = []
    prev = ""
    specials = _special_strings(tokenizer)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True) if i else _render_empty_prompt(tokenizer)
        full = _render(tokenizer, messages[:i + 1], False)
        if not prompt.startswith(prev) or not full.startswith(prompt):
            raise DataError("the chat template renders a conversation's earlier turns differently once later turns "
                            "follow, so the answers cannot be masked; set data.chat_template to chatml, llama-3, "
                            "alpaca or a template that only appends")
        out.append((prompt[len(prev):], False))
        answer = full[len(prompt):]
        cut = len(answer)
        ends = [answer.rfind(s) + len(s) for s in specials if s in answer]
        if ends:
            cut = max(ends)  # up to and including the end-of-turn token
        out.append((answer[:cut], True))
        if answer[cut:]:
            out.append((answer[cut:], False))
        prev = full
    whole = _render(tokenizer, messages, False)
    if whole.startswith(prev) and len(whole) > len(prev):
        out.append((whole[len(prev):], False))
    if train_on_all:
        out = [(t, True) for t, _ in out]
    return [(t, keep) for t, keep in out if t]


def _render_empty_prompt(tokenizer: Any) -> str:
    """The generation prompt with no earlier turns (an assistant that speaks first)."""
    try:
        return _render(tokenizer, [], True)
    except Exception:
        return ""


def encode_conversation(tokenizer: Any, messages: list[dict], max_length: int | None = None,
                        train_on_all: bool = False) -> tuple[list[int], list[bool]]:
    """(ids, carries loss) of one conversation through the tokenizer's chat template, cut at `max_length`."""
    pieces = segments(tokenizer, messages, train_on_all)
    enc = tokenizer([t for t, _ in pieces], add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    mask: list[bool] = []
    for (_, keep), piece in zip(pieces, enc):
        ids.extend(piece)
        mask.extend([keep] * len(piece))
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask


def pack_ids(ids: list[int], mask: list[bool]) -> np.ndarray:
    """uint32 tokens with NO_LOSS_BIT on the ones that carry no loss (cpt.data.pack.collate reads them)."""
    a = np.asarray(ids, dtype=np.uint32)
    return np.where(np.asarray(mask, dtype=bool), a, a | NO_LOSS_BIT).astype(np.uint32)


def has_answer(tokens: np.ndarray) -> bool:
    """Whether a packed conversation has a token that carries loss after the first (the first predicts nothing)."""
    return bool((tokens[1:] & NO_LOSS_BIT == 0).any())


def unpack_ids(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(input ids, labels with -100 where no loss) of one packed conversation."""
    t = np.asarray(tokens, dtype=np.uint32)
    no_loss = (t & NO_LOSS_BIT) != 0
    ids = (t & ~NO_LOSS_BIT).astype(np.int64)
    return ids, np.where(no_loss, IGNORE_INDEX, ids)


class ChatEncoder:
    """Conversations -> uint32 token arrays with the loss mask in bit 31 (the token cache's encoder for sft)."""

    dtype = np.dtype(np.uint32)

    def __init__(self, tokenizer: Any, cfg: Config):
        d = cfg.data
        self.tokenizer = tokenizer
        self.max_length = cfg.model.max_seq_length
        self.assistant_only = d.assistant_only_loss
        self.completion_only = d.completion_only_loss
        self.fmt = d.chat_format
        self.truncated = 0
        self.answerless = 0  # cut conversations left without an answer token: they teach nothing
        self.eos_id = tokenizer.eos_token_id  # build_data pads blocks with it when the tokenizer has no pad token
        if len(tokenizer) >= 1 << 31:
            raise DataError("the vocabulary is too large for the answer mask bit")
        if cfg.add_eos and self.eos_id is None:
            raise DataError("data.add_eos is true but the tokenizer has no eos_token: set data.add_eos: null (the chat "
                            "template ends each answer), or give the tokenizer an EOS token")
        # data.add_eos set true: EOS also ends each conversation, unless the template's answers already end with it.
        self.add_eos = cfg.add_eos and end_of_turn_id(tokenizer) != self.eos_id

    def fingerprint(self) -> str:
        key = [tokenizer_fingerprint(self.tokenizer), self.tokenizer.chat_template, self.max_length,
               self.assistant_only, self.completion_only, "chat-1"]
        if self.add_eos:  # named only when on: caches built without it stay valid
            key.append("eos")
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()

    def encode(self, messages: list[dict], pair: bool = False) -> np.ndarray:
        train_all = not (self.completion_only if pair else self.assistant_only)
        ids, mask = encode_conversation(self.tokenizer, messages, None, train_all)
        if self.add_eos:
            ids, mask = ids + [self.eos_id], mask + [True]  # a target: the model learns to end there
        if len(ids) > self.max_length:
            self.truncated += 1
            ids, mask = ids[:self.max_length], mask[:self.max_length]
            packed = pack_ids(ids, mask)
            self.answerless += not has_answer(packed)
            return packed
        return pack_ids(ids, mask)

    def encode_docs(self, convs: Iterator[Conversation]) -> Iterator[tuple[Conversation, np.ndarray]]:
        for c in convs:
            yield c, self.encode(c.messages, pair=c.pair)

    def warn(self, name: str) -> None:
        if self.truncated:
            lost = (f"; {self.answerless} of them lost every answer token and teach nothing (raise model.max_seq_length)"
                    if self.answerless else "")
            warnings.warn(f"{name}: {self.truncated} conversations longer than model.max_seq_length="
                          f"{self.max_length} tokens were cut there{lost}", DataWarning, stacklevel=2)
            self.truncated = self.answerless = 0


def chat_prompt_ids(tokenizer: Any, prompt: str | list[dict]) -> list[int]:
    """The ids a user prompt (or a list of messages) becomes before the answer: template and generation prompt,
    tokenized as in training."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template writes to end an answer (the last one in it), or None."""
    try:
        pieces = segments(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
    except Exception:
        return None
    answer = next((t for t, keep in pieces if keep), "")
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"] if answer else []
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return int(ids[-1]) if ids and ids[-1] in special else None


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an answer: EOS and the template's end-of-turn token, so generation stops where
    training taught the turn to end."""
    out = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end = end_of_turn_id(tokenizer)
    if end is not None and end not in out:
        out.append(end)
    return out
