"""Experiment trackers through accelerate: TensorBoard, wandb (offline) and MLflow (a local file store)
each get the run's metrics; a tracker that is missing or cannot log in is named before the model loads.

    python -m pytest tests/test_track.py -q
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpt.api import run_training
from cpt.config import ConfigError, load_config
from cpt.track import check_trackers


def _cfg(model_dir, corpus_dir, out, *extra):
    return load_config(None, [f"model.name_or_path={model_dir}", "model.max_seq_length=32", f"data.path={corpus_dir}",
                              "adapter.r=4", "adapter.use_gradient_checkpointing=false", "train.max_steps=4",
                              "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1",
                              "train.learning_rate=1e-2", f"output.output_dir={out}", "output.logging_steps=2",
                              "output.save_steps=0", "output.report=false", "eval.eval_at_start=false", *extra])


def test_every_tracker_gets_the_metrics(tiny_model_dir, corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    run_training(_cfg(tiny_model_dir, corpus_dir, out, "output.report_to=[tensorboard,wandb,mlflow]",
                      "output.run_name=tracked"))
    losses = {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert sorted(losses) == [2, 4]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out / "tensorboard"))
    tb.Reload()
    assert {e.step: e.value for e in tb.Scalars("train/loss")} == pytest.approx(losses)
    assert "train/lr/adapter" in tb.Tags()["scalars"]

    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    data = list(runs[0].glob("run-*.wandb"))
    assert data and data[0].stat().st_size > 0

    metric_files = list((out / "mlruns").glob("*/*/metrics/train/loss"))
    assert len(metric_files) == 1
    logged = {int(line.split()[2]): float(line.split()[1]) for line in metric_files[0].read_text().splitlines()}
    assert logged == pytest.approx(losses)
    run_dir = metric_files[0].parents[2]
    assert (run_dir / "tags" / "mlflow.runName").read_text() == "tracked"
    assert (run_dir / "params" / "train" / "learning_rate").read_text() == "0.01"


def test_no_tracker_writes_nothing_but_metrics(tiny_model_dir, corpus_dir, tmp_path):
    out = tmp_path / "run"
    run_training(_cfg(tiny_model_dir, corpus_dir, out, "output.report_to=none"))
    assert (out / "metrics.jsonl").is_file()
    assert not any((out / d).exists() for d in ("tensorboard", "wandb", "mlruns"))


def test_trackers_that_cannot_log_are_named_before_the_model_loads(tmp_path, monkeypatch):
    import importlib.util

    cfg = load_config(None, [f"output.output_dir={tmp_path}", "output.report_to=[wandb]"])
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    with pytest.raises(ConfigError, match="WANDB_API_KEY.*WANDB_MODE=offline"):
        check_trackers(cfg)
    monkeypatch.setenv("WANDB_MODE", "offline")
    check_trackers(cfg)

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match="mlflow is not installed: pip install mlflow"):
        check_trackers(load_config(None, [f"output.output_dir={tmp_path}", "output.report_to=[mlflow]"]))
