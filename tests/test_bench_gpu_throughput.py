"""bench/gpu_throughput.py's other families: their shapes, a CPU dry run of the worker on a 2-layer model of
the family's kind, and the results file they write (the Llama rows' file is not touched)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_throughput import (FAMILIES, LLAMA_8B, _write_families, build_model_dir, family_config,
                                  family_flops_per_token, flops_per_token, token_high)

ROOT = Path(__file__).resolve().parents[1]


def test_family_shapes_are_the_published_ones_and_plan_reads_them():
    from cpt.config import load_config
    from cpt.plan import plan, shape_from_config

    q = shape_from_config(family_config("qwen3"))
    assert (q.hidden, q.layers, q.heads, q.kv_heads, q.head_dim, q.vocab, q.tied) == (4096, 36, 32, 8, 128, 151936, False)
    g = shape_from_config(family_config("gemma2"))
    assert (g.hidden, g.attn_dim, g.kv_dim, g.vocab, g.tied) == (3584, 4096, 2048, 256000, True)
    assert family_config("gemma2").final_logit_softcapping == 30.0
    m = shape_from_config(family_config("mistral"))
    assert (m.hidden, m.layers, m.kv_heads, m.vocab) == (4096, 32, 8, 32768)
    # Llama's count is the reference one; the others follow their own shapes.
    assert family_flops_per_token("llama", 2048) == flops_per_token(2048, 32)
    assert family_flops_per_token("qwen3", 2048) > family_flops_per_token("mistral", 2048)
    assert token_high("llama") == 128000 and token_high("mistral") == 32768
    cfg = load_config(None, ["model.name_or_path=x", "model.load_in_4bit=true"])
    assert plan(cfg, family_config("gemma2"))["memory_gib"]["trained embeddings"] == pytest.approx(
        256000 * 3584 * 4 / 2**30)  # tied: one trained matrix
    assert LLAMA_8B is FAMILIES["llama"]["shape"]


def test_worker_dry_run_on_cpu(tmp_path):
    """The `ours` worker, as the driver starts it, on a tiny model of Gemma 2's kind (eager attention,
    tied, soft-capped) on the CPU: cpt's setup and loop run, the embeddings change, and the result says
    which family it measured."""
    family = "gemma2"
    build_model_dir(tmp_path / "m", family, tiny=True, device="cpu")
    result = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "bench/gpu_throughput.py", "--worker", "ours", "--family", family, "--tiny",
                        "--device", "cpu", "--model-dir", str(tmp_path / "m"), "--seq", "32", "--batch", "1",
                        "--warmup", "1", "--steps", "1", "--result", str(result)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(result.read_text())
    assert res["family"] == family and res["device"] == "cpu" and len(res["losses"]) == 3  # warm-up, timed, one more
    assert res["embedding_changed"]["lm_head"] > 0.9 and res["fallbacks"] == []


def test_model_folder_is_rebuilt_after_an_unfinished_build_and_makes_room(tmp_path, monkeypatch):
    """A build cut short (the disk filled up mid-save) is not reused; a folder the benchmark did not
    build is refused, not deleted; another family's built folder goes only when the disk lacks room."""
    import shutil
    from collections import namedtuple

    m = tmp_path / "cache" / "qwen3-random"
    build_model_dir(m, "qwen3", tiny=True, device="cpu")
    assert (m / "built").is_file() and (m / "config.json").is_file()
    (m / "built").rename(m / "building")  # as a save cut short leaves it
    for f in m.glob("*.safetensors"):
        f.write_bytes(b"cut")
    build_model_dir(m, "qwen3", tiny=True, device="cpu")
    assert (m / "built").is_file() and all(f.stat().st_size > 1000 for f in m.glob("*.safetensors"))

    foreign = tmp_path / "cache" / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    with pytest.raises(SystemExit, match="neither a model folder"):
        build_model_dir(foreign, "mistral", tiny=True, device="cpu")
    assert (foreign / "todo.txt").is_file()

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1, 1, 0))  # a full disk
    with pytest.raises(SystemExit, match="GiB are free"):
        build_model_dir(tmp_path / "cache" / "mistral-random", "mistral", tiny=True, device="cpu")
    assert not m.exists() and (foreign / "todo.txt").is_file()  # the built one made room; the other stays


def test_families_results_file(tmp_path):
    row = {"tokens_per_s": 1000.0, "peak_gib": 20.0, "step_s_range": [0.4, 0.5], "mfu": 0.3,
           "embedding_changed": {"lm_head": 1.0, "embed_tokens_seen_rows": 1.0}, "plan": {"tokens_per_s": 900.0, "peak_gib": 19.0}}
    ours = {**row, "tokens_per_s": 1900.0, "peak_gib": 14.0, "layers": {"host": 12}, "offload_embedding_state": True,
            "fallbacks": ["Triton loss pass: it has no logit soft-cap; soft-capped chunks run as PyTorch operations"]}
    results = {"families": {"gemma2": {"model": "Gemma-2-9B shape, random weights", "command": "python bench/gpu_throughput.py --family gemma2",
                                       "device": "H100", "torch": "2.x", "setup": {"warmup_steps": 2, "timed_steps": 6, "runs": 1},
                                       "bf16": {"baseline": row, "ours": ours, "speedup": 1.9, "memory_ratio": 0.7,
                                                "target_met": {"speedup": True, "memory_ratio": True}}}}}
    _write_families(results, tmp_path)
    md = (tmp_path / "gpu_throughput_families.md").read_text()
    assert "| gemma2 | bf16 | ours: embedding states in host memory, 12 host layers | 1,900 |" in md
    assert "gemma2 bf16: fell back: Triton loss pass" in md and "speedup 1.900x (met)" in md
    assert json.loads((tmp_path / "gpu_throughput_families.json").read_text()) == results
    assert not (tmp_path / "gpu_throughput.md").exists()
