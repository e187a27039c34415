"""Bad input, by class: configs and output locations. Every case ends in a ConfigError that names the key
(or the file and line) and what to do, before anything heavy is loaded; never a traceback, never a run
that trains on with a meaningless setting. docs/reliability.md lists these classes.

    python -m pytest tests/test_bad_input_config.py -q
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import cpt.api
import cpt.checkpoint as ckpt
from cpt.api import run_training
from cpt.config import ConfigError, config_from_dict, load_config


def _fails(raw: dict, *words: str) -> str:
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    for w in words:
        assert w in str(e.value), f"{w!r} not in {str(e.value)!r}"
    return str(e.value)


# ---------------------------------------------------------------------------- wrong types, every section


@pytest.mark.parametrize("raw, key, expected", [
    ({"model": {"max_seq_length": "long"}}, "model.max_seq_length", "integer"),
    ({"model": {"name_or_path": ["a", "b"]}}, "model.name_or_path", "string"),
    ({"model": {"load_in_4bit": "maybe"}}, "model.load_in_4bit", "true or false"),
    ({"model": {"dtype": "bf16"}}, "model.dtype", "Did you mean 'bfloat16'"),
    ({"adapter": {"r": "big"}}, "adapter.r", "integer"),
    ({"adapter": {"r": 8.5}}, "adapter.r", "integer"),
    ({"adapter": {"target_modules": {"q_proj": 1}}}, "adapter.target_modules", "list"),
    ({"adapter": {"lora_alpha": [32]}}, "adapter.lora_alpha", "number"),
    ({"data": {"sources": "a.txt"}}, "data.sources", "list"),
    ({"data": {"sources": [{"path": ["a", "b"]}]}}, "data.sources[0].path", "string"),
    ({"data": {"strict": "sometimes"}}, "data.strict", "true or false"),
    ({"train": {"max_steps": "many"}}, "train.max_steps", "integer"),
    ({"train": {"learning_rate": "fast"}}, "train.learning_rate", "number"),
    ({"train": {"learning_rate": float("nan")}}, "train.learning_rate", "finite"),
    ({"train": {"learning_rate": float("inf")}}, "train.learning_rate", "finite"),
    ({"train": 5}, "train", "mapping"),
    ({"eval": {"sets": [["domain"]]}}, "eval.sets[0]", "mapping"),
    ({"eval": {"eval_steps": True}}, "eval.eval_steps", "integer"),
    ({"output": {"output_dir": {"a": 1}}}, "output.output_dir", "string"),
    ({"output": {"save_total_limit": "two"}}, "output.save_total_limit", "int"),
])
def test_wrong_type_names_the_key(raw, key, expected):
    _fails(raw, key, expected)


# ---------------------------------------------------------------------------- out-of-range values


@pytest.mark.parametrize("raw, key", [
    ({"model": {"max_seq_length": 0}}, "model.max_seq_length"),
    ({"model": {"name_or_path": " "}}, "model.name_or_path"),
    ({"adapter": {"r": 0}}, "adapter.r"),
    ({"adapter": {"lora_alpha": 0}}, "adapter.lora_alpha"),
    ({"adapter": {"lora_alpha": -16}}, "adapter.lora_alpha"),
    ({"adapter": {"lora_dropout": 1.0}}, "adapter.lora_dropout"),
    ({"adapter": {"target_modules": []}}, "adapter.target_modules"),
    ({"adapter": {"host_activations": -1}}, "adapter.host_activations"),
    ({"adapter": {"recompute_budget_gib": -4}}, "adapter.recompute_budget_gib"),
    ({"adapter": {"recompute_budget_gib": "lots"}}, "adapter.recompute_budget_gib"),
    ({"data": {"dataset_num_proc": 0}}, "data.dataset_num_proc"),
    ({"data": {"max_docs": 0}}, "data.max_docs"),
    ({"data": {"dataset_text_field": ""}}, "data.dataset_text_field"),
    ({"data": {"sources": [{"path": "a.txt", "weight": 0}]}}, "data.sources[0].weight"),
    ({"train": {"learning_rate": -1e-5}}, "train.learning_rate"),
    ({"train": {"embedding_learning_rate": 0}}, "train.embedding_learning_rate"),
    ({"train": {"per_device_train_batch_size": 0}}, "train.per_device_train_batch_size"),
    ({"train": {"gradient_accumulation_steps": 0}}, "train.gradient_accumulation_steps"),
    ({"train": {"max_steps": 0}}, "train.max_steps"),
    ({"train": {"num_train_epochs": 0}}, "train.num_train_epochs"),
    ({"train": {"warmup_ratio": 1.5}}, "train.warmup_ratio"),
    ({"train": {"warmup_steps": -1}}, "train.warmup_steps"),
    ({"train": {"weight_decay": -0.1}}, "train.weight_decay"),
    ({"train": {"adam_beta1": 1.0}}, "train.adam_beta1"),
    ({"train": {"adam_beta2": -0.5}}, "train.adam_beta2"),
    ({"train": {"adam_epsilon": 0}}, "train.adam_epsilon"),
    ({"train": {"min_lr_ratio": 2}}, "train.min_lr_ratio"),
    ({"train": {"decay_ratio": 0}}, "train.decay_ratio"),
    ({"train": {"max_grad_norm": -1}}, "train.max_grad_norm"),
    ({"train": {"max_nonfinite_steps": 0}}, "train.max_nonfinite_steps"),
    ({"train": {"seed": -1}}, "train.seed"),
    ({"eval": {"eval_steps": -1}}, "eval.eval_steps"),
    ({"eval": {"holdout_fraction": 1.0}}, "eval.holdout_fraction"),
    ({"eval": {"holdout_max_docs": -1}}, "eval.holdout_max_docs"),
    ({"eval": {"per_device_eval_batch_size": 0}}, "eval.per_device_eval_batch_size"),
    ({"eval": {"max_eval_tokens": 0}}, "eval.max_eval_tokens"),
    ({"eval": {"max_new_tokens": 0}}, "eval.max_new_tokens"),
    ({"eval": {"forgetting_limit": -0.1}}, "eval.forgetting_limit"),
    ({"eval": {"sets": [{"path": "a.txt", "max_docs": 0}]}}, "eval.sets[0].max_docs"),
    ({"output": {"output_dir": ""}}, "output.output_dir"),
    ({"output": {"save_total_limit": -1}}, "output.save_total_limit"),
    ({"output": {"save_steps": -5}}, "output.save_steps"),
    ({"output": {"logging_steps": 0}}, "output.logging_steps"),
    ({"output": {"save_grace_seconds": -1}}, "output.save_grace_seconds"),
    ({"output": {"report_to": ["neptune"]}}, "output.report_to"),
    ({"output": {"metric_for_best_model": "domain/accuracy", }, "eval": {"eval_steps": 5}}, "output.metric_for_best_model"),
])
def test_out_of_range_value_names_the_key(raw, key):
    _fails(raw, key)


# ---------------------------------------------------------------------------- unknown and misplaced keys


@pytest.mark.parametrize("raw, words", [
    ({"modle": {}}, ["'modle'", "Did you mean 'model'"]),
    ({"train": {"max_step": 5}}, ["'train.max_step'", "Did you mean 'train.max_steps'"]),
    ({"adapter": {"max_steps": 5}}, ["'adapter.max_steps'", "belongs in 'train.max_steps'"]),
    ({"train": {"r": 16}}, ["'train.r'", "belongs in 'adapter.r'"]),
    ({"model": {"lora_alfa": 16}}, ["'model.lora_alfa'", "Did you mean 'adapter.lora_alpha'"]),
    ({"max_step": 3}, ["'max_step'", "Did you mean 'train.max_steps'"]),  # a flat key with a typo
    ({"data": {"sources": [{"path": "a.txt", "wieght": 2}]}}, ["'data.sources[0].wieght'", "Did you mean 'data.sources[0].weight'"]),
    ({"eval": {"sets": [{"path": "a.txt", "max_doc": 2}]}}, ["'eval.sets[0].max_doc'", "Did you mean 'eval.sets[0].max_docs'"]),
    ({"output": {"zzz_unheard_of": 1}}, ["'output.zzz_unheard_of'", "Valid keys: output_dir"]),
])
def test_unknown_or_misplaced_key_gets_a_suggestion(raw, words):
    _fails(raw, *words)


def test_flat_override_with_a_typo_gets_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key 'max_step'\. Did you mean 'train\.max_steps'\?"):
        load_config(None, ["max_step=3"])
    with pytest.raises(ConfigError, match=r"Did you mean 'train\.max_steps'\?"):
        load_config(None, ["train.max_step=3"])


@pytest.mark.parametrize("overrides, words", [
    (["train.max_steps"], ["train.max_steps", "key=value"]),
    (["train.max_steps=["], ["train.max_steps", "not valid YAML", "quote it"]),
    (["data.sources.0.path=a.txt"], ["data.sources", "as a whole"]),  # no list to index yet
    (["data.path=a.txt", "data.sources.3.weight=2"], ["data.sources", "list of 1", "data.sources.<0..0>"]),
    (["adapter.target_modules=[q_proj]", "adapter.target_modules.0.x=1"], ["adapter.target_modules.0", "no entry 'x'"]),
    (["max_steps=3", "learning_rate=fast"], ["train.learning_rate", "number"]),
])
def test_bad_override_is_named(overrides, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    for w in words:
        assert w in str(e.value), f"{w!r} not in {str(e.value)!r}"


def test_an_override_may_address_the_single_source_it_follows():
    cfg = load_config(None, ["data.path=a.txt", "data.sources.0.weight=2"])
    assert [(s.path, s.weight) for s in cfg.data.sources] == [("a.txt", 2.0)]


# ---------------------------------------------------------------------------- conflicting settings


@pytest.mark.parametrize("raw, words", [
    ({"train": {"bf16": True, "fp16": True}}, ["train.bf16", "train.fp16"]),
    ({"model": {"cuda_graphs": True, "compile": False}}, ["model.cuda_graphs", "model.compile"]),
    ({"train": {"offload_embedding_state": True, "optim": "adamw_torch"}}, ["train.offload_embedding_state", "adamw_8bit"]),
    ({"train": {"offload_embedding_state": True, "optim": "adamw_8bit", "fsdp": True}}, ["train.offload_embedding_state", "fsdp"]),
    ({"model": {"load_in_4bit": True}, "adapter": {"method": "full"}}, ["model.load_in_4bit", "method: lora"]),
    ({"adapter": {"target_modules": ["q_proj"]}, "train": {"embedding_learning_rate": 1e-6}},
     ["train.embedding_learning_rate", "embed_tokens"]),
    ({"output": {"metric_for_best_model": "domain/bits_per_byte"}}, ["output.metric_for_best_model", "eval.eval_steps"]),
    ({"data": {"sources": [{"path": "a.txt", "dataset": "b"}]}}, ["data.sources[0]", "exactly one of path or dataset"]),
    ({"eval": {"sets": [{"name": "x", "path": "a"}, {"name": "x", "path": "b"}]}}, ["eval.sets[1].name", "own name"]),
])
def test_conflicting_settings_name_both_keys(raw, words):
    _fails(raw, *words)


def test_a_section_with_every_key_commented_out_is_the_defaults(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("model:\n  name_or_path: x\ntrain:\n  # max_steps: 10\n")
    assert load_config(p).train.max_steps == -1


def test_a_key_overriding_a_yaml_merge_is_not_a_duplicate(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("data:\n  sources:\n    - &src {path: a.txt, weight: 3}\n    - <<: *src\n      path: b.txt\n")
    assert [(s.path, s.weight) for s in load_config(p).data.sources] == [("a.txt", 3.0), ("b.txt", 3.0)]


# ---------------------------------------------------------------------------- the file itself


@pytest.mark.parametrize("name, content, words", [
    ("missing.yaml", None, ["missing.yaml", "not found", "check the path"]),
    ("empty.yaml", "", ["empty.yaml", "is empty", "key=value overrides"]),
    ("comments.yaml", "# train:\n#   max_steps: 3\n", ["comments.yaml", "is empty"]),
    ("list.yaml", "- model\n- train\n", ["list.yaml", "top level must be a mapping", "not a list"]),
    ("scalar.yaml", "just some words\n", ["scalar.yaml", "top level must be a mapping", "not a str"]),
    ("syntax.yaml", "model:\n  name_or_path: x\ntrain:\n  max_steps: [3\n", ["syntax.yaml, line 5", "not valid YAML"]),
    ("tabs.yaml", "train:\n\tmax_steps: 3\n", ["tabs.yaml, line 2", "not valid YAML"]),
    ("twice.yaml", "train:\n  max_steps: 3\n  max_steps: 30\n", ["twice.yaml, line 3", "'max_steps' is given twice", "line 2"]),
    ("binary.yaml", b"\xff\xfe\x00model", ["binary.yaml", "not UTF-8"]),
    ("data.jsonl", '{"text": "a"}\n{"text": "b"}\n', ["data.jsonl, line 2", "not valid YAML"]),
])
def test_bad_config_file_names_the_file_and_line(tmp_path, name, content, words):
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        p.write_text(content)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    for w in words:
        assert w in str(e.value), f"{w!r} not in {str(e.value)!r}"


def test_a_folder_given_as_config_says_so_and_points_at_its_config(tmp_path):
    with pytest.raises(ConfigError, match="is a folder: give the path of a YAML file$"):
        load_config(tmp_path)
    (tmp_path / "config.yaml").write_text("train:\n  max_steps: 3\n")  # a run folder
    with pytest.raises(ConfigError, match=f"a run's config is {tmp_path / 'config.yaml'}"):
        load_config(tmp_path)


# ---------------------------------------------------------------------------- output locations


class _Loaded(Exception):
    """Raised where the model would load: the checks before it have passed."""


@pytest.fixture()
def no_model_load(monkeypatch):
    def load(*a, **k):
        raise _Loaded()
    monkeypatch.setattr(cpt.api, "build_model", load)


def _cfg(tmp_path, *extra):
    data = tmp_path / "docs.txt"
    data.write_text("a document\n")
    return load_config(None, ["model.name_or_path=unused", f"data.path={data}", f"data.cache_dir={tmp_path / 'cache'}",
                              f"output.output_dir={tmp_path / 'run'}", *extra])


def _path_error(cfg, *words):
    """run_training stops with a ConfigError naming `words`, before the model loads."""
    with pytest.raises(ConfigError) as e:
        run_training(cfg)
    for w in words:
        assert w in str(e.value), f"{w!r} not in {str(e.value)!r}"
    return str(e.value)


def test_output_dir_that_is_a_file(tmp_path, no_model_load):
    (tmp_path / "run").write_text("not a folder")
    _path_error(_cfg(tmp_path), "output.output_dir", str(tmp_path / "run"), "is a file", "choose another output.output_dir")
    assert (tmp_path / "run").read_text() == "not a folder"


def test_output_dir_under_a_file(tmp_path, no_model_load):
    (tmp_path / "f").write_text("")
    _path_error(_cfg(tmp_path, f"output.output_dir={tmp_path / 'f' / 'run'}"), "output.output_dir", "is not a folder",
                str(tmp_path / "f"))


def test_missing_output_dir_is_made_by_the_run_and_not_before(tmp_path, no_model_load):
    deep = tmp_path / "a" / "b" / "run"
    with pytest.raises(_Loaded):  # the checks pass; a run that fails later leaves no empty folder behind
        run_training(_cfg(tmp_path, f"output.output_dir={deep}"))
    assert not (tmp_path / "a").exists()
    assert not list(tmp_path.glob(".cpt-write-probe-*"))


def test_missing_parents_of_output_dir_are_created(tmp_path, tiny_model_dir, corpus_dir):
    deep = tmp_path / "a" / "b" / "run"
    run_training(load_config(None, [
        f"model.name_or_path={tiny_model_dir}", "model.max_seq_length=32", f"data.path={corpus_dir}",
        f"data.cache_dir={tmp_path / 'cache'}", "adapter.r=4", "adapter.use_gradient_checkpointing=false",
        "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1", "train.max_steps=1",
        f"output.output_dir={deep}", "output.report=false", "output.report_to=[]", "eval.eval_at_start=false"]))
    assert (deep / "adapter_model.safetensors").is_file()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_dir(tmp_path, no_model_load):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _path_error(_cfg(tmp_path, f"output.output_dir={ro / 'run'}"), "output.output_dir", str(ro), "not writable")
    finally:
        ro.chmod(0o755)


def test_read_only_output_dir_by_permissions(tmp_path, no_model_load, monkeypatch):
    """What a user without write permission sees (the tests may run as root, who may write anywhere)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == ro and mode & os.W_OK else real_access(p, mode, **kw))
    _path_error(_cfg(tmp_path, f"output.output_dir={ro / 'run'}"), "output.output_dir", str(ro), "not writable",
                "fix its permissions or choose another output.output_dir")


@pytest.mark.parametrize("code, words", [
    pytest.param(errno.ENOSPC, ["the disk is full", "free some space"], id="ENOSPC"),
    pytest.param(errno.EDQUOT, ["quota"], id="EDQUOT"),
    pytest.param(errno.EROFS, ["read-only"], id="EROFS"),
    pytest.param(errno.EACCES, ["permission denied"], id="EACCES"),
])
def test_output_dir_where_nothing_can_be_written(tmp_path, no_model_load, monkeypatch, code, words):
    """A full disk, a read-only mount or a refused write: the probe file cannot be written."""
    real_open = open

    def refusing_open(file, *a, **k):
        if ".cpt-write-probe" in str(file):
            raise OSError(code, os.strerror(code), str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(ckpt, "open", refusing_open, raising=False)
    (tmp_path / "run").mkdir()
    _path_error(_cfg(tmp_path), "output.output_dir", str(tmp_path / "run"), "choose another output.output_dir", *words)
    assert not list((tmp_path / "run").iterdir())


def test_cache_dir_that_is_a_file(tmp_path, no_model_load):
    cfg = _cfg(tmp_path)
    Path(cfg.data.cache_dir).write_text("")
    _path_error(cfg, "data.cache_dir", cfg.data.cache_dir, "is a file")


def test_streamed_sources_need_no_cache(tmp_path, no_model_load):
    cfg = _cfg(tmp_path, "data.streaming=true")
    Path(cfg.data.cache_dir).write_text("")
    with pytest.raises(_Loaded):
        run_training(cfg)


@pytest.mark.parametrize("extra, words", [
    (["data.path=/nonexistent/docs"], ["data.sources[0].path", "/nonexistent/docs", "no such file"]),
    (["eval.sets=[{name: domain, path: /nonexistent/eval.jsonl}]"], ["eval.sets[0].path", "/nonexistent/eval.jsonl"]),
])
def test_missing_data_paths_are_named_before_the_model_loads(tmp_path, no_model_load, extra, words):
    _path_error(_cfg(tmp_path, *extra), *words)


def test_no_training_data_is_named_before_the_model_loads(tmp_path, no_model_load):
    cfg = load_config(None, ["model.name_or_path=unused", f"output.output_dir={tmp_path / 'run'}"])
    _path_error(cfg, "no training data", "data.path")
