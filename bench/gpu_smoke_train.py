"""`cpt train` of one small config on a CUDA GPU: bf16 (compiled layers, the CUDA default, and eager),
a run stopped at its checkpoint and resumed, and 4-bit QLoRA, all with adamw_8bit and the held-out documents
scored before and after training.

Builds a small random Llama (4 layers, hidden 256) with a BPE tokenizer trained on the spot, a
text corpus, and one YAML config; then runs the real CLI in subprocesses:

    cpt train smoke.yaml train.optim=adamw_8bit        (model.compile and model.cuda_graphs: auto -> on)
    cpt train smoke.yaml train.optim=adamw_8bit model.compile=false
    cpt train smoke.yaml train.optim=adamw_8bit model.cuda_graphs=false
    cpt train smoke.yaml model.load_in_4bit=true train.optim=adamw_8bit
    cpt train smoke.yaml train.optim=adamw_8bit train.max_steps=6, then again without: resumes at 6

and checks exit codes, adapters, and that the compiled, eager and resumed loss curves agree.

    python bench/gpu_smoke_train.py [--work /tmp/cpt-smoke] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the court held that the statute applies to every contract signed after the act entered into force a party "
         "may appeal within thirty days and the judge shall give written reasons for the decision").split()


def build(work: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    docs = [" ".join(WORDS[(s + i) % len(WORDS)] for i in range(rng.randint(40, 160))) + "."
            for s in (rng.randrange(len(WORDS)) for _ in range(400))]
    (work / "corpus").mkdir(parents=True, exist_ok=True)
    (work / "corpus" / "docs.txt").write_text("\n\n".join(docs))
    held = [" ".join(WORDS[(s + i) % len(WORDS)] for i in range(rng.randint(40, 160))) + "."
            for s in (rng.randrange(len(WORDS)) for _ in range(20))]
    (work / "held.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in held))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id, tie_word_embeddings=False)
    model_dir = work / "tiny-llama"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    config = work / "smoke.yaml"
    config.write_text(f"""model:
  name_or_path: {model_dir}
  max_seq_length: 256
adapter:
  r: 16
  lora_alpha: 32
data:
  path: {work / 'corpus'}
train:
  per_device_train_batch_size: 2
  gradient_accumulation_steps: 2
  max_steps: 12
  learning_rate: 2.0e-4
  embedding_learning_rate: 5.0e-5
  lr_scheduler_type: constant
eval:
  sets: [{{name: domain, path: {work / 'held.jsonl'}}}]
  prompts: []
output:
  output_dir: {work / 'out'}
  logging_steps: 3
  save_steps: 6
  report: false
""")
    return config


def _run(config: Path, out: Path, overrides: list[str], env: dict, log: list[str]) -> tuple[int, dict[int, float]]:
    cmd = [sys.executable, "-m", "cpt.cli", "train", str(config), *overrides, f"output.output_dir={out}"]
    log.append(f"$ cpt train {config.name} {' '.join(overrides)} output.output_dir={out}")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    text = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if "it/s]" not in line and "s/it]" not in line)
    log.append(text[-3000:])
    metrics = out / "metrics.jsonl"
    losses = {}
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            if "loss" in rec:
                losses[int(rec["step"])] = rec["loss"]
    print(log[-2] + "\n" + log[-1], flush=True)
    return proc.returncode, losses


def _held_out(out: Path) -> dict[int, float]:
    """Bits per byte of the held-out documents by step, from the run's eval.jsonl."""
    path = out / "eval.jsonl"
    recs = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {int(r["step"]): round(r["bits_per_byte"], 4) for r in recs if "bits_per_byte" in r}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/cpt-smoke")
    ap.add_argument("--out", help="folder for gpu_smoke_train.md (default: print only)")
    args = ap.parse_args()
    work = Path(args.work)
    config = build(work)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    import peft
    import torch
    import transformers

    log = [f"transformers {transformers.__version__} peft {peft.__version__} torch {torch.__version__}"]
    checks: list[tuple[str, bool, str]] = []
    runs: dict[str, dict[int, float]] = {}
    for name, overrides in (("bf16", ["train.optim=adamw_8bit"]),
                            ("bf16-eager", ["train.optim=adamw_8bit", "model.compile=false"]),
                            ("bf16-nographs", ["train.optim=adamw_8bit", "model.cuda_graphs=false"]),
                            ("qlora-4bit", ["model.load_in_4bit=true", "train.optim=adamw_8bit"]),
                            ("bf16-offload", ["train.optim=adamw_8bit", "train.offload_embedding_state=true"])):
        out = work / f"out-{name}"
        rc, runs[name] = _run(config, out, overrides, env, log)
        written = (out / "adapter_model.safetensors").is_file()
        checks.append((f"{name}: exit 0, adapter written, 4 losses logged", rc == 0 and written and len(runs[name]) == 4,
                       f"exit {rc}, losses {[round(x, 3) for x in runs[name].values()]}"))
        scored = _held_out(out)
        checks.append((f"{name}: the held-out documents scored on the GPU before and after training, and better after",
                       sorted(scored) == [0, 12] and scored[12] < scored[0], f"bits/byte by step {scored}"))
    # The same run stopped after its step-6 checkpoint and resumed from it in a new process.
    out = work / "out-bf16-resumed"
    rc1, _ = _run(config, out, ["train.optim=adamw_8bit", "train.max_steps=6"], env, log)
    rc2, runs["bf16-resumed"] = _run(config, out, ["train.optim=adamw_8bit"], env, log)
    # The same again with the embeddings' optimizer states in host memory (they travel in optimizer.pt).
    out = work / "out-bf16-offload-resumed"
    off = ["train.optim=adamw_8bit", "train.offload_embedding_state=true"]
    rc3, _ = _run(config, out, [*off, "train.max_steps=6"], env, log)
    rc4, runs["bf16-offload-resumed"] = _run(config, out, off, env, log)
    a, b = runs["bf16"], runs["bf16-resumed"]
    close = lambda x, y: abs(x - y) <= 0.02 * abs(y)  # noqa: E731 (bf16 on a GPU: not bitwise)
    checks.append(("compiled and eager layers give the same losses (within 2%)",
                   bool(a) and a.keys() == runs["bf16-eager"].keys() and all(close(a[k], runs["bf16-eager"][k]) for k in a),
                   f"compiled {[round(x, 4) for x in a.values()]}, eager {[round(x, 4) for x in runs['bf16-eager'].values()]}"))
    checks.append(("a run resumed from checkpoint-6 continues the same curve (within 2%)",
                   rc1 == 0 and rc2 == 0 and all(k in b and close(b[k], a[k]) for k in (9, 12)),
                   f"uninterrupted {[round(a.get(k, float('nan')), 4) for k in (9, 12)]}, resumed "
                   f"{[round(b.get(k, float('nan')), 4) for k in (9, 12)]}"))
    g = runs["bf16-nographs"]
    checks.append(("compiled layers replayed as CUDA graphs (the default) give the losses of plain compiled layers (within 2%; accumulation 2, row-sparse embed_tokens)",
                   bool(g) and a.keys() == g.keys() and all(close(a[k], g[k]) for k in a),
                   f"CUDA graphs {[round(x, 4) for x in a.values()]}, without {[round(x, 4) for x in g.values()]}"))
    o, r = runs["bf16-offload"], runs["bf16-offload-resumed"]
    checks.append(("embedding states in host memory give the same losses as on the GPU (within 2%)",
                   bool(o) and a.keys() == o.keys() and all(close(a[k], o[k]) for k in a),
                   f"on the GPU {[round(x, 4) for x in a.values()]}, in host memory {[round(x, 4) for x in o.values()]}"))
    checks.append(("with them in host memory, a run resumed from checkpoint-6 continues the same curve (within 2%)",
                   rc3 == 0 and rc4 == 0 and all(k in r and close(r[k], o[k]) for k in (9, 12)),
                   f"uninterrupted {[round(o.get(k, float('nan')), 4) for k in (9, 12)]}, resumed "
                   f"{[round(r.get(k, float('nan')), 4) for k in (9, 12)]}"))
    ok = all(c[1] for c in checks)
    lines = ["# cpt train on a CUDA GPU: bf16 (compiled with and without CUDA graphs, and eager), resumed, 4-bit QLoRA, and embedding states in host memory, with adamw_8bit", "",
             f"`python bench/gpu_smoke_train.py --out bench/results` on {torch.cuda.get_device_name(0)} "
             "(a 4-layer random Llama, hidden 256, BPE tokenizer trained on the spot; 12 steps of 2 x 2 blocks of 256 tokens).", "",
             "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c} | {'PASS' if p else 'FAIL'} | {d} |" for c, p, d in checks]
    lines += ["", "Log (progress bars removed):", "", "```", *log, "```", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_smoke_train.md").write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
