"""Two processes (gloo, CPU) train like one process with twice the batch, under DDP and FSDP2, and
checkpoints move between the two setups.

The data sampler gives rank r of W the global block slots g with g % W == r, so 2 processes with
per-device batch B see exactly the blocks 1 process with batch 2B sees, and the loss is normalised
by the step's tokens across ranks: the loss curves agree up to float rounding.

    python -m pytest tests/test_distributed.py -q
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

STEPS = 6


def _overrides(model_dir: Path, corpus_dir: Path, out: Path, batch: int, *extra: str) -> list[str]:
    return [f"model.name_or_path={model_dir}", "model.max_seq_length=32", f"data.path={corpus_dir}",
            "adapter.r=8", "adapter.use_gradient_checkpointing=false", f"train.per_device_train_batch_size={batch}",
            "train.gradient_accumulation_steps=2", "train.learning_rate=2e-2", "train.embedding_learning_rate=4e-3",
            f"train.max_steps={STEPS}", f"output.output_dir={out}", "output.logging_steps=1", "output.save_steps=3",
            "output.report=false", "eval.eval_at_start=false", *extra]


def _one_process(*args: str) -> None:
    from cpt.cli import main as cli_main  # here, not at the top: spawned workers re-import this module

    assert cli_main(["train", *args]) == 0


def _two_processes(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cpt.cli", "train", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), f"a step was logged twice (by two ranks?): {steps}"
    return {r["step"]: r["loss"] for r in records}


def _assert_same_curve(a: dict[int, float], b: dict[int, float]) -> None:
    assert a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), f"step {step}: {a[step]} vs {b[step]}"


def _assert_same_adapter(a: Path, b: Path) -> None:
    """Identical format (files, tensor names, shapes, dtypes, config) and values within rounding."""
    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert torch.allclose(ta[k], tb[k], atol=5e-5, rtol=1e-4), (k, (ta[k] - tb[k]).abs().max())
    ca, cb = (json.loads((p / "adapter_config.json").read_text()) for p in (a, b))
    for c in (ca, cb):  # a set in peft, written in no fixed order
        c["target_modules"] = sorted(c["target_modules"])
    assert ca == cb
    assert sorted(p.name for p in a.iterdir() if p.is_file()) == sorted(p.name for p in b.iterdir() if p.is_file())


def test_ddp_two_processes_match_one_process_with_twice_the_batch(tiny_model_dir, corpus_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "ddp"
    _one_process(*_overrides(tiny_model_dir, corpus_dir, one, 4))
    _two_processes(*_overrides(tiny_model_dir, corpus_dir, two, 2))
    _assert_same_curve(_losses(one), _losses(two))
    _assert_same_adapter(one, two)
    _assert_same_adapter(one / "checkpoint-6" / "adapter", two / "checkpoint-6" / "adapter")
    state = json.loads((two / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and (two / "checkpoint-6" / "rng_ranks.pt").is_file()


def _has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_fsdp2(), reason="this torch has no FSDP2 (fully_shard)")
def test_fsdp_tied_matches_one_process_and_resumes_across_setups(tiny_tied_model_dir, corpus_dir, tmp_path):
    """FSDP2 with a tied, fully trained embed_tokens/lm_head, gradient checkpointing and evaluation
    (held-out loss and greedy samples, which need every rank's shards) during training."""
    extra = ("adapter.use_gradient_checkpointing=true", "eval.holdout_fraction=0.1", "eval.eval_steps=3",
             "eval.prompts=[the court]", "eval.max_new_tokens=4")
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    _one_process(*_overrides(tiny_tied_model_dir, corpus_dir, one, 4, *extra))
    _two_processes(*_overrides(tiny_tied_model_dir, corpus_dir, fsdp, 2, "train.fsdp=true", *extra))
    reference = _losses(one)
    _assert_same_curve(reference, _losses(fsdp))
    _assert_same_adapter(one, fsdp)
    _assert_same_adapter(one / "checkpoint-3" / "adapter", fsdp / "checkpoint-3" / "adapter")
    evals = [[json.loads(l) for l in (d / "eval.jsonl").read_text().splitlines()] for d in (one, fsdp)]
    assert [(r["step"], r["set"]) for r in evals[1]] == [(3, "domain"), (6, "domain")]  # written once, by rank 0
    for r1, r2 in zip(*evals):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
    samples = [[json.loads(l)["completion"] for l in (d / "samples.jsonl").read_text().splitlines()] for d in (one, fsdp)]
    assert samples[0] == samples[1]
    # The optimizer state is full and keyed by name under either strategy.
    opt = torch.load(fsdp / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert all(isinstance(k, str) for k in opt["state"])

    # FSDP on 2 processes -> 1 process, and 1 process -> FSDP on 2: both continue the reference curve.
    to_one, to_fsdp = tmp_path / "to_one", tmp_path / "to_fsdp"
    _one_process(*_overrides(tiny_tied_model_dir, corpus_dir, to_one, 4, *extra,
                             f"output.resume={fsdp / 'checkpoint-3'}"))
    _two_processes(*_overrides(tiny_tied_model_dir, corpus_dir, to_fsdp, 2, "train.fsdp=true", *extra,
                               f"output.resume={one / 'checkpoint-3'}"))
    later = {s: v for s, v in reference.items() if s > 3}
    _assert_same_curve(later, _losses(to_one))
    _assert_same_curve(later, _losses(to_fsdp))
    _assert_same_adapter(one, to_one)
    _assert_same_adapter(one, to_fsdp)


def test_optimizer_state_by_name_and_by_index_load_the_same(tmp_path):
    """Checkpoints written before the name-keyed format (keyed by position) still resume."""
    from types import SimpleNamespace

    from cpt.distributed import Parallel, _named_optimizer_state

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW([{"params": [model[0].weight, model[1].weight]}, {"params": [model[0].bias], "lr": 1e-4}])
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    par = Parallel("single", SimpleNamespace(unwrap_model=lambda m: m, is_main_process=True, process_index=0))
    by_name, by_index = _named_optimizer_state(model, opt), opt.state_dict()
    assert set(by_name["state"]) == {"0.weight", "1.weight", "0.bias"}
    for saved in (by_name, by_index):
        fresh = torch.optim.AdamW([{"params": [model[0].weight, model[1].weight]}, {"params": [model[0].bias], "lr": 1e-4}])
        par.load_optimizer(model, fresh, saved)
        for p in (model[0].weight, model[1].weight, model[0].bias):
            assert torch.equal(fresh.state[p]["exp_avg"], opt.state[p]["exp_avg"])
        assert fresh.param_groups[1]["lr"] == 1e-4
    # Named groups match by name, whatever their order in the checkpoint.
    named = [{"params": [model[0].weight, model[1].weight], "name": "adapter"}, {"params": [model[0].bias], "lr": 1e-4, "name": "embeddings"}]
    opt2 = torch.optim.AdamW(named)
    model(torch.randn(5, 4)).sum().backward()
    opt2.step()
    saved = _named_optimizer_state(model, opt2)
    saved["param_groups"].reverse()
    fresh = torch.optim.AdamW([{**g, "params": list(g["params"])} for g in named])
    par.load_optimizer(model, fresh, saved)
    assert [g["lr"] for g in fresh.param_groups] == [g["lr"] for g in opt2.param_groups]
    other = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match="parameter groups|no parameter"):
        par.load_optimizer(other, torch.optim.AdamW(other.parameters()), by_name)


def _rng_and_stop_worker(rank: int, world: int, init_file: str, folder: str, results: str) -> None:
    import random
    from types import SimpleNamespace

    import torch.distributed as dist

    from cpt.distributed import Parallel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        acc = SimpleNamespace(device=torch.device("cpu"), process_index=rank, is_main_process=rank == 0,
                              unwrap_model=lambda m: m)
        par = Parallel("ddp", acc, world_size=world)
        torch.manual_seed(100 + rank)  # each rank its own streams, as set_seed(device_specific=True) gives
        random.seed(200 + rank)
        rngs = par._gather_rng()
        if rank == 0:
            from cpt import checkpoint as ckpt
            from cpt.distributed import Snapshot

            torch.save(rngs[0]["torch"], Path(folder) / "rng.pt")
            par.write_rank_rng(Path(folder), Snapshot({}, {}, rngs))
            ckpt.write_json(Path(folder) / "trainer_state.json", {"world_size": world, "rng": rngs[0]["rng"]})
        dist.barrier()
        expected = (torch.rand(3).tolist(), random.random())
        torch.manual_seed(0)
        random.seed(0)
        par.restore_rng(Path(folder), json.loads((Path(folder) / "trainer_state.json").read_text()))
        again = (torch.rand(3).tolist(), random.random())
        stop = [par.anyone(rank == 1), par.anyone(False)]
        Path(results, f"{rank}.json").write_text(json.dumps({"expected": expected, "again": again, "stop": stop}))
    finally:
        dist.destroy_process_group()


def test_each_rank_gets_its_own_random_streams_back_and_a_stop_reaches_every_rank(tmp_path):
    """Exact resume on as many ranks needs every rank's dropout streams, not rank 0's copied to all;
    a signal seen by one rank must stop all of them at the same step."""
    import torch.multiprocessing as mp

    folder, results = tmp_path / "ckpt", tmp_path / "results"
    folder.mkdir()
    results.mkdir()
    mp.spawn(_rng_and_stop_worker, args=(2, str(tmp_path / "init"), str(folder), str(results)), nprocs=2)
    out = [json.loads((results / f"{r}.json").read_text()) for r in (0, 1)]
    for r in out:
        assert r["again"] == r["expected"]
        assert r["stop"] == [True, False]
    assert out[0]["expected"] != out[1]["expected"]  # the ranks' streams really differ


def test_fsdp_refuses_what_it_cannot_shard(monkeypatch):
    """Refused before any process group or model exists, with the key to change; one process with
    train.fsdp has nothing to shard and is not refused."""
    from cpt.config import ConfigError, load_config
    from cpt.distributed import build_accelerator

    monkeypatch.setenv("WORLD_SIZE", "2")
    for override, key in (("model.load_in_4bit=true", "model.load_in_4bit"), ("train.optim=adamw_8bit", "train.optim")):
        with pytest.raises(ConfigError, match=key):
            build_accelerator(load_config(None, ["train.fsdp=true", override]), torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert build_accelerator(load_config(None, ["train.fsdp=true", "train.optim=adamw_8bit"]), torch.device("cpu"))


def test_a_second_run_in_one_process_may_change_mixed_precision():
    """accelerate keeps one state per process: a run after a bf16 one (a notebook, the test suite) must
    get its own mixed precision, not "AcceleratorState has already been initialized"."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from cpt.config import load_config
    from cpt.distributed import build_accelerator

    AcceleratorState._reset_state()  # whatever an earlier test left
    assert Accelerator(mixed_precision="bf16", cpu=True).mixed_precision == "bf16"
    accelerator = build_accelerator(load_config(None, []), torch.device("cpu"))
    assert accelerator.mixed_precision == "no"
    assert accelerator.device.type == "cpu"


def test_ddp_with_the_8bit_optimizer_and_split_masters(tiny_model_dir, corpus_dir, tmp_path):
    """bf16 with adamw_8bit under DDP: the embeddings keep split masters (dense gradients, reduced
    across ranks; the row-sparse form is for one process), the adapters take bitsandbytes' per-tensor
    step (the flat pass is for one process). Two processes follow one process with twice the batch,
    whose run uses the sparse gradient and the flat pass, within the 8-bit states' rounding."""
    pytest.importorskip("bitsandbytes")
    extra = ("model.dtype=bfloat16", "train.optim=adamw_8bit", "adapter.r=64", "train.learning_rate=5e-3",
             "train.embedding_learning_rate=1e-3")
    one, two = tmp_path / "one", tmp_path / "ddp"
    _one_process(*_overrides(tiny_model_dir, corpus_dir, one, 4, *extra))
    _two_processes(*_overrides(tiny_model_dir, corpus_dir, two, 2, *extra))
    a, b = _losses(one), _losses(two)
    assert a.keys() == b.keys() and a[STEPS] < a[1]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-4), f"step {step}: {a[step]} vs {b[step]}"
    saved = repr(torch.load(two / "checkpoint-6" / "optimizer.pt", weights_only=False))
    assert "'lo': tensor(" in saved
