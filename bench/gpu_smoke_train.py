"""`cpt train` of one small config on a CUDA GPU, in bf16 and in 4-bit QLoRA with adamw_8bit (issue #2).

Builds a small random Llama (4 layers, hidden 256) with a BPE tokenizer trained on the spot, a
text corpus, and one YAML config; then runs the real CLI twice in subprocesses:

    cpt train smoke.yaml train.optim=adamw_8bit
    cpt train smoke.yaml model.load_in_4bit=true train.optim=adamw_8bit

    python bench/gpu_smoke_train.py [--work /tmp/cpt-smoke]
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
output:
  output_dir: {work / 'out'}
  logging_steps: 3
  save_steps: 6
  report: false
""")
    return config


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/cpt-smoke")
    args = ap.parse_args()
    work = Path(args.work)
    config = build(work)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    ok = True
    for name, overrides in (("bf16", ["train.optim=adamw_8bit"]),
                            ("qlora-4bit", ["model.load_in_4bit=true", "train.optim=adamw_8bit"])):
        out = work / f"out-{name}"
        cmd = [sys.executable, "-m", "cpt.cli", "train", str(config), *overrides, f"output.output_dir={out}"]
        print(f"$ cpt train {config.name} {' '.join(overrides)} output.output_dir={out}", flush=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        print((proc.stdout + proc.stderr)[-2500:], flush=True)
        metrics = out / "metrics.jsonl"
        losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        print(f"{name}: exit {proc.returncode}, logged losses {[round(x, 3) for x in losses]}, adapter "
              f"{'written' if (out / 'adapter_model.safetensors').is_file() else 'MISSING'}", flush=True)
        ok &= proc.returncode == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
