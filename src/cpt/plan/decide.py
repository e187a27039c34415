"""Making the run plan: config + model shape + hardware -> a frozen RunPlan.

Every speed and memory choice is made here, once, before anything is applied: which kernels, whether
the decoder layers compile and replay as CUDA graphs, which layers keep their activations, which keep
their MLP activations in host memory, whether the trained embeddings' optimizer states live in host
memory. The user's config is read, never written; `cpt plan` prints what this decides.

The default (no adapter.recompute_budget_gib) is the lean configuration, which on a GPU is also the
faster one: every layer recomputes, the host link carries what it can of the recomputation's work
(host layers) and of the embeddings' optimizer states, so the GPU holds little beyond the weights.
A budget in GiB ('auto': most of the GPU) lets the lowest layers keep their activations instead, for
more speed at more memory. On a CPU, speed features that need CUDA stay off.

    cpt plan examples/seed.yaml
    python -m pytest tests/test_plan.py -q
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from typing import Any, Optional

import torch

from cpt.config import Config, ConfigError, load_config
from cpt.model import load_model_config
from cpt.plan.estimate import FIT_MARGIN, format_plan, plan, shape_from_config
from cpt.plan.rules import (checkpointing_mode, fsdp_wanted, host_layer_indices, liger_available, use_compile,
                            use_cuda_graphs, use_split_masters)
from cpt.plan.run_plan import RunPlan
from cpt.runtime import gpu_memory_gib, host_memory_gib, launched_world_size, resolve_dtype

log = logging.getLogger("cpt")

# In the lean configuration the embeddings' states go to host memory (3.9 GiB of an 8B model's GPU
# memory) unless the estimate says the step would wait for their copies more than this share of its
# speed (one micro-batch per step with clipping; small models, whose steps are short).
OFFLOAD_SPEED_TOLERANCE = 0.90
# On a CPU, recomputation only costs time: layers keep their activations while the estimate stays under
# this share of the host's memory.
CPU_MEMORY_SHARE = 0.5


def _budget(cfg: Config, gpu_total: Optional[float]) -> Optional[float]:
    """adapter.recompute_budget_gib in GiB: a number as given, 'auto' as FIT_MARGIN of the GPU, None unset."""
    b = cfg.adapter.recompute_budget_gib
    if b is None:
        return None
    if b == "auto":
        return FIT_MARGIN * gpu_total if gpu_total else None
    if isinstance(b, str) or isinstance(b, bool):
        raise ConfigError(f"adapter.recompute_budget_gib: {b!r} is not a number of GiB or 'auto'")
    return float(b)


def _kernels(cfg: Config, cuda: bool) -> str:
    mode = cfg.model.kernels
    if mode == "auto":
        return "cpt" if cuda else "none"
    if mode == "liger" and not cuda:
        raise ConfigError("model.kernels=liger needs a CUDA device; use 'cpt' or 'none' on CPU")
    if mode == "liger" and not liger_available():
        raise ConfigError("model.kernels=liger needs liger-kernel: pip install liger-kernel")
    return mode


def memory_plan(cfg: Config, model_config: Any, budget_gib: float, offload: bool) -> tuple[int, int]:
    """(recomputing layers, host layers) under a cap of budget_gib: the fewest recomputing layers whose
    estimated peak fits, with adapter.host_activations' layers among them; if nothing fits with host
    layers (their copies in flight cost memory too), every layer recomputes without them."""
    layers = shape_from_config(model_config).layers
    kw = {"gpu_memory_gib": budget_gib, "offload_embedding_state": offload}
    for k in range(layers + 1):
        est = plan(cfg, model_config, recompute_layers=k, **kw)
        if est["peak_gib"] <= budget_gib:
            return k, est["host_layers"]
    if plan(cfg, model_config, recompute_layers=layers, host_layers=0, **kw)["peak_gib"] <= budget_gib:
        return layers, 0
    return layers, plan(cfg, model_config, recompute_layers=layers, **kw)["host_layers"]


def decide(cfg: Config, model_config: Any, device: torch.device | str, *, world_size: Optional[int] = None,
           fsdp: Optional[bool] = None, gpu_total_gib: Optional[float] = None) -> RunPlan:
    """The run plan for `cfg` on `device` (the model's config gives the shape; no weights needed).
    world_size / fsdp default to the launch's; gpu_total_gib to the device's memory (`cpt plan` passes
    one to plan for another GPU)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    world = launched_world_size() if world_size is None else world_size
    fsdp = (fsdp_wanted(cfg) and world > 1) if fsdp is None else fsdp
    a, t, m = cfg.adapter, cfg.train, cfg.model
    reasons: list[str] = []
    kernels = _kernels(cfg, cuda)
    if m.kernels == "auto":
        reasons.append(f"model.kernels=auto: {kernels} on {device.type}")
    compile_ = use_compile(m.compile, kernels, device, fsdp)
    graphs = compile_ and use_cuda_graphs(m.cuda_graphs, device, fsdp, world) and cuda
    checkpointing = checkpointing_mode(a.use_gradient_checkpointing)
    # (`cpt plan` plans for a GPU on machines without one: bf16 there.)
    dtype = (resolve_dtype(m.dtype, device) if not cuda or torch.cuda.is_available()
             else torch.bfloat16 if m.dtype == "auto" else getattr(torch, m.dtype))
    split = use_split_masters(cfg, dtype, fsdp)
    sparse = split and world == 1
    common = dict(device=str(device), kernels=kernels, compile=compile_, cuda_graphs=graphs,
                  checkpointing=checkpointing, split_masters=split, sparse_embedding_grad=sparse,
                  frozen_originals_on_host=cuda and kernels in ("cpt", "liger"))
    # The estimate counts GPU memory; on a CPU it still orders the choices, and a numeric budget caps them.
    gpu_total = gpu_total_gib if gpu_total_gib is not None else (gpu_memory_gib(device) if cuda else None)
    budget = _budget(cfg, gpu_total)
    if budget is None and not cuda and checkpointing == "recompute":
        budget = CPU_MEMORY_SHARE * host_memory_gib()
        reasons.append(f"on the CPU: layers keep their activations while the estimate stays under {budget:.0f} GiB "
                       "(half the host memory; adapter.recompute_budget_gib sets another cap)")
    gpu_total = gpu_total or 80.0
    layers = shape_from_config(model_config).layers
    # Host layers need cpt's own LoRA projections inside compiled layers on a GPU (liger's SwiGLU hides
    # the MLP outputs). Under DDP each process copies its own, as if each GPU had a host link of its own.
    host_possible = (cuda and compile_ and kernels == "cpt" and checkpointing == "recompute"
                     and a.method == "lora" and bool({"gate_proj", "gate_up_proj"} & set(a.target_modules)))
    if cuda and not host_possible and a.host_activations not in (0, False, "0"):
        reasons.append("adapter.host_activations: no host layers (they need compiled layers with model.kernels cpt, "
                       "recomputation, and LoRA on the MLP's gate projection)")
    lean = dataclasses.replace(cfg, adapter=dataclasses.replace(
        a, host_activations=a.host_activations if host_possible else 0))
    can_offload = cuda and split
    est = lambda offload, **kw: plan(lean, model_config, gpu_memory_gib=gpu_total, offload_embedding_state=offload, **kw)

    offload = t.offload_embedding_state is True and can_offload
    if checkpointing == "off":
        recompute_layers, host_n = 0, 0
        if t.offload_embedding_state == "auto" and can_offload:
            offload = est(False, recompute_layers=0)["peak_gib"] > FIT_MARGIN * gpu_total
    elif budget is None:  # the lean configuration: everything recomputes, the host link carries what it can
        recompute_layers = layers
        if t.offload_embedding_state == "auto" and can_offload:
            # Under DDP the update runs whole at the step (nothing early), which the estimate does not count:
            # there the states move only when the run would not fit otherwise.
            on, off = est(True, recompute_layers=layers), est(False, recompute_layers=layers)
            offload = ((world == 1 and on["tokens_per_s"] >= OFFLOAD_SPEED_TOLERANCE * off["tokens_per_s"])
                       or off["peak_gib"] > FIT_MARGIN * gpu_total)
            reasons.append("train.offload_embedding_state=auto: " + (
                "on (embedding states in host memory: the estimate loses under 10% of speed)" if offload else
                "off (in host memory the step would wait for the copies)"))
        host_n = est(offload, recompute_layers=layers)["host_layers"]
    else:  # a memory budget: keep activations in the lowest layers while the estimate stays under it
        if t.offload_embedding_state == "auto" and can_offload:
            offload = est(False)["peak_gib"] > budget
            reasons.append(f"train.offload_embedding_state=auto: {'on' if offload else 'off'} under the "
                           f"{budget:.1f} GiB budget")
        recompute_layers, host_n = memory_plan(lean, model_config, budget, offload)
        if checkpointing == "offload":
            host_n = 0
        peak = est(offload, recompute_layers=recompute_layers, host_layers=host_n)["peak_gib"]
        if peak > budget and cfg.adapter.recompute_budget_gib is not None:
            log.warning("adapter.recompute_budget_gib=%.2f: even with every decoder layer recomputing, cpt plan "
                        "estimates a %.2f GiB peak; lower per_device_train_batch_size or model.max_seq_length, or use "
                        "train.offload_embedding_state / use_gradient_checkpointing=offload / model.load_in_4bit to "
                        "fit under it", budget, peak)
        if cfg.adapter.recompute_budget_gib is not None:
            reasons.append(f"adapter.recompute_budget_gib={budget:.1f}: {layers - recompute_layers} of {layers} "
                           "layers keep their activations")
    keep = layers - recompute_layers
    host = tuple(host_layer_indices(list(range(keep, layers)), layers, host_n)) if host_n else ()
    if host and a.host_activations == "auto":
        reasons.append(f"adapter.host_activations=auto: {len(host)} layers, what the host link carries "
                       "during the forward pass")
    estimate = est(offload, recompute_layers=recompute_layers, host_layers=len(host))
    return RunPlan(**common, keep_layers=keep if checkpointing != "off" else 0, host_layers=host,
                   offload_embedding_state=offload, reasons=tuple(reasons),
                   estimate={k: estimate[k] for k in ("peak_gib", "tokens_per_s", "fits", "gpu", "gpu_memory_gib")})


def estimate_for(cfg: Config, run: RunPlan, model_config: Any, gpu_total_gib: Optional[float] = None,
                 system: str = "ours") -> dict:
    """cpt plan's full estimate (every memory line) for the choices a RunPlan made."""
    layers = shape_from_config(model_config).layers
    recompute = 0 if run.checkpointing == "off" else layers - run.keep_layers
    return plan(cfg, model_config, system=system, gpu_memory_gib=gpu_total_gib, recompute_layers=recompute,
                host_layers=len(run.host_layers), offload_embedding_state=run.offload_embedding_state)


def format_run_plan(run: RunPlan) -> str:
    lines = [f"run plan on {run.device}: kernels {run.kernels}"
             f"{', compiled layers' if run.compile else ''}{', CUDA graphs' if run.cuda_graphs else ''}",
             f"  checkpointing {run.checkpointing}" + (f", {run.keep_layers} lowest layers keep activations"
                                                       if run.keep_layers else "")
             + (f", host layers {list(run.host_layers)}" if run.host_layers else ""),
             f"  embeddings: {'split float32 masters' if run.split_masters else 'as configured'}"
             f"{', row-sparse embed_tokens gradients' if run.sparse_embedding_grad else ''}"
             f"{', optimizer states in host memory' if run.offload_embedding_state else ''}"]
    lines += [f"  - {r}" for r in run.reasons]
    return "\n".join(lines)


def plan_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="cpt plan", description="Show the run plan (speed and memory choices) of a "
                                 "config and estimate its peak GPU memory and tokens/s, before running it.")
    ap.add_argument("config", nargs="?")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--gpu-memory-gib", type=float, default=None, help="plan for a GPU of this size (default: this machine's, else 80)")
    ap.add_argument("--baseline", action="store_true", help="estimate plain transformers + peft instead")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides, args.config = [args.config, *args.overrides], None  # overrides only, no file
    cfg = load_config(args.config, args.overrides)
    try:
        mc = load_model_config(cfg.model)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cpt plan: cannot read the config of model.name_or_path={cfg.model.name_or_path!r} "
                          f"(not a local folder, and not in the Hugging Face cache?): {str(e).splitlines()[0]}") from None
    total = args.gpu_memory_gib or gpu_memory_gib(torch.device("cuda")) if torch.cuda.is_available() else args.gpu_memory_gib
    run = decide(cfg, mc, "cuda", gpu_total_gib=total or 80.0)  # a plan is for a GPU, wherever it is printed
    est = estimate_for(cfg, run, mc, total, system="baseline" if args.baseline else "ours")
    if args.json:
        print(json.dumps({"run_plan": run.to_dict(), "estimate": est}, indent=1))
    else:
        print(format_run_plan(run) + "\n" + format_plan(est))
    return 0
