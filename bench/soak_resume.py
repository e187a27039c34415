"""Kill-and-resume soak: SIGKILL a small training run at random moments (some of them in the middle of
writing a checkpoint) at least 20 times, resume it each time with the same command, and check that the
final state equals an uninterrupted run's bit for bit.

A tiny random Llama, a tokenizer and a corpus are built locally (nothing is downloaded). Every run is
`cpt train run.yaml` in a child process forked from this one after the heavy imports, so a restart
costs a fork, not a fresh Python start; the uninterrupted reference run is made the same way.

    python bench/soak_resume.py                 # 40 SIGKILLs and some SIGTERMs, ~2 minutes on 2 cores
    python bench/soak_resume.py --kills 40 --seed 1

Writes bench/results/soak_resume.json (every kill: when, where, what the next run resumed from) and
bench/results/soak_resume.md (the summary).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Heavy imports happen once, here, before any fork; this process itself never runs a torch op, so no
# thread pool exists yet that a forked child could inherit half-initialised.
import torch  # noqa: E402
import transformers  # noqa: E402,F401
import peft  # noqa: E402,F401
from safetensors.torch import load_file  # noqa: E402

from cpt import checkpoint as ckpt  # noqa: E402
from cpt import api, cli, data, evaluate, model, train  # noqa: E402,F401

RESULTS = Path(__file__).resolve().parent / "results"
EXACT_KEYS = ("step", "loss", "grad_norm", "lr", "tokens", "nonfinite_skipped", "epoch")
WORDS = ("the court held that the statute applies to every contract signed after the act entered into force "
         "a party may appeal within thirty days and the judge shall give written reasons for the decision "
         "patients with chronic disease received the dose twice daily and the trial measured blood pressure").split()


# ---------------------------------------------------------------------------- forked children


def _fork(fn: Callable[[], int], log_path: Path) -> int:
    """Run fn() in a forked child with stdout/stderr to log_path; returns the pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = fn()
        except BaseException as e:  # report and leave without running the parent's cleanup
            print(f"child failed: {type(e).__name__}: {e}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _build_assets(root: Path) -> int:
    """Tokenizer, tiny untied Llama and a corpus folder: all local, seconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    docs = []
    for _ in range(120):
        start, n = rng.randrange(len(WORDS)), rng.randint(20, 80)
        docs.append(" ".join(WORDS[(start + i) % len(WORDS)] for i in range(n)) + ".")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<pad>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<pad>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id,
                      pad_token_id=fast.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    (root / "corpus").mkdir()
    for i, d in enumerate(docs):
        (root / "corpus" / f"doc{i:03d}.txt").write_text(d)
    return 0


def _config(root: Path, out: Path, steps: int) -> Path:
    from cpt.config import load_config

    cfg = load_config(None, [
        f"model.name_or_path={root / 'model'}", "model.max_seq_length=32", f"data.path={root / 'corpus'}",
        f"data.cache_dir={root / 'cache'}", "adapter.r=8", "adapter.lora_dropout=0.1",
        "adapter.use_gradient_checkpointing=false", "train.per_device_train_batch_size=2",
        "train.gradient_accumulation_steps=2", "train.learning_rate=5e-3", "train.embedding_learning_rate=1e-3",
        "train.warmup_steps=2", f"train.max_steps={steps}", "train.deterministic=true", f"output.output_dir={out}",
        "output.logging_steps=1", "output.save_steps=2", "output.save_total_limit=2", "output.report=false",
        "output.report_to=[]", "eval.eval_at_start=false"])
    path = out.parent / f"{out.name}.yaml"
    cfg.save(path)
    return path


def _train(yaml_path: Path) -> Callable[[], int]:
    def run() -> int:
        torch.set_num_threads(1)  # the same reduction order in every run, whatever else the machine does
        return cli.main(["train", str(yaml_path)])
    return run


# ---------------------------------------------------------------------------- observing a run


def _steps_logged(out: Path) -> int:
    p = out / "metrics.jsonl"
    if not p.is_file():
        return 0
    steps = []
    for line in p.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return max(steps, default=0)


def _temp_folders(out: Path) -> list[str]:
    try:
        return sorted(n for n in os.listdir(out) if n.startswith((ckpt.TMP_PREFIX, ckpt.TRASH_PREFIX)))
    except FileNotFoundError:
        return []


def final_state(out: Path) -> dict[str, torch.Tensor]:
    """The adapter, every trained tensor and the optimizer state of a run's last checkpoint: what a resumed
    run must leave bit for bit as an uninterrupted one does (tests/test_reliability.py uses it too)."""
    last = ckpt.latest_checkpoint(out)
    state = {f"adapter/{k}": v for k, v in load_file(str(out / "adapter_model.safetensors")).items()}
    state.update({f"trainable/{k}": v for k, v in load_file(str(last / "trainable.safetensors")).items()})
    opt = ckpt.load_torch(last / "optimizer.pt")
    for pid, s in opt["state"].items():
        for k, v in s.items():
            state[f"optim/{pid}/{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    state["optim/lrs"] = torch.tensor([g["lr"] for g in opt["param_groups"]], dtype=torch.float64)
    return state


def exact_metrics(out: Path) -> list[dict]:
    """Each logged step's values that a resumed run must repeat exactly (not its timings)."""
    return [{k: r.get(k) for k in EXACT_KEYS} for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


# ---------------------------------------------------------------------------- the soak


def _compare(ref_out: Path, out: Path, result_path: Path) -> Callable[[], int]:
    """In a child (the parent stays free of torch work between forks): is `out` equal to the reference?"""
    def run() -> int:
        ref_state, state = final_state(ref_out), final_state(out)
        differing = sorted(k for k in ref_state if k not in state or not torch.equal(ref_state[k], state[k]))
        metrics = exact_metrics(out)
        result_path.write_text(json.dumps({
            "metrics_equal": metrics == exact_metrics(ref_out), "steps_logged": [r["step"] for r in metrics],
            "tensors_compared": len(ref_state), "tensors_differing": differing,
            "state_bitwise_equal": not differing and ref_state.keys() == state.keys(),
            "leftover_partial_folders": _temp_folders(out)}))
        return 0
    return run


def _kill_one(rng: random.Random, yaml_path: Path, out: Path, steps: int, mode: str, log_path: Path) -> dict:
    """Start a run and SIGKILL it at a point chosen by `mode`:
    'save': the moment this run's checkpoint write is seen in progress (plus 0-15 ms);
    'step': once one of the next 1-5 steps is logged (plus 0-300 ms, so anywhere inside a step);
    'start': a random time during start-up (model load, data, resume);
    'term': like 'step' but SIGTERM (preemption): the run must finish its step, save and exit 0."""
    before = ckpt.latest_checkpoint(out)
    done_before = _steps_logged(out)
    t0 = time.perf_counter()
    pid = _fork(_train(yaml_path), log_path)
    mine = f"-{pid}"  # temp and trash folder names carry the writer's pid; older leftovers are not this run's
    resumed_step = ckpt.step_of(before) if before else 0
    # A killed run may have logged steps past its checkpoint; the new run drops them when it opens its
    # log. Only steps logged after that are this run's, so the step modes wait for it first.
    own_log = done_before <= resumed_step
    target = min(resumed_step + rng.randint(1, 5), steps) if mode in ("step", "term") else None
    start_delay = rng.uniform(0.0, 2.0) if mode == "start" else None
    exited = None
    while exited is None:
        if mode == "save" and any(mine in t for t in _temp_folders(out)):
            time.sleep(rng.uniform(0.0, 0.015))
            break
        own_log = own_log or _steps_logged(out) <= resumed_step
        if mode in ("step", "term") and own_log and _steps_logged(out) >= target:
            time.sleep(rng.uniform(0.0, 0.3))
            break
        if mode == "start" and time.perf_counter() - t0 >= start_delay:
            break
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            exited = os.waitstatus_to_exitcode(status)
        time.sleep(0.001)
    if exited is not None:
        return {"mode": mode, "killed": False, "exit_code": exited, "resumed_from": before.name if before else None}
    if mode == "term":
        os.kill(pid, signal.SIGTERM)
        code = _wait(pid)
        latest = ckpt.latest_checkpoint(out)
        logged = _steps_logged(out)
        return {"mode": mode, "killed": False, "terminated": True, "exit_code": code,
                "resumed_from": before.name if before else None, "steps_logged_at_exit": logged,
                "saved_at_stop": latest is not None and ckpt.step_of(latest) == logged,
                "partial_folders_left": _temp_folders(out)}
    os.kill(pid, signal.SIGKILL)
    code = _wait(pid)
    temps = _temp_folders(out)
    latest = ckpt.latest_checkpoint(out)
    return {"mode": mode, "killed": True, "exit_code": code, "after_s": round(time.perf_counter() - t0, 3),
            "resumed_from": before.name if before else None, "steps_logged_at_kill": _steps_logged(out),
            "partial_folders_left": temps,
            "mid_checkpoint_write": any(t.startswith(ckpt.TMP_PREFIX) and t.endswith(mine) for t in temps),
            "newest_complete_after": latest.name if latest else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=40, help="SIGKILLs to deliver (>= 20 for the issue's soak)")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps of the run")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    ap.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    t_start = time.perf_counter()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="cpt-soak-"))
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "children.log"
    if _wait(_fork(lambda: _build_assets(root), log_path)) != 0:
        print(f"building the tiny model failed; see {log_path}", file=sys.stderr)
        return 1

    ref_out = root / "reference"
    t0 = time.perf_counter()
    if _wait(_fork(_train(_config(root, ref_out, args.steps)), log_path)) != 0:
        print(f"the reference run failed; see {log_path}", file=sys.stderr)
        return 1
    ref_seconds = time.perf_counter() - t0

    out = root / "soaked"
    yaml_path = _config(root, out, args.steps)
    kills: list[dict] = []
    completions: list[dict] = []
    modes = ["save", "save", "step", "term", "step", "start"]

    def check_completed(exit_code: int) -> None:
        """The run reached its end: compare it with the reference, then start the soak over."""
        path = root / f"compare{len(completions)}.json"
        _wait(_fork(_compare(ref_out, out, path), log_path))
        completions.append({"after_kills": sum(k["killed"] for k in kills), "exit_code": exit_code,
                            **json.loads(path.read_text())})
        import shutil
        shutil.rmtree(out)

    failed: list[dict] = []
    while sum(k["killed"] for k in kills) < args.kills and not failed:
        if len(kills) > 4 * args.kills:
            print("too many runs finished before they could be killed", file=sys.stderr)
            return 1
        record = _kill_one(rng, yaml_path, out, args.steps, modes[len(kills) % len(modes)], log_path)
        record["run"] = len(kills) + 1
        kills.append(record)
        print(json.dumps(record), flush=True)
        if not record["killed"] and record["exit_code"] != 0:
            failed.append(record)  # a run that cannot continue after a kill: the soak has found a bug
            break
        if not record["killed"] and not record.get("terminated") and (out / "run_summary.json").is_file() and \
                not json.loads((out / "run_summary.json").read_text()).get("interrupted", True):
            check_completed(record["exit_code"])
    if not failed and (out.exists() or not completions):
        check_completed(_wait(_fork(_train(yaml_path), log_path)))
    killed = [k for k in kills if k["killed"]]
    result = {
        "kills": len(killed),
        "kills_mid_checkpoint_write": sum(k["mid_checkpoint_write"] for k in killed),
        "kills_with_partial_folder_left": sum(bool(k["partial_folders_left"]) for k in killed),
        "kills_by_mode": {m: sum(k["mode"] == m for k in killed) for m in sorted(set(modes) - {"term"})},
        "runs_that_finished_before_their_kill": sum(not k["killed"] and not k.get("terminated") for k in kills),
        "sigterms": sum(bool(k.get("terminated")) for k in kills),
        "sigterms_exit_0_with_checkpoint_at_stop_step": sum(bool(k.get("terminated")) and k["exit_code"] == 0
                                                             and k["saved_at_stop"] and not k["partial_folders_left"]
                                                             for k in kills),
        "failed_runs": failed,
        "completions": completions,
        "all_completions_equal": bool(completions) and all(c["metrics_equal"] and c["state_bitwise_equal"] and c["exit_code"] == 0
                                     and not c["leftover_partial_folders"] for c in completions),
        "steps": args.steps, "seed": args.seed,
        "reference_run_s": round(ref_seconds, 1), "total_s": round(time.perf_counter() - t_start, 1),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "cpus": os.cpu_count(), "runs": kills,
    }
    passed = (result["all_completions_equal"] and result["kills"] >= 20 and not failed
              and result["sigterms_exit_0_with_checkpoint_at_stop_step"] == result["sigterms"])
    result["passed"] = passed
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak_resume.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "soak_resume.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0 if passed else 1


def _markdown(r: dict) -> str:
    modes = ", ".join(f"{m}: {n}" for m, n in r["kills_by_mode"].items())
    return f"""# Kill-and-resume soak

`python bench/soak_resume.py --kills {r['kills']} --steps {r['steps']} --seed {r['seed']}` — a tiny random Llama
(LoRA r=8 with dropout 0.1, trained embeddings, 2 micro-batches per step, deterministic, a checkpoint every
2 steps, save_total_limit=2), {r['steps']} steps, SIGKILLed and resumed with the same command over and over,
then compared with one uninterrupted run.

| | |
|---|---|
| result | **{'PASS' if r['passed'] else 'FAIL'}** |
| SIGKILLs | {r['kills']} ({modes}) |
| killed while writing a checkpoint (its own temp folder present) | {r['kills_mid_checkpoint_write']} |
| kills that left a partial folder behind (cleaned up on resume) | {r['kills_with_partial_folder_left']} |
| SIGTERMs (preemption): exited 0 with a checkpoint at the stop step | {r['sigterms_exit_0_with_checkpoint_at_stop_step']} of {r['sigterms']} |
| runs that ended before their planned kill | {r['runs_that_finished_before_their_kill']} |
| runs that failed after a kill (exit code != 0 without being killed) | {len(r['failed_runs'])} |
| completed runs compared with the uninterrupted one | {len(r['completions'])} |
| per-step metrics (loss, grad norm, lr, tokens, ...) equal | {all(c['metrics_equal'] for c in r['completions'])} ({', '.join(str(len(c['steps_logged'])) for c in r['completions'])} records) |
| adapter + trained tensors + optimizer state bitwise equal | {all(c['state_bitwise_equal'] for c in r['completions'])} ({r['completions'][-1]['tensors_compared'] if r['completions'] else 0} tensors, {sum(len(c['tensors_differing']) for c in r['completions'])} differ) |
| temporary folders left at the end | {sum(len(c['leftover_partial_folders']) for c in r['completions'])} |
| exit code of each completing run | {', '.join(str(c['exit_code']) for c in r['completions'])} |
| time | {r['total_s']} s in all; the uninterrupted run took {r['reference_run_s']} s |

Modes: *save* kills within 0-15 ms of seeing a checkpoint's temp folder (mid-write, mid-rename or
mid-rotation); *term* sends SIGTERM instead, at a random point in the next 1-5 steps, and expects exit 0
with a checkpoint at the step it stopped on; *step* kills 0-300 ms after one of the next 1-5 steps is logged (anywhere inside a step);
*start* kills 0-2 s after launch (loading, data, resuming). Every run is forked after the imports,
so a kill can land anywhere in the run but not in the Python start-up. When a run reaches its end before
all kills are delivered, it is compared with the uninterrupted run and the soak starts over; every
completion must match.

Python {r['python']}, torch {r['torch']}, transformers {r['transformers']}, {r['cpus']} CPUs. Each run's
record (what it resumed from, where it was killed, which partial folders it left) is in soak_resume.json.
"""


if __name__ == "__main__":
    sys.exit(main())
