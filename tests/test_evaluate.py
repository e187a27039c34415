"""Evaluation metrics against hand computations, samples, the forgetting alarm and `cpt eval`.

    python -m pytest tests/test_evaluate.py -q
"""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cpt.config import Config, EvalConfig, EvalSetConfig, ModelConfig
from cpt.evaluate import (EvalSet, Evaluator, evaluate_texts, format_summary, generate_samples,
                          summarize_records)

CHARS = list("abcdefghijklmnopqrstuvwxyz .éö")


def char_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    """One token per character, so the predicted tokens of a text can be counted by hand."""
    from tokenizers import Tokenizer, models, processors

    vocab = {"<eos>": 0, "<pad>": 1, "<s>": 2, "<unk>": 3}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                   bos_token="<s>" if add_bos else None, unk_token="<unk>")


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    # Make the random model decisively non-uniform, so a wrongly counted token changes the sum.
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model.eval()


TEXTS = ["abc", "héllo wörld", "the quick brown fox jumps over the lazy dog.", "zz"]


def test_char_tokenizer_is_one_token_per_char():
    tok = char_tokenizer()
    for t in TEXTS:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == len(t)


@pytest.mark.parametrize("max_seq_length,batch_size", [(64, 1), (64, 3), (4, 2), (2, 5)])
def test_bits_per_byte_uniform_model_by_hand(max_seq_length, batch_size):
    """A model with a zero output layer predicts uniformly: every predicted token costs ln(V) nats.
    Predicted tokens = every character + one EOS per document; bytes = UTF-8 bytes (é and ö are 2)."""
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    V = len(tok)
    n_pred = (3 + 1) + (11 + 1) + (44 + 1) + (2 + 1)
    n_bytes = 3 + 13 + 44 + 2
    m = evaluate_texts(model, tok, TEXTS, max_seq_length=max_seq_length, batch_size=batch_size)
    assert m["tokens"] == n_pred
    assert m["bytes"] == n_bytes
    assert m["documents"] == 4
    assert m["loss"] == pytest.approx(math.log(V), rel=1e-6)
    assert m["perplexity"] == pytest.approx(V, rel=1e-5)
    assert m["bits_per_byte"] == pytest.approx(n_pred * math.log2(V) / n_bytes, rel=1e-6)


def _nll(model, ids: list[int]) -> float:
    """Summed NLL of ids[1:] given the prefix, one unpadded forward pass."""
    x = torch.tensor([ids])
    logp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)
    return -sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1))


def test_bits_per_byte_random_model_by_hand_with_windows():
    """Hand-written windows for max_seq_length 4: 'abcdefg' -> [E a b c] [c d e f] [f g E]."""
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    E = tok.eos_token_id
    t = {c: tok.convert_tokens_to_ids(c) for c in "abcdefgxy"}
    texts = ["abcdefg", "xy"]
    windows = [[E, t["a"], t["b"], t["c"]], [t["c"], t["d"], t["e"], t["f"]], [t["f"], t["g"], E],
               [E, t["x"], t["y"], E]]
    nll = sum(_nll(model, w) for w in windows)
    m = evaluate_texts(model, tok, texts, max_seq_length=4, batch_size=3)
    assert m["tokens"] == 3 + 3 + 2 + 3
    assert m["bytes"] == 9
    assert m["loss"] == pytest.approx(nll / 11, rel=1e-5)
    assert m["bits_per_byte"] == pytest.approx(nll / math.log(2) / 9, rel=1e-5)


def test_padding_never_counts_and_batching_does_not_change_the_result():
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    E = tok.eos_token_id
    expected = sum(_nll(model, [E, *tok(t, add_special_tokens=False)["input_ids"], E]) for t in TEXTS)
    one = evaluate_texts(model, tok, TEXTS, max_seq_length=64, batch_size=1)
    many = evaluate_texts(model, tok, TEXTS, max_seq_length=64, batch_size=4)  # lengths 5..46 padded together
    for m in (one, many):
        assert m["loss"] * m["tokens"] == pytest.approx(expected, rel=1e-5)
    assert many["tokens"] == one["tokens"] == 64


def test_tokenizer_bos_is_the_context():
    """A tokenizer that adds <s> by default is scored as <s> + text + EOS: <s> is context, not EOS."""
    tok = char_tokenizer(add_bos=True)
    model = tiny_llama(len(tok))
    ids = tok("abc", add_special_tokens=False)["input_ids"]
    expected = _nll(model, [tok.bos_token_id, *ids, tok.eos_token_id])
    m = evaluate_texts(model, tok, ["abc"], max_seq_length=64, batch_size=1)
    assert m["tokens"] == 4
    assert m["loss"] * 4 == pytest.approx(expected, rel=1e-5)


def test_max_tokens_takes_whole_documents_and_empty_documents_are_skipped():
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    m = evaluate_texts(model, tok, ["abc", "", "héllo wörld", "zz"], max_seq_length=64, batch_size=2, max_tokens=5)
    # 'abc' scores 4 tokens (< 5), so 'héllo wörld' is scored in full; 'zz' is never reached.
    assert (m["documents"], m["tokens"], m["bytes"]) == (2, 4 + 12, 3 + 13)
    with pytest.raises(ValueError, match="empty"):
        evaluate_texts(model, tok, ["", ""], max_seq_length=8, batch_size=1)


def test_training_mode_is_restored():
    tok = char_tokenizer()
    model = tiny_llama(len(tok)).train()
    evaluate_texts(model, tok, ["abc"], max_seq_length=8, batch_size=1)
    assert model.training
    generate_samples(model, tok, ["ab"], max_new_tokens=3)
    assert model.training
    model.eval()
    evaluate_texts(model, tok, ["abc"], max_seq_length=8, batch_size=1)
    assert not model.training


def test_generate_samples_is_greedy_and_deterministic():
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    # The model's own generation config asks for sampling and penalties; samples must ignore all of it.
    model.generation_config.do_sample = True
    model.generation_config.temperature = 5.0
    model.generation_config.repetition_penalty = 3.0
    model.generation_config.no_repeat_ngram_size = 2
    a = generate_samples(model, tok, ["the ", "ab"], max_new_tokens=8)
    assert a == generate_samples(model, tok, ["the ", "ab"], max_new_tokens=8)
    assert [s["prompt"] for s in a] == ["the ", "ab"]
    for sample in a:
        ids = tok(sample["prompt"])["input_ids"]
        new: list[int] = []
        for _ in range(8):  # greedy by hand: the argmax of the logits, token after token
            nxt = model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax().item()
            new.append(nxt)
            if nxt == tok.eos_token_id:
                break
        assert sample["new_tokens"] == len(new)
        assert sample["completion"] == tok.decode(new, skip_special_tokens=True)
    assert len(set(a[0]["completion"])) < len(a[0]["completion"])  # repeats: no penalty was applied


def _cfg(limit: float = 0.05, prompts: list[str] | None = None) -> Config:
    return Config(model=ModelConfig(max_seq_length=32),
                  eval=EvalConfig(per_device_eval_batch_size=2, forgetting_limit=limit, prompts=prompts or [],
                                  max_new_tokens=4))


def test_forgetting_alarm_fires_when_general_degrades(tmp_path, caplog):
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    sets = [EvalSet("domain", ["abc abc abc"]), EvalSet("general_web", ["the quick brown fox."])]
    ev = Evaluator(_cfg(prompts=["ab"]), tok, sets, tmp_path)
    base = ev.run(model, 0)
    assert not base["general_web"]["forgetting_alarm"]

    same = ev.run(model, 5)  # unchanged model: no alarm
    assert not same["general_web"]["forgetting_alarm"]
    assert same["general_web"]["bits_per_byte_change"] == pytest.approx(0.0, abs=1e-9)

    torch.manual_seed(1)
    with torch.no_grad():  # a different, sharper random output layer: much worse on both sets
        model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight) * 3)
    with caplog.at_level(logging.WARNING, logger="cpt"):
        worse = ev.run(model, 10)
    assert worse["general_web"]["bits_per_byte"] > base["general_web"]["bits_per_byte"] * 1.05
    assert worse["general_web"]["forgetting_alarm"]
    assert not worse["domain"]["forgetting_alarm"]  # only 'general*' sets feed the alarm
    assert any("forgetting alarm" in r.message and "general_web" in r.message for r in caplog.records)

    lines = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["set"]) for r in lines] == [(s, n) for s in (0, 5, 10) for n in ("domain", "general_web")]
    assert lines[-1]["forgetting_alarm"] is True
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 5, 10] and samples[0]["prompt"] == "ab"

    rows = {r["set"]: r for r in ev.summary_table()}
    assert rows["general_web"]["step_before"] == 0 and rows["general_web"]["step_after"] == 10
    assert rows["general_web"]["forgetting_alarm"] and not rows["domain"]["forgetting_alarm"]
    assert rows["general_web"]["bits_per_byte_change"] > 0.05
    text = format_summary(ev.summary_table())
    assert "general_web" in text and "FORGETTING" in text


def test_an_evaluation_says_what_it_scores_and_how_long_it_took(tmp_path, caplog):
    # A held-out set on a CPU can take minutes; the log says so before and after (not silence).
    tok = char_tokenizer()
    ev = Evaluator(_cfg(), tok, [EvalSet("domain", ["abc abc abc", "héllo"])], tmp_path)
    with caplog.at_level(logging.INFO, logger="cpt"):
        result = ev.run(tiny_llama(len(tok)), 7)
    lines = [r.getMessage() for r in caplog.records]
    assert "evaluating at step 7: domain (2 documents, 17 bytes)" in lines
    done = next(x for x in lines if x.startswith("evaluated in "))
    assert f"domain {result['domain']['bits_per_byte']:.4f} bits/byte" in done


def test_alarm_respects_the_limit(tmp_path):
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    ev = Evaluator(_cfg(limit=1000.0), tok, [EvalSet("general", ["the quick brown fox."])], tmp_path)
    ev.run(model, 0)
    with torch.no_grad():
        model.lm_head.weight.mul_(3)
    r = ev.run(model, 10)["general"]
    assert r["bits_per_byte_change"] > 0 and not r["forgetting_alarm"]


def test_evaluator_keeps_baseline_across_restart_and_replaces_repeated_steps(tmp_path):
    tok = char_tokenizer()
    model = tiny_llama(len(tok))
    sets = [EvalSet("general", ["the quick brown fox."])]
    ev = Evaluator(_cfg(), tok, sets, tmp_path)
    ev.run(model, 0)
    ev.run(model, 20)
    with torch.no_grad():
        model.lm_head.weight.mul_(3)
    resumed = Evaluator(_cfg(), tok, sets, tmp_path)  # resumed from a checkpoint at step 10
    r = resumed.run(model, 20)["general"]
    assert r["forgetting_alarm"]  # compared with the step-0 baseline read back from eval.jsonl
    steps = [json.loads(x)["step"] for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert steps == [0, 20]


def test_summarize_records_handles_partial_records():
    rows = summarize_records([{"step": 0, "set": "a", "bits_per_byte": 2.0}, {"step": 3, "set": "a"},
                              {"set": "no step"}, {"step": 1, "set": "b", "loss": 1.0}])
    a, b = rows
    assert a["bits_per_byte_before"] == 2.0 and a["bits_per_byte_after"] is None and a["bits_per_byte_change"] is None
    # Evaluated only after training (eval_at_start: false): no baseline, not a "before" equal to the "after".
    assert b["step_before"] is None and b["step_after"] == 1 and b["loss_before"] is None and b["loss_after"] == 1.0
    assert b["bits_per_byte_change"] is None
    assert "-" in format_summary(rows) and "None" not in format_summary(rows)


# ---------------------------------------------------------------------------- eval sets and `cpt eval`


def test_load_eval_sets_adds_holdout_as_domain(tmp_path):
    from cpt.config import ConfigError
    from cpt.evaluate import load_eval_sets

    (tmp_path / "general.jsonl").write_text('{"body": "first general"}\n{"body": "  "}\n{"body": "second"}\n')
    cfg = Config(eval=EvalConfig(sets=[EvalSetConfig(name="general", path=str(tmp_path / "general.jsonl"),
                                                     text_field="body")]))
    from cpt.data import DataWarning

    with pytest.warns(DataWarning, match="1 empty"):  # the blank row is skipped, and said so
        sets = load_eval_sets(cfg, ["held out one", "held out two"])
    assert [(s.name, s.texts) for s in sets] == [("general", ["first general", "second"]),
                                                 ("domain", ["held out one", "held out two"])]
    with pytest.warns(DataWarning):
        assert [s.name for s in load_eval_sets(cfg, [])] == ["general"]

    (tmp_path / "d.txt").write_text("my domain text")
    cfg.eval.sets.append(EvalSetConfig(name="domain", path=str(tmp_path / "d.txt")))
    with pytest.warns(DataWarning):
        sets = load_eval_sets(cfg, ["held out one"])  # a named domain set wins over the automatic slice
    assert [(s.name, s.texts) for s in sets] == [("general", ["first general", "second"]), ("domain", ["my domain text"])]

    cfg.eval.sets.append(EvalSetConfig(name="domain", path=str(tmp_path / "d.txt")))
    with pytest.raises(ConfigError, match=r"eval.sets\[2\] \(domain\).*used by an earlier set"), \
            pytest.warns(DataWarning):
        load_eval_sets(cfg, [])
    cfg.eval.sets = [EvalSetConfig(name="general", path=str(tmp_path / "general.jsonl"), max_docs=1,
                                   text_field="body")]
    assert load_eval_sets(cfg, [])[0].texts == ["first general"]


def _run_eval_main(argv: list[str], capsys) -> tuple[int, str, str]:
    from cpt.evaluate import eval_main

    rc = eval_main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_eval_main_on_a_saved_model(tmp_path, tiny_model_dir, tiny_tied_model_dir, corpus, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (tmp_path / "domain.txt").write_text(corpus[0])
    (tmp_path / "web.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus[1:4]))
    data = ["--data", str(tmp_path / "domain.txt"), "--data", f"general={tmp_path / 'web.jsonl'}"]
    rc, out, err = _run_eval_main([str(tiny_model_dir), *data, "--max-seq-length", "64", "--device", "cpu",
                                   "--json"], capsys)
    assert rc == 0, err
    res = json.loads(out)["sets"]
    assert set(res) == {"domain", "general"}

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    direct = evaluate_texts(model, tok, corpus[1:4], max_seq_length=64, batch_size=4)
    assert res["general"]["tokens"] == direct["tokens"] and res["general"]["bytes"] == direct["bytes"]
    assert res["general"]["bits_per_byte"] == pytest.approx(direct["bits_per_byte"], rel=1e-5)

    rc, out, err = _run_eval_main([str(tiny_model_dir), *data, "--compare", str(tiny_tied_model_dir),
                                   "--max-seq-length", "64", "--device", "cpu", "--json"], capsys)
    assert rc == 0, err
    both = json.loads(out)
    rows = {r["set"]: r for r in both["summary"]}
    g = rows["general"]
    assert g["bits_per_byte_after"] == pytest.approx(res["general"]["bits_per_byte"], rel=1e-6)
    assert g["bits_per_byte_before"] == pytest.approx(both["base_sets"]["general"]["bits_per_byte"], rel=1e-6)
    assert g["bits_per_byte_change"] == pytest.approx(g["bits_per_byte_after"] / g["bits_per_byte_before"] - 1, rel=1e-6)

    rc, out, _ = _run_eval_main([str(tiny_model_dir), *data, "--compare", str(tiny_model_dir), "--max-seq-length",
                                 "64", "--device", "cpu"], capsys)
    assert rc == 0 and "+0.00%" in out and "FORGETTING" not in out and "general" in out


def test_eval_main_errors(tmp_path, tiny_model_dir, capsys):
    rc, _, err = _run_eval_main([str(tiny_model_dir), "--device", "cpu"], capsys)
    assert rc == 2 and "--data" in err
    (tmp_path / "a.txt").write_text("some text")
    rc, _, err = _run_eval_main([str(tiny_model_dir), "--data", str(tmp_path / "a.txt"), "--max-seq-length", "100000",
                                 "--device", "cpu"], capsys)
    assert rc == 2 and "max_position_embeddings" in err
    rc, _, err = _run_eval_main([str(tiny_model_dir), "--data", f"general={tmp_path / 'missing.jsonl'}"], capsys)
    assert rc == 2 and "no file or folder matches" in err and "missing.jsonl" in err
