"""Instruction fine-tuning (train.stage=sft): formats through the template, the answer mask, packing without
cross-talk, the fused loss honouring it, adapters with added template tokens, continuing from a CPT run; the
same sources as CPT (a `datasets` folder by name with a split slice, save_to_disk, streams that resume).

    python -m pytest tests/test_chat.py -q
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from speed_helpers import peft_model, speed_for
from test_data import epoch_tokens, make_cfg

from cpt.api import run_training
from cpt.cli import main as cli_main
from cpt.config import ConfigError, SourceConfig, load_config
from cpt.data import DataError, DataWarning, build_data
from cpt.data.chat import (TEMPLATES, apply_template, encode_conversation, has_answer, iter_conversations, pack_ids,
                           to_messages)
from cpt.data.pack import Block, best_fit_layout, collate
from cpt.speed import plain_causal_lm_loss

ROWS = {
    "messages": {"messages": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Name a prime."}, {"from": "gpt", "value": "Seven."}]},
    "alpaca": {"instruction": "Name a prime.", "input": "", "output": "Seven."},
    "prompt_completion": {"prompt": "Name a prime.", "completion": "Seven."},
}


@pytest.fixture()
def chat_tok(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert apply_template(tok, "chatml") == ["<|im_start|>", "<|im_end|>"]
    return tok


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("fmt", list(ROWS))
def test_each_format_renders_through_the_template_with_the_answer_mask(chat_tok, fmt):
    tok = chat_tok
    S, E = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    ids, mask = encode_conversation(tok, to_messages(ROWS[fmt], fmt))
    # Worked by hand: <|im_start|>user\nName a prime.<|im_end|>\n<|im_start|>assistant\n | Seven.<|im_end|> | \n
    prompt = [S] + _ids(tok, "user\nName a prime.") + [E] + _ids(tok, "\n") + [S] + _ids(tok, "assistant\n")
    answer = _ids(tok, "Seven.") + [E]
    assert ids == prompt + answer + _ids(tok, "\n")
    assert mask == [False] * len(prompt) + [True] * len(answer) + [False]
    assert tok.decode(ids) == tok.apply_chat_template(to_messages(ROWS[fmt], fmt), tokenize=False)
    # Training on everything marks every token.
    assert all(encode_conversation(tok, to_messages(ROWS[fmt], fmt), train_on_all=True)[1])


def test_several_turns_and_system_mask_every_answer_only(chat_tok):
    tok = chat_tok
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    ids, mask = encode_conversation(tok, msgs)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "b<|im_end|>d<|im_end|>"


@pytest.mark.parametrize("name,answer_end", [("llama-3", "<|eot_id|>"), ("alpaca", "<|endoftext|>")])
def test_builtin_templates_end_the_answer_at_their_end_of_turn(tokenizer_dir, name, answer_end):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    apply_template(tok, name)
    ids, mask = encode_conversation(tok, to_messages(ROWS["alpaca"], "alpaca"))
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Seven." + answer_end
    if name == "alpaca":
        assert tok.decode(ids).startswith("### Instruction:\nName a prime.\n\n### Response:\n")


def test_malformed_rows_are_counted_and_skipped_or_fail_under_strict(tmp_path):
    rows = [ROWS["messages"],
            {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]},
            {"messages": [{"role": "user", "content": "x"}]},
            {"text": "no conversation here"},
            ROWS["sharegpt"]]
    f = tmp_path / "chat.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(DataWarning, match=r"skipped 4 rows.*unknown role.*empty answer.*not ending"):
        from cpt.data.sources import ReadReport
        report = ReadReport("chat")
        convs = list(iter_conversations(SourceConfig(path=str(f)), report=report))
        report.warn()
    assert len(convs) == 2
    with pytest.raises(DataError, match=r"chat.jsonl:2: unknown role.*data.strict"):
        list(iter_conversations(SourceConfig(path=str(f)), strict=True))
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(DataError, match=r"not a chat row; the fields are: text.*data.chat_format"):
        list(iter_conversations(SourceConfig(path=str(plain))))
    # A filter on a column the rows lack would drop every conversation without a word.
    with pytest.raises(DataError, match=r"chat.jsonl:1: filter 'lang == \"en\"': no column 'lang'; the fields are: "
                                        r"messages"):
        list(iter_conversations(SourceConfig(path=str(f), filters=['lang == "en"'])))


def test_add_eos_under_sft_ends_each_conversation_only_when_asked(chat_tok, tokenizer_dir):
    """data.add_eos unset: the chat template ends each answer (chatml: <|im_end|>, which carries loss) and nothing
    is appended. Set true: EOS also ends each conversation, with loss, and the token cache tells the two apart;
    a template whose answers already end with EOS gets no second one."""
    from transformers import AutoTokenizer

    from cpt.data.chat import ChatEncoder, unpack_ids

    msgs = to_messages(ROWS["messages"], "messages")

    def encoder(tok, *over):
        return ChatEncoder(tok, load_config(None, ["train.stage=sft", "model.max_seq_length=64", *over]))

    plain, _ = encode_conversation(chat_tok, msgs)
    for over in ((), ("data.add_eos=false",)):
        assert unpack_ids(encoder(chat_tok, *over).encode(msgs))[0].tolist() == plain
    ids, labels = unpack_ids(encoder(chat_tok, "data.add_eos=true").encode(msgs))
    eos = chat_tok.eos_token_id
    assert ids.tolist() == plain + [eos] and labels[-1] == eos
    assert encoder(chat_tok, "data.add_eos=true").fingerprint() != encoder(chat_tok).fingerprint() \
        == encoder(chat_tok, "data.add_eos=false").fingerprint()
    alpaca = AutoTokenizer.from_pretrained(tokenizer_dir)
    apply_template(alpaca, "alpaca")  # "### Response:\n{answer}<|endoftext|>\n\n"
    assert unpack_ids(encoder(alpaca, "data.add_eos=true").encode(msgs))[0].tolist() == encode_conversation(alpaca, msgs)[0]
    chat_tok.eos_token = None
    with pytest.raises(DataError, match=r"data.add_eos is true but the tokenizer has no eos_token: set data.add_eos: null"):
        encoder(chat_tok, "data.add_eos=true")
    # Continued pretraining keeps its EOS after every document unless told otherwise.
    assert load_config(None, []).add_eos and not load_config(None, ["data.add_eos=false"]).add_eos
    assert not load_config(None, ["train.stage=sft"]).add_eos and load_config(None, ["stage=sft", "data.add_eos=true"]).add_eos


def test_sft_blocks_pad_with_eos_when_the_tokenizer_has_no_pad_token(chat_tok, tmp_path):
    chat_tok.pad_token = None
    data = _write_chat(tmp_path / "chat.jsonl", 10)
    cfg = make_cfg(tmp_path, [{"path": str(data)}], train__stage="sft", model__max_seq_length=64)
    batch = epoch_tokens(build_data(cfg, chat_tok).train, 2, 1)[0]
    # The blocks' padding is EOS (the conversations themselves hold none under chatml).
    assert batch["input_ids"][batch["labels"] == -100].tolist().count(chat_tok.eos_token_id) > 0


def test_whole_conversations_are_never_split_and_fill_blocks_best_fit():
    # Longest first, each into the open block with the least room that fits: 9 | 5+4 | 3+2 (blocks of 10).
    lo, hi, bounds = best_fit_layout(np.array([5, 4, 3, 9, 2]), 10)
    blocks = [list(zip(lo[a:b].tolist(), hi[a:b].tolist())) for a, b in zip(bounds[:-1], bounds[1:])]
    assert blocks == [[(12, 21)], [(0, 5), (5, 9)], [(9, 12), (21, 23)]]
    # Only a document longer than a block is cut: whole blocks, then its remainder placed like any other.
    lo, hi, bounds = best_fit_layout(np.array([25, 4]), 10)
    assert list(zip(lo.tolist(), hi.tolist())) == [(0, 10), (10, 20), (20, 25), (25, 29)] and bounds.tolist() == [0, 1, 2, 4]
    lo, hi, bounds = best_fit_layout(np.array([5, 4, 3]), 10, one_per_block=True)
    assert bounds.tolist() == [0, 1, 2, 3] and lo.tolist() == [0, 5, 9]
    # Realistic lengths fill the blocks almost completely, every token placed exactly once.
    lengths = np.random.default_rng(0).integers(200, 2001, 3000)
    lo, hi, bounds = best_fit_layout(lengths, 2048)
    assert sorted(zip(lo.tolist(), hi.tolist())) == list(zip(np.cumsum([0, *lengths[:-1]]).tolist(), np.cumsum(lengths).tolist()))
    assert max(int((hi[a:b] - lo[a:b]).sum()) for a, b in zip(bounds[:-1], bounds[1:])) <= 2048
    assert lengths.sum() / (2048 * (len(bounds) - 1)) > 0.95


def _tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")


def test_packed_loss_equals_unpacked_loss_and_the_fused_head_honours_the_mask(chat_tok, tiny_model_dir):
    tok = chat_tok
    model = _tiny(tiny_model_dir)
    model.resize_token_embeddings(len(tok))
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
             for q, a in (("What is two?", "A number."), ("Say hi.", "Hello there, friend."), ("Why?", "Because."))]
    packed = [pack_ids(*encode_conversation(tok, c)) for c in convs]
    T = sum(len(p) for p in packed) + 3
    starts = np.cumsum([0] + [len(p) for p in packed[:-1]])
    batch = collate([Block(np.concatenate(packed), starts)], T, "document", tok.pad_token_id)
    n_answer = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        packed_loss = plain_causal_lm_loss(model, batch, 1).item()
        alone = sum(plain_causal_lm_loss(model, collate([Block(p, np.array([0]))], len(p), "document", 0), 1).item()
                    for p in packed)
    assert n_answer == sum(int(m) for c in convs for m in encode_conversation(tok, c)[1])
    assert packed_loss == pytest.approx(alone, rel=1e-5)
    # Prompt tokens carry no loss: changing what the prompts' labels would be changes nothing.
    assert (batch["labels"][0, : len(packed[0])] != -100).sum() == sum(encode_conversation(tok, convs[0])[1])


def test_fused_loss_honours_ignored_labels(tiny_model_dir):
    model = peft_model(tiny_model_dir)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :15] = -100  # a prompt
    b = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(24).repeat(2, 1)}
    plain = speed_for(model, kernels="none").loss_fn(model, b, 16).item()
    fused = speed_for(model, kernels="cpt").loss_fn(model, b, 16).item()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                            labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum").item() / 16
    assert plain == pytest.approx(ref, rel=1e-5) and fused == pytest.approx(ref, rel=1e-5)
    speed_for(model, kernels="none")


def _chat_row(fmt: str, q: str, a: str) -> dict:
    return {"messages": {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
            "sharegpt": {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
            "alpaca": {"instruction": q, "input": "", "output": a},
            "prompt_completion": {"prompt": q, "completion": a}}[fmt]


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_chat(path: Path, n: int, fmt: str = "messages") -> Path:
    qa = ((f"What is item {i % 7}?", f"Item {i % 7} is the number {i % 7}, an answer.") for i in range(n))
    return _write_rows(path, [_chat_row(fmt, q, a) for q, a in qa])


def _sft_overrides(model, data, out, *extra):
    """`data`: a file or folder (data.path), or the data.* overrides naming another kind of source."""
    source = list(data) if isinstance(data, (list, tuple)) else [f"data.path={data}"]
    return [f"model.name_or_path={model}", "model.max_seq_length=64", *source, "adapter.r=8",
            "adapter.use_gradient_checkpointing=false", "train.per_device_train_batch_size=2",
            "train.gradient_accumulation_steps=1", "train.learning_rate=2e-2", "train.embedding_learning_rate=4e-3",
            "train.max_steps=12", f"output.output_dir={out}", "output.save_steps=0", "output.report=false",
            "eval.holdout_fraction=0.1", "eval.prompts=['What is item 3?']", "eval.max_new_tokens=8",
            f"data.cache_dir={Path(out).parent / 'cache'}", *extra]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_sft_adds_template_tokens_and_reloads_in_plain_peft_and_merges(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = _write_chat(tmp_path / "chat.jsonl", 80)
    out = tmp_path / "sft"
    assert cli_main(["sft", *_sft_overrides(tiny_model_dir, data, out)]) == 0
    rec = [json.loads(l) for l in (out / "eval.jsonl").read_text().splitlines()]
    answers = [r for r in rec if r["set"] == "answers"]
    assert answers[-1]["loss"] < 0.8 * answers[0]["loss"]  # held-out answers learned
    assert (out / "samples.jsonl").is_file()
    tok = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tok.get_vocab() and "<|im_end|>" in tok.get_vocab()
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.resize_token_embeddings(len(tok))
    peft = PeftModel.from_pretrained(base, out).eval()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    merged_dir = tmp_path / "merged"
    assert cli_main(["merge", str(out), str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    a, b = _logits(peft, ids), _logits(merged, ids)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert AutoTokenizer.from_pretrained(merged_dir).chat_template == tok.chat_template


@pytest.mark.parametrize("fmt", ["sharegpt", "alpaca", "prompt_completion"])
def test_sft_runs_on_each_format(tiny_model_dir, tmp_path, fmt):
    data = _write_chat(tmp_path / f"{fmt}.jsonl", 30, fmt)
    cfg = load_config(None, _sft_overrides(tiny_model_dir, data, tmp_path / "run", "train.max_steps=2",
                                           "train.stage=sft", "eval.prompts=[]"))
    summary = run_training(cfg)
    assert summary["step"] == 2 and summary["data"]["stage"] == "sft"


def test_continue_from_cpt_both_ways(tiny_model_dir, corpus_dir, tmp_path):
    from safetensors.torch import load_file

    from cpt.build import build_model

    cpt_out = tmp_path / "cpt"
    run_training(load_config(None, [
        f"model.name_or_path={tiny_model_dir}", "model.max_seq_length=32", f"data.path={corpus_dir}", "adapter.r=8",
        "adapter.use_gradient_checkpointing=false", "train.max_steps=3", "train.learning_rate=2e-2",
        f"output.output_dir={cpt_out}", "output.report=false", f"data.cache_dir={tmp_path / 'cache'}"]))
    data = _write_chat(tmp_path / "chat.jsonl", 30)
    # 1. The same adapter and embeddings keep training (the template's new rows start as the mean row).
    cfg = load_config(None, _sft_overrides(tiny_model_dir, data, tmp_path / "sft1", f"model.adapter_path={cpt_out}",
                                           "train.stage=sft", "train.max_steps=2"))
    bundle = build_model(cfg, device="cpu")
    saved = load_file(str(cpt_out / "adapter_model.safetensors"))
    own = dict(bundle.model.named_parameters())
    lora_b = next(k for k in saved if "lora_B" in k)
    mine = next(v for n, v in own.items() if n.replace(".default", "") == lora_b)
    assert saved[lora_b].abs().sum() > 0 and torch.equal(mine.detach().float(), saved[lora_b].float())
    emb_key = next(k for k in saved if "embed_tokens" in k)
    emb = next(v for n, v in own.items() if "embed_tokens.modules_to_save" in n).detach()
    rows = saved[emb_key].shape[0]
    assert emb.shape[0] == rows + 2 and torch.equal(emb[:rows], saved[emb_key].float())
    assert torch.allclose(emb[rows], emb[:rows].mean(0), atol=1e-5)
    assert run_training(cfg)["step"] == 2
    # 2. The merged CPT model as the base, with a fresh adapter.
    merged = tmp_path / "cpt-merged"
    assert cli_main(["merge", str(cpt_out), str(merged)]) == 0
    cfg2 = load_config(None, _sft_overrides(merged, data, tmp_path / "sft2", "train.stage=sft", "train.max_steps=2"))
    assert run_training(cfg2)["step"] == 2


def test_sft_config_errors_name_the_key(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="data.packing=concat"):
        load_config(None, ["train.stage=sft", "data.packing=concat"])
    with pytest.raises(ConfigError, match="model.adapter_path"):
        load_config(None, ["model.adapter_path=/no/such/run"])
    with pytest.raises(ConfigError, match="data.chat_format"):
        load_config(None, ["data.chat_format=jsonish"])
    assert load_config(None, ["stage=sft"]).train.stage == "sft"
    assert load_config(None, ["stage=sft"]).packing == "document"
    assert load_config(None, []).packing == "concat"


def test_the_sft_example_config_loads():
    cfg = load_config("examples/sft.yaml")
    assert cfg.train.stage == "sft" and cfg.packing == "document" and cfg.data.assistant_only_loss


def test_sft_trainer_with_trl_names_trains_on_answers(tiny_model_dir, tmp_path):
    """The Python face: SFTTrainer(model, processing_class, train_dataset, args=SFTConfig(...)) with TRL's names,
    on a datasets.Dataset of `messages` rows; packing=True means whole conversations, attention restarting."""
    from datasets import Dataset

    from cpt.api import CPTModel, SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in Path(_write_chat(tmp_path / "chat.jsonl", 40)).read_text().splitlines()]
    model, tok = CPTModel.from_pretrained(str(tiny_model_dir), max_seq_length=64)
    assert tok.chat_template is None  # a base model's tokenizer: the default template (chatml) adds two tokens
    model = CPTModel.get_peft_model(model, r=8, use_gradient_checkpointing=False,
                                    target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"])
    args = SFTConfig(max_length=64, packing=True, assistant_only_loss=True, max_steps=3, learning_rate=1e-2,
                     per_device_train_batch_size=2, gradient_accumulation_steps=1, output_dir=str(tmp_path / "o"),
                     save_steps=0, report_to="none")
    with pytest.raises(ConfigError, match="chat template adds tokens"):
        SFTTrainer(model=model, processing_class=tok, train_dataset=Dataset.from_list(rows), args=args).train()
    model, tok = CPTModel.from_pretrained(str(tiny_model_dir), max_seq_length=64)
    apply_template(tok, "chatml")
    model.resize_token_embeddings(len(tok))
    model = CPTModel.get_peft_model(model, r=8, use_gradient_checkpointing=False,
                                    target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"])
    trainer = SFTTrainer(model=model, processing_class=tok, train_dataset=Dataset.from_list(rows), args=args)
    assert trainer.config.train.stage == "sft" and trainer.config.packing == "document"
    assert trainer.config.model.max_seq_length == 64 and trainer.config.data.assistant_only_loss
    trainer.train()
    summary = json.loads((tmp_path / "o" / "run_summary.json").read_text())
    assert summary["step"] == 3 and 0 < summary["tokens"] < summary["tokens_read"]  # answers only carry loss


# ---------------------------------------------------------------------------- the same sources as CPT


def _distinct_rows(n: int, fmt: str) -> list[dict]:
    """Conversations that all differ (an off-by-some slice or resume shows), of varied lengths; `messages` rows
    alternate one turn with a system prompt and two turns."""
    rows = []
    for i in range(n):
        q, a = f"What is {i} squared?", f"{i} squared is {i * i}." + " Indeed." * (i % 4)
        row = _chat_row(fmt, q, a)
        if fmt == "messages" and i % 2:
            row["messages"] = [{"role": "system", "content": "Be brief."}, *row["messages"],
                               {"role": "user", "content": "And plus one?"},
                               {"role": "assistant", "content": f"{i * i + 1}."}]
        rows.append(row)
    return rows


def _hub_like_chat(folder: Path, rows: list[dict]) -> Path:
    """A local data set laid out as on the Hub: a `chat` configuration declared in the README over two Parquet
    files, so load_dataset(folder, "chat", split=...) reads it (a streamed percentage takes the size from the
    Parquet footers)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "data").mkdir(parents=True)
    half = len(rows) // 2
    for i, part in enumerate((rows[:half], rows[half:])):
        pq.write_table(pa.Table.from_pylist(part), folder / "data" / f"{i:03d}.parquet")
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: chat\n  data_files:\n  - split: train\n"
                                      "    path: data/*\n---\n")
    return folder


def _sft_data(tmp_path, tok, source: dict, streaming: bool):
    # 0.15 holds out conversations 7, 14 and 15 of 20, streamed or not (cpt.data.holdout_indices)
    cfg = make_cfg(tmp_path, [source], train__stage="sft", model__max_seq_length=64, data__streaming=streaming,
                   data__shuffle=False, eval__holdout_fraction=0.15)
    return build_data(cfg, tok)


def _assert_reads_like_the_jsonl(tok, tmp_path, source: dict, rows: list[dict], fmt: str, streaming: bool):
    """`source` gives the conversations, token ids, answer masks, held-out conversations and training blocks that
    the same rows in a JSON lines file give."""
    ref = {"path": str(_write_rows(tmp_path / "ref" / f"{fmt}.jsonl", rows))}
    convs = list(iter_conversations(SourceConfig(**source), fmt, streaming=streaming))
    assert [c.messages for c in convs] == [to_messages(r, fmt) for r in rows]
    assert [c.index for c in convs] == list(range(len(rows)))
    got, want = _sft_data(tmp_path, tok, source, streaming), _sft_data(tmp_path, tok, ref, streaming)
    assert got.stats["sources"][0]["holdout_documents"] == want.stats["sources"][0]["holdout_documents"] > 0
    assert [h.tolist() for h in got.holdout_conversations] == [h.tolist() for h in want.holdout_conversations]
    n = want.train.blocks_per_epoch or len(rows)
    a, b = epoch_tokens(got.train, 2, n), epoch_tokens(want.train, 2, n)  # an epoch and more
    for x, y in zip(a, b):
        for k in y:
            assert torch.equal(x[k], y[k]), k
    labels = torch.cat([x["labels"] for x in a])
    assert (labels == -100).any() and (labels != -100).any()  # prompts masked, answers trained
    # The trained tokens are the answers, each ended by the template's end-of-turn token.
    trained = tok.decode(labels[labels != -100].tolist())
    assert "squared is" in trained and "What is" not in trained and "<|im_end|>" in trained


@pytest.mark.parametrize("streaming", [False, True])
def test_sft_reads_a_datasets_folder_by_name_with_a_split_slice(chat_tok, tmp_path, streaming):
    """A `dataset:` source (a local folder with a README declaring configurations, as on the Hub) with a config
    name and split=train[:50%], materialised or streamed, reads exactly like its first half as a JSON lines file."""
    rows = _distinct_rows(40, "messages")
    folder = _hub_like_chat(tmp_path / "chats", rows)
    source = {"dataset": str(folder), "name": "chat", "split": "train[:50%]"}
    _assert_reads_like_the_jsonl(chat_tok, tmp_path, source, rows[:20], "messages", streaming)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("fmt", ["sharegpt", "alpaca"])
def test_sft_reads_a_save_to_disk_folder(chat_tok, tmp_path, fmt, streaming):
    """A save_to_disk DatasetDict in ShareGPT or alpaca format: its split and slice read like the same rows in
    JSON lines."""
    import datasets

    rows = _distinct_rows(30, fmt)
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:24]),
                          "test": datasets.Dataset.from_list(rows[24:])}).save_to_disk(str(folder))
    source = {"dataset": str(folder), "split": "train[2:22]"}
    _assert_reads_like_the_jsonl(chat_tok, tmp_path, source, rows[2:22], fmt, streaming)


@pytest.mark.parametrize("cut", [3, 14])
def test_streamed_sft_resumes_at_the_right_conversation(chat_tok, tmp_path, cut):
    folder = _hub_like_chat(tmp_path / "chats", _distinct_rows(40, "messages"))
    source = {"dataset": str(folder), "name": "chat", "split": "train[:50%]"}

    def rows(stream, n):
        return [r.tolist() for b in epoch_tokens(stream, 2, n) for r in (b["input_ids"], b["labels"])]

    ref = rows(_sft_data(tmp_path, chat_tok, source, True).train, 20)  # crosses into the second epoch
    first = _sft_data(tmp_path, chat_tok, source, True).train
    it = first.batches(2)
    for _ in range(cut):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    again = _sft_data(tmp_path, chat_tok, source, True).train
    again.load_state_dict(state)
    assert rows(again, 20 - cut) == ref[2 * cut:]


def test_sft_trains_on_a_streamed_dataset_and_resumes_where_it_stopped(tiny_model_dir, tmp_path):
    """`cpt sft` on a streamed `dataset:` split; stopped at step 3 and resumed, steps 4-6 see the same
    conversations and give the same losses and adapter as an uninterrupted run."""
    from safetensors.torch import load_file

    folder = _hub_like_chat(tmp_path / "chats", _distinct_rows(40, "messages"))
    data = [f"data.dataset={folder}", "data.name=chat", "data.split=train[:50%]", "data.streaming=true"]

    def args(out, *extra):
        return ["sft", *_sft_overrides(tiny_model_dir, data, tmp_path / out, "eval.prompts=[]",
                                       "train.lr_scheduler_type=constant", "output.logging_steps=1", *extra)]

    def losses(out):
        rows = map(json.loads, (tmp_path / out / "metrics.jsonl").read_text().splitlines())
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    assert cli_main(args("whole", "train.max_steps=6")) == 0
    assert cli_main(args("cut", "train.max_steps=3", "output.save_steps=3")) == 0
    assert json.loads((tmp_path / "cut" / "checkpoint-3" / "trainer_state.json").read_text())["data"]["streams"]
    assert cli_main(args("cut", "train.max_steps=6", "output.save_steps=3")) == 0  # resumes at step 3
    whole, cut = losses("whole"), losses("cut")
    assert sorted(cut) == sorted(whole) == [1, 2, 3, 4, 5, 6]
    assert [cut[s] for s in (4, 5, 6)] == [whole[s] for s in (4, 5, 6)]
    assert len(set(whole.values())) == 6  # different conversations each step: a restarted stream would show
    a, b = load_file(str(tmp_path / "whole" / "adapter_model.safetensors")), \
        load_file(str(tmp_path / "cut" / "adapter_model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sft_learns_new_tokens_from_the_training_conversations(tiny_model_dir, tmp_path):
    """vocab.add_tokens under train.stage=sft learns from the conversations' message contents, never from the
    held-out ones; the run trains with the larger vocabulary and the template's tokens, and saves both."""
    from test_vocab import domain_docs
    from transformers import AutoTokenizer

    from cpt.data import holdout_indices, training_texts
    from cpt.model.vocab import read_extension

    docs = domain_docs(80, seed=3)
    rows = [{"messages": [{"role": "user", "content": d[:30]}, {"role": "assistant", "content": d[30:]}]} for d in docs]
    data = _write_rows(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "run"
    cfg = load_config(None, _sft_overrides(tiny_model_dir, data, out, "train.stage=sft", "train.max_steps=2",
                                           "eval.prompts=[]", "eval.holdout_fraction=0.2", "vocab.add_tokens=30",
                                           "model.max_seq_length=256"))
    contents = [f"{d[:30]}\n{d[30:]}" for d in docs]
    held = [contents[i] for i in holdout_indices(0.2, cfg.eval.holdout_max_docs, len(contents))]
    texts = list(training_texts(cfg))
    assert held and not set(held) & set(texts) and sorted(texts + held) == sorted(contents)

    assert run_training(cfg)["step"] == 2
    ext = read_extension(out / "tokenizer")
    tok = AutoTokenizer.from_pretrained(out)
    assert len(ext["pieces"]) == 30 and len(tok) >= ext["size"]
    assert "<|im_start|>" in tok.get_vocab() and tok(docs[0])["input_ids"] != []
    assert max(tok(docs[0], add_special_tokens=False)["input_ids"]) >= ext["first_id"]  # the text uses new tokens


def test_held_out_conversations_cut_before_their_answer_are_not_scored(chat_tok, tiny_model_dir, tmp_path):
    """A prompt longer than model.max_seq_length leaves a held-out conversation nothing to score: it is dropped
    from the held-out answers with a warning that says what to raise, and the run goes on."""
    rows = [_chat_row("messages", ("a long question " * 12 if i % 2 else "short?"), f"answer {i}.") for i in range(40)]
    data = _write_rows(tmp_path / "chat.jsonl", rows)
    cfg = load_config(None, _sft_overrides(tiny_model_dir, data, tmp_path / "run", "train.stage=sft",
                                           "model.max_seq_length=32", "eval.holdout_fraction=0.5", "eval.prompts=[]"))
    with pytest.warns(DataWarning, match=r"held-out conversations lost every answer token to the cut at "
                                         r"model.max_seq_length=32: they are not scored"):
        bundle = build_data(cfg, chat_tok)
    assert bundle.holdout_conversations and all(has_answer(c) for c in bundle.holdout_conversations)
    long_only = _write_rows(tmp_path / "long.jsonl", [r for i, r in enumerate(rows) if i % 2])
    cfg = load_config(None, _sft_overrides(tiny_model_dir, long_only, tmp_path / "long_run", "train.stage=sft",
                                           "model.max_seq_length=32", "eval.holdout_fraction=0.5", "eval.prompts=[]",
                                           "train.max_steps=2"))
    with pytest.warns(DataWarning) as rec:
        assert run_training(cfg)["step"] == 2
    said = " | ".join(str(w.message) for w in rec)
    assert "20 conversations longer than model.max_seq_length=32 tokens were cut there; 20 of them lost every " \
           "answer token and teach nothing (raise model.max_seq_length)" in said, said
    assert "nothing is left to score the answers on: raise model.max_seq_length" in said
