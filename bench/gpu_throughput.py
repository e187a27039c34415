"""GPU speed and memory, side by side: cpt's trainer against plain transformers + peft (issue #5).

One command, one machine. It builds a Llama-3.1-8B-shaped model from its config (random
weights, saved as bf16 safetensors to local disk, no download), then runs each row in its own
process: the baseline exactly as ../shared/reference/gpu_anchor.md describes it, and ours through
cpt's real setup (`cpt.build.build_model`) and training loop (`cpt.train.Trainer`), in bf16 and
NF4; then our memory-aware row (layers keep their activations where they fit), the longest
sequence that trains at micro-batch 1 (ours vs baseline), and `cpt plan`'s estimate beside each
measurement. Writes bench/results/gpu_throughput.{md,json} (or --out).

    python bench/gpu_throughput.py                       # everything (about 8 minutes on one H200)
    python bench/gpu_throughput.py --rows bf16 --runs 1  # a subset
    python bench/gpu_throughput.py --worker ours --mode bf16 --result /tmp/r.json   # one row

Other families (`--family qwen3,mistral`: a Qwen3-8B, Mistral-7B or Gemma-2-9B shape, random weights) run
the bf16 and nf4 rows, baseline and ours, and write bench/results/gpu_throughput_families.{md,json}; the
Llama rows and their file are untouched by them. `--tiny --device cpu` on a worker is a dry run of its
plumbing on a 2-layer model of the family's kind (tests/test_bench_gpu_throughput.py).

    python bench/gpu_throughput.py --family qwen3,mistral --rows bf16,nf4 --warmup 2 --steps 6
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# The reference setup (gpu_anchor.md): Llama-3.1-8B shape.
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192},
                max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
                hidden_act="silu", initializer_range=0.02)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, LR, EMB_LR = 128, 32, 5e-6, 1e-6
MICRO_BATCH, SEQ = 2, 2048
TOKEN_HIGH = 128000
ANCHOR = {"bf16": {"baseline": {"tokens_per_s": 6751, "peak_gib": 28.9}, "unsloth": {"tokens_per_s": 9663, "peak_gib": 22.3}},
          "nf4": {"baseline": {"tokens_per_s": 5984, "peak_gib": 19.3}, "unsloth": {"tokens_per_s": 8445, "peak_gib": 12.7}}}
TARGETS = {"bf16": {"speedup": 1.8, "memory_ratio": 0.75}, "nf4": {"speedup": 1.75, "memory_ratio": 0.65}}
BUDGET_MARGIN_GIB = 0.1  # the ours_budget row's cap sits this far under the memory target
LONG_LADDER = [8192, 16384, 32768, 65536, 131072]
# The other families' rows: transformers' config class and a realistic shape (published configs' sizes,
# random weights). attn: the attention both systems use (transformers has no SDPA for Gemma 2).
FAMILIES = {
    "llama": {"config": "LlamaConfig", "shape": LLAMA_8B, "name": "Llama-3.1-8B shape", "attn": "sdpa"},
    "qwen3": {"config": "Qwen3Config", "name": "Qwen3-8B shape", "attn": "sdpa", "shape": dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, vocab_size=151936, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960,
        tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645, hidden_act="silu")},
    "mistral": {"config": "MistralConfig", "name": "Mistral-7B-v0.3 shape", "attn": "sdpa", "shape": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=32768, rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=32768, sliding_window=None,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, hidden_act="silu")},
    "gemma2": {"config": "Gemma2Config", "name": "Gemma-2-9B shape", "attn": "eager", "shape": dict(
        hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
        head_dim=256, vocab_size=256000, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=8192,
        query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0, hidden_activation="gelu_pytorch_tanh")},
}
# --tiny: the family's kind at toy size (a dry run of a worker's plumbing on a CPU).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, bos_token_id=1, eos_token_id=1, pad_token_id=0)
PEAK_TFLOPS = 989.0  # H200 SXM dense bf16 datasheet; the anchor's MFU uses the same


# ---------------------------------------------------------------------------- shared helpers


def _sync() -> None:
    import torch
    if torch.cuda.is_available():  # (a --device cpu dry run has nothing to wait for)
        torch.cuda.synchronize()


def _gib(n: float) -> float:
    return n / 2**30


def _tokenizer():
    """A small word-level tokenizer: cpt's setup wants one; the bench feeds token ids directly."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|eos|>": 1, **{f"w{i}": i + 2 for i in range(64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", unk_token="<unk>", pad_token="<|eos|>")


def family_config(family: str = "llama", tiny: bool = False):
    """The transformers config of a family's benchmark shape (or, tiny, of its kind at toy size)."""
    import transformers

    spec = FAMILIES[family]
    return getattr(transformers, spec["config"])(**{**spec["shape"], **(TINY if tiny else {})})


def build_model_dir(path: Path, family: str = "llama", tiny: bool = False, device: str = "cuda") -> None:
    """Random weights of the family's shape (transformers' own init, seed 0), saved as bf16 safetensors.
    A build that did not finish (a disk that filled up mid-save) is started again, not reused. Other
    random folders this benchmark built beside it are removed when the disk lacks room for this one
    (they are rebuilt in about 20 s)."""
    import torch
    from transformers import AutoModelForCausalLM

    if (path / "built").is_file():
        return
    if (path / "building").is_file():
        shutil.rmtree(path)
    elif path.is_dir() and any(path.iterdir()):
        if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            return  # a model folder given with --model-dir
        raise SystemExit(f"{path}: neither a model folder nor one this benchmark built; give --model-dir a new folder")
    path.mkdir(parents=True, exist_ok=True)
    (path / "building").write_text(family + "\n")
    cfg = family_config(family, tiny)
    with torch.device("meta"):
        need = 2 * sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters()) + 2**30
    for other in sorted(q for q in path.parent.iterdir() if q != path and (q / "built").is_file()):
        if shutil.disk_usage(path).free >= need:
            break
        print(f"removing {other} to make room for {path.name} ({need / 2**30:.0f} GiB)", flush=True)
        shutil.rmtree(other)
    if shutil.disk_usage(path).free < need:
        raise SystemExit(f"{path}: the random {family} model needs {need / 2**30:.0f} GiB, "
                         f"{shutil.disk_usage(path).free / 2**30:.0f} GiB are free; make room or give --model-dir elsewhere")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="4GB")
    _tokenizer().save_pretrained(path)
    (path / "building").rename(path / "built")


def token_high(family: str = "llama", tiny: bool = False) -> int:
    """Random token ids are drawn below this: TOKEN_HIGH, or the vocabulary where it is smaller."""
    return min(TOKEN_HIGH, family_config(family, tiny).vocab_size)


def family_flops_per_token(family: str, seq: int, recompute_layers: Optional[int] = None, host_layers: int = 0) -> float:
    """`flops_per_token` for another family's shape (every layer recomputing unless told)."""
    from cpt.plan import model_flops_per_token, shape_from_config

    s = shape_from_config(family_config(family))
    return model_flops_per_token(hidden=s.hidden, layers=s.layers, heads=s.heads, kv_heads=s.kv_heads,
                                 intermediate=s.intermediate, vocab=s.vocab, r=R, seq=seq, head_dim=s.head_dim,
                                 fused=s.fused, recompute_layers=s.layers if recompute_layers is None else recompute_layers,
                                 host_layers=host_layers)


def flops_per_token(seq: int, recompute_layers: int, host_layers: int = 0) -> float:
    """The anchor's count: 6*N_frozen + 8*N_lora + 6*N_lm_head + 6*L*d*seq with full recompute;
    each layer that keeps its activations saves 2*N (frozen) + 2*N (lora) of its share, each host
    layer (adapter.host_activations) the same for its gate and up projections."""
    from cpt.plan import model_flops_per_token
    return model_flops_per_token(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256,
                                 r=R, n_lora_targets=7, seq=seq, recompute_layers=recompute_layers, host_layers=host_layers)


def _batches(n: int, batch: int, seq: int, seed: int, device, high: int = TOKEN_HIGH) -> list:
    import torch
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randint(0, high, (batch, seq), generator=g).to(device) for _ in range(n)]


def _embedding_snapshot(named: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in named.items()}


def _changed_fraction(before: dict, after: dict, seen_rows) -> dict:
    """Fraction of elements that changed: lm_head over all elements; embed_tokens over the rows of
    the tokens that appeared in the batches (the other rows get no gradient at all)."""
    import torch
    out = {}
    for k in before:
        diff = before[k] != after[k].detach().to("cpu")
        if k == "embed_tokens":
            rows = torch.tensor(sorted(seen_rows))
            out["embed_tokens_seen_rows"] = float(diff[rows].float().mean())
            out["embed_tokens_all"] = float(diff.float().mean())
        else:
            out[k] = float(diff.float().mean())
    return out


def _profile_step(step_fn, path: Path, gpu_only: bool = False) -> None:
    """gpu_only: the GPU's timeline without the host's operators, whose recording slows the host enough
    to make a step that is not host-bound look so."""
    from torch.profiler import ProfilerActivity, profile

    _sync()
    with profile(activities=[ProfilerActivity.CUDA] if gpu_only else [ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step_fn()
        _sync()
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70))
    # The timeline (streams side by side) for chrome://tracing or Perfetto, gzipped beside the table.
    trace = path.with_suffix(".trace.json")
    prof.export_chrome_trace(str(trace))
    import gzip
    import shutil
    with open(trace, "rb") as src, gzip.open(str(trace) + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()


# ---------------------------------------------------------------------------- baseline (the anchor, exactly)


def baseline_setup(model_dir: Path, mode: str, attn: str = "sdpa", device: str = "cuda"):
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw: dict[str, Any] = {"dtype": torch.bfloat16, "attn_implementation": attn}
    if mode == "nf4":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        kw["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    if mode == "bf16":
        model.to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, bias="none", use_rslora=True,
                                             target_modules=LORA_TARGETS, modules_to_save=["embed_tokens", "lm_head"],
                                             task_type="CAUSAL_LM"))
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    emb = [p for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n]
    opt = bnb.optim.AdamW8bit([{"params": lora, "lr": LR}, {"params": emb, "lr": EMB_LR}],
                              betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    emb_named = {}
    for n, p in model.named_parameters():
        if "modules_to_save" in n:
            emb_named["embed_tokens" if "embed_tokens" in n else "lm_head"] = p
    return model, opt, emb_named


def _baseline_step(model, opt, device: str = "cuda"):
    """The anchor's loop body: forward with labels under bf16 autocast, backward, step, zero_grad."""
    import torch

    def step(ids):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def worker_baseline(args) -> dict:
    import torch

    model, opt, emb_named = baseline_setup(Path(args.model_dir), args.mode, FAMILIES[args.family]["attn"], args.device)
    model.train()
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    n = args.warmup + args.steps
    data = _batches(n, args.batch, args.seq, seed=1, device=args.device, high=token_high(args.family, args.tiny))
    before = _embedding_snapshot(emb_named)
    seen = set()

    step = _baseline_step(model, opt, args.device)

    times, losses = [], []
    for i, ids in enumerate(data):
        seen.update(ids.flatten().tolist())
        _sync()
        t0 = time.perf_counter()
        loss = step(ids)
        _sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    res = _result(args, times, losses)
    res["embedding_changed"] = _changed_fraction(before, emb_named, seen)
    if args.profile:
        _profile_step(lambda: step(data[0]), Path(args.profile))
    return res


def _result(args, times: list[float], losses: list[float], **extra) -> dict:
    import torch
    timed = times[args.warmup:]
    mean = sum(timed) / len(timed)
    tokens = args.batch * args.seq
    cuda = torch.cuda.is_available()
    return {"system": args.worker, "mode": args.mode, "seq": args.seq, "batch": args.batch,
            "tokens_per_s": tokens / mean, "step_s_mean": mean, "step_s_min": min(timed), "step_s_max": max(timed),
            "peak_gib": _gib(torch.cuda.max_memory_allocated()) if cuda else 0.0,
            "peak_reserved_gib": _gib(torch.cuda.max_memory_reserved()) if cuda else 0.0,
            "step_s": timed, "losses": losses, "warmup": args.warmup, "steps": args.steps, **extra}


# ---------------------------------------------------------------------------- ours: cpt's setup and loop


def ours_config(model_dir: Path, mode: str, seq: int, batch: int, steps: int, recompute_budget: Optional[str] = None,
                checkpointing: Any = True, compile: str = "auto", offload_embedding_state: Any = "auto",
                cuda_graphs: Any = None, host_activations: Any = None, attn: str = "sdpa"):
    from cpt.config import config_from_dict
    raw = {
        "model": {"name_or_path": str(model_dir), "max_seq_length": seq, "dtype": "bfloat16",
                  "load_in_4bit": mode == "nf4", "attn_implementation": attn, "kernels": "auto",
                  "compile": compile, **({} if cuda_graphs is None else {"cuda_graphs": cuda_graphs})},
        "adapter": {"r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0, "use_rslora": True,
                    "target_modules": LORA_TARGETS + ["embed_tokens", "lm_head"],
                    "use_gradient_checkpointing": checkpointing, "embedding_master_dtype": "float32"},
        "train": {"per_device_train_batch_size": batch, "gradient_accumulation_steps": 1, "max_steps": steps,
                  "learning_rate": LR, "embedding_learning_rate": EMB_LR, "weight_decay": 0.0, "optim": "adamw_8bit",
                  "lr_scheduler_type": "constant", "max_grad_norm": 0.0, "bf16": True,
                  "offload_embedding_state": offload_embedding_state},
        "output": {"output_dir": f"/tmp/cpt-bench/out-{mode}-{os.getpid()}", "logging_steps": 1, "save_steps": 0, "report": False,
                   "report_to": [], "overwrite_output_dir": True, "resume": False},
    }
    if host_activations is not None:
        raw["adapter"]["host_activations"] = host_activations
    if recompute_budget is not None:
        raw["adapter"]["recompute_budget_gib"] = recompute_budget if recompute_budget == "auto" else float(recompute_budget)
    return config_from_dict(raw)


class _RandomTokens:
    """The data object cpt's Trainer reads: random token blocks. Each new batch request marks a step
    boundary: synchronise there and note the time (the anchor synchronises around each step too)."""

    def __init__(self, batch: int, seq: int, seed: int, profile: "tuple[int, Path] | None" = None,
                 high: int = TOKEN_HIGH):
        self.batch, self.seq, self.seed, self.high = batch, seq, seed, high
        self.blocks_per_epoch = None
        self.marks: list[float] = []
        self.seen: set[int] = set()
        self.profile, self.prof = profile, None  # (step, path): profile that step of the loop, host and GPU

    def batches(self, batch_size: int):
        import torch
        g = torch.Generator().manual_seed(self.seed)
        while True:
            ids = torch.randint(0, self.high, (batch_size, self.seq), generator=g)
            self.seen.update(ids.flatten().tolist())
            _sync()
            self.marks.append(time.perf_counter())
            if self.profile is not None and len(self.marks) in (self.profile[0], self.profile[0] + 1):
                self._profiler(len(self.marks) == self.profile[0])
            yield {"input_ids": ids, "labels": ids.clone(),
                   "position_ids": torch.arange(self.seq).repeat(batch_size, 1)}

    def _profiler(self, start: bool) -> None:
        """--profile-loop: one whole step of the Trainer's loop (its syncs included) under the profiler."""
        from torch.profiler import ProfilerActivity, profile

        if start:
            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.prof.start()
            return
        self.prof.stop()
        path = self.profile[1]
        self.prof.export_chrome_trace(str(path))
        import gzip
        import shutil
        with open(path, "rb") as src, gzip.open(str(path) + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        path.unlink()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        return None


def worker_ours(args) -> dict:
    import torch
    from types import SimpleNamespace

    import cpt.train as cpt_train
    from cpt.build import build_model
    from cpt.model import trained_embedding_modules

    cfg = ours_config(Path(args.model_dir), args.mode, args.seq, args.batch, args.warmup + args.steps + 1,
                      recompute_budget=args.recompute_budget, checkpointing=args.checkpointing, compile=args.compile,
                      offload_embedding_state=args.offload_embedding_state, cuda_graphs=args.cuda_graphs,
                      host_activations=None if args.host_activations is None else
                      (args.host_activations if args.host_activations == "auto" else int(args.host_activations)),
                      attn=FAMILIES[args.family]["attn"])
    speed_options: dict = {}  # cpt.speed.apply's options for the experiments below
    if args.host_lead is not None:
        speed_options["host_lead"] = args.host_lead
    optimizer_knobs: dict = {}  # cpt.optim.adamw8bit.AdamW8bit's arguments for the experiments below
    built: list = []  # the optimizer the Trainer builds with them
    if args.skip_early_update:
        optimizer_knobs["host_update"] = lambda *a, **k: None
    if args.bnb_dequant:  # 4-bit weights dequantized by bitsandbytes' functions, not cpt.speed.nf4
        speed_options["nf4_kernel"] = False
    if args.emulate_backup:  # the link traffic of the host backup of the weights the early passes move,
        # which undoing a skipped step needs without cpt.optim.split_master.UndoLog: each chunk's old weights, copied out
        from cpt.optim.split_master import update_split_rows
        from cpt.runtime import host_tensor

        update, host = optimizer_knobs.get("host_update", update_split_rows), {}

        def with_backup(high, *a, **k):
            if k.get("log") is None:
                return update(high, *a, **k)
            old = high.clone()
            update(high, *a, **k)
            _, _, cout = built[0].host_stream.streams(high.device)
            buf = host.setdefault(high.numel(), host_tensor(high.shape, high.dtype))
            cout.wait_stream(torch.cuda.current_stream(high.device))
            with torch.cuda.stream(cout):
                buf.copy_(old, non_blocking=True)
            old.record_stream(cout)

        optimizer_knobs["host_update"] = with_backup
    if args.lora_addmm:
        speed_options["lora_op"] = False
    if args.no_dequant_reuse:
        speed_options["dequantize_once"] = False
    if args.reuse_skip_low:  # the lowest recomputing layers (last in the backward pass) dequantize in the op again
        speed_options["dequantize_once_skip_lowest"] = args.reuse_skip_low
    if args.keep_layers is not None:  # the memory plan's number of layers that keep their activations, forced
        import cpt.plan.decide

        planned = cpt.plan.decide.memory_plan
        cpt.plan.decide.memory_plan = lambda c, mc, budget, offload: (32 - args.keep_layers, planned(c, mc, budget, offload)[1])
    if args.side_update:
        optimizer_knobs["side_launch"] = tuple(int(x) for x in args.side_update.split(","))
    if optimizer_knobs:
        plain_build = cpt_train.build_optimizer

        def build_with_knobs(*a, **k):
            built.append(plain_build(*a, **k, **optimizer_knobs))
            return built[-1]

        cpt_train.build_optimizer = build_with_knobs
    t_setup = time.perf_counter()
    bundle = build_model(cfg, torch.device(args.device), tokenizer=_tokenizer(), **speed_options)
    setup_s = time.perf_counter() - t_setup
    if args.embeddings_first:
        # Experiment: the two huge embedding updates first, so the GPU works on them while the
        # host launches the hundreds of small LoRA updates.
        bundle.groups.sort(key=lambda g: g["name"] != "embeddings")
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if args.memory_trace:
        traced_from = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(enabled="all", stacks="python", max_entries=5_000_000)
    emb_named = {k: m.weight for k, m in trained_embedding_modules(bundle.model).items()}
    before = _embedding_snapshot(emb_named)
    data = _RandomTokens(args.batch, args.seq, seed=1,
                         profile=(args.warmup + 1, Path(args.profile_loop)) if args.profile_loop else None,
                         high=token_high(args.family, args.tiny))
    trainer = cpt_train.Trainer(cfg, bundle, SimpleNamespace(train=data))
    # Checkpoint and adapter writing are not part of a training step's speed: skip the disk.
    trainer.save = lambda: None
    trainer.parallel.save_trained = lambda *a, **k: None
    if args.main_stream_priority is not None:
        # Kernels of a higher-priority stream are scheduled first: the embedding states' update kernels on
        # the side streams (priority 0) then take only what the training stream leaves of the GPU.
        main = torch.cuda.Stream(priority=args.main_stream_priority)
        main.wait_stream(torch.cuda.current_stream())
        ctx = torch.cuda.stream(main)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        trainer.train()
    _sync()
    if args.memory_trace:
        from memory_peak import format_composition, peak_composition
        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
        torch.cuda.memory._record_memory_history(enabled=None)
        comp = peak_composition(trace, traced_from)
        comp["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        Path(args.memory_trace).write_text(json.dumps(comp, indent=1))
        print(format_composition(comp), flush=True)
    marks = data.marks[: args.warmup + args.steps + 1]
    times = [b - a for a, b in zip(marks, marks[1:])]
    losses = [json.loads(line)["loss"] for line in open(Path(cfg.output.output_dir) / "metrics.jsonl")]
    shutil.rmtree(cfg.output.output_dir, ignore_errors=True)  # (workers of one call would fill the disk)
    speed = bundle.speed
    host = speed.hosts
    plan_layers = {"keep": speed.layers["keep"], "offload": speed.layers["offload"],
                   "host": len(host), "host_tensors_last_step": sum(h.count for h in host),
                   "host_late": sum(h.late for h in host),
                   "host_gib": sum(b.numel() * b.element_size() for h in host for b in h.buffers) / 2**30}
    from torch._dynamo.utils import counters

    from cpt.speed import graphs_recorded
    failed = {str(speed.compiler.backend): speed.compile_failed} if speed.compile_failed else {}
    dynamo = {"compile_failed": failed, "graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
              "break_reasons": [k[:300] for k in counters["graph_break"]][:5],
              "cudagraph_skips": counters["inductor"]["cudagraph_skips"], "cuda_graphs_recorded": graphs_recorded()}
    res = _result(args, times, losses, setup_s=setup_s, kernels=speed.applied, fallbacks=speed.fallbacks, layers=plan_layers,
                  dynamo=dynamo, offload_embedding_state=bundle.plan.offload_embedding_state,
                  run_plan=bundle.plan.to_dict())
    from cpt.optim import master_weight
    # The values being trained: for split masters the bf16 weight together with its low half.
    res["embedding_changed"] = _changed_fraction(before, {k: master_weight(p, trainer.optimizer) for k, p in emb_named.items()},
                                                 data.seen)
    if args.profile or args.phase_steps:
        with ctx:
            res.update(_phase_timings(args, trainer, bundle))
    return res


def _phase_timings(args, trainer, bundle) -> dict:
    """Steps made as the loop makes them (train.py), with CUDA events between the phases and the host's
    own time for each (with the embedding states in host memory, also when the early passes' last copy
    lands): `--phase-steps` of them without the profiler, then one under it (`--profile`)."""
    import torch

    mark_step = bundle.speed.before_micro_batch
    model, opt, loss_fn = trainer.model, trainer.optimizer, bundle.loss_fn
    ids = torch.randint(0, TOKEN_HIGH, (args.batch, args.seq), device="cuda")
    batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(args.seq, device="cuda").repeat(args.batch, 1)}
    inner = getattr(opt, "optimizer", opt)
    host = getattr(inner, "host_split_state", False)
    done: list = []
    marks: list = []  # (what, layer, host seconds, CUDA event): --layer-times
    if args.layer_times:
        _time_layers(bundle.model, marks)

    def step():
        ev = {k: torch.cuda.Event(enable_timing=True) for k in ("start", "forward", "backward", "side", "step")}
        cpu = {}
        marks.clear()
        t0 = time.perf_counter()
        mark_step()
        ev["start"].record()
        loss = loss_fn(model, batch, ids.numel())
        cpu["forward"] = time.perf_counter() - t0
        ev["forward"].record()
        if host:
            inner.start_early(ids.reshape(-1), clipping=False)  # as the loop passes them: on the GPU, no sync
            cpu["start_early"] = time.perf_counter() - t0
        trainer.accelerator.backward(loss)
        cpu["backward"] = time.perf_counter() - t0
        ev["backward"].record()
        if host:
            inner.host_stream.drain(ids.device)  # the early passes are queued (by the Feeder's thread) before the event
            ev["side"].record(inner.host_stream.streams(ids.device)[2])
        opt.step()
        cpu["step"] = time.perf_counter() - t0
        ev["step"].record()
        opt.zero_grad(set_to_none=True)
        done.append((ev, cpu, [(w, i, 1000 * (t - t0), e) for w, i, t, e in marks]))

    def read(ev, cpu, lm=()) -> dict:
        gpu = {k: ev["start"].elapsed_time(e) for k, e in ev.items() if k != "start" and (host or k != "side")}
        out = {"gpu_ms": gpu, "host_ms": {k: 1000 * v for k, v in cpu.items()}}
        if lm:  # when the host queued each layer's start (forward) / reached its output's gradient (backward), and when the GPU got there
            out["layers"] = [[w, i, round(h, 2), round(ev["start"].elapsed_time(e), 2)] for w, i, h, e in lm]
        return out

    out: dict = {}
    if args.phase_steps:
        for _ in range(args.phase_steps):
            step()
        _sync()
        out["phases"] = [read(*x) for x in done]
        done.clear()
    if args.profile:
        _profile_step(step, Path(args.profile), args.profile_gpu_only)
        out["phases_ms"] = read(*done[-1])["gpu_ms"]  # profiler on: the host side is slowed down, unevenly
        Path(args.profile).with_suffix(".phases.json").write_text(json.dumps(out, indent=1))
    return out


# ---------------------------------------------------------------------------- longest sequence at micro-batch 1


def _time_layers(model, marks: list) -> None:
    """Wrap each decoder layer's forward: note (host time, CUDA event) when its forward is queued and
    when the backward pass reaches its output (a gradient hook, on autograd's thread)."""
    import torch

    from cpt.speed import decoder_layers

    for i, layer in enumerate(decoder_layers(model)):
        inner = layer.forward

        def forward(*a, _inner=inner, _i=i, **k):
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            marks.append(("forward", _i, time.perf_counter(), e))
            out = _inner(*a, **k)
            first = out[0] if isinstance(out, tuple) else out
            if first.requires_grad:
                def hook(g, _i=_i):
                    e = torch.cuda.Event(enable_timing=True)
                    e.record()
                    marks.append(("backward", _i, time.perf_counter(), e))
                first.register_hook(hook)
            return out

        layer.forward = forward


def worker_long(args) -> dict:
    """Climb the ladder of sequence lengths, one training step each at micro-batch 1, until a step
    runs out of memory (or the next one would not finish inside --time-limit)."""
    import torch

    if args.system == "baseline":
        model, opt, _ = baseline_setup(Path(args.model_dir), args.mode)

        step = _baseline_step(model, opt)
    else:
        from accelerate import Accelerator

        from cpt.build import build_model
        from cpt.optim import build_optimizer
        cfg = ours_config(Path(args.model_dir), args.mode, max(LONG_LADDER), 1, 1, checkpointing="offload")
        bundle = build_model(cfg, torch.device("cuda", 0), tokenizer=_tokenizer())
        acc = Accelerator(mixed_precision="bf16")
        # As cpt's Trainer does: the model is placed already (frozen originals stay in host memory).
        model, opt = acc.prepare(bundle.model, build_optimizer(bundle.groups, cfg.train, bundle.device),
                                 device_placement=[False, True])

        def step(ids):
            pos = torch.arange(ids.shape[1], device="cuda")[None]
            loss = bundle.loss_fn(model, {"input_ids": ids, "labels": ids, "position_ids": pos}, ids.numel() - 1)
            acc.backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
    model.train()
    start = time.perf_counter()
    rows, longest, last_s = [], 0, None
    fallback_used, retry = False, []
    ladder = list(LONG_LADDER)
    while ladder:
        seq = retry.pop() if retry else ladder.pop(0)
        # Step time grows a little faster than linearly with length (attention): predict with 2.5x.
        if last_s is not None and time.perf_counter() - start + 2.5 * last_s > args.time_limit:
            rows.append({"seq": seq, "status": "not tried (time limit)"})
            break
        ids = torch.randint(0, TOKEN_HIGH, (1, seq), device="cuda")
        torch.cuda.reset_peak_memory_stats()
        try:
            _sync()
            t0 = time.perf_counter()
            step(ids)
            _sync()
            last_s = time.perf_counter() - t0
            rows.append({"seq": seq, "status": "ok", "step_s": last_s, "peak_gib": _gib(torch.cuda.max_memory_allocated())})
            longest = seq
        except torch.cuda.OutOfMemoryError:
            rows.append({"seq": seq, "status": "out of memory"})
            break
        except Exception as e:  # keep the row: note the failure, retry this length with plain recompute
            if args.system != "ours" or fallback_used:
                rows.append({"seq": seq, "status": f"error: {type(e).__name__}: {e}"[:300]})
                break
            import dataclasses

            from cpt.speed import apply
            rows.append({"seq": seq, "status": f"offload error, switching to plain recompute: {type(e).__name__}: {e}"[:300]})
            bundle.plan = dataclasses.replace(bundle.plan, checkpointing="recompute")
            bundle.speed = apply(bundle.model, bundle.plan)
            fallback_used = True
            retry.append(seq)
        finally:
            del ids
            opt.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
    return {"system": args.system, "mode": args.mode, "longest_seq": longest, "ladder": rows}


# ---------------------------------------------------------------------------- the driver


def _run_worker(argv: list[str], log_dir: Path, name: str, timeout: float, script: Optional[str] = None) -> Optional[dict]:
    """One worker in its own process (this script's, or `script`'s), its result read back from JSON."""
    result = log_dir / f"{name}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, script or str(Path(__file__).resolve()), *argv, "--result", str(result)]
    print(f"--- {name}: {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    with open(log_dir / f"{name}.log", "w") as logf:
        try:
            proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, timeout=timeout, env=os.environ.copy())
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    if rc != 0 or not result.is_file():
        tail = (log_dir / f"{name}.log").read_text()[-3000:]
        print(f"    FAILED (rc={rc}, {wall:.0f} s):\n{tail}", flush=True)
        return None
    res = json.loads(result.read_text())
    res["wall_s"] = wall
    if "tokens_per_s" in res:
        print(f"    {res['tokens_per_s']:,.0f} tokens/s, peak {res['peak_gib']:.1f} GiB, {wall:.0f} s wall", flush=True)
    else:
        print(f"    longest {res.get('longest_seq')} ({wall:.0f} s wall)", flush=True)
    return res


def _plan_estimate(model_dir: Path, mode: str, seq: int, batch: int, recompute_budget: Any = None,
                   checkpointing: Any = True, system: str = "ours", offload_embedding_state: Any = "auto",
                   host_activations: Any = None, attn: str = "sdpa") -> dict:
    """`cpt plan` for a row: the run plan decided for an H200 (one process), and its estimate."""
    from cpt.model import load_model_config
    from cpt.plan import decide, estimate_for
    cfg = ours_config(model_dir, mode, seq, batch, 1, recompute_budget=recompute_budget, checkpointing=checkpointing,
                      offload_embedding_state=offload_embedding_state, host_activations=host_activations, attn=attn)
    mc = load_model_config(cfg.model)
    run = decide(cfg, mc, "cuda", world_size=1, gpu_total_gib=139.8)
    est = estimate_for(cfg, run, mc, 139.8, system=system)
    return {"peak_gib": est["peak_gib"], "tokens_per_s": est["tokens_per_s"], "recompute_layers": est["recompute_layers"],
            "host_layers": est["host_layers"]}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["baseline", "ours", "long"], help=argparse.SUPPRESS)
    p.add_argument("--system", default="ours", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a dry run of the worker's plumbing
    p.add_argument("--mode", default="bf16", choices=["bf16", "nf4"])
    p.add_argument("--family", default="llama", help="comma list of " + ", ".join(FAMILIES) + ": llama alone is the "
                   "reference benchmark (gpu_throughput.md); others run their bf16/nf4 rows into gpu_throughput_families.md")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the family's kind at toy size (dry runs)
    p.add_argument("--seq", type=int, default=SEQ)
    p.add_argument("--batch", type=int, default=MICRO_BATCH)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--recompute-budget", default=None, help="ours: adapter.recompute_budget_gib (memory-aware row)")
    p.add_argument("--host-activations", default=None, help="ours: adapter.host_activations (auto or a number of layers)")
    p.add_argument("--host-lead", type=int, default=None, help="ours: how many layers ahead host layers are fetched (experiment; cpt.speed.apply's host_lead)")
    p.add_argument("--checkpointing", default="true", help="ours: adapter.use_gradient_checkpointing")
    p.add_argument("--compile", default="auto", help="ours: model.compile (auto, true, false)")
    p.add_argument("--profile", default=None, help="write a torch profiler table of one step here")
    p.add_argument("--profile-loop", default=None, help="ours: a chrome trace (host and GPU, gzipped) of the first timed step of the training loop itself")
    p.add_argument("--profile-gpu-only", action="store_true", help="--profile records the GPU's timeline only (no host operators)")
    p.add_argument("--phase-steps", type=int, default=0, help="ours: this many more steps with CUDA-event and host phase times (no profiler; 5 with --profile-rows)")
    p.add_argument("--main-stream-priority", type=int, default=None,
                   help="ours (experiment): train on a stream of this priority (negative: above the side streams, whose update kernels then yield to it)")
    p.add_argument("--skip-early-update", action="store_true",
                   help="ours (experiment, trains wrongly): the host-resident embedding states are copied as usual but their update kernels (early passes and kept rows) are skipped, to see what they cost the step")
    p.add_argument("--layer-times", action="store_true", help="ours: the phase steps also time each decoder layer's forward and backward, on the host and the GPU")
    p.add_argument("--memory-trace", default=None, help="ours: write what is allocated at the peak (bench/memory_peak.py) here")
    p.add_argument("--offload-embedding-state", nargs="?", const=True, default="auto", type=lambda v: v if v == "auto" else v == "true",
                   help="ours: train.offload_embedding_state (the flag alone: true; or auto)")
    p.add_argument("--systems", default=None, help="the bf16/nf4 rows run exactly these systems (comma list of baseline, "
                   "ours, ours_eager, ours_offload; a suffix _graphs / _nographs sets model.cuda_graphs true / false, e.g. ours_offload_nographs) instead of baseline, ours and what --rows adds")
    p.add_argument("--cuda-graphs", nargs="?", const="true", default=None, choices=["auto", "true", "false"],
                   help="ours: model.cuda_graphs (default: the config's default; the flag alone: true; systems named *_graphs set true, *_nographs false)")
    p.add_argument("--lora-addmm", action="store_true", help="ours: projections without the cpt::lora_linear / lora_linear_4bit ops (experiment row)")
    p.add_argument("--side-update", default=None,
                   help="ours (experiment): the embedding states' update kernel beside the backward pass launched as NB,WARPS,PROGRAMS (cpt.optim.adamw8bit.AdamW8bit's side_launch)")
    p.add_argument("--emulate-backup", action="store_true",
                   help="ours (experiment): also copy out the early passes' old weights, as the host backup that undoing a skipped step used to need")
    p.add_argument("--bnb-dequant", action="store_true",
                   help="ours (experiment): dequantize 4-bit weights with bitsandbytes' functions instead of cpt.speed.nf4 (cpt.speed.apply's nf4_kernel=False)")
    p.add_argument("--no-dequant-reuse", action="store_true",
                   help="ours (experiment): 4-bit recomputing layers dequantize inside the op again (forward, recompute and backward)")
    p.add_argument("--keep-layers", type=int, default=None, help="ours (experiment): this many layers keep their activations, whatever the memory plan says")
    p.add_argument("--reuse-skip-low", type=int, default=0, help="ours (experiment): the lowest N recomputing layers dequantize inside the op again")
    p.add_argument("--embeddings-first", action="store_true", help="ours: embedding group first in the optimizer (experiment row)")
    p.add_argument("--time-limit", type=float, default=150.0, help="long-context worker: seconds for the ladder")
    p.add_argument("--model-dir", default=None, help="the random model's folder (default /tmp/cpt-bench/<family>-random)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--logs", default=None, help="folder for worker logs and profiles (default: OUT/logs)")
    p.add_argument("--rows", default="bf16,nf4,memory,long", help="comma list of: bf16, nf4, memory, long, offload (ours with train.offload_embedding_state beside ours in the bf16/nf4 rows), "
                   "budget (ours capped at the memory target: adapter.recompute_budget_gib from the baseline's peak, offload auto), order (experiment), "
                   "eager (ours with model.compile=false beside ours in the bf16/nf4 rows), nf4compile (experiment: nf4 with model.compile=true)")
    p.add_argument("--runs", type=int, default=1, help="repeat the bf16/nf4 pairs; the second run goes in reverse order")
    p.add_argument("--append", action="store_true", help="keep the rows of OUT/gpu_throughput.json that this run does not redo")
    p.add_argument("--profile-rows", action="store_true", help="profile one step of the bf16 baseline and ours rows")
    args = p.parse_args(argv)

    if args.worker:
        import torch
        if args.checkpointing in ("true", "false"):
            args.checkpointing = args.checkpointing == "true"
        fn = {"baseline": worker_baseline, "ours": worker_ours, "long": worker_long}[args.worker]
        args.model_dir = args.model_dir or _model_dir(args.family)
        res = fn(args)
        res["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        res["family"] = args.family
        Path(args.result).write_text(json.dumps(res, indent=1))
        return 0
    if args.family != "llama":
        return drive_families(args)
    args.model_dir = args.model_dir or _model_dir("llama")
    return drive(args)


def _model_dir(family: str) -> str:
    return "/tmp/cpt-bench/llama-3.1-8b-random" if family == "llama" else f"/tmp/cpt-bench/{family}-random"


def drive_families(args) -> int:
    """The bf16 / nf4 rows (baseline and ours, --runs times) of each family in --family, one after the
    other, into OUT/gpu_throughput_families.{md,json}; a family's earlier rows there are replaced."""
    import torch
    out = Path(args.out)
    logs = Path(args.logs) if args.logs else out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_throughput_families.json"
    results = json.loads(path.read_text()) if path.is_file() else {"families": {}}
    t0 = time.perf_counter()
    modes = [m for m in ("bf16", "nf4") if m in args.rows.split(",")]
    for family in args.family.split(","):
        if family not in FAMILIES or family == "llama":
            raise SystemExit(f"--family: {family!r} is not one of {', '.join(f for f in FAMILIES if f != 'llama')} "
                             "(llama runs alone: the reference benchmark)")
        model_dir = Path(args.model_dir or _model_dir(family))
        t_build = time.perf_counter()
        build_model_dir(model_dir, family, tiny=args.tiny, device=args.device)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"{family}: model folder ready in {time.perf_counter() - t_build:.0f} s", flush=True)
        common = ["--family", family, "--model-dir", str(model_dir), "--warmup", str(args.warmup), "--steps", str(args.steps),
                  "--seq", str(args.seq), "--batch", str(args.batch), "--device", args.device, *(["--tiny"] if args.tiny else [])]
        entry: dict[str, Any] = {"model": FAMILIES[family]["name"] + ", random weights", "command":
                                 "python bench/gpu_throughput.py " + " ".join(sys.argv[1:]),
                                 "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (dry run)",
                                 "torch": torch.__version__,
                                 "setup": {"micro_batch": args.batch, "seq": args.seq, "r": R, "warmup_steps": args.warmup,
                                           "timed_steps": args.steps, "runs": args.runs}}
        for mode in modes:
            runs: dict[str, list] = {"baseline": [], "ours": []}
            for run in range(args.runs):
                for system in (["baseline", "ours"] if run % 2 == 0 else ["ours", "baseline"]):
                    r = _run_worker(["--worker", system, "--mode", mode, *common], logs, f"{family}_{system}_{mode}_run{run + 1}", 600)
                    if r:
                        runs[system].append(r)
            row: dict[str, Any] = {}
            for system, rs in runs.items():
                if not rs:
                    row[system] = None
                    continue
                tps = sum(r["tokens_per_s"] for r in rs) / len(rs)
                layers = rs[0].get("layers") or {}
                flops = family_flops_per_token(family, args.seq, None if system == "baseline" else
                                               family_config(family).num_hidden_layers - layers.get("keep", 0), layers.get("host", 0))
                row[system] = {"tokens_per_s": tps, "tokens_per_s_runs": [r["tokens_per_s"] for r in rs],
                               "peak_gib": max(r["peak_gib"] for r in rs),
                               "step_s_range": [min(r["step_s_min"] for r in rs), max(r["step_s_max"] for r in rs)],
                               "mfu": tps * flops / (PEAK_TFLOPS * 1e12), "embedding_changed": rs[0].get("embedding_changed"),
                               "loss_first_last": [rs[0]["losses"][0], rs[0]["losses"][-1]],
                               **({"kernels": rs[0].get("kernels"), "fallbacks": rs[0].get("fallbacks"), "layers": layers,
                                   "offload_embedding_state": rs[0].get("offload_embedding_state"),
                                   "dynamo": rs[0].get("dynamo"), "run_plan": rs[0].get("run_plan")}
                                  if system == "ours" else {})}
                row[system]["plan"] = _plan_estimate(model_dir, mode, args.seq, args.batch, system=system,
                                                     attn=FAMILIES[family]["attn"])
            if row.get("ours") and row.get("baseline") and row["baseline"]["peak_gib"] > 0:  # (0: a CPU dry run)
                row["speedup"] = row["ours"]["tokens_per_s"] / row["baseline"]["tokens_per_s"]
                row["memory_ratio"] = row["ours"]["peak_gib"] / row["baseline"]["peak_gib"]
                row["target_met"] = {"speedup": row["speedup"] >= TARGETS[mode]["speedup"],
                                     "memory_ratio": row["memory_ratio"] <= TARGETS[mode]["memory_ratio"]}
            entry[mode] = row
            results["families"][family] = entry
            results["wall_s"] = time.perf_counter() - t0
            _write_families(results, out)
    print((out / "gpu_throughput_families.md").read_text())
    return 0


def _write_families(results: dict, out: Path) -> None:
    (out / "gpu_throughput_families.json").write_text(json.dumps(results, indent=1))
    lines = ["# GPU throughput on other model families: cpt vs transformers + peft (micro-batch 2 x 2048)", "",
             "Random weights in each family's published shape; r=128 rsLoRA on every projection, `embed_tokens` and "
             "`lm_head` trained in full, 8-bit AdamW; cpt with its default run plan. Both systems of a row ran in one "
             "process each, one after the other, on the same machine.", "",
             "| family | mode | system | tokens/s | step ms min-max | peak GiB | speedup | memory ratio | MFU | plan: tokens/s | plan: peak GiB | lm_head changed | embed rows changed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for family, entry in results["families"].items():
        for mode in ("bf16", "nf4"):
            row = entry.get(mode)
            if not row:
                continue
            for system in ("baseline", "ours"):
                s = row.get(system)
                label = system
                if system == "ours" and s:
                    label = (f"ours: embedding states {'in host memory' if s.get('offload_embedding_state') else 'on the GPU'}"
                             + (f", {h} host layers" if (h := (s.get('layers') or {}).get('host')) else "") + _graphs_label(s))
                if not s:
                    lines.append(f"| {family} | {mode} | {label} | failed | | | | | | | | | |")
                    continue
                ch = s.get("embedding_changed") or {}
                sp = _fmt(row.get("speedup"), ".2f") + "x" if system == "ours" else "1.00x"
                mr = _fmt(row.get("memory_ratio"), ".2f") + "x" if system == "ours" else "1.00x"
                rng = "-".join(f"{1000 * x:.0f}" for x in s["step_s_range"])
                lines.append(f"| {family} | {mode} | {label} | {s['tokens_per_s']:,.0f} | {rng} | {s['peak_gib']:.1f} | {sp} | {mr} | "
                             f"{100 * s['mfu']:.1f}% | {s['plan']['tokens_per_s']:,.0f} | {s['plan']['peak_gib']:.1f} | "
                             f"{100 * ch.get('lm_head', float('nan')):.2f}% | {100 * ch.get('embed_tokens_seen_rows', float('nan')):.2f}% |")
                for f in (s.get("fallbacks") or []):
                    notes.append(f"- {family} {mode}: fell back: {f}")
            if "target_met" in row:
                tm = row["target_met"]
                notes.append(f"- {family} {mode}: speedup {row['speedup']:.3f}x ({'met' if tm['speedup'] else 'NOT met'}), "
                             f"memory {row['memory_ratio']:.3f}x ({'met' if tm['memory_ratio'] else 'NOT met'})")
    lines += ["", "Targets (as the Llama rows): bf16 >= 1.8x tokens/s at <= 0.75x peak; nf4 >= 1.75x at <= 0.65x.", *notes, ""]
    for family, entry in results["families"].items():
        lines.append(f"{family}: {entry['model']}; `{entry['command']}` on {entry['device']}, torch {entry['torch']}; "
                     f"{entry['setup']['warmup_steps']} warm-up + {entry['setup']['timed_steps']} timed steps, "
                     f"{entry['setup']['runs']} run(s).")
    (out / "gpu_throughput_families.md").write_text("\n".join(lines) + "\n")


def drive(args) -> int:
    import torch
    model_dir = Path(args.model_dir)
    out = Path(args.out)
    logs = Path(args.logs) if args.logs else out / "logs"
    out.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    rows = set(args.rows.split(","))
    t0 = time.perf_counter()
    build_model_dir(model_dir)
    torch.cuda.empty_cache()
    print(f"model folder ready in {time.perf_counter() - t0:.0f} s", flush=True)
    common = ["--model-dir", str(model_dir), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    results: dict[str, Any] = {"command": "python bench/gpu_throughput.py " + " ".join(sys.argv[1:]),
                               "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                               "setup": {"model": "Llama-3.1-8B shape, random weights", "micro_batch": MICRO_BATCH,
                                         "seq": SEQ, "r": R, "lora_alpha": ALPHA, "use_rslora": True,
                                         "optim": "bitsandbytes AdamW8bit", "lr": LR, "embedding_lr": EMB_LR,
                                         "warmup_steps": args.warmup, "timed_steps": args.steps, "runs": args.runs},
                               "flops_per_token": {"with_recompute": flops_per_token(SEQ, 32),
                                                   "without_recompute": flops_per_token(SEQ, 0),
                                                   "count": "6*N_frozen + 8*N_lora + 6*N_lm_head + 6*L*d*seq (causal attention), "
                                                            "minus 2*N per layer that keeps its activations (no recompute) and 2*N of gate and up per host layer"},
                               "peak_tflops": PEAK_TFLOPS, "anchor": ANCHOR, "targets": TARGETS}
    if args.append and (out / "gpu_throughput.json").is_file():
        # Rows of an earlier run on the same kind of machine: kept unless this run redoes them;
        # every command is listed.
        earlier = json.loads((out / "gpu_throughput.json").read_text())
        commands = earlier.get("commands") or [earlier["command"]]
        results = {**{k: v for k, v in earlier.items() if k not in ("commands", "wall_s")}, **results,
                   "commands": [*commands, results["command"]]}
    try:
        import importlib.metadata as md
        results["versions"] = {k: md.version(k) for k in ("transformers", "peft", "accelerate", "bitsandbytes", "liger-kernel")}
    except Exception as e:  # a missing package shows in the rows that need it
        results["versions"] = str(e)
    for mode in ("bf16", "nf4"):
        if mode not in rows:
            continue
        systems = args.systems.split(",") if args.systems else (
            ["baseline", "ours"] + (["ours_eager"] if "eager" in rows else []) + (["ours_offload"] if "offload" in rows else []))
        if "budget" in rows and "ours_budget" not in systems:
            systems.append("ours_budget")
        runs: dict[str, list] = {s: [] for s in systems}
        budget = None  # ours_budget: the memory target as a cap, from this run's baseline peak
        for run in range(args.runs):
            order = systems if run % 2 == 0 else systems[::-1]
            if any(_is_budget(x) for x in order) and "baseline" in order:  # the cap needs the baseline's peak first
                order = ["baseline"] + [x for x in order if x != "baseline"] if budget is None else order
            for system in order:
                prof = ["--profile", str(logs / f"profile_{system}_{mode}.txt")] if args.profile_rows and run == 0 and mode == "bf16" else []
                if (prof or args.phase_steps) and system != "baseline":
                    prof += ["--phase-steps", str(args.phase_steps or 5)]
                if _is_budget(system):
                    if budget is None:
                        if not runs.get("baseline"):
                            continue
                        # A little under the target: the cap applies to cpt plan's estimate.
                        budget = round(TARGETS[mode]["memory_ratio"] * runs["baseline"][0]["peak_gib"] - BUDGET_MARGIN_GIB, 2)
                base_system = _base(system)
                worker = {"ours_eager": ["--worker", "ours", "--compile", "false"],
                          "ours_offload": ["--worker", "ours", "--offload-embedding-state"],
                          "ours_budget": ["--worker", "ours", "--offload-embedding-state", "auto",
                                          "--recompute-budget", str(budget)],
                          "ours_budget_nohost": ["--worker", "ours", "--offload-embedding-state", "auto",
                                                 "--recompute-budget", str(budget), "--host-activations", "0"],
                          }.get(base_system, ["--worker", base_system])
                if system != base_system:
                    worker = [*worker, "--cuda-graphs", "false" if system.endswith("_nographs") else "true"]
                r = _run_worker([*worker, "--mode", mode, *common, *prof], logs, f"{system}_{mode}_run{run + 1}", 900)
                if r:
                    runs[system].append(r)
        entry: dict[str, Any] = {}
        for system, rs in runs.items():
            if not rs:
                entry[system] = None
                continue
            tps = sum(r["tokens_per_s"] for r in rs) / len(rs)
            entry[system] = {"tokens_per_s": tps, "tokens_per_s_runs": [r["tokens_per_s"] for r in rs],
                             "peak_gib": max(r["peak_gib"] for r in rs), "peak_reserved_gib": max(r["peak_reserved_gib"] for r in rs),
                             "step_s_range": [min(r["step_s_min"] for r in rs), max(r["step_s_max"] for r in rs)],
                             "mfu": tps * flops_per_token(SEQ, 32) / (PEAK_TFLOPS * 1e12),
                             "embedding_changed": rs[0].get("embedding_changed"), "loss_first_last": [rs[0]["losses"][0], rs[0]["losses"][-1]],
                             **({"kernels": rs[0].get("kernels"), "setup_s": rs[0].get("setup_s"), "dynamo": rs[0].get("dynamo")}
                                if system != "baseline" else {})}
            if system != "baseline":  # what the run plan chose, as the worker applied it
                entry[system].update(layers=rs[0].get("layers"), offload_embedding_state=rs[0].get("offload_embedding_state"),
                                     run_plan=rs[0].get("run_plan"),
                                     mfu=tps * flops_per_token(SEQ, 32 - rs[0]["layers"]["keep"], rs[0]["layers"].get("host", 0))
                                     / (PEAK_TFLOPS * 1e12))
            if _is_budget(system):
                entry[system]["budget_gib"] = budget
            entry[system]["plan"] = _plan_estimate(model_dir, mode, SEQ, MICRO_BATCH, system="baseline" if system == "baseline" else "ours",
                                                   offload_embedding_state=True if _base(system) == "ours_offload" else "auto",
                                                   recompute_budget=budget if _is_budget(system) else None,
                                                   host_activations=0 if _base(system) == "ours_budget_nohost" else None)
        if entry.get("ours") and entry.get("baseline"):
            entry["speedup"] = entry["ours"]["tokens_per_s"] / entry["baseline"]["tokens_per_s"]
            entry["memory_ratio"] = entry["ours"]["peak_gib"] / entry["baseline"]["peak_gib"]
            entry["target_met"] = {"speedup": entry["speedup"] >= TARGETS[mode]["speedup"],
                                   "memory_ratio": entry["memory_ratio"] <= TARGETS[mode]["memory_ratio"]}
        for other in [k for k in runs if k not in ("baseline", "ours")]:
            if entry.get(other) and entry.get("baseline"):
                entry[other]["speedup"] = entry[other]["tokens_per_s"] / entry["baseline"]["tokens_per_s"]
                entry[other]["memory_ratio"] = entry[other]["peak_gib"] / entry["baseline"]["peak_gib"]
                entry[other]["target_met"] = {"speedup": entry[other]["speedup"] >= TARGETS[mode]["speedup"],
                                              "memory_ratio": entry[other]["memory_ratio"] <= TARGETS[mode]["memory_ratio"]}
        entry["mfu"] = entry["ours"]["mfu"] if entry.get("ours") else None
        results[mode] = entry
        _write(results, out)
    if "memory" in rows:
        graphs = ["--cuda-graphs", args.cuda_graphs] if args.cuda_graphs else []
        r = _run_worker(["--worker", "ours", "--mode", "bf16", "--recompute-budget", "auto", *graphs, *common], logs, "ours_bf16_memory_aware", 900)
        if r:
            keep = r["layers"]["keep"]
            r["mfu"] = r["tokens_per_s"] * flops_per_token(SEQ, 32 - keep) / (PEAK_TFLOPS * 1e12)
            r["plan"] = _plan_estimate(model_dir, "bf16", SEQ, MICRO_BATCH, recompute_budget="auto")
            base = results.get("bf16", {}).get("baseline")
            if base:
                r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
                r["memory_ratio"] = r["peak_gib"] / base["peak_gib"]
        results["bf16_memory_aware"] = r
        _write(results, out)
    if "long" in rows:
        long = {}
        for system in ("baseline", "ours"):
            long[system] = _run_worker(["--worker", "long", "--system", system, "--mode", "bf16", "--model-dir", str(model_dir),
                                        "--time-limit", str(args.time_limit)], logs, f"long_{system}", args.time_limit + 300)
            for rung in (long[system] or {}).get("ladder", []):
                ckpt = "offload" if system == "ours" and "plain recompute" not in json.dumps(long[system]["ladder"]) else True
                rung["plan_peak_gib"] = _plan_estimate(model_dir, "bf16", rung["seq"], 1, checkpointing=ckpt, system=system)["peak_gib"]
            results["long_context_bf16_micro_batch_1"] = long
            _write(results, out)
    if "nf4compile" in rows:
        r = _run_worker(["--worker", "ours", "--mode", "nf4", "--compile", "true", *common], logs, "ours_nf4_compiled", 600)
        base = results.get("nf4", {}).get("baseline")
        if r and base:
            r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["memory_ratio"] = r["peak_gib"] / base["peak_gib"]
        results["nf4_experiment_compiled"] = r
        _write(results, out)
    if "order" in rows:
        r = _run_worker(["--worker", "ours", "--mode", "bf16", "--embeddings-first", *common], logs, "ours_bf16_embeddings_first", 600)
        if r and results.get("bf16", {}).get("baseline"):
            r["speedup"] = r["tokens_per_s"] / results["bf16"]["baseline"]["tokens_per_s"]
            r["memory_ratio"] = r["peak_gib"] / results["bf16"]["baseline"]["peak_gib"]
        results["bf16_experiment_embeddings_first"] = r
        _write(results, out)
    results["wall_s"] = time.perf_counter() - t0
    _write(results, out)
    print((out / "gpu_throughput.md").read_text())
    return 0


def _is_budget(system: str) -> bool:
    """Rows capped at the memory target: ours_budget, and ours_budget_nohost (no host layers, A/B)."""
    return _base(system) in ("ours_budget", "ours_budget_nohost")


def _base(system: str) -> str:
    """The system a row runs, without the suffix _graphs / _nographs (model.cuda_graphs true / false)."""
    return system.removesuffix("_nographs").removesuffix("_graphs")


def _graphs_label(row: dict) -> str:
    """What the row's own kernel list says about CUDA graphs (rows of ours only)."""
    failed = (row.get("dynamo") or {}).get("compile_failed")
    if failed:  # the layers fell back to the plain path mid-run: the row is not the compiled code's
        return f", COMPILING THE LAYERS FAILED ({'; '.join(failed.values())[:160]}), plain layers"
    compiled = [k for k in row.get("kernels") or [] if k.startswith("decoder layers compiled")]
    if not compiled:
        return ""
    return ", CUDA graphs" if "CUDA graphs" in compiled[0] else ", without CUDA graphs"


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _write(results: dict, out: Path) -> None:
    (out / "gpu_throughput.json").write_text(json.dumps(results, indent=1))
    lines = ["# GPU throughput: cpt vs transformers + peft (Llama-3.1-8B shape, micro-batch 2 x 2048)", "",
             *([f"Commands (rows from {len(results['commands'])} runs, each row's systems in one run): "
                + "; ".join(f"`{c}`" for c in results["commands"]) + "  "] if results.get("commands")
               else [f"Command: `{results['command']}`  "]), f"Device: {results['device']}, torch {results['torch']}, "
             f"{results.get('versions')}", "", *([results["note"], ""] if results.get("note") else []),
             f"FLOPs per token for MFU: {results['flops_per_token']['with_recompute'] / 1e9:.2f} G with full recompute "
             f"({results['flops_per_token']['count']}); MFU against {PEAK_TFLOPS:.0f} TFLOP/s.", "",
             "| mode | system | tokens/s | step ms min-max | peak GiB | speedup | memory ratio | MFU | plan: tokens/s | plan: peak GiB | lm_head changed | embed rows changed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode in ("bf16", "nf4"):
        e = results.get(mode)
        if not e:
            continue
        for system in [k for k in e if k == "baseline" or k.startswith("ours")]:
            s = e.get(system)
            label = {"ours_eager": "ours, eager (model.compile=false)",
                     "ours_offload": "ours, embedding states in host memory (train.offload_embedding_state)"}.get(_base(system), _base(system))
            if _base(system) == "ours" and s and s.get("layers"):
                label = ("ours, default run plan (no memory budget): embedding states "
                         f"{'in host memory' if s.get('offload_embedding_state') else 'on the GPU'}, "
                         f"{s['layers'].get('keep', 0)} of 32 layers keep activations"
                         + (f", {h} keep their MLP activations in host memory" if (h := s['layers'].get('host')) else ""))
            if _is_budget(system) and s:
                label = (f"ours, capped at the memory target (adapter.recompute_budget_gib={s['budget_gib']}): embedding states "
                         f"{'in host memory' if s.get('offload_embedding_state') else 'on the GPU'}, "
                         f"{(s.get('layers') or {}).get('keep', '?')} of 32 layers keep activations"
                         + (f", {h} keep their MLP activations in host memory" if (h := (s.get('layers') or {}).get('host')) else "")
                         + (" (adapter.host_activations=0)" if _base(system) == "ours_budget_nohost" else ""))
            if s and system != "baseline":
                label += _graphs_label(s)
            if not s:
                lines.append(f"| {mode} | {label} | failed | | | | | | | | | |")
                continue
            ch = s.get("embedding_changed") or {}
            ratios = e if system == "ours" else s
            sp = _fmt(ratios.get("speedup"), ".2f") + "x" if system != "baseline" else "1.00x"
            mr = _fmt(ratios.get("memory_ratio"), ".2f") + "x" if system != "baseline" else "1.00x"
            rng = "-".join(f"{1000 * x:.0f}" for x in s["step_s_range"])
            lines.append(f"| {mode} | {label} | {s['tokens_per_s']:,.0f} | {rng} | {s['peak_gib']:.1f} | {sp} | {mr} | {100 * s['mfu']:.1f}% | "
                         f"{s['plan']['tokens_per_s']:,.0f} | {s['plan']['peak_gib']:.1f} | {100 * ch.get('lm_head', float('nan')):.2f}% | "
                         f"{100 * ch.get('embed_tokens_seen_rows', float('nan')):.2f}% |")
    m = results.get("bf16_memory_aware")
    if m:
        lines.append(f"| bf16 | ours, memory-aware ({m['layers']['keep']} of 32 layers keep activations){_graphs_label(m)} | {m['tokens_per_s']:,.0f} | "
                     f"{1000 * m['step_s_min']:.0f}-{1000 * m['step_s_max']:.0f} | {m['peak_gib']:.1f} | {_fmt(m.get('speedup'), '.2f')}x | {_fmt(m.get('memory_ratio'), '.2f')}x | "
                     f"{100 * m['mfu']:.1f}% | {m['plan']['tokens_per_s']:,.0f} | {m['plan']['peak_gib']:.1f} | | |")
    for key, mode, label in (("nf4_experiment_compiled", "nf4", "experiment: ours with model.compile=true"),
                             ("bf16_experiment_embeddings_first", "bf16",
                              "experiment: ours with the embedding group first in the optimizer")):
        x = results.get(key)
        if x:
            lines.append(f"| {mode} | {label} | {x['tokens_per_s']:,.0f} | "
                         f"{1000 * x['step_s_min']:.0f}-{1000 * x['step_s_max']:.0f} | {x['peak_gib']:.1f} | "
                         f"{_fmt(x.get('speedup'), '.2f')}x | {_fmt(x.get('memory_ratio'), '.2f')}x | | | | | |")
    runs = results.get("setup", {}).get("runs", 1)
    lines += ["", f"Each row: {results['setup']['warmup_steps']} warm-up + {results['setup']['timed_steps']} timed steps, "
              f"tokens/s = tokens / mean step time, {runs} run(s) per row (the anchor used 2). Peak = "
              "torch.cuda.max_memory_allocated after model and adapter setup. 'embed rows changed': share of the "
              "embed_tokens elements, in the rows of tokens that occurred, that differ after the run.",
              "", "Targets (ratios to the baseline in the same run): bf16 >= 1.8x tokens/s at <= 0.75x peak; "
              "nf4 >= 1.75x at <= 0.65x."]
    for mode in ("bf16", "nf4"):
        e = results.get(mode) or {}
        if "target_met" in e:
            tm = e["target_met"]
            lines.append(f"- {mode}, ours{_graphs_label(e.get('ours') or {})}: speedup {e['speedup']:.3f}x ({'met' if tm['speedup'] else 'NOT met'}), "
                         f"memory {e['memory_ratio']:.3f}x ({'met' if tm['memory_ratio'] else 'NOT met'})")
        for key in [k for k in e if k.startswith("ours_")]:
            o = e.get(key) or {}
            what = {"ours_offload": "embedding states in host memory", "ours_budget": "capped at the memory target",
                    "ours_budget_nohost": "capped at the memory target, no host layers",
                    "ours_eager": "eager"}.get(_base(key), _base(key)) + _graphs_label(o)
            if "target_met" in o:
                tm = o["target_met"]
                lines.append(f"- {mode}, {what}: speedup {o['speedup']:.3f}x ({'met' if tm['speedup'] else 'NOT met'}), "
                             f"memory {o['memory_ratio']:.3f}x ({'met' if tm['memory_ratio'] else 'NOT met'})")
    long = results.get("long_context_bf16_micro_batch_1")
    if long:
        lines += ["", "## Longest sequence at micro-batch 1 (bf16, one H200)", "", "| system | longest that trained | ladder |", "|---|---|---|"]
        for system, r in long.items():
            if not r:
                lines.append(f"| {system} | failed | |")
                continue
            ladder = "; ".join(f"{x['seq']}: {x['status']}" + (f" {x['step_s']:.1f} s, {x['peak_gib']:.1f} GiB (plan {x.get('plan_peak_gib', float('nan')):.1f})" if x["status"] == "ok" else "")
                               for x in r["ladder"])
            lines.append(f"| {system} | {r['longest_seq']:,} | {ladder} |")
        lines += ["", "One step per length, each the first at its length (so it includes one-off costs: Triton "
                  "compilation, cuBLAS plans, pinned host buffers for the offloaded layer inputs); ours uses "
                  "use_gradient_checkpointing=offload. 'not tried (time limit)': the next step was predicted to "
                  "overrun --time-limit, not known to fail."]
    lines += ["", f"Reference (anchor, another run of the same machine type): baseline bf16 {ANCHOR['bf16']['baseline']['tokens_per_s']:,} tokens/s "
              f"{ANCHOR['bf16']['baseline']['peak_gib']} GiB; nf4 {ANCHOR['nf4']['baseline']['tokens_per_s']:,} / {ANCHOR['nf4']['baseline']['peak_gib']}; "
              f"Unsloth bf16 {ANCHOR['bf16']['unsloth']['tokens_per_s']:,} / {ANCHOR['bf16']['unsloth']['peak_gib']}, "
              f"nf4 {ANCHOR['nf4']['unsloth']['tokens_per_s']:,} / {ANCHOR['nf4']['unsloth']['peak_gib']}.", ""]
    (out / "gpu_throughput.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
