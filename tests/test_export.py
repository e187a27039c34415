"""GGUF export: a file llama.cpp loads, checked by reading it back (gguf's reader, transformers' gguf_file=
loading and, where llama-cpp-python is installed, llama.cpp itself) against the model it came from; what
it refuses; and merge/export temp files left by a killed command.

    python -m pytest tests/test_export.py -q
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from test_bad_input_model import SMOL_GGUF, _perturbed_adapter, _save_run, _smol_dir

TEXT = "the court held that the statute applies to every contract signed after 2024, 12 days."

# Largest logit difference allowed between the exported file, read back, and the model it came from, as a
# fraction of the largest logit: f16 keeps 11 significant bits, bf16 8, q8_0 about 7 per 32-weight block.
# Measured on the sharpened tiny model, read by transformers (llama.cpp): 3e-4 (3.3e-4) in f16, 2.7e-3
# (3.1e-3) in bf16, 6.5e-3 (1.0e-2) in q8_0; a q/k permutation left out moves its logits by 6% of the
# largest. SmolLM2's 30 layers add up more rounding: f16 1e-3 (transformers), 1.8e-3 (llama.cpp, which also
# rounds the activations to f16 in its matrix products).
TOLERANCE = {"f16": 2e-3, "bf16": 1e-2, "q8_0": 2e-2}
DEEP_F16 = 5e-3


def _fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            out[key] = field.contents()
        elif field.data:
            out[key] = field.contents()
    out["tensors"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return out


def _logits(model, tokenizer, text: str = TEXT) -> torch.Tensor:
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return model(ids).logits[0].float()


def _read_back(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _assert_close(got: torch.Tensor, want: torch.Tensor, outtype: str, tolerance: float | None = None) -> None:
    worst = (got - want).abs().max().item() / want.abs().max().item()
    assert worst < (tolerance or TOLERANCE[outtype]), f"{outtype}: largest logit difference {worst:.2e} of the largest logit"


def _llama_cpp_logits(path: Path, ids: list[int]):
    """(the llama.cpp model, its logits for `ids`) from the GGUF file at `path`.

    The model loads without llama.cpp's extra buffer types (`use_extra_bufts`, weights repacked for the CPU's
    matrix units): on CPUs with AMX its AMX path crashes the process on q8_0 weights (ggml-org/llama.cpp#20824),
    so whether the suite passed would depend on the machine. The file and the arithmetic checked are the same.
    llama-cpp-python has no argument for it, so its default model parameters are wrapped while the model loads."""
    import numpy as np
    import llama_cpp.llama as llama_module
    from llama_cpp import Llama

    default_params = llama_module.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        llm = Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    finally:
        llama_module.llama_cpp.llama_model_default_params = default_params
    llm.eval(ids)
    return llm, torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The untied tiny Llama with q/k and embeddings scaled up: attention is peaked and logits are large, so
    a wrong head layout or a dropped tensor shows in the logits (random init attends almost uniformly)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(6)
            elif "embed_tokens" in name or "lm_head" in name:
                p.mul_(8)
    out = tmp_path_factory.mktemp("sharp")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


# --- round trips ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_untied_llama_round_trip(sharp_model_dir, tmp_path, outtype):
    """An untied Llama folder -> GGUF: llama.cpp's keys and tensor names, an output head of its own, the
    weight matrices in the outtype and the norms in float32; transformers reads it back to the same
    tokenizer ids and logits within the format's precision."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.export import export_gguf

    out = export_gguf(sharp_model_dir, tmp_path / "m.gguf", outtype=outtype)
    model = AutoModelForCausalLM.from_pretrained(sharp_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(sharp_model_dir)
    f = _fields(out)
    assert f["general.architecture"] == "llama"
    assert (f["llama.block_count"], f["llama.embedding_length"], f["llama.feed_forward_length"]) == (2, 64, 128)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"], f["llama.rope.dimension_count"]) == (4, 2, 16)
    assert f["llama.context_length"] == 256 and f["llama.vocab_size"] == len(tok)
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(model.config.rms_norm_eps)
    assert f["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.tokens"] == [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    assert len(f["tokenizer.ggml.merges"]) > 0
    assert f["tokenizer.ggml.token_type"][tok.eos_token_id] == 3  # CONTROL
    assert (f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.padding_token_id"]) == (tok.eos_token_id, tok.pad_token_id)
    matrix = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[outtype]
    assert f["tensors"]["output.weight"] == f["tensors"]["token_embd.weight"] == f["tensors"]["blk.1.ffn_down.weight"] == matrix
    assert f["tensors"]["blk.0.attn_norm.weight"] == f["tensors"]["output_norm.weight"] == "F32"
    assert len(f["tensors"]) == 2 * 9 + 3

    back, back_tok = _read_back(out)
    assert back_tok(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert not back.config.tie_word_embeddings
    _assert_close(_logits(back, tok), _logits(model, tok), outtype)


def test_adapter_run_exports_through_the_command(tiny_tied_model_dir, tmp_path, capsys):
    """A run's output folder (tied tiny Llama, LoRA on q/k/v and trained embeddings): `cpt export RUN` merges
    it as `cpt merge` does and writes RUN-f16.gguf beside the run and nothing else, with no output tensor
    (tied); transformers reads it back to the adapter model's logits."""
    from cpt.cli import main
    from cpt.config import ModelConfig
    from cpt.model import load_base_model, load_tokenizer

    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_tied_model_dir, dtype=torch.float32)
    with torch.no_grad():  # peaked attention and large logits, as in sharp_model_dir
        for name, p in base.named_parameters():  # lm_head is embed_tokens (tied)
            p.mul_(6 if "q_proj" in name or "k_proj" in name else 8 if "embed_tokens" in name else 1)
    base.save_pretrained(tmp_path / "base")
    mcfg = ModelConfig(name_or_path=str(tmp_path / "base"))
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_tied_model_dir)))
    tok.save_pretrained(tmp_path / "base")
    live = _perturbed_adapter(load_base_model(mcfg, torch.device("cpu"), torch.float32),
                              targets=("q_proj", "k_proj", "v_proj", "embed_tokens", "lm_head"))
    run = _save_run(live, tok, tmp_path / "run", mcfg)
    capsys.readouterr()

    assert main(["export", str(run), "--format", "gguf"]) == 0
    out = tmp_path / "run-f16.gguf"
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "run", "run-f16.gguf"]
    f = _fields(out)
    assert "output.weight" not in f["tensors"] and len(f["tensors"]) == 2 * 9 + 2
    back, _ = _read_back(out)
    assert back.config.tie_word_embeddings
    _assert_close(_logits(back, tok), _logits(live, tok), "f16")


def test_smollm2_round_trip(tmp_path):
    """The demo's base (SmolLM2-135M from its Q4_1 GGUF: 30 layers, 9 heads over 3 key/value heads, tied
    embeddings, a 49k vocabulary with a chat template) with a trained-looking adapter, merged: the file has
    no output tensor, the chat template and special ids; transformers (and llama.cpp, where installed) read
    it back to the adapter model's tokens and logits."""
    from cpt.config import ModelConfig
    from cpt.export import write_gguf
    from cpt.model import load_base_model, load_tokenizer

    mcfg = ModelConfig(name_or_path=str(_smol_dir()), gguf_file=SMOL_GGUF)
    tok = load_tokenizer(mcfg)
    live = _perturbed_adapter(load_base_model(mcfg, torch.device("cpu"), torch.float32),
                              targets=("q_proj", "k_proj", "embed_tokens", "lm_head"))
    text = TEXT + " 3.14159 and 2,048 items\n<|im_start|>user\nWhy?<|im_end|>"
    want = _logits(live, tok, text)
    merged = live.merge_and_unload()
    merged.tie_weights()
    out = tmp_path / "smol.gguf"
    write_gguf(merged, tok, out, "f16")
    del live, merged

    f = _fields(out)
    assert "output.weight" not in f["tensors"] and len(f["tensors"]) == 30 * 9 + 2
    assert f["llama.vocab_size"] == 49152 and f["llama.attention.head_count"] == 9 and f["llama.attention.head_count_kv"] == 3
    assert f["llama.rope.freq_base"] == pytest.approx(100000.0) and f["llama.context_length"] == 8192
    assert f["tokenizer.ggml.add_bos_token"] is False and f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert "<|im_start|>" in f["tokenizer.chat_template"]
    back, back_tok = _read_back(out)
    assert back_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert back.config.tie_word_embeddings
    _assert_close(_logits(back, tok, text), want, "f16", DEEP_F16)
    if HAS_LLAMA_CPP:
        llm, got = _llama_cpp_logits(out, tok(text)["input_ids"])
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text)["input_ids"]
        _assert_close(got, want, "f16", DEEP_F16)


def test_rope_scaling_and_vocabulary_padding_are_written(tiny_model_dir, tmp_path):
    """Llama 3 frequency scaling becomes llama.cpp's rope_freqs tensor (1 for the fast frequencies, the factor
    for the slow ones), linear scaling its two keys; embedding rows past the tokenizer become unused
    `[PAD<i>]` tokens so that the vocabulary and the embedding agree."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.export import write_gguf

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.resize_token_embeddings(len(tok) + 6)
    model.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    write_gguf(model, tok, tmp_path / "llama3.gguf")
    reader = gguf.GGUFReader(str(tmp_path / "llama3.gguf"))
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
    # head_dim 16: wavelengths 2*pi*500000**(i/8) for i < 8 against 64/4 and 64/1 tokens. The first is short
    # (not scaled), the second (32.4 tokens) between (smoothed: 1 / ((1 - s) / 8 + s), s = (64 / 32.4 - 1) / 3),
    # the rest long (divided by the factor).
    assert freqs.shape == (8,)
    assert freqs.tolist() == pytest.approx([1.0, 2.4423, 8, 8, 8, 8, 8, 8], rel=1e-4)
    assert reader.fields["llama.rope.freq_base"].contents() == pytest.approx(500000.0)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == len(tok) + 6 and tokens[-1] == f"[PAD{len(tok) + 5}]" and types[-1] == gguf.TokenType.UNUSED

    model.config.rope_parameters = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    write_gguf(model, tok, tmp_path / "linear.gguf")
    f = _fields(tmp_path / "linear.gguf")
    assert (f["llama.rope.scaling.type"], f["llama.rope.scaling.factor"]) == ("linear", 4.0)
    assert "rope_freqs.weight" not in f["tensors"]


# --- what it refuses ------------------------------------------------------------------------------------------

def test_what_gguf_export_refuses(tiny_model_dir, tokenizer_dir, tmp_path, capsys):
    """Models and tokenizers the writer cannot represent, and output paths it must not write, end in one line
    naming what and the way out (exit 2), before anything is written."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from cpt.cli import main
    from cpt.export import ExportError, check_gguf_exportable

    def refused(args, *words):
        capsys.readouterr()
        assert main(["export", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and all(w in err for w in words), err

    qwen = tmp_path / "qwen"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=322, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(qwen)
    PreTrainedTokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(qwen)
    refused([qwen], "Qwen2ForCausalLM", "LlamaForCausalLM", "convert_hf_to_gguf.py")

    llama = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    llama.config.attention_bias = True
    with pytest.raises(ExportError, match="attention_bias"):
        check_gguf_exportable(llama, PreTrainedTokenizerFast.from_pretrained(tokenizer_dir))
    llama.config.attention_bias = False
    llama.config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    with pytest.raises(ExportError, match="'dynamic'"):
        check_gguf_exportable(llama, PreTrainedTokenizerFast.from_pretrained(tokenizer_dir))

    # A sentencepiece-style vocabulary (Metaspace, byte fallback), as Llama 2 and Mistral ship.
    spm = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    spm.pre_tokenizer = pre_tokenizers.Metaspace()
    spm.decoder = decoders.Metaspace()
    spm.train_from_iterator(["the court held that"] * 20, trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "</s>"]))
    with pytest.raises(ExportError, match="byte-level BPE.*byte fallback"):
        check_gguf_exportable(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                              PreTrainedTokenizerFast(tokenizer_object=spm, eos_token="</s>"))

    (tmp_path / "taken.gguf").write_bytes(b"keep me")
    refused([tiny_model_dir, "--out", tmp_path / "taken.gguf"], "taken.gguf exists")
    assert (tmp_path / "taken.gguf").read_bytes() == b"keep me"
    refused([tiny_model_dir, "--out", tmp_path / "model.bin"], "ends in .gguf")
    refused([tmp_path / "missing-run"], "missing-run", "expected")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen", "taken.gguf"]


# --- killed commands ------------------------------------------------------------------------------------------

_STALL = """
import sys, time
from pathlib import Path
import cpt.model.load as load
def stall(*args, **kwargs):  # the merge has claimed its temp folder and is loading: kill it here
    Path(sys.argv[3]).write_text("loading")
    time.sleep(600)
load.load_for_inference = stall
from cpt.export import merge
merge(sys.argv[1], sys.argv[2])
"""


def test_killed_merge_leaves_a_temp_folder_the_next_merge_removes(tiny_model_dir, tmp_path):
    """`cpt merge` killed with SIGKILL while it works leaves its hidden `.tmp-<name>-<pid>` folder; the next
    merge to the same target removes it and writes the model. A temp folder whose process still runs is a
    merge in progress: the second one stops with a message naming it instead of deleting its work."""
    from cpt.config import ModelConfig
    from cpt.export import merge
    from cpt.model import load_base_model, load_tokenizer

    mcfg = ModelConfig(name_or_path=str(tiny_model_dir))
    run = _save_run(_perturbed_adapter(load_base_model(mcfg, torch.device("cpu"), torch.float32)),
                    load_tokenizer(mcfg), tmp_path / "run", mcfg)
    out, marker = tmp_path / "merged", tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_STALL), str(run), str(out), str(marker)], env=env)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert child.poll() is None and time.time() < deadline, "the merge never reached its load"
            time.sleep(0.05)
        temp = tmp_path / f".tmp-merged-{child.pid}"
        assert temp.is_dir()
        with pytest.raises(FileExistsError, match=f"process {child.pid}"):
            merge(run, out)  # the first merge is still running
        assert temp.is_dir()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert temp.is_dir() and not out.exists()  # what a killed merge leaves

    merge(run, out)
    assert (out / "config.json").is_file()
    assert not list(tmp_path.glob(".tmp-*"))


def test_killed_export_leaves_a_temp_file_the_next_export_removes(sharp_model_dir, tmp_path):
    """A GGUF export killed while writing leaves `.tmp-<file>-<pid>`; the next export to the same file
    removes it."""
    from cpt.export import export_gguf

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f".tmp-model.gguf-{gone.pid}"
    stale.write_bytes(b"GGUF half written")
    export_gguf(sharp_model_dir, tmp_path / "model.gguf", outtype="q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


# --- llama.cpp itself -----------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_llama_cpp_loads_the_export(sharp_model_dir, tmp_path, outtype):
    """llama.cpp (through llama-cpp-python) loads the file, tokenizes as the Hugging Face tokenizer does, and
    computes the source model's logits within the format's precision."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpt.export import export_gguf

    out = export_gguf(sharp_model_dir, tmp_path / "m.gguf", outtype=outtype)
    tok = AutoTokenizer.from_pretrained(sharp_model_dir)
    model = AutoModelForCausalLM.from_pretrained(sharp_model_dir, dtype=torch.float32).eval()
    ids = tok(TEXT)["input_ids"]
    llm, got = _llama_cpp_logits(out, ids)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == ids
    _assert_close(got, _logits(model, tok), outtype)


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
], ids=lambda r: r["rope_type"])
def test_llama_cpp_applies_the_rope_scaling(sharp_model_dir, tmp_path, rope):
    """Each RoPE scaling written reaches llama.cpp as transformers computes it (leaving it out moves the
    logits by 2.5-6% of the largest; transformers' own GGUF reader ignores these keys, so only llama.cpp
    can check them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from cpt.export import write_gguf

    source = AutoModelForCausalLM.from_pretrained(sharp_model_dir, dtype=torch.float32)
    source.config.rope_parameters = rope
    model = LlamaForCausalLM(source.config).eval()  # rotary frequencies are computed from the config at build
    model.load_state_dict(source.state_dict())
    tok = AutoTokenizer.from_pretrained(sharp_model_dir)
    write_gguf(model, tok, tmp_path / "m.gguf")
    _, got = _llama_cpp_logits(tmp_path / "m.gguf", tok(TEXT)["input_ids"])
    _assert_close(got, _logits(model, tok), "f16")
