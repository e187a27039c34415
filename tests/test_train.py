"""The loop end to end on a tiny model: learning, frozen base, accumulation, outputs, CLI, resume."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cpt.api import run_training
from cpt.cli import main as cli_main
from cpt.config import load_config


def _overrides(model_dir, corpus_dir, out, *extra):
    return [f"model.name_or_path={model_dir}", "model.max_seq_length=32", f"data.path={corpus_dir}",
            "adapter.r=8", "adapter.use_gradient_checkpointing=false", "train.per_device_train_batch_size=2",
            "train.gradient_accumulation_steps=2", "train.learning_rate=2e-2", "train.embedding_learning_rate=4e-3",
            "train.warmup_ratio=0", "train.max_steps=30", f"output.output_dir={out}", "output.logging_steps=5",
            "output.save_steps=10", "output.save_total_limit=2", "output.report=false", "eval.eval_at_start=false",
            *extra]


def _metrics(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_cli_train_learns_and_writes_hf_outputs(tiny_model_dir, corpus_dir, tmp_path):
    out = tmp_path / "run"
    assert cli_main(["train", *_overrides(tiny_model_dir, corpus_dir, out)]) == 0
    m = _metrics(out)
    assert [r["step"] for r in m] == [5, 10, 15, 20, 25, 30]
    assert m[-1]["loss"] < 0.8 * m[0]["loss"]  # a learnable corpus: loss falls
    assert set(m[0]["lr"]) == {"adapter", "embeddings"}
    assert m[0]["lr"]["embeddings"] / m[0]["lr"]["adapter"] == pytest.approx(0.2)
    assert m[-1]["tokens_per_s"] > 0 and m[-1]["tokens"] > 0
    # rotation kept the newest two complete checkpoints
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]
    # HF-native outputs: adapter with trained embeddings, tokenizer, config
    for f in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "config.yaml", "run_summary.json"):
        assert (out / f).is_file(), f
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert any("embed_tokens" in k for k in adapter) and any("lm_head" in k for k in adapter)
    assert any("lora_A" in k for k in adapter)


def test_frozen_base_unchanged_adapter_and_embeddings_changed(tiny_model_dir, corpus_dir, tmp_path):
    from cpt.build import build_model
    cfg = load_config(None, _overrides(tiny_model_dir, corpus_dir, tmp_path / "r", "train.max_steps=5"))
    from cpt.data import build_data
    from cpt.train import Trainer
    bundle = build_model(cfg)
    frozen = {n: p.detach().clone() for n, p in bundle.model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in bundle.model.named_parameters() if p.requires_grad}
    Trainer(cfg, bundle, build_data(cfg, bundle.tokenizer)).train()
    params = dict(bundle.model.named_parameters())
    assert frozen and all(torch.equal(params[n], v) for n, v in frozen.items())
    changed = {n for n, v in trained.items() if not torch.equal(params[n], v)}
    assert any("embed_tokens" in n for n in changed) and any("lm_head" in n for n in changed)
    assert any("lora_B" in n for n in changed)


def test_accumulation_matches_one_big_batch(tiny_model_dir, corpus_dir, tmp_path):
    """Loss is normalised by real tokens over the whole step: 4x1 and 2x2 give the same update. The loop's
    arithmetic is what is checked, so every device runs it in float32 on plain PyTorch (what `auto` gives on a
    CPU): in a GPU's bf16 the saved weights differ by a rounding step wherever the micro-batch shape changes
    which GEMM kernel runs, and that says nothing about the normalisation."""
    results = []
    for bs, acc in ((4, 1), (2, 2), (1, 4)):
        cfg = load_config(None, _overrides(tiny_model_dir, corpus_dir, tmp_path / f"a{bs}", "train.max_steps=2",
                                           f"train.per_device_train_batch_size={bs}", f"train.gradient_accumulation_steps={acc}",
                                           "data.shuffle=false", "train.max_grad_norm=0", "model.dtype=float32",
                                           "model.kernels=none", "model.compile=false",
                                           # eps >> |g| makes Adam's update proportional to the gradient, so
                                           # float rounding noise cannot flip an update's sign.
                                           "train.adam_epsilon=1.0"))
        run_training(cfg)
        results.append(load_file(str(tmp_path / f"a{bs}" / "adapter_model.safetensors")))
    for other in results[1:]:
        for k in results[0]:
            assert torch.allclose(results[0][k], other[k], atol=1e-7, rtol=1e-5), k


def test_resume_auto_continues_and_refuses_foreign_output(tiny_model_dir, corpus_dir, tmp_path):
    out = tmp_path / "run"
    args = _overrides(tiny_model_dir, corpus_dir, out, "train.max_steps=10", "output.save_steps=5")
    assert cli_main(["train", *args]) == 0
    assert cli_main(["train", *args, "train.max_steps=15"]) == 0  # resumes at 10, runs 5 more
    steps = [r["step"] for r in _metrics(out)]
    assert steps == [5, 10, 15]
    # starting fresh over a finished run is refused without overwrite_output_dir
    assert cli_main(["train", *args, "output.resume=false"]) == 2


def test_merge_and_generate_cli(tiny_model_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["train", *_overrides(tiny_model_dir, corpus_dir, out, "train.max_steps=3")]) == 0
    assert cli_main(["merge", str(out), str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    capsys.readouterr()
    assert cli_main(["generate", str(tmp_path / "merged"), "--prompt", "the court", "--max-new-tokens", "5", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt"] == "the court" and isinstance(line["completion"], str)


def test_bad_config_exits_2_naming_key(tmp_path, capsys):
    assert cli_main(["train", "train.max_stepz=3"]) == 2
    assert "did you mean 'train.max_steps'" in capsys.readouterr().err.lower()


def test_delegated_commands_keep_their_own_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["plan", "--help"])
    assert e.value.code == 0 and "plan" in capsys.readouterr().out
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"document number {i} about contracts", "id": i, "url": "u"}) for i in range(20)))
    assert cli_main(["inspect", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "unlabeled" in json.dumps(report).lower()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
def test_moving_a_batch_does_not_wait_for_the_gpu():
    """The loop moves each step's batch (and the early pass its token ids) while the GPU still works on
    the previous step: a copy from pageable memory would wait for the queue to drain first (the 8B
    bench lost 60-80 ms a step to that with the embedding states in host memory)."""
    import time

    from cpt.train import to_device

    cuda = torch.device("cuda")
    ids = torch.randint(0, 1000, (2, 2048))
    to_device(ids, cuda)
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU work queued ahead
    t0 = time.perf_counter()
    moved = to_device(ids, cuda)
    waited = time.perf_counter() - t0
    assert waited < 0.2, waited
    assert torch.equal(moved.cpu(), ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
@pytest.mark.parametrize("accumulation,optim", [(1, "adamw_torch"), (2, "adamw_torch"), (2, "adamw_8bit")])
def test_cuda_graphs_train_as_the_compiled_layers_do(tiny_model_dir, corpus_dir, tmp_path, accumulation, optim, monkeypatch):
    """model.cuda_graphs replays the compiled layers as CUDA graphs: the same losses and weights as
    without, with recomputation, and with gradient accumulation (a graph's output buffer kept as a
    first .grad would be overwritten by the next micro-batch's replay; with adamw_8bit embed_tokens'
    row-sparse gradient is a view of one)."""
    if optim == "adamw_8bit":
        pytest.importorskip("bitsandbytes")
    from cpt.speed import graphs_recorded

    results = []
    for graphs in (False, True):
        out = tmp_path / f"g{int(graphs)}"
        cfg = load_config(None, _overrides(tiny_model_dir, corpus_dir, out, "train.max_steps=6", "output.logging_steps=1",
                                           "output.save_steps=0", "data.shuffle=false", "train.max_grad_norm=0",
                                           "adapter.use_gradient_checkpointing=true", "model.compile=true",
                                           f"train.gradient_accumulation_steps={accumulation}", f"train.optim={optim}",
                                           f"model.cuda_graphs={str(graphs).lower()}"))
        summary = run_training(cfg)
        assert "compile_failed" not in summary, summary["compile_failed"]
        if graphs:  # 2 layers x (forward, backward), recorded in the second micro-batch
            assert graphs_recorded(torch.cuda.current_device()) >= 4
        results.append(([r["loss"] for r in _metrics(out)], load_file(str(out / "adapter_model.safetensors"))))
    (loss_a, w_a), (loss_b, w_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-3)
    for k in w_a:
        a, b = w_a[k].float(), w_b[k].float()
        off = ~torch.isclose(a, b, atol=1e-5, rtol=1e-3)
        assert not off.any(), (f"{k}: {int(off.sum())} of {off.numel()} elements differ, by up to "
                               f"{(a - b).abs().max().item():.2e}")
    assert any(not torch.equal(w_a[k], torch.zeros_like(w_a[k])) for k in w_a if "lora_B" in k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
def test_evaluation_on_the_gpu_with_the_embedding_originals_in_host_memory(tiny_model_dir, corpus_dir, tmp_path):
    """The run plan keeps the trained embeddings' frozen originals in host memory, so the model's first
    parameter is on the CPU: evaluation still scores on the GPU, where the model runs."""
    out = tmp_path / "run"
    cfg = load_config(None, _overrides(tiny_model_dir, corpus_dir, out, "train.max_steps=2", "output.save_steps=0",
                                       "eval.holdout_fraction=0.2", "eval.eval_steps=1", "eval.prompts=[]"))
    assert run_training(cfg)["step"] == 2
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [1, 2] and all(0 < e["bits_per_byte"] < 100 for e in evals)


def test_cuda_graphs_need_compiled_layers():
    from cpt.config import ConfigError

    with pytest.raises(ConfigError, match="model.cuda_graphs"):
        load_config(None, ["model.cuda_graphs=true", "model.compile=false"])
    with pytest.raises(ConfigError, match="model.cuda_graphs"):
        load_config(None, ["model.cuda_graphs=sometimes"])
    assert load_config(None, ["model.compile=false", "model.cuda_graphs=auto"]).model.cuda_graphs == "auto"  # off where nothing compiles


def test_the_loop_lists_the_trained_parameters_once_not_every_step(tiny_model_dir, corpus_dir, tmp_path):
    """Walking an 8B LoRA model's ~2,700 modules for its parameters took the host ~6 ms per step while
    the GPU waited (docs/performance.md): the loop lists them once. Calls of model.parameters()
    must not grow with the number of steps (here with gradient clipping on, which walks them too)."""
    from cpt.data import build_data
    from cpt.build import build_model
    from cpt.train import Trainer

    calls = {}
    for steps in (2, 6):
        cfg = load_config(None, _overrides(tiny_model_dir, corpus_dir, tmp_path / f"p{steps}", f"train.max_steps={steps}",
                                           "train.max_grad_norm=1.0", "output.save_steps=100"))
        bundle = build_model(cfg)
        model, n = bundle.model, [0]
        walk = model.parameters

        def counted(*a, **k):
            n[0] += 1
            return walk(*a, **k)

        model.parameters = counted
        Trainer(cfg, bundle, build_data(cfg, bundle.tokenizer)).train()
        calls[steps] = n[0]
    assert calls[2] == calls[6], calls


def test_a_failed_compile_is_named_in_the_run_summary(tiny_model_dir, corpus_dir, tmp_path, monkeypatch):
    """If compiling the decoder layers failed (the layers then train plain, on a GPU much slower), the
    run's summary says why, not only a warning in the log (the report shows it: tests/test_report.py)."""
    import cpt.speed

    out = tmp_path / "ok"
    run_training(load_config(None, _overrides(tiny_model_dir, corpus_dir, out, "train.max_steps=2")))
    assert "compile_failed" not in json.loads((out / "run_summary.json").read_text())
    monkeypatch.setattr(cpt.speed.Speed, "compile_failed", property(lambda s: "RuntimeError: no C compiler on this machine"))
    out = tmp_path / "failed"
    run_training(load_config(None, _overrides(tiny_model_dir, corpus_dir, out, "train.max_steps=2")))
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["compile_failed"] == "RuntimeError: no C compiler on this machine"


def test_the_saved_config_is_the_one_given_and_the_run_plan_sits_beside_it(tiny_model_dir, corpus_dir, tmp_path):
    """The run plan's choices (kernels, recomputation, host memory) never rewrite the user's config: the
    config.yaml of the run and of its checkpoints equals the one given, 'auto's included, and the
    resolved plan is saved next to it as run_plan.json."""
    import yaml

    from cpt.plan import RunPlan

    out = tmp_path / "run"
    given = tmp_path / "given.yaml"
    given.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_model_dir), "max_seq_length": 64},
        "data": {"sources": [{"path": str(corpus_dir)}]},
        "adapter": {"r": 8, "lora_alpha": 16},
        "train": {"max_steps": 2, "per_device_train_batch_size": 2, "optim": "adamw_8bit"},
        "output": {"output_dir": str(out), "save_steps": 1, "report": False},
    }))
    cfg = load_config(str(given))
    expected = load_config(str(given)).to_dict()
    run_training(cfg)
    assert cfg.to_dict() == expected
    for folder in (out, out / "checkpoint-2"):
        assert load_config(str(folder / "config.yaml")).to_dict() == expected, folder
    run = RunPlan.load(out)
    assert RunPlan.load(out / "checkpoint-2") == run
    if torch.cuda.is_available():
        assert run.device.startswith("cuda") and run.kernels == "cpt"
    else:
        assert run.device == "cpu" and run.kernels == "none" and run.offload_embedding_state is False
    assert expected["train"]["offload_embedding_state"] == "auto" and expected["adapter"]["host_activations"] == "auto"
