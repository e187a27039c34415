"""Instruction-tuning speed and memory, side by side: cpt's SFT stage against TRL's SFTTrainer + peft.

One command, one machine. The model is the CPT benchmark's Llama-3.1-8B shape (random weights, built
locally, no download) with a chat tokenizer (chatml, a word-level vocabulary of 32k words, so every
conversation's length in tokens is exact). The data: 600 synthetic conversations of 200 to 2,000 tokens
(one to three user/assistant exchanges, some with a system turn), loss on the assistant turns only,
packed into blocks of 2,048 tokens for both systems. The setup is the reference one on both sides:
r=128 rsLoRA on every projection, embed_tokens and lm_head trained in full at a 5x smaller learning
rate, bitsandbytes-style 8-bit AdamW, gradient checkpointing, micro-batch 2, bf16 and 4-bit NF4.

    python bench/sft_throughput.py                        # bf16 and nf4, baseline and ours (about 6 minutes on one H100)
    python bench/sft_throughput.py --rows nf4 --runs 1
    python bench/sft_throughput.py --worker ours --mode bf16 --result /tmp/r.json   # one row

Tokens per second count the tokens the model reads besides padding (cpt packs conversations in their
order and pads a block's end that the next one does not fit; TRL's best-fit packing leaves none); a
step's time runs from one step's end to the next's, data preparation included. `--tiny --device cpu`
runs the same workers on a 2-layer model and short conversations: a dry run of the plumbing
(tests/test_bench_sft_throughput.py).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))

from bench.gpu_throughput import (ALPHA, EMB_LR, LLAMA_8B, LORA_TARGETS, LR, MICRO_BATCH, R, TARGETS, TINY,  # noqa: E402
                                  _gib, _run_worker, _sync, baseline_setup)

SEQ = 2048
WORDS = 32000
CONVERSATIONS = 600
LENGTHS = (200, 2000)
TINY_SEQ, TINY_LENGTHS, TINY_WORDS = 256, (20, 200), 500
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# chatml, with the assistant's part marked for TRL's assistant_only_loss (transformers' {% generation %})
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
                 "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}\n{% else %}"
                 "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer(words: int = WORDS):
    """A word-level tokenizer (whitespace split) over w0..w{words-1} plus the roles, with chatml's tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + ["<unk>", "system", "user", "assistant"] + [f"w{i}" for i in range(words)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", additional_special_tokens=SPECIALS[1:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model_dir(path: Path, tiny: bool = False, device: str = "cuda") -> None:
    """Random Llama-3.1-8B-shaped weights saved as bf16 safetensors, with the chat tokenizer (tiny: a
    2-layer model of the same kind over a 500-word vocabulary)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file() and any(path.glob("*.safetensors")) and (path / "tokenizer.json").is_file():
        return
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    tok = chat_tokenizer(TINY_WORDS if tiny else WORDS)
    shape = {**LLAMA_8B, **TINY, "vocab_size": len(tok), "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0} if tiny else LLAMA_8B
    with torch.device(device):
        model = LlamaForCausalLM._from_config(LlamaConfig(**shape), dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="4GB")
    tok.save_pretrained(path)


def conversations(n: int = CONVERSATIONS, seed: int = 0, lengths: tuple = LENGTHS, words: int = WORDS) -> list[dict]:
    """Synthetic conversations in OpenAI `messages` form, 200-2,000 tokens each (template included):
    answers are longer than questions, as in instruction data."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        budget = rng.randint(*lengths)
        turns = rng.randint(1, 3)
        messages = [{"role": "system", "content": _words(rng, rng.randint(10, 40), words)}] if rng.random() < 0.3 else []
        per_turn = max(20, budget // turns)
        for _ in range(turns):
            q = max(4, int(per_turn * rng.uniform(0.1, 0.35)))
            messages.append({"role": "user", "content": _words(rng, q, words)})
            messages.append({"role": "assistant", "content": _words(rng, max(4, per_turn - q - 6), words)})
        out.append({"messages": messages})
    return out


def _words(rng: random.Random, n: int, words: int) -> str:
    return " ".join(f"w{rng.randrange(words)}" for _ in range(n))


def write_data(path: Path, tiny: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = conversations(lengths=TINY_LENGTHS, words=TINY_WORDS) if tiny else conversations()
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


class _StepClock:
    """Step boundaries: synchronise and note the time at each step's end."""

    def __init__(self):
        self.marks: list[float] = []
        self.tokens: list[int] = []

    def mark(self) -> None:
        _sync()
        self.marks.append(time.perf_counter())

    def result(self, args, losses: list[float], **extra) -> dict:
        import torch
        # mark 0 ends warm-up step 1; the timed steps are those after the warm-up
        times = [b - a for a, b in zip(self.marks, self.marks[1:])][args.warmup - 1:][: args.steps]
        tokens = self.tokens[args.warmup:][: len(times)]
        cuda = torch.cuda.is_available() and args.device == "cuda"
        return {"system": args.worker, "mode": args.mode, "tokens_per_s": sum(tokens) / sum(times),
                "tokens_per_step": sum(tokens) / len(tokens), "step_s_min": min(times), "step_s_max": max(times),
                "step_s": times, "losses": losses, "peak_gib": _gib(torch.cuda.max_memory_allocated()) if cuda else 0.0,
                "peak_reserved_gib": _gib(torch.cuda.max_memory_reserved()) if cuda else 0.0, **extra}

# ---------------------------------------------------------------------------- baseline: TRL's SFTTrainer + peft


def worker_baseline(args) -> dict:
    """TRL's SFTTrainer over the CPT benchmark's baseline model: the same peft setup and 8-bit AdamW groups."""
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    model_dir = Path(args.model_dir)
    model, opt, _ = baseline_setup(model_dir, args.mode, "sdpa", args.device)
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = load_dataset("json", data_files=str(args.data), split="train")
    clock = _StepClock()
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            clock.mark()

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    class CountingTrainer(SFTTrainer):
        def training_step(self, model, inputs, *a, **k):
            clock.tokens.append(int((inputs["input_ids"] != tok.pad_token_id).sum()))
            return super().training_step(model, inputs, *a, **k)

    config = SFTConfig(output_dir=f"/tmp/cpt-bench/trl-{args.mode}", max_length=args.seq, packing=True,
                       assistant_only_loss=True, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                       max_steps=args.warmup + args.steps, learning_rate=LR, lr_scheduler_type="constant",
                       warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, bf16=True, gradient_checkpointing=True,
                       gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1, save_strategy="no",
                       report_to=[], seed=3407, dataloader_num_workers=0, disable_tqdm=True,
                       use_cpu=args.device == "cpu", bf16_full_eval=False)
    trainer = CountingTrainer(model=model, args=config, train_dataset=data, processing_class=tok,
                              optimizers=(opt, None), callbacks=[Clock()])
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return clock.result(args, losses)

# ---------------------------------------------------------------------------- ours: cpt's SFT stage


def ours_config(model_dir: Path, data: Path, mode: str, batch: int, steps: int, seq: int = SEQ):
    from cpt.config import config_from_dict
    raw = {
        "stage": "sft",
        "model": {"name_or_path": str(model_dir), "max_seq_length": seq, "dtype": "bfloat16",
                  "load_in_4bit": mode == "nf4", "attn_implementation": "sdpa", "kernels": "auto", "compile": "auto"},
        "adapter": {"r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0, "use_rslora": True,
                    "target_modules": LORA_TARGETS + ["embed_tokens", "lm_head"],
                    "use_gradient_checkpointing": True, "embedding_master_dtype": "float32"},
        "data": {"path": str(data), "chat_format": "messages", "assistant_only_loss": True},
        "eval": {"eval_at_start": False},
        "train": {"per_device_train_batch_size": batch, "gradient_accumulation_steps": 1, "max_steps": steps,
                  "learning_rate": LR, "embedding_learning_rate": EMB_LR, "weight_decay": 0.0, "optim": "adamw_8bit",
                  "lr_scheduler_type": "constant", "max_grad_norm": 0.0, "bf16": True, "seed": 3407},
        "output": {"output_dir": f"/tmp/cpt-bench/sft-{mode}", "logging_steps": 1, "save_steps": 0, "report": False,
                   "report_to": [], "overwrite_output_dir": True, "resume": False},
    }
    return config_from_dict(raw)


class _Timed:
    """cpt's own training data, with a step mark at each batch request (the request for step n+1
    comes when step n has ended) and the tokens each batch holds besides padding (the pad token,
    <|endoftext|>, occurs in no conversation)."""

    def __init__(self, inner, clock: _StepClock, pad_id: int):
        self.inner, self.clock, self.pad_id = inner, clock, pad_id

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def batches(self, batch_size: int):
        first = True
        for batch in self.inner.batches(batch_size):
            if not first:
                self.clock.mark()
            first = False
            self.clock.tokens.append(int((batch["input_ids"] != self.pad_id).sum()))  # blocks' padding not counted
            yield batch


def worker_ours(args) -> dict:
    import torch

    import cpt.train as cpt_train
    from cpt.build import build_model
    from cpt.data import build_data

    cfg = ours_config(Path(args.model_dir), Path(args.data), args.mode, args.batch, args.warmup + args.steps + 1, args.seq)
    bundle = build_model(cfg, torch.device(args.device))
    data = build_data(cfg, bundle.tokenizer)
    clock = _StepClock()
    data.train = _Timed(data.train, clock, bundle.tokenizer.pad_token_id)
    trainer = cpt_train.Trainer(cfg, bundle, data)
    trainer.save = lambda: None
    trainer.parallel.save_trained = lambda *a, **k: None
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    _sync()
    losses = [json.loads(line)["loss"] for line in open(Path(cfg.output.output_dir) / "metrics.jsonl")]
    return clock.result(args, losses, kernels=bundle.speed.applied, run_plan=bundle.plan.to_dict())

# ---------------------------------------------------------------------------- the driver


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["baseline", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="bf16", choices=["bf16", "nf4"])
    p.add_argument("--batch", type=int, default=MICRO_BATCH)
    p.add_argument("--seq", type=int, default=None, help="block length (default 2048; 256 with --tiny)")
    p.add_argument("--device", default="cuda", help="cuda; cpu for a dry run with --tiny")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model and short conversations (dry runs)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rows", default="bf16,nf4")
    p.add_argument("--runs", type=int, default=1, help="repeat each pair; the second run goes in reverse order")
    p.add_argument("--model-dir", default="/tmp/cpt-bench/llama-3.1-8b-random-chat")
    p.add_argument("--data", default="/tmp/cpt-bench/sft-conversations.jsonl")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--logs", default=None)
    args = p.parse_args(argv)
    args.seq = args.seq or (TINY_SEQ if args.tiny else SEQ)
    if args.worker:
        import torch
        res = {"baseline": worker_baseline, "ours": worker_ours}[args.worker](args)
        res["device"] = torch.cuda.get_device_name(0) if args.device == "cuda" else args.device
        Path(args.result).write_text(json.dumps(res, indent=1))
        return 0
    return drive(args)


def drive(args) -> int:
    import importlib.metadata as md

    import torch
    out, model_dir, data = Path(args.out), Path(args.model_dir), Path(args.data)
    logs = Path(args.logs) if args.logs else out / "logs"
    out.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build_model_dir(model_dir, args.tiny, args.device)
    write_data(data, args.tiny)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"model folder and data ready in {time.perf_counter() - t0:.0f} s", flush=True)
    common = ["--model-dir", str(model_dir), "--data", str(data), "--warmup", str(args.warmup),
              "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--device", args.device,
              *(["--tiny"] if args.tiny else [])]
    results: dict[str, Any] = {
        "command": "python bench/sft_throughput.py " + " ".join(sys.argv[1:]), "device": torch.cuda.get_device_name(0) if args.device == "cuda" else args.device,
        "torch": torch.__version__, "versions": {k: _version(md, k) for k in
                                                 ("transformers", "peft", "trl", "bitsandbytes", "liger-kernel")},
        "setup": {"model": ("2-layer Llama (dry run)" if args.tiny else "Llama-3.1-8B shape") + ", random weights, chatml word-level tokenizer",
                  "micro_batch": args.batch, "max_length": args.seq, "packing": True, "loss": "assistant turns only",
                  "conversations": CONVERSATIONS, "conversation_tokens": list(TINY_LENGTHS if args.tiny else LENGTHS), "r": R, "lora_alpha": ALPHA, "use_rslora": True,
                  "warmup_steps": args.warmup, "timed_steps": args.steps, "runs": args.runs},
        "targets": TARGETS}
    for mode in [m for m in ("bf16", "nf4") if m in args.rows.split(",")]:
        runs: dict[str, list] = {"baseline": [], "ours": []}
        for run in range(args.runs):
            for system in (["baseline", "ours"] if run % 2 == 0 else ["ours", "baseline"]):
                r = _run_worker(["--worker", system, "--mode", mode, *common], logs, f"sft_{system}_{mode}_run{run + 1}", 900,
                                script=str(Path(__file__).resolve()))
                if r:
                    runs[system].append(r)
        entry = {}
        for system, rs in runs.items():
            entry[system] = None if not rs else {
                "tokens_per_s": sum(r["tokens_per_s"] for r in rs) / len(rs), "tokens_per_s_runs": [r["tokens_per_s"] for r in rs],
                "tokens_per_step": rs[0]["tokens_per_step"], "peak_gib": max(r["peak_gib"] for r in rs),
                "step_s_range": [min(r["step_s_min"] for r in rs), max(r["step_s_max"] for r in rs)],
                "loss_first_last": [rs[0]["losses"][0], rs[0]["losses"][-1]] if rs[0]["losses"] else None,
                **({"kernels": rs[0].get("kernels"), "run_plan": rs[0].get("run_plan")} if system == "ours" else {})}
        if entry["baseline"] and entry["ours"]:
            entry["speedup"] = entry["ours"]["tokens_per_s"] / entry["baseline"]["tokens_per_s"]
            if entry["baseline"]["peak_gib"]:  # (0 on a CPU dry run)
                entry["memory_ratio"] = entry["ours"]["peak_gib"] / entry["baseline"]["peak_gib"]
        results[mode] = entry
    results["wall_s"] = time.perf_counter() - t0
    _write(results, out)
    return 0


def _version(md, name: str) -> Optional[str]:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _write(results: dict, out: Path) -> None:
    (out / "sft_throughput.json").write_text(json.dumps(results, indent=1))
    lines = ["# Instruction tuning on the GPU: cpt's SFT stage vs TRL's SFTTrainer + peft", "",
             f"Command: `{results['command']}`  ", f"Device: {results['device']}, torch {results['torch']}, {results['versions']}", "",
             f"{results['setup']['model']}, r=128 rsLoRA on all projections, embed_tokens and lm_head trained in full, "
             f"8-bit AdamW, gradient checkpointing, micro-batch {results['setup']['micro_batch']} x {results['setup']['max_length']} tokens packed "
             f"(conversations of {results['setup']['conversation_tokens'][0]}-{results['setup']['conversation_tokens'][1]} tokens, "
             "loss on the assistant turns).", "",
             "| mode | system | tokens/s | tokens per step | step ms min-max | peak GiB | speedup | memory ratio | loss first -> last |",
             "|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for mode in ("bf16", "nf4"):
        e = results.get(mode)
        if not e:
            continue
        for system in ("baseline", "ours"):
            s = e.get(system)
            if not s:
                lines.append(f"| {mode} | {system} | failed (see the worker log) | | | | | | |")
                continue
            base = e.get("baseline")
            speed = f"{s['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
            mem = f"{s['peak_gib'] / base['peak_gib']:.2f}x" if base and base["peak_gib"] else ""
            loss = " -> ".join(f"{x:.3f}" for x in s["loss_first_last"]) if s.get("loss_first_last") else ""
            label = "TRL SFTTrainer + peft" if system == "baseline" else "cpt sft (default run plan)"
            lines.append(f"| {mode} | {label} | {s['tokens_per_s']:,.0f} | {s['tokens_per_step']:,.0f} | "
                         f"{s['step_s_range'][0] * 1e3:.0f}-{s['step_s_range'][1] * 1e3:.0f} | {s['peak_gib']:.1f} | {speed} | {mem} | {loss} |")
        if "memory_ratio" in e:
            t = TARGETS[mode]
            ok = e["speedup"] >= t["speedup"] and e["memory_ratio"] <= t["memory_ratio"]
            verdicts.append(f"- {mode}: {e['speedup']:.2f}x tokens/s at {e['memory_ratio']:.2f}x peak memory "
                            f"(target >= {t['speedup']}x at <= {t['memory_ratio']}x: {'met' if ok else 'NOT met'})")
    setup = results["setup"]
    lines += ["", f"Each row: {setup['warmup_steps']} warm-up + {setup['timed_steps']} timed steps, {setup['runs']} run(s); "
              "tokens/s = tokens read (padding not counted) in the timed steps / their time.", "", *verdicts]
    (out / "sft_throughput.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
