"""The reliability guarantees of issue #6, each on a tiny random Llama on CPU (docs/reliability.md
maps every guarantee to its test here or in tests/test_checkpoint.py).

    python -m pytest tests/test_reliability.py -q
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cpt import checkpoint as ckpt
from cpt.api import run_training
from cpt.cli import main as cli_main
from cpt.config import ConfigError, load_config

from bench.soak_resume import exact_metrics, final_state  # what a resumed run must repeat bit for bit

# Metrics that must match bitwise between an interrupted and an uninterrupted run (timings and
# memory legitimately differ).


def _overrides(model_dir, corpus_dir, out, *extra) -> list[str]:
    return [f"model.name_or_path={model_dir}", "model.max_seq_length=32", f"data.path={corpus_dir}",
            "adapter.r=8", "adapter.lora_dropout=0.1", "adapter.use_gradient_checkpointing=false",
            "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=2",
            "train.learning_rate=5e-3", "train.embedding_learning_rate=1e-3", "train.warmup_steps=2",
            "train.max_steps=8", "train.deterministic=true", f"output.output_dir={out}", "output.logging_steps=1",
            "output.save_steps=4", "output.report=false", "output.report_to=[]", "eval.eval_at_start=false",
            *extra]


def _cfg(model_dir, corpus_dir, out, *extra):
    return load_config(None, _overrides(model_dir, corpus_dir, out, *extra))


def _assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


class _Crash(Exception):
    """Stands in for a process dying in the middle of a step."""


def _wrap_loss(monkeypatch, on_call):
    """Count micro-batch loss calls across Trainer instances; `on_call(n)` runs before call n (1-based)."""
    import cpt.train as train_mod

    calls = {"n": 0}
    real_init = train_mod.Trainer.__init__

    def init(self, cfg, bundle, *a, **k):
        real_fn = bundle.loss_fn

        def loss_fn(*args, **kw):
            calls["n"] += 1
            on_call(calls["n"])
            return real_fn(*args, **kw)

        bundle.loss_fn = loss_fn
        real_init(self, cfg, bundle, *a, **k)

    monkeypatch.setattr(train_mod.Trainer, "__init__", init)
    return calls


@pytest.fixture(scope="module", autouse=True)
def _cpu_one_thread():
    """These are CPU guarantees, so the module pretends there is no GPU (also on a GPU machine, where a
    forked child must not touch CUDA). One intra-op thread: a forked child must not inherit a live
    OpenMP pool (it would hang), and in-process and forked runs must add up floats in the same order
    to compare bitwise."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, corpus, tmp_path_factory):
    """An uninterrupted 8-step run (dropout on, accumulation 2, deterministic) to compare against."""
    root = tmp_path_factory.mktemp("reference")
    corpus_dir = root / "corpus"
    corpus_dir.mkdir()
    for i, doc in enumerate(corpus):
        (corpus_dir / f"doc{i:03d}.txt").write_text(doc)
    out = root / "run"
    run_training(_cfg(tiny_model_dir, corpus_dir, out))
    return {"corpus": corpus_dir, "out": out, "metrics": exact_metrics(out), "state": final_state(out)}


# ---------------------------------------------------------------------------- 1. exact resume


def test_1_exact_resume_is_bitwise(reference, tiny_model_dir, tmp_path, monkeypatch):
    """Die in step 6 (after checkpoint-4, with steps 5 logged), resume: per-step losses, adapter,
    trained tensors and optimizer state equal the uninterrupted run bit for bit."""
    out = tmp_path / "run"
    accum = 2

    def crash(n):
        if n == 5 * accum + 1:  # first micro-batch of step 6
            raise _Crash()

    _wrap_loss(monkeypatch, crash)
    with pytest.raises(_Crash):
        run_training(_cfg(tiny_model_dir, reference["corpus"], out))
    monkeypatch.undo()
    assert [r["step"] for r in exact_metrics(out)] == [1, 2, 3, 4, 5]
    assert ckpt.latest_checkpoint(out).name == "checkpoint-4"

    from cpt.data.sampler import TokenStream

    blocks_read = []
    real_fill = TokenStream._fill
    monkeypatch.setattr(TokenStream, "_fill", lambda self, slot: (blocks_read.append(slot), real_fill(self, slot))[1])
    summary = run_training(_cfg(tiny_model_dir, reference["corpus"], out))
    assert summary["step"] == 8 and not summary["interrupted"]
    # O(1) seek: only the blocks of steps 5-8 were read (4 steps x 2 micro-batches x 2 blocks), none replayed
    assert blocks_read == list(range(16, 32))
    assert exact_metrics(out) == reference["metrics"]  # step 5 once, from the resumed run
    _assert_bitwise_equal(final_state(out), reference["state"])


# ---------------------------------------------------------------------------- 2. hard kill

# A forked child needs no new interpreter (the imports are done), but on a machine with a GPU the
# autograd engine has device threads that a fork cannot take along: there the child is a new process.
_CAN_FORK = not torch.cuda.is_available()

def _hang_in_save(hang_at: int) -> None:
    """Make the save of checkpoint-`hang_at` write half of optimizer.pt, announce itself with
    output_dir/HANG, and hang there (until the test's SIGKILL)."""
    real = torch.save

    def save(obj, f, *a, **k):
        if isinstance(f, (str, Path)) and Path(f).name == "optimizer.pt" and f"checkpoint-{hang_at}" in str(f):
            buf = io.BytesIO()
            real(obj, buf)
            Path(f).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
            (Path(f).parent.parent / "HANG").write_text(str(hang_at))
            time.sleep(300)
        return real(obj, f, *a, **k)

    torch.save = save


_CHILD = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    from test_reliability import _hang_in_save
    if int(sys.argv[2]):
        _hang_in_save(int(sys.argv[2]))
    from cpt.cli import main
    sys.exit(main(sys.argv[3:]))
""")


def _fork_train(yaml_path: Path, log: Path, hang_at: int | None = None) -> int:
    """`cpt train CONFIG` in a child process, on CPU with one thread like this module, killed by the
    test; with `hang_at`, see _hang_in_save."""
    if not _CAN_FORK:
        with open(log, "a") as f:
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
            return subprocess.Popen([sys.executable, "-c", _CHILD, str(Path(__file__).parent), str(hang_at or 0),
                                     "train", str(yaml_path)], stdout=f, stderr=f, env=env).pid
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        sys.stdout = sys.stderr = open(log, "a", buffering=1)
        os.dup2(sys.stdout.fileno(), 1)
        os.dup2(sys.stdout.fileno(), 2)
        if hang_at:
            _hang_in_save(hang_at)
        code = cli_main(["train", str(yaml_path)])
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        os._exit(code)


def _kill_when(cond, pid: int, log: Path, what: str, delay: float = 0.0, timeout: float = 120.0) -> None:
    """SIGKILL the child `delay` seconds after cond() holds; fail if it exits or times out first."""
    deadline = time.time() + timeout
    while not cond():
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            raise AssertionError(f"child exited ({status}) before {what}: {log.read_text()[-2000:]}")
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _write_yaml(cfg, path: Path) -> Path:
    cfg.save(path)
    return path


def _spawn(yaml_path: Path, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _CHILD, "train", str(yaml_path)], env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"child exited ({proc.returncode}) before {what}: {proc.stderr.read().decode()[-2000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_2_sigkill_at_random_moment_and_mid_checkpoint_write(reference, tiny_model_dir, tmp_path):
    """SIGKILL once at a random moment, then again while checkpoint-8 is half written (adapter there,
    optimizer.pt cut in half, no fsync, no marker): the third run resumes from checkpoint-4 and ends
    bitwise equal to the uninterrupted run."""
    import random

    seed = int(time.time())
    rng = random.Random(seed)
    out = tmp_path / "run"
    yaml_path = _write_yaml(_cfg(tiny_model_dir, reference["corpus"], out), tmp_path / "run.yaml")

    log = tmp_path / "children.log"
    after_lines = rng.randint(1, 7)
    # The first run is killed a random 0-0.3 s after step `after_lines` is logged, or at the latest
    # inside the write of checkpoint-8, so that a checkpoint to resume from always remains.
    pid = _fork_train(yaml_path, log, hang_at=8)
    _kill_when(lambda: _lines(out / "metrics.jsonl") >= after_lines or (out / "HANG").exists(), pid, log,
               f"step {after_lines}", delay=0 if (out / "HANG").exists() else rng.uniform(0, 0.3))
    # The second run resumes (or starts over) and is killed in the middle of writing checkpoint-8.
    (out / "HANG").unlink(missing_ok=True)
    pid = _fork_train(yaml_path, log, hang_at=8)
    _kill_when(lambda: (out / "HANG").exists(), pid, log, "the save of checkpoint-8")
    (out / "HANG").unlink()
    partial = [p for p in out.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)]
    assert partial and not any(ckpt.is_complete(p) for p in partial), f"seed {seed}"
    assert not (out / "checkpoint-8").exists()
    assert ckpt.latest_checkpoint(out) == out / "checkpoint-4", f"seed {seed}"

    run_training(_cfg(tiny_model_dir, reference["corpus"], out))
    assert not any(p.name.startswith(ckpt.TMP_PREFIX) for p in out.iterdir())
    assert exact_metrics(out) == reference["metrics"], f"seed {seed}"
    _assert_bitwise_equal(final_state(out), reference["state"])


# ---------------------------------------------------------------------------- 4. disk full in the loop


def test_4_failed_save_in_the_loop_exits_nonzero_and_keeps_previous(reference, tiny_model_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    yaml_path = _write_yaml(_cfg(tiny_model_dir, reference["corpus"], out, "output.save_total_limit=1"), tmp_path / "run.yaml")
    real_save = torch.save
    snapshot = {}

    def full_disk(obj, f, *a, **k):
        if isinstance(f, (str, Path)) and "checkpoint-8" in str(f) and Path(f).name == "optimizer.pt":
            snapshot.update(_tree(out / "checkpoint-4"))
            Path(f).write_bytes(b"PK\x03\x04 half a file")
            raise RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    assert cli_main(["train", str(yaml_path)]) == 1
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "checkpoint-8" in err and "file write failed" in err
    monkeypatch.undo()
    assert snapshot, "the failing save never ran"
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-4"]
    assert _tree(out / "checkpoint-4") == snapshot
    # and the run continues from it as if nothing happened
    run_training(_cfg(tiny_model_dir, reference["corpus"], out, "output.save_total_limit=1"))
    assert exact_metrics(out) == reference["metrics"]
    _assert_bitwise_equal(final_state(out), reference["state"])


# ---------------------------------------------------------------------------- 5. preemption


def test_5_sigterm_mid_step_saves_exits_0_and_resumes_next_step(reference, tiny_model_dir, tmp_path, monkeypatch):
    """SIGTERM in the middle of step 3 (between its micro-batches): the step finishes, checkpoint-3 is
    written although a second SIGTERM arrives during the write, `cpt train` returns 0, and the next
    run starts at step 4 and ends bitwise equal to the uninterrupted run."""
    out = tmp_path / "run"
    yaml_path = _write_yaml(_cfg(tiny_model_dir, reference["corpus"], out), tmp_path / "run.yaml")
    accum = 2

    def preempt(n):
        if n == 2 * accum + 2:  # second micro-batch of step 3
            os.kill(os.getpid(), signal.SIGTERM)

    _wrap_loss(monkeypatch, preempt)
    real_save = ckpt.save_checkpoint

    def save_with_second_signal(out_dir, step, write, *a, **k):
        def write_then_signal(folder):
            write(folder)
            os.kill(os.getpid(), signal.SIGTERM)  # the impatient second Ctrl-C
            time.sleep(0.05)
        return real_save(out_dir, step, write_then_signal, *a, **k)

    monkeypatch.setattr(ckpt, "save_checkpoint", save_with_second_signal)
    assert cli_main(["train", str(yaml_path), "output.save_grace_seconds=30"]) == 0
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(out).name == "checkpoint-3" and ckpt.is_complete(out / "checkpoint-3")
    assert json.loads((out / "run_summary.json").read_text())["interrupted"] is True
    assert [r["step"] for r in exact_metrics(out)] == [1, 2, 3]

    steps = []
    _wrap_loss(monkeypatch, lambda n: None)
    import cpt.train as train_mod
    real_log = train_mod.Trainer._log
    monkeypatch.setattr(train_mod.Trainer, "_log", lambda self, rec: (steps.append(rec["step"]), real_log(self, rec)))
    run_training(_cfg(tiny_model_dir, reference["corpus"], out))
    assert steps == [4, 5, 6, 7, 8]
    assert exact_metrics(out) == reference["metrics"]
    _assert_bitwise_equal(final_state(out), reference["state"])


# ---------------------------------------------------------------------------- 3. rotation with the best kept


def test_3_rotation_keeps_newest_and_best(reference, tiny_model_dir, tmp_path, monkeypatch):
    """save_total_limit=1 with best-model tracking: the best checkpoint (step 3, saved although 3 is no
    save step) survives every rotation, the newest is never deleted, nothing else is kept — also across
    a crash and resume."""
    from cpt.evaluate import Evaluator

    scripted = {3: 0.5, 6: 0.8, 8: 0.9}  # bits per byte by step: step 3 is the best
    monkeypatch.setattr(Evaluator, "run", lambda self, model, step: {
        "domain": {"loss": scripted[step], "bits_per_byte": scripted[step]}})
    out = tmp_path / "run"
    extra = (f"eval.sets=[{{name: domain, path: {reference['corpus']}}}]", "eval.eval_steps=3",
             "output.save_total_limit=1", "output.metric_for_best_model=domain/bits_per_byte")
    deleted_newest = []
    real_rotate = ckpt.rotate

    def watch_rotate(output_dir, limit, protect=()):
        newest = ckpt.latest_checkpoint(output_dir)
        gone = real_rotate(output_dir, limit, protect)
        deleted_newest.extend(p for p in gone if p == newest)
        return gone

    monkeypatch.setattr(ckpt, "rotate", watch_rotate)

    def crash(n):
        if n == 6 * 2 + 1:  # step 7: after the evaluation at 6, before the save at 8
            raise _Crash()

    _wrap_loss(monkeypatch, crash)
    with pytest.raises(_Crash):
        run_training(_cfg(tiny_model_dir, reference["corpus"], out, *extra))
    assert sorted(p.name for p in ckpt.list_checkpoints(out)) == ["checkpoint-3", "checkpoint-4"]
    _wrap_loss(monkeypatch, lambda n: None)
    summary = run_training(_cfg(tiny_model_dir, reference["corpus"], out, *extra))
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-3", "checkpoint-8"]
    assert summary["best_checkpoint"] == str(out / "checkpoint-3") and summary["best_metric"] == 0.5
    assert not deleted_newest
    with pytest.raises(ConfigError, match="output.metric_for_best_model"):
        run_training(_cfg(tiny_model_dir, reference["corpus"], tmp_path / "b", *extra[:-1],
                          "output.metric_for_best_model=domain/accuracy"))


# ---------------------------------------------------------------------------- 6. non-finite steps


class _PoisonGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def _snapshot(trainer) -> dict[str, torch.Tensor]:
    from cpt.model import trainable_state

    state = {f"w/{k}": v.clone() for k, v in trainable_state(trainer.accelerator.unwrap_model(trainer.model)).items()}
    for i, (p, s) in enumerate(trainer.optimizer.state.items()):
        for k, v in s.items():
            state[f"o/{i}/{k}"] = v.clone() if torch.is_tensor(v) else torch.tensor(v)
    return state


def test_6_nonfinite_steps_are_skipped_counted_and_stop_after_k(reference, tiny_model_dir, tmp_path, monkeypatch, capsys):
    import cpt.train as train_mod

    accum, poison = 2, {3: "loss", 5: "grad", 7: "loss", 8: "loss", 9: "loss"}
    snaps: dict[int, dict] = {}
    real_init = train_mod.Trainer.__init__

    def init(self, cfg, bundle, *a, **k):
        real_fn, calls = bundle.loss_fn, {"n": 0}

        def loss_fn(*args, **kw):
            calls["n"] += 1
            loss = real_fn(*args, **kw)
            kind = poison.get((calls["n"] - 1) // accum + 1)
            return loss + float("nan") if kind == "loss" else _PoisonGrad.apply(loss) if kind == "grad" else loss

        bundle.loss_fn = loss_fn
        real_init(self, cfg, bundle, *a, **k)
        real_zero = self.optimizer.zero_grad

        def zero_and_snapshot(*args, **kw):  # runs once per optimizer step, after the (skipped) update
            real_zero(*args, **kw)
            snaps[self.state.step + 1] = _snapshot(self)

        self.optimizer.zero_grad = zero_and_snapshot

    monkeypatch.setattr(train_mod.Trainer, "__init__", init)
    out = tmp_path / "run"
    yaml_path = _write_yaml(_cfg(tiny_model_dir, reference["corpus"], out, "train.max_steps=20",
                                 "train.max_nonfinite_steps=3", "output.save_steps=0"), tmp_path / "run.yaml")
    assert cli_main(["train", str(yaml_path)]) == 1
    err = capsys.readouterr().err
    assert "3 consecutive steps had a non-finite loss or gradient" in err and "train.max_nonfinite_steps=3" in err
    for bad in (3, 5, 7, 8, 9):  # skipped: weights and optimizer state exactly as after the step before
        _assert_bitwise_equal(snaps[bad], snaps[bad - 1])
    for good in (2, 4, 6):
        assert not torch.equal(snaps[good]["o/0/exp_avg"], snaps[good - 1]["o/0/exp_avg"])
    m = {r["step"]: r for r in exact_metrics(out)}
    assert max(m) == 9 and [m[s]["nonfinite_skipped"] for s in (2, 3, 4, 5, 6, 9)] == [0, 1, 1, 2, 2, 5]
    # the stop saved the last good weights (those after step 6) for inspection
    saved = load_file(str(out / "checkpoint-9" / "trainable.safetensors"))
    assert all(torch.equal(v, snaps[6][f"w/{k}"]) for k, v in saved.items())


# ---------------------------------------------------------------------------- 7. bad config and paths


@pytest.mark.parametrize("extra, key", [
    (["train.max_stepz=3"], "train.max_stepz"),  # unknown key (with a suggestion)
    (["train.max_steps=many"], "train.max_steps"),  # wrong type
    (["model.load_in_4bit=true"], "model.load_in_4bit"),  # 4-bit on a machine without CUDA
    (["adapter.target_modules=[q_proj,v_proj]"], "train.embedding_learning_rate"),  # no trained embeddings
    (["model.max_seq_length=1024"], "model.max_seq_length"),  # the tiny model allows 256 positions
])
def test_7_bad_config_fails_before_any_model_is_loaded(extra, key, tiny_model_dir, corpus_dir, tmp_path, monkeypatch, capsys):
    import transformers

    import cpt.model

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(cpt.model, "load_base_model", no_load)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    args = _overrides(tiny_model_dir, corpus_dir, tmp_path / "run", *extra)
    with pytest.raises(ConfigError, match=re.escape(key)):
        run_training(load_config(None, args))
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(f"model:\n  name_or_path: {tiny_model_dir}\n")
    assert cli_main(["train", str(yaml_path), *args[1:]]) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_7_output_dir_of_another_run_is_not_overwritten(tiny_model_dir, corpus_dir, tmp_path):
    out = tmp_path / "run"
    earlier = ckpt.save_checkpoint(out, 50, lambda f: (f / "state.bin").write_bytes(b"another run"))
    (out / "adapter_model.safetensors").write_bytes(b"another run's adapter")
    before = _tree(out)
    with pytest.raises(ConfigError, match="overwrite_output_dir"):
        run_training(_cfg(tiny_model_dir, corpus_dir, out, "output.resume=false"))
    assert _tree(out) == before and ckpt.latest_checkpoint(out) == earlier
    # a finished run without checkpoints is not silently restarted by resume=auto either
    ckpt.clear_checkpoints(out)
    before = _tree(out)
    with pytest.raises(ConfigError, match="overwrite_output_dir"):
        run_training(_cfg(tiny_model_dir, corpus_dir, out))
    assert _tree(out) == before
    # with consent it is replaced
    run_training(_cfg(tiny_model_dir, corpus_dir, out, "output.resume=false", "output.overwrite_output_dir=true",
                      "train.max_steps=1"))
    assert (out / "adapter_model.safetensors").read_bytes() != b"another run's adapter"


# ---------------------------------------------------------------------------- 8. safe loading, secrets


def test_8_planted_pickle_in_a_checkpoint_is_refused(reference, tiny_model_dir, tmp_path, capsys):
    """An attacker swaps rng.pt of the newest checkpoint for a pickle that writes a file (and fixes the
    manifest): resuming refuses it with a clear error and the file is never written."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    target = tmp_path / "pwned.txt"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (target, "pwned"))

    last = ckpt.latest_checkpoint(out)
    torch.save({"cpu": Payload()}, last / "rng.pt")
    marker = json.loads((last / ckpt.COMPLETE).read_text())
    marker["files"]["rng.pt"] = (last / "rng.pt").stat().st_size
    (last / ckpt.COMPLETE).write_text(json.dumps(marker))
    assert ckpt.latest_checkpoint(out) == last
    yaml_path = _write_yaml(_cfg(tiny_model_dir, reference["corpus"], out), tmp_path / "run.yaml")
    assert cli_main(["train", str(yaml_path)]) == 1
    assert "refused to load" in capsys.readouterr().err
    assert not target.exists()


def test_8_remote_code_off_and_tokens_never_written(tiny_model_dir, corpus_dir, tmp_path, monkeypatch, capsys):
    import transformers

    assert load_config(None, []).model.trust_remote_code is False
    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *a, _real=real, **k):
            seen.append(k.get("trust_remote_code"))
            return _real(klass, *a, **k)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))

    token = "hf_" + "Zq8rT2vX9kLm4NpW7sYb3CdF6gHj1KoE5uAi"
    monkeypatch.setenv("HF_TOKEN", token)
    out = tmp_path / "run"
    args = _overrides(tiny_model_dir, corpus_dir, out, "train.max_steps=2", "output.save_steps=1", "output.report=true",
                      f"data.data_files=https://huggingface.co/x/resolve/main/a.jsonl?token={token}",
                      "eval.holdout_fraction=0.1", "eval.prompts=[the court]", "eval.max_new_tokens=4")
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text(f"model:\n  name_or_path: {tiny_model_dir}\n")
    assert cli_main(["-v", "train", str(yaml_path), *args[1:]]) == 0
    assert cli_main(["config", str(yaml_path), *args[1:]]) == 0
    captured = capsys.readouterr()
    assert seen and all(v is False for v in seen)
    assert (out / "report.html").is_file()
    leaks = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    assert not leaks, f"the token was written to {leaks}"
    assert token not in captured.out and token not in captured.err
    assert "***" in (out / "config.yaml").read_text()  # the field was dumped, with the token masked


def test_damaged_checkpoint_is_named_in_a_clear_error(reference, tiny_model_dir, tmp_path, capsys):
    """A checkpoint that passes the marker check but cannot be loaded (here: an old-style marker with no
    manifest and a file gone) stops with exit 1 and names the folder, instead of a bare traceback."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference["out"], out)
    last = ckpt.latest_checkpoint(out)
    (last / "scheduler.pt").unlink()
    (last / ckpt.COMPLETE).write_text(json.dumps({"step": ckpt.step_of(last)}))
    yaml_path = _write_yaml(_cfg(tiny_model_dir, reference["corpus"], out), tmp_path / "run.yaml")
    assert cli_main(["train", str(yaml_path)]) == 1
    err = capsys.readouterr().err
    assert f"cannot resume from {last}" in err and "scheduler.pt" in err
