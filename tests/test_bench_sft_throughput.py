"""bench/sft_throughput.py: its conversations, and a CPU dry run of the whole driver (TRL's SFTTrainer and
cpt's SFT stage on a 2-layer model) with the results file it writes."""
import json
import subprocess
import sys
from pathlib import Path

from bench.sft_throughput import LENGTHS, chat_tokenizer, conversations

ROOT = Path(__file__).resolve().parents[1]


def test_conversations_have_the_stated_lengths_and_answers_to_learn():
    tok = chat_tokenizer()
    lengths, answers = [], []
    for row in conversations(60):
        out = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        lengths.append(len(out["input_ids"]))
        answers.append(sum(out["assistant_masks"]) / len(out["input_ids"]))
        assert row["messages"][-1]["role"] == "assistant"
    assert LENGTHS[0] <= min(lengths) and max(lengths) <= LENGTHS[1] + 16  # the template's tokens on top
    assert 0.5 < min(answers) and max(answers) < 0.95  # answers are most, never all, of a conversation


def test_driver_dry_run_on_cpu(tmp_path):
    r = subprocess.run([sys.executable, "bench/sft_throughput.py", "--tiny", "--device", "cpu", "--rows", "bf16",
                        "--warmup", "2", "--steps", "2", "--model-dir", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"),
                        "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "sft_throughput.json").read_text())["bf16"]
    for system in ("baseline", "ours"):
        row = res[system]
        assert row["tokens_per_s"] > 0 and all(x == x for x in row["loss_first_last"])
        # Both pack whole conversations nearly full: best-fit leaves little padding in a 2 x 256 batch.
        assert row["tokens_per_step"] > 0.9 * 2 * 256, (system, row["tokens_per_step"])
    assert res["speedup"] > 0
    md = (tmp_path / "out" / "sft_throughput.md").read_text()
    assert "| bf16 | TRL SFTTrainer + peft |" in md and "| bf16 | cpt sft (default run plan) |" in md
