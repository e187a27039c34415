"""`cpt inspect`: verdicts on unlabeled, instruction, chat and classification data; stats; budget.

    .venv/bin/python -m pytest tests/test_data_inspect.py -q
"""
from __future__ import annotations

import io
import json
import random

import pytest
from rich.console import Console

from cpt.config import config_from_dict
from cpt.data.inspect import inspect_main, inspect_source, labeled_warning, render_inspection
from test_data import write_jsonl


@pytest.fixture()
def unlabeled(tmp_path, corpus):
    rows = [{"text": t, "id": f"<urn:{i}>", "url": f"https://x.org/{i}", "language": "en",
             "language_score": 0.9, "int_score": i % 5, "token_count": len(t.split())} for i, t in enumerate(corpus)]
    rows += [{"text": "   ", "id": "e", "url": "u", "language": "en", "language_score": 0.1, "int_score": 0, "token_count": 0},
             dict(rows[0])]
    return write_jsonl(tmp_path / "fineweb.jsonl", rows)


def test_unlabeled_verdict_and_stats(unlabeled, corpus, tokenizer):
    r = inspect_source(str(unlabeled), tokenizer=tokenizer)
    assert r["verdict"]["kind"] == "unlabeled"
    assert any("metadata fields" in e and "url" in e for e in r["verdict"]["evidence"])
    assert r["rows"] == len(corpus) + 2 and r["fully_read"]
    assert r["empty_rows"] == 1 and r["duplicate_rows"] == 1
    assert r["fields"]["int_score"]["types"] == {"int": len(corpus) + 2}
    chars = sorted(len(t) for t in corpus + [corpus[0]])
    assert r["text_chars"]["min"] == chars[0] and r["text_chars"]["max"] == chars[-1]
    assert r["text_tokens"]["max"] == max(len(tokenizer(t)["input_ids"]) for t in corpus)
    assert labeled_warning(r["verdict"]) is None


def test_instruction_chat_classification_verdicts(tmp_path, corpus):
    rng = random.Random(0)
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": f"Summarise: {t}", "input": "", "output": t[:40]}
                                                     for t in corpus])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": t[:30]},
                                                               {"role": "assistant", "content": t}]} for t in corpus])
    cls = write_jsonl(tmp_path / "cls.jsonl", [{"text": t, "label": rng.choice(["pos", "neg"])} for t in corpus])
    a = inspect_source(str(alpaca))
    assert a["verdict"]["kind"] == "labeled_pairs" and "'instruction'" in a["verdict"]["evidence"][0]
    assert not a["text_field_found"] and a["text_field_candidates"][0] == "instruction"
    c = inspect_source(str(chat))
    assert c["verdict"]["kind"] == "labeled_pairs" and "assistant, user" in c["verdict"]["evidence"][0]
    k = inspect_source(str(cls))
    assert k["verdict"]["kind"] == "classification" and "2 distinct" in k["verdict"]["evidence"][0]
    for v in (a, c, k):
        w = labeled_warning(v["verdict"])
        assert w and v["verdict"]["evidence"][0] in w


def test_text_folder_and_datasets_object(corpus_dir, corpus):
    import datasets

    r = inspect_source(str(corpus_dir))
    assert r["verdict"]["kind"] == "unlabeled" and r["rows"] == len(corpus)
    ds = datasets.Dataset.from_dict({"text": corpus, "label": [i % 3 for i in range(len(corpus))]})
    assert inspect_source(ds)["verdict"]["kind"] == "classification"


def test_budget(unlabeled, corpus, tokenizer):
    cfg = config_from_dict({"model": {"max_seq_length": 64}, "train": {"per_device_train_batch_size": 2,
                                                                        "gradient_accumulation_steps": 4, "max_steps": 10}})
    r = inspect_source(str(unlabeled), tokenizer=tokenizer, cfg=cfg)
    b = r["budget"]
    docs = corpus + [corpus[0]]
    want = sum(len(tokenizer(t)["input_ids"]) + 1 for t in docs)  # + EOS each
    assert b["data_tokens"] == want and b["data_tokens_exact"]
    assert b["tokens_per_step"] == 2 * 4 * 64
    assert b["steps_per_epoch"] == pytest.approx(want / 512)
    assert b["epochs_for_max_steps"] == pytest.approx(10 * 512 / want)


def test_sampled_rows_extrapolate(unlabeled, corpus, tokenizer):
    cfg = config_from_dict({"model": {"max_seq_length": 64}})
    r = inspect_source(str(unlabeled), tokenizer=tokenizer, cfg=cfg, sample_rows=10)
    assert not r["fully_read"] and r["rows"] == len(corpus) + 2 and r["sampled_rows"] == 10
    assert not r["budget"]["data_tokens_exact"] and r["budget"]["data_tokens"] > 0


def test_cli_json_and_render(unlabeled, tmp_path, capsys):
    assert inspect_main([str(unlabeled), "--json", "--max-rows", "50"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"]["kind"] == "unlabeled" and out["sampled_rows"] == 50
    buf = io.StringIO()
    render_inspection(out, Console(file=buf, width=120))
    text = buf.getvalue()
    assert "unlabeled" in text and "int_score" in text
    assert inspect_main([str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_build_data_carries_the_verdict(tmp_path, corpus, tokenizer, unlabeled, monkeypatch):
    from cpt.data import build_data
    from test_data import make_cfg

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Q: {t[:20]}", "response": t} for t in corpus])
    mixed = build_data(make_cfg(tmp_path, [{"path": str(unlabeled)}, {"path": str(pairs), "text_field": "response"}]),
                       tokenizer)
    v = mixed.stats["verdict"]
    assert v["kind"] == "labeled_pairs" and v["source"] == str(pairs)
    assert "'prompt'" in labeled_warning(v)
    assert mixed.stats["sources"][0]["verdict"]["kind"] == "unlabeled"
    import cpt.data.sources as sources

    monkeypatch.setattr(sources, "_iter_jsonl", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))
    again = build_data(make_cfg(tmp_path, [{"path": str(pairs), "text_field": "response"}]), tokenizer)
    assert again.stats["verdict"]["kind"] == "labeled_pairs"  # from the cache entry: nothing re-read
