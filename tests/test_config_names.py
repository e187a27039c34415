"""Names users bring from other tools: transformers' TrainingArguments names mean what they mean there
(or say what to use), transformers' schedules follow transformers' curves, LLaMA-Factory and axolotl
keys say what cpt calls them, and `cpt convert-config` turns their pretraining configs into cpt's.

    python -m pytest tests/test_config_names.py -q
"""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from cpt.cli import main as cli_main
from cpt.config import ConfigError, config_from_dict, load_config
from cpt.optim.schedule import lr_lambda


def _fails(raw: dict, *words: str) -> str:
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    return str(e.value)


def test_transformers_names_in_a_yaml_config_take_their_meaning(tmp_path):
    ckpt = tmp_path / "run" / "checkpoint-5"
    ckpt.mkdir(parents=True)
    cfg = config_from_dict({"train": {"resume_from_checkpoint": str(ckpt), "eval_strategy": "steps", "warmup_steps": 0.1,
                                      "optim": "adamw_bnb_8bit", "lr_scheduler_type": "cosine_with_min_lr",
                                      "lr_scheduler_kwargs": {"min_lr_rate": 0.1}, "gradient_checkpointing": False},
                            "output": {"logging_steps": 7, "report_to": "none", "save_strategy": "no"}})
    assert cfg.output.resume == str(ckpt) and cfg.eval.eval_steps == 7  # eval_steps defaults to logging_steps
    assert (cfg.train.warmup_ratio, cfg.train.warmup_steps, cfg.train.optim) == (0.1, 0, "adamw_8bit")
    assert (cfg.train.lr_scheduler_type, cfg.train.min_lr_ratio) == ("cosine_with_min_lr", 0.1)
    assert cfg.adapter.use_gradient_checkpointing is False and cfg.output.report_to == [] and cfg.output.save_steps == 0
    assert config_from_dict({"resume_from_checkpoint": True}).output.resume in (True, "true")
    assert config_from_dict({"eval_strategy": "no", "eval": {"eval_steps": 5}}).eval.eval_steps == 0
    assert load_config(None, ["resume_from_checkpoint=false"]).output.resume in (False, "false")


@pytest.mark.parametrize("raw, words", [
    ({"train": {"optim": "paged_adamw_8bit"}}, ["paged_adamw_8bit", "adamw_8bit"]),
    ({"push_to_hub": True}, ["push_to_hub", "hf upload"]),
    ({"hub_model_id": "me/model"}, ["hub_model_id", "hf upload"]),
    ({"eval_strategy": "epoch"}, ["eval_strategy='epoch'", "eval_steps"]),
    ({"save_strategy": "epoch"}, ["save_strategy='epoch'", "save_steps"]),
    ({"train": {"lr_scheduler_type": "cosine_with_restarts"}}, ["cosine_with_restarts", "closest: cosine"]),
    ({"train": {"lr_scheduler_type": "cosine_with_min_lr"}}, ["min_lr_ratio"]),
    ({"train": {"lr_scheduler_type": "warmup_stable_decay", "lr_scheduler_kwargs": {"num_decay_steps": 10}}},
     ["num_decay_steps needs max_steps"]),
    ({"train": {"lr_scheduler_kwargs": {"power": 2.0}}}, ["lr_scheduler_kwargs.power"]),
    ({"logging_dir": "runs"}, ["logging_dir", "<output_dir>/tensorboard"]),
    ({"output": {"report_to": ["comet_ml"]}}, ["output.report_to", "tensorboard, wandb, mlflow"]),
    ({"output": {"report_to": ["all"]}}, ["name the trackers"]),
    ({"output": {"report_to": ["none", "wandb"]}}, ["keep one"]),
])
def test_transformers_names_cpt_does_not_honour_say_what_to_use(raw, words):
    _fails(raw, *words)


@pytest.mark.parametrize("kind, kwargs", [
    ("constant_with_warmup", {}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("warmup_stable_decay", {"num_decay_steps": 6, "min_lr_ratio": 0.05}),
])
def test_transformers_schedules_follow_transformers_curves(kind, kwargs):
    """The multiplier at every step equals transformers' own scheduler's."""
    from transformers import get_scheduler

    total, warm = 20, 4
    cfg = config_from_dict({"train": {"lr_scheduler_type": kind, "warmup_steps": warm, "max_steps": total,
                                      "lr_scheduler_kwargs": kwargs}})
    ours = lr_lambda(cfg.train, total)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_scheduler(kind, opt, num_warmup_steps=warm, num_training_steps=total, scheduler_specific_kwargs=kwargs)
    for step in range(total):
        assert ours(step) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-9), (kind, step)
        opt.step()
        theirs.step()


@pytest.mark.parametrize("raw, words", [
    ({"model_name_or_path": "x"}, ["cpt calls this 'model.name_or_path'", "cpt convert-config"]),
    ({"cutoff_len": 1024}, ["'model.max_seq_length'"]),
    ({"adapter": {"lora_rank": 64}}, ["'adapter.lora_rank'", "cpt calls this 'adapter.r'"]),
    ({"base_model": "x"}, ["'model.name_or_path'"]),
    ({"sequence_len": 4096}, ["'model.max_seq_length'"]),
    ({"sample_packing": True}, ["'data.packing'"]),
    ({"datasets": [{"path": "a"}]}, ["'data.sources'"]),
    ({"num_epochs": 1}, ["'train.num_train_epochs'"]),
    ({"micro_batch_size": 2}, ["'train.per_device_train_batch_size'"]),
    ({"lora_target": "all"}, ["'adapter.target_modules'"]),
    ({"plot_loss": True}, ["no such setting", "report.html"]),
])
def test_other_tools_keys_say_what_cpt_calls_them(raw, words):
    _fails(raw, *words)


LLAMA_FACTORY = """\
### model
model_name_or_path: {model}
trust_remote_code: true

### method
stage: pt
do_train: true
finetuning_type: lora
lora_rank: 16
lora_target: all
additional_target: embed_tokens,lm_head

### dataset
dataset: c4_demo
dataset_dir: {data_dir}
cutoff_len: 64
max_samples: 500
overwrite_cache: true
preprocessing_num_workers: 2
new_special_tokens: <case>,<ref>
resize_vocab: true
dataloader_num_workers: 4

### output
output_dir: {out}
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null
"""

AXOLOTL = """\
base_model: {model}
model_type: LlamaForCausalLM
tokenizer_type: AutoTokenizer
load_in_8bit: false
load_in_4bit: false
strict: false

pretraining_dataset:
  - path: {data}
    type: pretrain
    text_column: body
dataset_prepared_path:
val_set_size: 0.0
output_dir: {out}

sequence_len: 128
sample_packing: true
pad_to_sequence_len: true

adapter: lora
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
lora_modules_to_save:
  - embed_tokens
  - lm_head

wandb_project: my-cpt
wandb_name: first

gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 1
max_steps: 1000
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 0.0002
embedding_lr_scale: 0.1
cosine_min_lr_ratio: 0.1

train_on_inputs: false
group_by_length: false
bf16: auto
tf32: false
gradient_checkpointing: true
logging_steps: 1
flash_attention: true
warmup_steps: 10
saves_per_epoch: 1
weight_decay: 0.0
special_tokens:
tokens:
  - GmbH
  - "<ref>"
"""


def test_convert_llama_factory_pretraining_config(tmp_path, tiny_model_dir, corpus, capsys):
    data_dir = tmp_path / "lf_data"
    data_dir.mkdir()
    (data_dir / "c4_demo.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    (data_dir / "dataset_info.json").write_text(json.dumps({"c4_demo": {"file_name": "c4_demo.jsonl",
                                                                      "columns": {"prompt": "text"}}}))
    src = tmp_path / "llama3_lora_pretrain.yaml"
    src.write_text(LLAMA_FACTORY.format(model=tiny_model_dir, data_dir=data_dir, out=tmp_path / "saves"))
    out = tmp_path / "cpt.yaml"
    assert cli_main(["convert-config", str(src), "-o", str(out)]) == 0
    cfg = load_config(out)
    assert cfg.model.name_or_path == str(tiny_model_dir) and cfg.model.max_seq_length == 64
    assert (cfg.adapter.r, cfg.adapter.lora_alpha) == (16, 32)  # LLaMA-Factory: alpha defaults to twice the rank
    assert cfg.adapter.target_modules[-2:] == ["embed_tokens", "lm_head"] and "down_proj" in cfg.adapter.target_modules
    assert cfg.data.sources[0].path == str(data_dir / "c4_demo.jsonl") and cfg.data.max_docs == 500
    assert (cfg.train.learning_rate, cfg.train.per_device_train_batch_size, cfg.train.num_train_epochs) == (1e-4, 1, 3.0)
    assert cfg.output.report_to == [] and cfg.output.output_dir == str(tmp_path / "saves")
    assert cfg.vocab.special_tokens == ["<case>", "<ref>"] and cfg.vocab.tokens == []
    assert cli_main(["convert-config", str(src), "-o", str(out)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err


def test_convert_axolotl_pretraining_config(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(5)))
    src = tmp_path / "axolotl.yaml"
    src.write_text(AXOLOTL.format(model=tiny_model_dir, data=data, out=tmp_path / "out"))
    assert cli_main(["convert-config", str(src)]) == 0
    printed = capsys.readouterr().out
    cfg = config_from_dict(yaml.safe_load(printed))
    assert cfg.model.max_seq_length == 128 and cfg.model.attn_implementation == "flash_attention_2"
    assert (cfg.adapter.r, cfg.adapter.lora_alpha, cfg.adapter.lora_dropout) == (32, 16, 0.05)
    assert cfg.adapter.target_modules[-2:] == ["embed_tokens", "lm_head"]
    src0 = cfg.data.sources[0]
    assert (src0.path, src0.text_field, cfg.data.streaming, cfg.data.packing) == (str(data), "body", True, "document")
    assert (cfg.train.per_device_train_batch_size, cfg.train.gradient_accumulation_steps, cfg.train.max_steps) == (2, 4, 1000)
    assert cfg.train.optim == "adamw_8bit" and cfg.train.min_lr_ratio == 0.1
    assert cfg.train.embedding_learning_rate == pytest.approx(2e-5)
    assert cfg.output.report_to == ["wandb"] and cfg.output.run_name == "first"
    assert "WANDB_PROJECT=my-cpt" in printed and "saves_per_epoch" in printed
    assert cfg.vocab.tokens == ["GmbH", "<ref>"]


@pytest.mark.parametrize("text, words", [
    ("model_name_or_path: m\nstage: sft\n", ["stage='sft'", "stage: pt"]),
    ("base_model: m\nload_in_8bit: true\n", ["load_in_8bit=True", "4-bit"]),
    ("model_name_or_path: m\nfinetuning_type: freeze\n", ["finetuning_type='freeze'"]),
    ("base_model: m\ndatasets:\n  - path: tatsu-lab/alpaca\n    type: alpaca\n", ["type='alpaca'", "plain text"]),
    ("model_name_or_path: m\ndataset: c4\ndataset_dir: /nonexistent\n", ["dataset_info.json"]),
    ("learning_rate: 1.0e-4\n", ["neither a LLaMA-Factory config"]),
])
def test_convert_config_refuses_what_cpt_cannot_honour(tmp_path, capsys, text, words):
    src = tmp_path / "other.yaml"
    src.write_text(text)
    assert cli_main(["convert-config", str(src)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    for w in words:
        assert w in err, (w, err)
