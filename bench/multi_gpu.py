"""Several GPUs (issue #7): tokens/s on 1 and 2 GPUs for the same model and settings, the scaling
efficiency, and peak memory per GPU under DDP and FSDP2.

One command on a machine with 2 GPUs. It builds a model of a known shape from its
config (random weights saved as bf16 safetensors on local disk, no download), then runs each row as
its own `torchrun` launch through cpt's real path: `cpt.distributed.build_accelerator` ->
`loading_place` -> `cpt.build.build_model` -> `cpt.train.Trainer` (which shards under FSDP). The
data are random token blocks, a different stream per rank; every rank does the same work per step.

Rows (same per-GPU micro-batch, sequence length, LoRA rank and optimizer in each):
  single        1 GPU
  ddp           2 GPUs, DistributedDataParallel (each GPU holds the whole model)
  fsdp          2 GPUs, FSDP2 (parameters, gradients and optimizer state sharded)
  fsdp_offload  2 GPUs, FSDP2 with parameter shards in host memory (slow; shows the memory floor)

Scaling efficiency = tokens/s on 2 GPUs / (2 x tokens/s on 1 GPU). Peak memory is
torch.cuda.max_memory_allocated on each rank, after the model is set up and through the steps.
Writes multi_gpu.{md,json} into --out (default bench/results).

    python bench/multi_gpu.py                                  # 1B shape, all rows (about 4 minutes on 2 H200)
    python bench/multi_gpu.py --shape 8b --rows single,ddp,fsdp
    python bench/multi_gpu.py --device cpu --shape tiny --steps 3 --warmup 1 --out /tmp/mg   # dry run, gloo
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

_LLAMA3 = dict(vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
               hidden_act="silu", initializer_range=0.02, max_position_embeddings=131072,
               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192})
SHAPES: dict[str, dict] = {
    # Llama-3.2-1B: tied embed_tokens / lm_head (trained in full), the case FSDP must keep in one unit.
    "1b": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    # Llama-3.1-8B: the shape of the single-GPU bench (bench/gpu_throughput.py).
    "8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False, rope_scaling={**_LLAMA3["rope_scaling"], "factor": 8.0}),
    # For a dry run of this script on CPU.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=4096, bos_token_id=0,
                 eos_token_id=1),
}
ROWS = {"single": (1, {}), "ddp": (2, {}), "fsdp": (2, {"fsdp": True}),
        "fsdp_offload": (2, {"fsdp": True, "fsdp_offload_params": True})}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------- model folder


def _tokenizer():
    """A small word-level tokenizer: cpt's setup wants one; the bench feeds token ids directly."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|eos|>": 1, **{f"w{i}": i + 2 for i in range(64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", unk_token="<unk>", pad_token="<|eos|>")


def build_model_dir(path: Path, shape: str, device: str) -> None:
    """Random weights of `shape` (transformers' own init, seed 0), saved as bf16 safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(LlamaConfig(**SHAPES[shape]), dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="4GB")
    _tokenizer().save_pretrained(path)


# ---------------------------------------------------------------------------- one row (inside torchrun)


class _RandomTokens:
    """The data object cpt's Trainer reads: random blocks, one stream per rank. Each batch request
    marks a step boundary: synchronise there and note the time."""

    def __init__(self, seq: int, vocab: int, seed: int, cuda: bool):
        self.seq, self.vocab, self.seed, self.cuda = seq, vocab, seed, cuda
        self.blocks_per_epoch = None
        self.marks: list[float] = []

    def batches(self, batch_size: int):
        import torch
        g = torch.Generator().manual_seed(self.seed)
        while True:
            ids = torch.randint(0, self.vocab, (batch_size, self.seq), generator=g)
            if self.cuda:
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())
            yield {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(self.seq).repeat(batch_size, 1)}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


def row_config(args: argparse.Namespace, extra: dict, out_dir: str):
    from cpt.config import config_from_dict

    cpu = args.device == "cpu"
    return config_from_dict({
        "model": {"name_or_path": args.model_dir, "max_seq_length": args.seq, "dtype": "float32" if cpu else "bfloat16",
                  "attn_implementation": "sdpa", "kernels": "auto"},
        "adapter": {"r": args.r, "lora_alpha": 32, "lora_dropout": 0.0, "use_rslora": True,
                    "target_modules": LORA_TARGETS + ["embed_tokens", "lm_head"],
                    "use_gradient_checkpointing": True, "embedding_master_dtype": "float32"},
        "train": {"per_device_train_batch_size": args.batch, "gradient_accumulation_steps": args.accumulation,
                  "max_steps": args.warmup + args.steps, "learning_rate": 5e-6, "embedding_learning_rate": 1e-6,
                  "optim": "adamw_torch", "lr_scheduler_type": "constant", "max_grad_norm": 1.0,
                  "bf16": not cpu, **extra},
        "output": {"output_dir": out_dir, "logging_steps": 1, "save_steps": 0, "report": False, "report_to": [],
                   "overwrite_output_dir": True, "resume": False},
        "eval": {"eval_at_start": False},
    })


def worker(args: argparse.Namespace) -> None:
    import resource

    import torch
    import torch.distributed as dist

    from cpt.distributed import build_accelerator, loading_place
    from cpt.build import build_model
    from cpt.train import Trainer

    world, extra = ROWS[args.row]
    out_dir = f"/tmp/cpt-bench-multi/out-{args.row}"
    cfg = row_config(args, extra, out_dir)
    acc = build_accelerator(cfg)
    cuda = acc.device.type == "cuda"
    t0 = time.perf_counter()
    build_cfg, device = loading_place(cfg, acc, acc.device)
    bundle = build_model(build_cfg, device=device, tokenizer=_tokenizer())
    vocab = bundle.model.get_input_embeddings().weight.shape[0]
    data = _RandomTokens(args.seq, vocab, seed=1 + acc.process_index, cuda=cuda)
    trainer = Trainer(cfg, bundle, _Data(data), accelerator=acc)  # shards under FSDP
    if cuda:
        torch.cuda.synchronize()
    setup_s = time.perf_counter() - t0
    # Checkpoints and the final adapter are not part of a training step; skip the disk.
    trainer.save = lambda: None
    trainer.parallel.save_trained = lambda *a, **k: None
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    marks = data.marks
    per_step = args.accumulation
    # Each optimizer step asks for `accumulation` batches; step boundaries are every per_step marks.
    bounds = marks[::per_step]
    times = [b - a for a, b in zip(bounds, bounds[1:])][args.warmup:]
    mine = {"rank": acc.process_index, "setup_s": setup_s,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
            "host_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    everyone = [mine]
    if acc.num_processes > 1:
        everyone = [None] * acc.num_processes
        dist.all_gather_object(everyone, mine)
    if acc.is_main_process:
        losses = [json.loads(line)["loss"] for line in open(Path(out_dir) / "metrics.jsonl")]
        tokens = args.batch * args.seq * args.accumulation * acc.num_processes
        mean = sum(times) / len(times)
        kernels = bundle.speed.applied
        result = {"row": args.row, "gpus": acc.num_processes, "strategy": trainer.parallel.strategy,
                  "tokens_per_step": tokens, "tokens_per_s": tokens / mean, "step_s_mean": mean,
                  "step_s_min": min(times), "step_s_max": max(times), "step_s": times, "losses": losses,
                  "per_rank": everyone, "peak_gib_max": max((r["peak_gib"] or 0) for r in everyone),
                  "setup_s": max(r["setup_s"] for r in everyone), "kernels": kernels, "settings": extra}
        Path(args.result).write_text(json.dumps(result, indent=1))


class _Data:
    def __init__(self, stream: _RandomTokens):
        self.train = stream


# ---------------------------------------------------------------------------- the driver


def _run_row(args: argparse.Namespace, row: str, log_dir: Path) -> Optional[dict]:
    world, _ = ROWS[row]
    result = log_dir / f"{row}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
           str(Path(__file__).resolve()), "--worker", "--row", row, "--result", str(result),
           "--model-dir", args.model_dir, "--device", args.device, "--seq", str(args.seq), "--batch", str(args.batch),
           "--accumulation", str(args.accumulation), "--lora-rank", str(args.r), "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    with open(log_dir / f"{row}.log", "w") as logf:
        try:
            proc = subprocess.run(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, timeout=args.row_timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    print(f"{row}: exit {rc} in {time.perf_counter() - t0:.0f}s", flush=True)
    if rc != 0 or not result.is_file():
        tail = (log_dir / f"{row}.log").read_text()[-2000:]
        print(tail, flush=True)
        return {"row": row, "error": f"exit {rc}", "log_tail": tail[-600:]}
    return json.loads(result.read_text())


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def write_results(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "multi_gpu.json").write_text(json.dumps(results, indent=1))
    rows = results["rows"]
    single = rows.get("single", {}).get("tokens_per_s")
    lines = ["# Several GPUs: DDP and FSDP2 (bench/multi_gpu.py)", "",
             f"{results['device']}; torch {results['torch']}, transformers {results['transformers']}, "
             f"peft {results['peft']}, accelerate {results['accelerate']}.", "",
             f"Model: `{results['shape']}` shape, random weights, {'float32' if results['device'].startswith('CPU') else 'bf16'} frozen base; LoRA r={results['r']} (rsLoRA) on all "
             f"projections, embed_tokens + lm_head trained in full (float32 masters); AdamW (torch), gradient "
             f"checkpointing; per GPU {results['batch']} x {results['seq']} tokens per micro-batch, "
             f"{results['accumulation']} micro-batch(es) per step; {results['steps']} timed steps after "
             f"{results['warmup']} warm-up.", "",
             "| row | GPUs | tokens/s (all GPUs) | scaling efficiency | step s (mean) | peak GiB per GPU (each rank) | setup s |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | {ROWS[name][0]} | failed: {r['error']} | | | | |")
            continue
        eff = r["tokens_per_s"] / (r["gpus"] * single) if single and r["gpus"] > 1 else None
        peaks = " / ".join(_fmt(p["peak_gib"], ".1f") for p in r["per_rank"])
        lines.append(f"| {name} | {r['gpus']} | {r['tokens_per_s']:,.0f} | {_fmt(eff, '.2f')} | {r['step_s_mean']:.3f} | "
                     f"{peaks} | {r['setup_s']:.0f} |")
    lines += ["", "Scaling efficiency = tokens/s on 2 GPUs / (2 x tokens/s on 1 GPU). Peak GiB is "
              "torch.cuda.max_memory_allocated on each rank (setup and steps).", ""]
    for name, r in rows.items():
        if "losses" in r:
            lines.append(f"- {name}: kernels {', '.join(r['kernels']) or 'plain'}; first losses "
                         f"{', '.join(f'{x:.3f}' for x in r['losses'][:3])}")
    (out / "multi_gpu.md").write_text("\n".join(lines) + "\n")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="single,ddp,fsdp,fsdp_offload", help="comma-separated rows: " + ", ".join(ROWS))
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2, help="micro-batch per GPU")
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--lora-rank", dest="r", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--work", default="/tmp/cpt-bench-multi", help="model folder and logs")
    p.add_argument("--row-timeout", type=float, default=240)
    # inside torchrun
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    import accelerate
    import peft
    import torch
    import transformers

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.device == "cuda":
        need = max(ROWS[r][0] for r in rows)
        if torch.cuda.device_count() < need:
            p.error(f"rows {rows} need {need} GPUs; this machine has {torch.cuda.device_count()}")
    elif "fsdp_offload" in rows:
        rows.remove("fsdp_offload")  # host-memory offload means nothing on a CPU run
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    args.model_dir = str(work / f"model-{args.shape}")
    t0 = time.perf_counter()
    build_model_dir(Path(args.model_dir), args.shape, args.device)
    print(f"model folder ready in {time.perf_counter() - t0:.0f}s", flush=True)
    device = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if args.device == "cuda"
              else f"CPU ({os.cpu_count()} cores, gloo)")
    results: dict[str, Any] = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
                               "peft": peft.__version__, "accelerate": accelerate.__version__, "shape": args.shape,
                               "seq": args.seq, "batch": args.batch, "accumulation": args.accumulation, "r": args.r,
                               "steps": args.steps, "warmup": args.warmup, "rows": {}}
    for row in rows:
        results["rows"][row] = _run_row(args, row, work)
        write_results(results, Path(args.out))  # after every row: a later failure keeps the earlier ones
    single = results["rows"].get("single", {}).get("tokens_per_s")
    for name, r in results["rows"].items():
        if "tokens_per_s" in r:
            eff = f", scaling efficiency {r['tokens_per_s'] / (r['gpus'] * single):.2f}" if single and r["gpus"] > 1 else ""
            print(f"{name}: {r['tokens_per_s']:,.0f} tokens/s{eff}, peak {r['peak_gib_max'] or 0:.1f} GiB per GPU", flush=True)
    print(f"wrote {Path(args.out) / 'multi_gpu.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
