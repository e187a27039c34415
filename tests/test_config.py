import pytest
import yaml

from cpt.config import Config, ConfigError, config_from_dict, help_fields, load_config, redact


def test_defaults_are_the_seed_recipe():
    c = Config()
    assert (c.adapter.r, c.adapter.lora_alpha, c.adapter.use_rslora) == (128, 32, True)
    assert {"embed_tokens", "lm_head"} <= set(c.adapter.target_modules)
    assert (c.train.per_device_train_batch_size, c.train.gradient_accumulation_steps, c.train.seed) == (2, 8, 3407)


def test_yaml_round_trip(tmp_path):
    c = load_config("examples/seed.yaml", ["train.max_steps=7", "adapter.r=16"])
    assert c.train.max_steps == 7 and c.adapter.r == 16 and c.model.load_in_4bit
    c.save(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == c


def test_flat_override_and_flat_yaml():
    c = load_config(None, ["max_steps=3", "embedding_learning_rate=1e-6"])
    assert c.train.max_steps == 3 and c.train.embedding_learning_rate == 1e-6
    c = config_from_dict({"learning_rate": "5e-6", "data": {"path": "x.txt"}})
    assert c.train.learning_rate == 5e-6 and c.data.sources[0].path == "x.txt"


def test_a_data_override_replaces_the_files_source(tmp_path):
    # examples/quickstart.yaml's documented use: its data.path is a placeholder the command line replaces.
    c = load_config("examples/quickstart.yaml", ["data.path=corpus/"])
    assert [s.path for s in c.data.sources] == ["corpus/"]
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"data": {"sources": [{"dataset": "org/web", "name": "en", "text_field": "body"}]}}))
    c = load_config(f, ["data.split=train[:10%]"])  # another source key changes the file's single source
    assert (c.data.sources[0].dataset, c.data.sources[0].split, c.data.sources[0].text_field) == ("org/web", "train[:10%]", "body")
    c = load_config(f, ["data.path=local.jsonl"])  # a new location keeps how the source is read
    assert [(s.path, s.dataset, s.name, s.text_field) for s in c.data.sources] == [("local.jsonl", None, None, "body")]
    c = load_config(f, ["data.dataset=org/other", "data.split=train[:1%]"])
    assert [(s.dataset, s.name, s.split) for s in c.data.sources] == [("org/other", None, "train[:1%]")]
    f.write_text(yaml.safe_dump({"data": {"sources": [{"path": "a.txt"}, {"path": "b.txt"}]}}))
    assert [s.path for s in load_config(f, ["data.path=c.txt"]).data.sources] == ["c.txt"]
    with pytest.raises(ConfigError, match="data.sources.<0..1>.split"):
        load_config(f, ["data.split=x"])


@pytest.mark.parametrize("raw, words", [
    ({"train": {"max_step": 5}}, ["train.max_step", "Did you mean 'train.max_steps'"]),
    ({"train": {"logging_steps": 5}}, ["belongs in 'output.logging_steps'"]),
    ({"adapter": {"r": "big"}}, ["adapter.r", "integer"]),
    ({"train": {"optim": "adamw8bit"}}, ["train.optim", "Did you mean 'adamw_8bit'"]),
    ({"modle": {}}, ["modle", "Did you mean 'model'"]),
    ({"adapter": {"target_modules": ["q_proj"]}, "train": {"embedding_learning_rate": 1e-6}}, ["embedding_learning_rate", "embed_tokens"]),
    ({"model": {"load_in_4bit": True}, "adapter": {"method": "full"}}, ["load_in_4bit"]),
    ({"train": {"bf16": True, "fp16": True}}, ["bf16", "fp16"]),
    ({"data": {"sources": [{"path": "a", "dataset": "b"}]}}, ["data.sources[0]"]),
    ({"train": {"offload_embedding_state": True}}, ["train.offload_embedding_state", "train.optim=adamw_8bit"]),
    ({"train": {"offload_embedding_state": "sometimes"}}, ["train.offload_embedding_state", "true, false or auto"]),
    ({"train": {"offload_embedding_state": True, "optim": "adamw_8bit"}, "adapter": {"target_modules": ["q_proj"]}},
     ["train.offload_embedding_state", "embed_tokens or lm_head"]),
    ({"train": {"offload_embedding_state": True, "optim": "adamw_8bit", "fsdp": True}}, ["train.offload_embedding_state", "fsdp_offload_params"]),
])
def test_bad_config_names_the_key(raw, words):
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw)
    for w in words:
        assert w in str(e.value)


def test_bad_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(p)


def test_secrets_are_redacted():
    dumped = redact({"model": {"name_or_path": "x"}, "hub_token": "hf_abcdefghijklmnopqrstuvwxyz123", "note": "token=hf_abcdefghijklmnopqrstuvwxyz"})
    text = yaml.safe_dump(dumped)
    assert "hf_abcdef" not in text


def test_reference_lists_every_section():
    ref = help_fields()
    for key in ("max_seq_length", "embedding_learning_rate", "save_total_limit", "use_rslora", "holdout_fraction"):
        assert f"`{key}`" in ref


def test_docs_reference_is_current():
    from pathlib import Path
    assert help_fields() in Path("docs/configuration.md").read_text(), "regenerate: cpt config > docs/configuration.md (keep the header)"


def test_every_shipped_yaml_is_valid():
    from pathlib import Path
    for p in sorted(Path("examples").glob("*.yaml")):
        load_config(p)


def test_environment_tokens_are_redacted_whatever_their_shape(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "plainlookingsecret42")
    assert "plainlookingsecret42" not in yaml.safe_dump(redact({"model": {"revision": "x-plainlookingsecret42"}}))


def test_demo_corpus_is_the_same_in_every_process(tmp_path):
    """The demo's corpus is gathered from live docstrings: two processes, with different environment
    variables, must produce identical files, and no variable's value may reach the corpus (cgi's
    functions take `environ=os.environ` as a default)."""
    import os
    import subprocess
    import sys
    code = "import sys; from pathlib import Path; from cpt.demo import build_corpus; build_corpus(Path(sys.argv[1]))"
    for d, extra in (("a", {}), ("b", {"CPT_DEMO_PROBE": "hf_not-a-real-token-but-secret"})):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / d)], check=True, timeout=300,
                       env={**os.environ, **extra})
    for name in ("train.jsonl", "domain_eval.jsonl", "general_eval.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
        assert b"not-a-real-token" not in (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "train.jsonl").stat().st_size > 100_000
