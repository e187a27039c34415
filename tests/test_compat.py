"""The Unsloth face (cpt.compat): the user's document's script runs with its imports changed; Unsloth's
arguments that cpt does not honour are ConfigErrors; trainer.train() answers like transformers'.

    python -m pytest tests/test_compat.py -q
"""
from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import pytest
import torch

from cpt.compat import FastLanguageModel, UnslothTrainer, UnslothTrainingArguments
from cpt.config import ConfigError
from conftest import make_corpus

SEED = Path(__file__).resolve().parents[1] / "examples" / "seed.py"


def fineweb_like(folder: Path, n_docs: int = 200) -> Path:
    """A local stand-in for HuggingFaceFW/fineweb-edu: a `sample-10BT` configuration over JSON lines files,
    declared in the README as on the Hub, so load_dataset(folder, "sample-10BT", split=...) reads it."""
    (folder / "sample" / "10BT").mkdir(parents=True)
    with open(folder / "sample" / "10BT" / "000_00000.json", "w") as f:
        for i, t in enumerate(make_corpus(n_docs, seed=3)):
            f.write(json.dumps({"text": t, "id": str(i), "int_score": 3}) + "\n")
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: sample-10BT\n  data_files:\n  - split: train\n"
                                      "    path: sample/10BT/*\n---\n")
    return folder


def test_the_documents_script_runs_with_only_its_imports_changed(tiny_model_dir, tmp_path, monkeypatch):
    """examples/seed.py is the document's code; the test points its two names at local files, sets the
    notebook's settings for a CPU (its max_seq_length and load_in_4bit, which the document's code only
    uses) and shortens max_steps=2000 to 2 steps. Nothing else changes."""
    data = fineweb_like(tmp_path / "fineweb-edu")
    text = SEED.read_text()
    assert "from cpt.compat import FastLanguageModel, UnslothTrainer, UnslothTrainingArguments, is_bfloat16_supported" in text
    changes = {'"unsloth/llama-3-8b-bnb-4bit"': repr(str(tiny_model_dir)),
               '"HuggingFaceFW/fineweb-edu"': repr(str(data)),
               "max_seq_length = 2048": "max_seq_length = 32", "load_in_4bit = True": "load_in_4bit = False",
               "max_steps = 2000": "max_steps = 2"}
    for old, new in changes.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    script = tmp_path / "seed_local.py"
    script.write_text(text)
    monkeypatch.chdir(tmp_path)
    scope = runpy.run_path(str(script), run_name="__main__")

    stats = scope["trainer_stats"]
    assert stats.global_step == 2 and math.isfinite(stats.training_loss)
    m = stats.metrics
    for key in ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos"):
        assert key in m, key
    assert m["train_loss"] == stats.training_loss
    assert m["train_samples_per_second"] == pytest.approx(2 * 2 * 8 / m["train_runtime"], rel=0.01)
    out = tmp_path / "Llama-3-8B-fineweb-edu-r128a32wd0lstcosinelr5e06-10BT"
    plan = json.loads((out / "run_plan.json").read_text())
    assert plan["checkpointing"] == "offload"  # use_gradient_checkpointing="unsloth"
    assert scope["trainer"].summary["data"]["n_documents"] == 20  # train[:10%] of 200 documents
    cfg = (out / "config.yaml").read_text()
    for line in ("r: 128", "lora_alpha: 32.0", "use_rslora: true", "embedding_learning_rate: 1.0e-06",
                 "optim: adamw_8bit", "seed: 3407", "save_total_limit: 10"):
        assert line in cfg, line


def _loaded(tiny_model_dir):
    return FastLanguageModel.from_pretrained(str(tiny_model_dir), max_seq_length=32, load_in_4bit=False)


@pytest.mark.parametrize("kwargs, words", [
    ({"loftq_config": {"loftq_bits": 4}}, ["loftq_config", "loftq_config=None"]),
    ({"init_lora_weights": "pissa"}, ["init_lora_weights"]),
    ({"layers_to_transform": [0]}, ["layers_to_transform", "every decoder layer"]),
    ({"use_dora": True}, ["use_dora"]),
    ({"modules_to_save": ["norm"]}, ["modules_to_save", "embed_tokens and lm_head"]),
    ({"lora_dropuot": 0.1}, ["unknown argument 'lora_dropuot'"]),
])
def test_unsupported_peft_arguments_are_config_errors(tiny_model_dir, kwargs, words):
    model, _ = _loaded(tiny_model_dir)
    with pytest.raises(ConfigError) as e:
        FastLanguageModel.get_peft_model(model, r=4, **kwargs)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_from_pretrained_refuses_what_cpt_does_not_do(tiny_model_dir):
    for kwargs, word in (({"load_in_8bit": True}, "load_in_8bit"), ({"rope_scaling": {"type": "linear"}}, "rope_scaling"),
                         ({"device_map": {"model.layers.0": 0, "lm_head": 1}}, "torchrun"),
                         ({"fast_inference": True}, "vLLM")):
        with pytest.raises(ConfigError, match=word):
            FastLanguageModel.from_pretrained(str(tiny_model_dir), load_in_4bit=False, **kwargs)


def test_loftq_none_and_modules_to_save_embeddings_are_accepted(tiny_model_dir):
    model, _ = _loaded(tiny_model_dir)
    model = FastLanguageModel.get_peft_model(model, r=4, target_modules=["q_proj"], loftq_config=None,
                                             modules_to_save=["embed_tokens", "lm_head"])
    assert model._cpt_adapter_config.target_modules == ["q_proj", "embed_tokens", "lm_head"]
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("embed_tokens" in n for n in trained) and any("lm_head" in n for n in trained)


def test_training_arguments_take_transformers_defaults_and_names(tiny_model_dir, tmp_path):
    model, tok = _loaded(tiny_model_dir)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=True)
    ds = _dataset(40)
    args = UnslothTrainingArguments(output_dir=str(tmp_path / "o"), max_steps=3, warmup_steps=0.5,
                                    eval_strategy="steps", eval_steps=2, report_to="none", resume_from_checkpoint=None)
    trainer = UnslothTrainer(model=model, tokenizer=tok, train_dataset=ds, eval_dataset=_dataset(5), args=args)
    c = trainer.config
    assert (c.train.learning_rate, c.train.lr_scheduler_type, c.train.per_device_train_batch_size) == (5e-5, "linear", 8)
    assert (c.train.seed, c.output.logging_steps, c.train.warmup_ratio, c.eval.eval_steps) == (42, 500, 0.5, 2)
    assert c.adapter.use_gradient_checkpointing is True and c.output.report_to == []
    with pytest.raises(ConfigError, match="paged"):
        UnslothTrainingArguments(optim="paged_adamw_8bit")
    with pytest.raises(ConfigError, match="hf upload"):
        UnslothTrainingArguments(push_to_hub=True)
    with pytest.raises(ConfigError, match="data_collator"):
        UnslothTrainer(model=model, tokenizer=tok, train_dataset=ds, args=args, data_collator=object())


def test_eval_dataset_is_evaluated_and_resume_from_checkpoint_continues(tiny_model_dir, tmp_path):
    model, tok = _loaded(tiny_model_dir)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    args = UnslothTrainingArguments(output_dir=str(tmp_path / "o"), max_steps=2, save_steps=1, logging_steps=1,
                                    per_device_train_batch_size=2, gradient_accumulation_steps=1)
    trainer = UnslothTrainer(model=model, tokenizer=tok, train_dataset=_dataset(40), eval_dataset=_dataset(6),
                             args=args, max_seq_length=32)
    out = trainer.train()
    assert out.global_step == 2
    assert trainer.summary["eval"]["domain"]["loss"] > 0  # the eval_dataset, as the domain set
    with pytest.raises(ConfigError, match="nowhere"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "nowhere"))


def _dataset(n: int):
    import datasets

    return datasets.Dataset.from_dict({"text": make_corpus(n, seed=5)})
