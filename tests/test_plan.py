"""`cpt plan`: the memory estimate against measured H200 numbers, FLOP counts, memory-aware choice.

    python -m pytest tests/test_plan.py -q
"""
from __future__ import annotations

import pytest

from cpt.config import ConfigError, config_from_dict
from cpt.plan import apply_memory_plan, model_flops_per_token, plan, plan_main, recompute_layers_for_budget

LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)


def _cfg(nf4: bool = False, **adapter) -> object:
    return config_from_dict({
        "model": {"name_or_path": "unused", "max_seq_length": 2048, "load_in_4bit": nf4},
        "adapter": {"r": 128, "lora_alpha": 32, "use_rslora": True, **adapter},
        "train": {"per_device_train_batch_size": 2, "optim": "adamw_8bit", "learning_rate": 5e-6,
                  "embedding_learning_rate": 1e-6},
    })


def _llama_8b():
    from transformers import LlamaConfig
    return LlamaConfig(**LLAMA_8B)


@pytest.mark.parametrize("nf4, measured", [(False, 28.9), (True, 19.3)])
def test_baseline_estimate_within_15_percent_of_the_reference_measurement(nf4, measured):
    """gpu_anchor.md measured transformers + peft on one H200 at these settings."""
    est = plan(_cfg(nf4), _llama_8b(), system="baseline", gpu_memory_gib=139.8)
    assert abs(est["peak_gib"] - measured) / measured < 0.15, est["peak_gib"]
    assert est["fits"]


@pytest.mark.parametrize("mode", ["bf16", "nf4"])
def test_baseline_speed_estimate_stands_within_15_percent_of_every_committed_baseline_run(mode):
    """The baselines' tokens/s in every committed bench/results/gpu_throughput*.json (the 4-bit one runs
    in two speed modes from call to call, 5,479-7,116 tokens/s) and the anchor's, against `cpt plan`."""
    import json
    from pathlib import Path

    est = plan(_cfg(mode == "nf4"), _llama_8b(), system="baseline", gpu_memory_gib=139.8)["tokens_per_s"]
    runs = [{"bf16": 6751, "nf4": 5984}[mode]]
    for f in (Path(__file__).resolve().parents[1] / "bench" / "results").glob("gpu_throughput*.json"):
        row = json.loads(f.read_text()).get(mode, {}).get("baseline")
        if isinstance(row, dict):
            runs += row.get("tokens_per_s_runs") or [row["tokens_per_s"]]
    assert len(runs) >= 3
    assert all(abs(est / r - 1) < 0.15 for r in runs), (est, sorted(runs))


def test_flops_per_token_match_the_anchor_count():
    kw = dict(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256, r=128, seq=2048)
    assert model_flops_per_token(**kw) / 1e9 == pytest.approx(49.32, abs=0.01)
    assert model_flops_per_token(**kw, recompute_layers=0) / 1e9 == pytest.approx(34.69, abs=0.01)


def test_float32_masters_and_fused_loss_move_the_right_terms():
    mc = _llama_8b()
    ours = plan(_cfg(), mc, system="ours", gpu_memory_gib=139.8)
    base = plan(_cfg(), mc, system="baseline", gpu_memory_gib=139.8)
    assert ours["memory_gib"]["trained embeddings"] == pytest.approx(2 * base["memory_gib"]["trained embeddings"])
    assert ours["activations_gib"]["loss"] < base["activations_gib"]["loss"] / 2
    bf16 = plan(_cfg(embedding_master_dtype="model"), mc, gpu_memory_gib=139.8)
    assert bf16["peak_gib"] < ours["peak_gib"]


def test_memory_aware_keeps_more_layers_with_more_memory():
    mc, cfg = _llama_8b(), _cfg()
    small, large = recompute_layers_for_budget(cfg, mc, 32.0), recompute_layers_for_budget(cfg, mc, 60.0)
    assert 0 <= large < small <= 32
    assert plan(cfg, mc, gpu_memory_gib=32.0, recompute_layers=small)["peak_gib"] <= 32.0
    if small > 0:
        assert plan(cfg, mc, gpu_memory_gib=32.0, recompute_layers=small - 1)["peak_gib"] > 32.0
    keep_all = plan(cfg, mc, gpu_memory_gib=139.8, recompute_layers=0)
    assert keep_all["flops_per_token"] < plan(cfg, mc, gpu_memory_gib=139.8)["flops_per_token"]


def test_memory_plan_rejects_a_bad_budget():
    cfg = _cfg(recompute_budget_gib="lots")

    class M:
        config = _llama_8b()
    with pytest.raises(ConfigError, match="recompute_budget_gib"):
        apply_memory_plan(M(), cfg, "cuda")
    assert apply_memory_plan(M(), _cfg(), "cpu") is None  # no budget: nothing to do


def test_memory_plan_warns_when_the_budget_cannot_be_met(tiny_model_dir, caplog, monkeypatch):
    """A numeric budget under what the run needs even with every layer recomputing: every layer
    recomputes and a warning names the key and the estimate; a budget that fits stays silent."""
    import logging

    import cpt.kernels
    from cpt.config import load_config
    from cpt.model import load_model_config

    class M:
        config = load_model_config(load_config(None, [f"model.name_or_path={tiny_model_dir}"]).model)
    calls = []
    monkeypatch.setattr(cpt.kernels, "set_recompute", lambda model, k, offload=False, host_layers=0: calls.append(k))
    caplog.set_level(logging.WARNING, logger="cpt")
    for budget, recompute, warned in (("0.0001", M.config.num_hidden_layers, True), ("500", 0, False)):
        caplog.clear()
        apply_memory_plan(M(), load_config(None, [f"model.name_or_path={tiny_model_dir}",
                                                  f"adapter.recompute_budget_gib={budget}"]), "cpu")
        assert calls[-1] == recompute
        assert ("adapter.recompute_budget_gib=0.00" in caplog.text and "estimates" in caplog.text) == warned


def test_plan_cli_reads_the_model_config(tiny_model_dir, capsys):
    assert plan_main([f"model.name_or_path={tiny_model_dir}", "--gpu-memory-gib", "24"]) == 0
    out = capsys.readouterr().out
    assert "peak" in out and "tokens/s" in out
    assert plan_main([f"model.name_or_path={tiny_model_dir}", "--json", "--baseline"]) == 0
    assert '"system": "baseline"' in capsys.readouterr().out


def test_plan_names_a_model_it_cannot_read(tmp_path):
    with pytest.raises(ConfigError, match="model.name_or_path"):
        plan(config_from_dict({"model": {"name_or_path": str(tmp_path / "nowhere")}}))


def test_plan_leaves_headroom_near_the_cards_limit():
    """The baseline's 64k-token step (micro-batch 1) ran out of memory on a 140 GiB H200, though its
    estimate is 131 GiB: a plan that close to the limit is not called a fit."""
    cfg = config_from_dict({"model": {"name_or_path": "unused", "max_seq_length": 65536},
                            "train": {"per_device_train_batch_size": 1, "optim": "adamw_8bit"}})
    est = plan(cfg, _llama_8b(), system="baseline", gpu_memory_gib=139.8)
    assert 125 < est["peak_gib"] < 139.8 and not est["fits"]
    assert plan(cfg, _llama_8b(), system="ours", gpu_memory_gib=139.8)["fits"]


def test_split_masters_hold_bf16_gradients_and_rows_of_embed_tokens():
    """With adamw_8bit in bf16 the masters are bf16 + low half: same 4 bytes per element, but lm_head's
    gradient is bf16 and embed_tokens' covers the batch's rows only; other optimizers keep float32."""
    mc = _llama_8b()
    split = plan(_cfg(), mc, system="ours", gpu_memory_gib=139.8)
    cfg = _cfg()
    cfg.train.optim = "adamw_torch"
    full = plan(cfg, mc, system="ours", gpu_memory_gib=139.8)
    emb = 128256 * 4096 / 2**30
    assert split["memory_gib"]["trained embeddings"] == pytest.approx(full["memory_gib"]["trained embeddings"])
    # float32 gradients of both matrices (2 x 4 bytes) -> bf16 lm_head (2 bytes) + the rows of the step's
    # micro-batches for embed_tokens (4096 tokens each, accumulated as rows until the step)
    rows = 4096 * cfg.train.gradient_accumulation_steps
    assert full["gradients_gib"] - split["gradients_gib"] == pytest.approx(emb * 6 - rows * (4096 * 2 + 8) / 2**30, rel=1e-3)
    assert split["activations_gib"]["loss"] < full["activations_gib"]["loss"]  # no bf16 copy of the head


def test_offloaded_embedding_states_leave_the_gpu_and_cost_copy_time_only_with_clipping():
    """train.offload_embedding_state: the low halves and moment codes (4 bytes per trained embedding
    element) move to host memory (twice: the early passes write the second set); the GPU keeps the block maxima
    twice and three staging chunks. The copies hide behind the backward pass except lm_head's when
    gradients are clipped."""
    mc = _llama_8b()
    on = _cfg()
    on.train.offload_embedding_state = True
    on.train.max_grad_norm = 0.0
    off = _cfg()
    off.train.max_grad_norm = 0.0
    a, b = plan(off, mc, system="ours", gpu_memory_gib=139.8), plan(on, mc, system="ours", gpu_memory_gib=139.8)
    n = 2 * 128256 * 4096
    emb = n / 2**30
    assert b["host_memory_gib"] == pytest.approx(emb * 8)
    saved = emb * 4 - 2 * emb * 8 / 256 - 3 * 2**23 * 4 / 2**30  # the batch's rows come back only at the step
    static = {k: sum(p["memory_gib"].values()) for k, p in (("off", a), ("on", b))}
    assert static["off"] - static["on"] == pytest.approx(saved, rel=1e-3)
    assert a["peak_at"] == b["peak_at"] == "end of backward"
    assert a["peak_gib"] - b["peak_gib"] == pytest.approx(saved, rel=1e-3)
    # Without clipping the step waits for EARLY_EXPOSED_SHARE of the copies (4 bytes per element each way).
    from cpt.plan import EARLY_EXPOSED_SHARE, HOST_LINK_GB_S
    tokens = 4096 * on.train.gradient_accumulation_steps  # one optimizer step's
    step = tokens / a["tokens_per_s"] + EARLY_EXPOSED_SHARE * n * 4 / (HOST_LINK_GB_S * 1e9)
    assert b["tokens_per_s"] == pytest.approx(tokens / step)
    on.train.max_grad_norm = 1.0
    clipped = plan(on, mc, system="ours", gpu_memory_gib=139.8)
    assert clipped["tokens_per_s"] < b["tokens_per_s"]


def test_auto_moves_the_embedding_states_only_when_the_run_would_not_fit():
    """train.offload_embedding_state=auto (the default): an 8B bf16 run with its 128k-vocabulary embeddings
    trained does not fit a 24 GiB GPU with the states there (~24.5 GiB) and does with them in host memory;
    on an 80 GiB GPU they stay."""
    mc = _llama_8b()
    cfg = _cfg()
    assert cfg.train.offload_embedding_state == "auto"
    small, large = plan(cfg, mc, gpu_memory_gib=24.0), plan(cfg, mc, gpu_memory_gib=80.0)
    assert small["offload_embedding_state"] and small["fits"] and small["host_memory_gib"] > 7.5
    assert not large["offload_embedding_state"] and large["host_memory_gib"] == 0
    forced = _cfg()
    forced.train.offload_embedding_state = False
    assert not plan(forced, mc, gpu_memory_gib=24.0)["fits"]
    # A numeric adapter.recompute_budget_gib caps the run: on the 80 GiB GPU, under 22 GiB, they move.
    capped = _cfg()
    capped.adapter.recompute_budget_gib = 22.0
    est = plan(capped, mc, gpu_memory_gib=80.0)
    assert est["offload_embedding_state"] and est["peak_gib"] <= 22.0 < large["peak_gib"]
    capped.adapter.recompute_budget_gib = "auto"
    assert not plan(capped, mc, gpu_memory_gib=80.0)["offload_embedding_state"]


def test_auto_offload_is_decided_at_model_setup(tiny_model_dir):
    """On a CPU (and wherever nothing needs moving) auto resolves to false before the optimizer exists."""
    from cpt.config import load_config
    from cpt.model import build_model

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.max_seq_length=32", "train.optim=adamw_8bit"])
    assert cfg.train.offload_embedding_state == "auto"
    import torch

    build_model(cfg, torch.device("cpu"))
    assert cfg.train.offload_embedding_state is False


def test_host_layers_under_a_cap_trade_link_time_for_recompute():
    """adapter.host_activations=auto (the default) adds host layers only under a numeric cap, as many
    as the link carries during the forward pass; they cut the recompute FLOPs (gate and up) and cost
    pinned host memory and one layer's copies in flight, and the plan still fits the cap."""
    from cpt.plan import host_activation_bytes, memory_plan, shape_from_config

    mc = _llama_8b()
    capped = _cfg(recompute_budget_gib=21.5)
    k, host = memory_plan(capped, mc, 21.5)
    assert 10 <= host <= 32 - 2 - 3 and k >= host
    with_host = plan(capped, mc, gpu_memory_gib=139.8, recompute_layers=k, host_layers=host)
    without = plan(capped, mc, gpu_memory_gib=139.8, recompute_layers=k, host_layers=0)
    assert with_host["host_layers"] == host and with_host["peak_gib"] <= 21.5
    per_layer = 2 * 2 * (4096 * 14336 + 128 * (4096 + 14336))
    assert without["flops_per_token"] - with_host["flops_per_token"] == pytest.approx(host * per_layer)
    assert with_host["tokens_per_s"] > 1.05 * without["tokens_per_s"]
    moved = host * host_activation_bytes(shape_from_config(mc), 4096) / 2**30
    assert with_host["host_memory_gib"] == pytest.approx(without["host_memory_gib"] + moved)
    assert with_host["activations_gib"]["host layers' activations in flight"] == pytest.approx(224 / 1024)
    # The link bounds the count: the copies out fit in the forward pass's share of the step.
    from cpt.plan import FORWARD_SHARE, HOST_LINK_GB_S
    step_s = 4096 / without["tokens_per_s"]
    assert host * host_activation_bytes(shape_from_config(mc), 4096) <= HOST_LINK_GB_S * 1e9 * FORWARD_SHARE * step_s
    # No cap, none asked for, a number, not compiled.
    assert plan(_cfg(), mc, gpu_memory_gib=139.8)["host_layers"] == 0
    assert memory_plan(_cfg(recompute_budget_gib=21.5, host_activations=0), mc, 21.5)[1] == 0
    assert plan(_cfg(host_activations=4), mc, gpu_memory_gib=139.8)["host_layers"] == 4
    no_compile = config_from_dict({"model": {"name_or_path": "unused", "compile": False}, "adapter": {"host_activations": 4}})
    assert plan(no_compile, mc, gpu_memory_gib=139.8)["host_layers"] == 0


@pytest.mark.parametrize("value, ok", [("auto", "auto"), (3, 3), ("5", 5), (0, 0), ("lots", None), (-1, None), (True, None)])
def test_host_activations_key_is_checked(value, ok):
    if ok is None:
        with pytest.raises(ConfigError, match="adapter.host_activations"):
            config_from_dict({"adapter": {"host_activations": value}})
    else:
        assert config_from_dict({"adapter": {"host_activations": value}}).adapter.host_activations == ok


def test_memory_plan_hands_host_layers_to_set_recompute_on_cuda_only(monkeypatch):
    """model setup: under a numeric cap the plan's host layers reach set_recompute on a CUDA device
    (nothing on CPU); a fixed number without a cap applies to all-recomputing layers."""
    import cpt.kernels

    class M:
        config = _llama_8b()
    calls = []
    monkeypatch.setattr(cpt.kernels, "set_recompute",
                        lambda model, k, offload=False, host_layers=0: calls.append((k, host_layers)))
    apply_memory_plan(M(), _cfg(recompute_budget_gib=21.5), "cuda")
    k, host = calls[-1]
    assert host > 0 and k is not None and k >= host
    apply_memory_plan(M(), _cfg(recompute_budget_gib=21.5), "cpu")
    assert calls[-1][1] == 0
    apply_memory_plan(M(), _cfg(host_activations=6), "cuda")
    assert calls[-1] == (None, 6)
    n = len(calls)
    assert apply_memory_plan(M(), _cfg(host_activations=6), "cpu") is None and len(calls) == n


def _bench():
    """(bench/gpu_throughput.py as a module, the repository root)."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    try:
        import gpu_throughput as bench
    finally:
        sys.path.remove(str(root / "bench"))
    return bench, root


def test_a_row_whose_layers_failed_to_compile_says_so():
    """Compiling the decoder layers can fail mid-run (the loop then goes on with the plain layers at about
    half the speed, bench/NOTES.md, session 15): such a row must not read as the compiled code's."""
    bench, _ = _bench()
    row = {"kernels": ["decoder layers compiled (32 of 32), CUDA graphs"], "dynamo": {"compile_failed": {}}}
    assert bench._graphs_label(row) == ", CUDA graphs"
    row["dynamo"]["compile_failed"] = {"inductor": "RuntimeError: operation not permitted when stream is capturing"}
    label = bench._graphs_label(row)
    assert "FAILED" in label and "not permitted" in label and "CUDA graphs" not in label.split("),")[-1]


def test_estimates_stand_beside_the_committed_h200_measurements():
    """`cpt plan` for every row of bench/results/gpu_throughput.json (the issue asks for 15%): each of
    our bf16/nf4 rows, as configured there (recomputing and host layers as the run reports them), is
    within 10% of the measured tokens/s and 5% of the measured peak."""
    import json
    from pathlib import Path

    bench, root = _bench()
    res = json.loads((root / "bench" / "results" / "gpu_throughput.json").read_text())
    checked = 0
    for mode in ("bf16", "nf4"):
        for system, row in res[mode].items():
            if not system.startswith("ours") or not isinstance(row, dict) or "tokens_per_s" not in row:
                continue
            layers = row.get("layers") or {"keep": 0, "host": 0}
            budget = row.get("budget_gib")
            cfg = bench.ours_config(Path("unused"), mode, 2048, 2, 1, recompute_budget=budget,
                                    offload_embedding_state=row.get("offload_embedding_state", False),
                                    host_activations=layers.get("host", 0))
            est = plan(cfg, _llama_8b(), gpu_memory_gib=139.8, recompute_layers=32 - layers["keep"],
                       host_layers=layers.get("host", 0))
            assert abs(est["tokens_per_s"] / row["tokens_per_s"] - 1) < 0.10, (mode, system, est["tokens_per_s"])
            assert abs(est["peak_gib"] / row["peak_gib"] - 1) < 0.05, (mode, system, est["peak_gib"])
            checked += 1
    assert checked >= 4  # ours and the capped row, in both modes


def test_capped_rows_get_the_layers_they_ran_with_and_worker_peaks_stand():
    """The capped rows of bench/results/gpu_throughput.json ran with the kept and host layers the memory
    plan picks for their budget today; and each capped worker run of session 13
    (gpu_throughput_s13_workers.json: 1 or 2 kept layers, 10-24 host layers, both modes) peaked within
    2% of the plan's estimate. The plan once left the kept layers' activations out of the backward
    peak: it put 2 kept 4-bit layers at 11.5 GiB, which peaked at 12.04 over an 11.74 cap."""
    import json
    from pathlib import Path

    from cpt.plan import memory_plan

    bench, root = _bench()
    res = json.loads((root / "bench" / "results" / "gpu_throughput.json").read_text())
    for mode in ("bf16", "nf4"):
        row = res[mode]["ours_budget"]
        cfg = bench.ours_config(Path("unused"), mode, 2048, 2, 1, recompute_budget=row["budget_gib"], offload_embedding_state="auto")
        assert memory_plan(cfg, _llama_8b(), row["budget_gib"]) == (32 - row["layers"]["keep"], row["layers"]["host"]), mode
    workers = json.loads((root / "bench" / "results" / "gpu_throughput_s13_workers.json").read_text())
    checked = 0
    for call in workers["calls"].values():
        for name, w in call.items():
            if "dequant" in w["args"] or "reuse" in w["args"]:  # other code paths (experiments)
                continue
            mode = "nf4" if "--mode nf4" in w["args"] else "bf16"
            budget = float(w["args"].split("--recompute-budget ")[1].split()[0])
            keep, host = w["layers"]["keep"], w["layers"]["host"]
            cfg = bench.ours_config(Path("unused"), mode, 2048, 2, 1, recompute_budget=budget,
                                    offload_embedding_state="auto", host_activations=host)
            est = plan(cfg, _llama_8b(), gpu_memory_gib=139.8, recompute_layers=32 - keep, host_layers=host)
            assert abs(est["peak_gib"] / w["peak_gib"] - 1) < 0.02, (name, est["peak_gib"], w["peak_gib"])
            checked += 1
    assert checked >= 7
