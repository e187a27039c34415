"""Shared fixtures: a tokenizer trained on the spot and tiny random Llama models saved to folders.

Everything here is built locally in seconds; nothing is downloaded.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("the court held that the statute applies to every contract signed after the act entered into force "
         "a party may appeal within thirty days and the judge shall give written reasons for the decision "
         "patients with chronic disease received the dose twice daily and the trial measured blood pressure").split()


def gguf_style(tokenizer, byte_tokens: bool = False):
    """`tokenizer` rebuilt the way transformers 5.17 builds a GGUF's byte-level ("gpt2") tokenizer: the
    same vocabulary and merges with byte fallback switched on, an unknown token, an empty normalizer and a
    byte-fallback decoder in front of the ByteLevel one. byte_tokens: also give it <0xNN> tokens and take
    away the character that stands for byte 0, so that byte fallback would spell that byte <0x00>."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["model"].update(byte_fallback=True, unk_token=tokenizer.eos_token, fuse_unk=True)
    if byte_tokens:
        first = max(max(spec["model"]["vocab"].values()), *(t["id"] for t in spec["added_tokens"])) + 1
        spec["model"]["vocab"].update({f"<0x{b:02X}>": first + b for b in range(256)})
        assert not any("\u0100" in m for m in map(str, spec["model"]["merges"]))
        spec["model"]["vocab"].pop("\u0100")
    spec["normalizer"] = {"type": "Sequence", "normalizers": []}
    spec["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}, spec["decoder"]]}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=tokenizer.eos_token,
                                   pad_token=tokenizer.pad_token, bos_token=tokenizer.bos_token)


def make_corpus(n_docs: int = 60, seed: int = 0) -> list[str]:
    """Repetitive, learnable 'domain' documents of varied length."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        start = rng.randrange(len(WORDS))
        n = rng.randint(20, 80)
        docs.append(" ".join(WORDS[(start + i) % len(WORDS)] for i in range(n)) + ".")
    return docs


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return make_corpus()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (vocab ~300) trained on the corpus, saved as a HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(make_corpus(200, seed=1), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<pad>")
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _tiny_model_dir(tmp_path_factory, tokenizer_dir: Path, tied: bool, name: str, hidden: int = 64) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp(name)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """Untied 2-layer Llama (hidden 64) with the fixture tokenizer, saved as a HF folder."""
    return _tiny_model_dir(tmp_path_factory, tokenizer_dir, tied=False, name="tiny_untied")


@pytest.fixture(scope="session")
def tiny_wide_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """Untied, hidden 256: embedding rows are whole 8-bit quantisation blocks (256 elements)."""
    return _tiny_model_dir(tmp_path_factory, tokenizer_dir, tied=False, name="tiny_wide", hidden=256)


@pytest.fixture(scope="session")
def tiny_tied_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """Same with tied input/output embeddings (like SmolLM2)."""
    return _tiny_model_dir(tmp_path_factory, tokenizer_dir, tied=True, name="tiny_tied")


@pytest.fixture()
def corpus_dir(tmp_path, corpus) -> Path:
    """A folder of .txt documents, one per file."""
    d = tmp_path / "corpus"
    d.mkdir()
    for i, doc in enumerate(corpus):
        (d / f"doc{i:03d}.txt").write_text(doc)
    return d


@pytest.fixture(scope="session", autouse=True)
def _cpu_math_settled():
    """Tests compare runs bit for bit, some with models built without cpt.build.build_model: settle MKL's
    kernel choice once for the whole process (see settle_cpu_math)."""
    from cpt.runtime import settle_cpu_math

    settle_cpu_math()


def pytest_report_header(config):
    from dependencies import FAST_MOVING, describe

    return "cpt follows: " + describe(FAST_MOVING)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test of a feature that rests on a fast-moving library says which versions it ran on."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when == "call":
        from dependencies import FEATURES, describe

        feature = FEATURES.get(item.module.__name__.rsplit(".", 1)[-1])
        if feature is not None:
            report.sections.append(("cpt: what this test covers",
                                    f"{feature[0]}, which rests on {describe(feature[1])}"))
