"""Vocabulary extension on tiny models: old text keeps its ids, new rows start from their pieces, tied stays
tied, and a run trained on the larger vocabulary saves, reloads in plain PEFT, merges and generates with the
same logits; the commands that face it (`cpt vocab extend`, `cpt inspect --vocab-add`, vocab.add_tokens)."""
import json
import random

import pytest
import torch

from conftest import gguf_style

from cpt.cli import main as cli_main
from cpt.config import ConfigError, load_config
from cpt.data.inspect import script_of, token_rates
from cpt.model.vocab import check_unchanged, extend_model, extended_tokenizer, learn_extension, read_extension

HAN = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好"
CYRILLIC = ["суд", "решение", "закон", "договор", "сторона", "право", "статья", "срок", "жалоба", "судья"]
OLD_TEXT = ["the court held that the statute applies to every contract",
            "def f(x):\n    return x + 1  # the judge shall give reasons\n\tprint(f'{x!r}')",
            "Patients received the dose twice daily; blood pressure was 120/80 mmHg.",
            "  spaces   and\n\nnewlines, UPPER case, numbers 1234567 and symbols <>[]{}|~`"]


def domain_docs(n=120, seed=0):
    """Synthetic text in the scripts the fixture tokenizer never saw: Chinese phrases and Russian words,
    repeated enough for pairs to recur, with some English mixed in."""
    rng = random.Random(seed)
    phrases = ["".join(rng.choice(HAN) for _ in range(rng.randint(2, 4))) for _ in range(25)]
    docs = []
    for _ in range(n):
        parts = [rng.choice(phrases) for _ in range(rng.randint(5, 15))]
        docs.append("，".join(parts) + "。 " + " ".join(rng.choice(CYRILLIC) for _ in range(8)) + " the court.")
    return docs


@pytest.fixture(scope="module")
def extended(tokenizer):
    ext = learn_extension(tokenizer, domain_docs(), 150)
    return ext, extended_tokenizer(tokenizer, ext)


def test_old_text_keeps_its_ids_and_new_text_gets_fewer_tokens(tokenizer, extended):
    ext, new = extended
    assert len(ext.tokens) == 150 and len(new) == len(tokenizer) + 150
    assert check_unchanged(tokenizer, new, OLD_TEXT) is None
    assert check_unchanged(tokenizer, new, domain_docs(40, seed=1)) is not None  # the domain does change
    held_out = domain_docs(40, seed=1)
    before, after = token_rates(tokenizer, held_out), token_rates(new, held_out)
    assert after["tokens"] < before["tokens"] / 1.5
    assert after["scripts"]["Han"]["tokens_per_char"] < before["scripts"]["Han"]["tokens_per_char"] / 1.5
    for doc in held_out[:5]:  # the new tokens decode to the same text
        assert new.decode(new(doc, add_special_tokens=False)["input_ids"]) == doc


def test_new_tokens_are_their_pieces_concatenated(tokenizer, extended):
    ext, new = extended
    old_bpe = tokenizer.backend_tokenizer.model
    for i, (token, pieces) in enumerate(zip(ext.tokens, ext.pieces)):
        assert [t.id for t in old_bpe.tokenize(token)] == pieces  # the old tokenizer's split of its bytes
        assert len(pieces) >= 2 and max(pieces) < ext.first_id
        assert new.convert_tokens_to_ids(token) == ext.first_id + i


def test_merging_ascii_is_opt_in(tokenizer):
    english = ["zyzzyva quokka " * 3 + "the court held"] * 30
    assert learn_extension(tokenizer, english + domain_docs(20), 50).tokens  # the domain still gets tokens
    protected = learn_extension(tokenizer, english, 50, min_frequency=2)
    assert protected.tokens == []  # nothing but ASCII to merge
    free = learn_extension(tokenizer, english, 5, protect_ascii=False)
    new = extended_tokenizer(tokenizer, free)
    assert check_unchanged(tokenizer, new, english) is not None


def test_non_byte_level_tokenizers_are_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a small corpus of words"] * 5, trainers.WordPieceTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    with pytest.raises(ConfigError, match="byte-level BPE only"):
        learn_extension(fast, ["text"], 10)


def test_byte_level_tokenizers_with_inert_byte_fallback_extend_the_same(tokenizer, extended):
    """transformers 5.17 loads a GGUF's byte-level tokenizer with byte fallback on; with no <0xNN> tokens to
    fall back to it tokenises as before, so it extends to the same tokens. With them, it is refused."""
    gguf = gguf_style(tokenizer)
    assert gguf(OLD_TEXT + domain_docs(5))["input_ids"] == tokenizer(OLD_TEXT + domain_docs(5))["input_ids"]
    ext = learn_extension(gguf, domain_docs(), 150)
    assert ext.tokens == extended[0].tokens and ext.pieces == extended[0].pieces
    new = extended_tokenizer(gguf, ext)
    assert check_unchanged(gguf, new, OLD_TEXT) is None
    doc = domain_docs(1, seed=3)[0]
    assert new(doc)["input_ids"] == extended[1](doc)["input_ids"] and new.decode(new(doc)["input_ids"]) == doc
    with pytest.raises(ConfigError, match="byte fallback"):
        learn_extension(gguf_style(tokenizer, byte_tokens=True), ["text"], 10)


def _tiny(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_tied_model_dir"])
def test_new_rows_start_from_their_pieces_and_tied_stays_tied(request, extended, fixture):
    ext, new = extended
    model = _tiny(request.getfixturevalue(fixture))
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    extend_model(model, {"first_id": ext.first_id, "size": ext.size, "pieces": ext.pieces}, "subword")
    w_in, w_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert w_in.shape[0] == len(new) and w_out.shape[0] == len(new)
    assert torch.equal(w_in[:ext.first_id], old_in)  # old rows untouched
    for i, pieces in enumerate(ext.pieces):
        assert torch.allclose(w_in[ext.first_id + i], old_in[pieces].mean(0), atol=1e-6)
        assert torch.allclose(w_out[ext.first_id + i], old_out[pieces].mean(0), atol=1e-6)
    tied = fixture == "tiny_tied_model_dir"
    assert (w_in.data_ptr() == w_out.data_ptr()) == tied
    if not tied:  # the two sides really differ, so each got its own pieces' mean
        assert not torch.allclose(w_in[ext.first_id], w_out[ext.first_id])


def test_mean_init_is_the_transformers_default_and_unknown_init_is_refused(tiny_model_dir, extended):
    ext, _ = extended
    model = _tiny(tiny_model_dir)
    spec = {"first_id": ext.first_id, "size": ext.size, "pieces": ext.pieces}
    extend_model(model, spec, "mean")
    w = model.get_input_embeddings().weight
    assert w.shape[0] == ext.size
    assert not torch.allclose(w[ext.first_id], w[ext.pieces[0]].mean(0), atol=1e-3)
    with pytest.raises(ConfigError, match="vocab.init"):
        extend_model(_tiny(tiny_model_dir), spec, "random")
    # An embedding padded past its tokenizer (as Qwen's is): new ids on the padding rows start at the mean too.
    padded = _tiny(tiny_model_dir)
    padded.resize_token_embeddings(ext.first_id + 10)
    with torch.no_grad():
        padded.get_input_embeddings().weight[ext.first_id:] = 5.0
    extend_model(padded, spec, "mean")
    w = padded.get_input_embeddings().weight
    assert w.shape[0] == ext.size
    assert torch.allclose(w[ext.first_id:ext.first_id + 10], w[:ext.first_id].mean(0).expand(10, -1), atol=1e-5)


def _overrides(model_dir, data, out, *extra):
    return [f"model.name_or_path={model_dir}", "model.max_seq_length=32", f"data.path={data}", "adapter.r=4",
            "adapter.use_gradient_checkpointing=false", "train.per_device_train_batch_size=2",
            "train.gradient_accumulation_steps=1", "train.learning_rate=1e-2", "train.embedding_learning_rate=4e-3",
            "train.max_steps=4", f"output.output_dir={out}", "output.save_steps=2", "output.report=false",
            "eval.eval_at_start=false", *extra]


@pytest.fixture()
def domain_dir(tmp_path):
    d = tmp_path / "zh"
    d.mkdir()
    for i, doc in enumerate(domain_docs(60)):
        (d / f"{i:03d}.txt").write_text(doc)
    return d


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_tied_model_dir"])
def test_extend_train_reload_in_peft_merge_and_generate(request, domain_dir, tmp_path, capsys, fixture):
    """`cpt vocab extend`, then `cpt train` with that tokenizer: the adapter carries the tokenizer, reloads in
    plain PEFT on a resized base with the same logits, merges into a folder AutoModelForCausalLM and
    AutoTokenizer load with the same logits, and `cpt generate` decodes the new tokens."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.model.load import load_for_inference

    model_dir = request.getfixturevalue(fixture)
    tok_dir, out = tmp_path / "tok", tmp_path / "run"
    assert cli_main(["vocab", "extend", "--data", str(domain_dir), "--model", str(model_dir), "--add", "64",
                     "--out", str(tok_dir)]) == 0
    printed = capsys.readouterr().out
    assert "64 new tokens" in printed and "fewer tokens" in printed
    info = json.loads((tok_dir / "vocab_extension.json").read_text())
    assert info["stats"]["fewer_tokens"] > 1.5 and len(info["tokens"]) == 64
    assert cli_main(["train", *_overrides(model_dir, domain_dir, out, f"model.tokenizer={tok_dir}")]) == 0

    tok = AutoTokenizer.from_pretrained(out)  # the adapter folder holds the extended tokenizer
    assert len(tok) == info["size"]
    x = tok(domain_docs(2, seed=5)[0], return_tensors="pt")["input_ids"][:, :24]
    assert x.max() >= info["first_id"]  # the input uses new tokens
    live, _ = load_for_inference(str(out), device="cpu", dtype=torch.float32)
    # The two lines that reload it in plain transformers + PEFT:
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    base.resize_token_embeddings(len(tok))
    plain = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        want = live(input_ids=x).logits
        assert want.shape[-1] == len(tok)
        assert torch.allclose(plain(input_ids=x).logits, want, atol=1e-5)
        new_rows = live.get_input_embeddings().weight[info["first_id"]:]
    assert cli_main(["merge", str(out), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert len(AutoTokenizer.from_pretrained(tmp_path / "merged")) == len(tok)
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x).logits, want, atol=1e-4)
    assert merged.config.tie_word_embeddings == (fixture == "tiny_tied_model_dir")
    assert new_rows.abs().sum() > 0

    # Generation decodes new tokens: two output rows, v and -v, so large that one of them always wins.
    whole = [i for i in range(info["first_id"], info["size"]) if "\ufffd" not in tok.decode([i]) and tok.decode([i]).strip()]
    t1, t2 = whole[:2]
    with torch.no_grad():
        head = merged.get_output_embeddings().weight
        v = torch.randn(head.shape[1]) * 1e4
        head[t1], head[t2] = v, -v
    merged.save_pretrained(tmp_path / "merged2")
    AutoTokenizer.from_pretrained(tmp_path / "merged").save_pretrained(tmp_path / "merged2")
    capsys.readouterr()
    assert cli_main(["generate", str(tmp_path / "merged2"), "--prompt", "the court", "--max-new-tokens", "3", "--json"]) == 0
    completion = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["completion"]
    a, b = tok.decode([t1]), tok.decode([t2])
    assert completion and completion.replace(a, "").replace(b, "") == "", (completion, a, b)


def test_vocab_add_tokens_at_setup_and_resume(tiny_model_dir, domain_dir, tmp_path):
    from cpt.api import run_training

    out = tmp_path / "run"
    args = _overrides(tiny_model_dir, domain_dir, out, "vocab.add_tokens=40")
    run_training(load_config(None, args))
    ext = read_extension(out / "tokenizer")
    assert ext is not None and ext["size"] - ext["first_id"] == 40
    first = (out / "tokenizer" / "tokenizer.json").read_text()
    run_training(load_config(None, [*args, "train.max_steps=6"]))  # resumes on the same vocabulary
    assert (out / "tokenizer" / "tokenizer.json").read_text() == first
    with pytest.raises(ConfigError, match="other settings"):
        run_training(load_config(None, [*args, "vocab.add_tokens=30", "train.max_steps=8"]))


def test_a_tokenizer_longer_than_the_model_without_an_extension_file_is_refused(tiny_model_dir, extended, tmp_path):
    from cpt.api import run_training

    _, new = extended
    new.save_pretrained(tmp_path / "tok")
    with pytest.raises(ConfigError, match="vocab_extension.json"):
        run_training(load_config(None, _overrides(tiny_model_dir, tmp_path / "tok", tmp_path / "run",
                                                  f"model.tokenizer={tmp_path / 'tok'}")))


def test_scripts_and_rates():
    assert [script_of(c) for c in "a中я1 ,あ한"] == ["Latin", "Han", "Cyrillic", "common", "common", "common", "Kana", "Hangul"]


def test_inspect_reports_rates_per_script_and_what_an_extension_gives(tokenizer_dir, domain_dir, capsys):
    assert cli_main(["inspect", str(domain_dir), "--tokenizer", str(tokenizer_dir), "--json", "--vocab-add", "50"]) == 0
    r = json.loads(capsys.readouterr().out)
    rates = r["token_rates"]
    assert {"Han", "Cyrillic", "Latin"} <= set(rates["scripts"])
    assert rates["scripts"]["Han"]["tokens_per_char"] > rates["scripts"]["Latin"]["tokens_per_char"]
    assert sum(s["bytes"] for s in rates["scripts"].values()) == rates["bytes"]
    assert sum(s["tokens"] for s in rates["scripts"].values()) == rates["tokens"]
    ext = r["extension"]
    assert ext["added"] == 50 and ext["fewer_tokens"] > 1.3 and ext["measured_on_docs"] == 6
    assert cli_main(["inspect", str(domain_dir), "--tokenizer", str(tokenizer_dir), "--vocab-add", "50"]) == 0
    shown = capsys.readouterr().out
    assert "tokens per byte and per character" in shown and "Han" in shown and "fewer tokens for the same text" in shown


def test_vocab_extend_bad_input_is_one_line(tiny_model_dir, tmp_path, capsys):
    assert cli_main(["vocab", "extend", "--data", str(tmp_path / "nope"), "--model", str(tiny_model_dir), "--add", "5",
                     "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err and "no such file" in err
    (tmp_path / "d.txt").write_text("中文中文中文")
    assert cli_main(["vocab", "extend", "--data", str(tmp_path / "d.txt"), "--model", str(tiny_model_dir), "--add", "0",
                     "--out", str(tmp_path / "o")]) == 2
    assert ">= 1" in capsys.readouterr().err
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("")
    assert cli_main(["vocab", "extend", "--data", str(tmp_path / "d.txt"), "--model", str(tiny_model_dir), "--add", "1",
                     "--out", str(tmp_path / "o")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_new_rows_train_with_split_masters_and_row_sparse_gradients(tiny_model_dir, domain_dir, tmp_path):
    """adamw_8bit in bf16 on the CPU: float32 masters held split, embed_tokens' gradient row-sparse, with the
    larger vocabulary. The new rows the batches used move away from their initialisation; a resumed run
    matches the uninterrupted one bit for bit."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from cpt.api import run_training

    def cfg(out, steps):
        return load_config(None, _overrides(tiny_model_dir, domain_dir, out, "vocab.add_tokens=40", "model.dtype=bfloat16",
                                            "train.optim=adamw_8bit", f"train.max_steps={steps}", "output.save_steps=2",
                                            "train.lr_scheduler_type=constant", "train.warmup_ratio=0"))

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    summary = run_training(cfg(whole, 4))
    assert summary["step"] == 4
    plan = json.loads((whole / "run_plan.json").read_text())
    assert plan["split_masters"] and plan["sparse_embedding_grad"]
    run_training(cfg(parts, 2))
    run_training(cfg(parts, 4))
    wa, wb = load_file(str(whole / "adapter_model.safetensors")), load_file(str(parts / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ext = read_extension(whole / "tokenizer")
    trained = next(v for k, v in wa.items() if "embed_tokens" in k)
    assert trained.shape[0] == ext["size"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    extend_model(base, ext, "subword")
    start = base.get_input_embeddings().weight.detach()
    moved = (trained[ext["first_id"]:].float() - start[ext["first_id"]:].float()).abs().amax(1) > 0
    assert moved.any()


def test_python_api_extends_before_the_adapters(tiny_tied_model_dir, tmp_path):
    from cpt.api import CPTModel

    model, tok = CPTModel.from_pretrained(str(tiny_tied_model_dir), max_seq_length=32, device="cpu")
    new = CPTModel.extend_vocabulary(model, tok, domain_docs(), add_tokens=30, save_to=str(tmp_path / "tok"))
    assert len(new) == len(tok) + 30 == model.get_input_embeddings().weight.shape[0]
    assert read_extension(tmp_path / "tok")["size"] == len(new)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    peft_model = CPTModel.get_peft_model(model, r=4, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"])
    with pytest.raises(ConfigError, match="before get_peft_model"):
        CPTModel.extend_vocabulary(peft_model, new, domain_docs(), add_tokens=5)


@pytest.mark.parametrize("streaming", [False, True])
def test_new_tokens_are_learned_without_the_held_out_documents(tokenizer_dir, domain_dir, tmp_path, streaming):
    """vocab.add_tokens learns from what trains, never from the documents the held-out scores are measured on."""
    from cpt.data import build_data, training_texts
    from cpt.model.load import load_tokenizer

    cfg = load_config(None, [f"model.name_or_path={tokenizer_dir}", f"data.path={domain_dir}", "model.max_seq_length=32",
                             f"data.streaming={str(streaming).lower()}", "eval.holdout_fraction=0.2",
                             f"data.cache_dir={tmp_path / 'cache'}"])
    held = build_data(cfg, load_tokenizer(cfg.model)).holdout_texts
    texts = list(training_texts(cfg))
    every = list(training_texts(load_config(None, [f"data.path={domain_dir}", "eval.holdout_fraction=0"])))
    assert held and not set(held) & set(texts)
    assert sorted(texts + held) == sorted(every)


# --- tokens the user lists (vocab.tokens, vocab.special_tokens, add_new_tokens) ------------------------------

LISTED = ["<case>", "statute"]


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_tied_model_dir"])
def test_listed_tokens_are_whole_tokens_whose_rows_start_from_their_pieces(request, tokenizer, fixture):
    from transformers import AutoTokenizer

    from cpt.model.vocab import add_listed_tokens

    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    model = _tiny(request.getfixturevalue(fixture))
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    pieces = [tok(t, add_special_tokens=False)["input_ids"] for t in LISTED]
    assert all(len(p) > 1 for p in pieces)  # the old tokenizer splits both
    first = len(tok)
    assert add_listed_tokens(model, tok, [*LISTED, LISTED[0]], init="subword") == LISTED  # a repeat is added once
    assert tok("see <case> under the statute", add_special_tokens=False)["input_ids"].count(first) == 1
    assert first + 1 in tok("the statute", add_special_tokens=False)["input_ids"]
    w_in, w_out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert w_in.shape[0] == first + 2 and torch.equal(w_in[:first], old_in[:first])
    for i, p in enumerate(pieces):
        assert torch.allclose(w_in[first + i], old_in[p].mean(0), atol=1e-6)
        assert torch.allclose(w_out[first + i], old_out[p].mean(0), atol=1e-6)
    assert (w_in.data_ptr() == w_out.data_ptr()) == (fixture == "tiny_tied_model_dir")
    assert add_listed_tokens(model, tok, LISTED) == []  # known tokens: nothing to add
    single = next(t for t in tok.get_vocab() if t.startswith("Ġ") and len(t) > 2)  # a token with a byte-level name
    text = tok.convert_tokens_to_string([single])
    assert add_listed_tokens(model, tok, [text]) == []  # already one token: it keeps its id
    with pytest.raises(ConfigError, match=r"vocab.tokens\[1\]"):
        add_listed_tokens(model, tok, ["<new>", " "])


def test_listed_tokens_train_resume_and_merge_with_the_same_logits(tiny_tied_model_dir, domain_dir, tmp_path):
    """vocab.tokens / vocab.special_tokens in a run: the adapter's tokenizer has them, a resumed run adds them
    again at the same ids, and the merged folder gives the adapter's logits; a special token leaves decoded
    text with skip_special_tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.api import run_training
    from cpt.model.load import load_for_inference

    for i, doc in enumerate(domain_docs(20, seed=3)):
        (domain_dir / f"case-{i}.txt").write_text(f"<case> {i}: the statute {doc} <end>")
    out = tmp_path / "run"
    args = _overrides(tiny_tied_model_dir, domain_dir, out, "vocab.tokens=[statute]", "vocab.special_tokens=[<case>,<end>]")
    run_training(load_config(None, args))
    tok = AutoTokenizer.from_pretrained(out)
    base = AutoTokenizer.from_pretrained(tiny_tied_model_dir)
    ids = tok.convert_tokens_to_ids(["statute", "<case>", "<end>"])
    assert ids == [len(base), len(base) + 1, len(base) + 2] and len(tok) == len(base) + 3
    assert tok.decode(tok("<case> the statute <end>")["input_ids"], skip_special_tokens=True).strip() == "the statute"
    summary = run_training(load_config(None, [*args, "train.max_steps=6"]))  # resumes with the same ids
    assert summary["step"] == 6 and AutoTokenizer.from_pretrained(out).get_vocab() == tok.get_vocab()

    x = tok("<case> 7: the statute 的一 <end>", return_tensors="pt")["input_ids"]
    assert set(ids) <= set(x[0].tolist())
    live, _ = load_for_inference(str(out), device="cpu", dtype=torch.float32)
    assert cli_main(["merge", str(out), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        want = live(input_ids=x).logits
        assert want.shape[-1] == len(tok)
        assert torch.allclose(merged(input_ids=x).logits, want, atol=1e-4)
        trained = merged.get_input_embeddings().weight[ids]  # the adapter's trained rows, merged
        start = torch.stack([_tiny(tiny_tied_model_dir).get_input_embeddings().weight[
            base(t, add_special_tokens=False)["input_ids"]].mean(0) for t in ["statute", "<case>", "<end>"]])
    assert not torch.allclose(trained, start, atol=1e-4)  # the new rows trained


def test_listed_tokens_need_trained_embeddings_and_the_python_api_adds_them_before_the_adapters(tiny_tied_model_dir):
    from cpt.api import CPTModel
    from cpt.compat import add_new_tokens
    from cpt.config import config_from_dict, validate

    with pytest.raises(ConfigError, match="vocab.tokens.*embed_tokens and lm_head"):
        validate(config_from_dict({"vocab": {"tokens": ["<x>"]}, "adapter": {"target_modules": ["q_proj"]}}))
    with pytest.raises(ConfigError, match=r"vocab.special_tokens\[0\]"):
        validate(config_from_dict({"vocab": {"special_tokens": [""]}}))
    model, tok = CPTModel.from_pretrained(str(tiny_tied_model_dir), max_seq_length=32, device="cpu")
    rows = len(tok)
    add_new_tokens(model, tok, new_tokens=["<case>"])  # Unsloth's name and call
    assert CPTModel.add_new_tokens(model, tok, ["statute", "<case>"], special=True) == ["statute"]
    assert len(tok) == rows + 2 == model.get_input_embeddings().weight.shape[0]
    with pytest.raises(ConfigError, match="interpolation"):
        add_new_tokens(model, tok, ["<x>"], interpolation=0.3)
    peft_model = CPTModel.get_peft_model(model, r=4, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"])
    with pytest.raises(ConfigError, match="before get_peft_model"):
        CPTModel.add_new_tokens(peft_model, tok, ["<late>"])
