"""Memory and speed estimate of one set of run choices, from the model's shape alone (no weights).

Peak GPU memory is counted from the model's shape (read from its config.json, no weights loaded):
frozen weights (bf16, or NF4 with its quantisation constants), the frozen originals peft keeps of
trained embeddings, the trained copies with their gradients and optimizer states, the LoRA
adapters likewise, and activations: each decoder layer's input when it recomputes (on the host
when offloaded), all of a layer's saved tensors when it keeps them, one layer's worth during
recomputation, and the loss (full logits on the plain path, one chunk on the fused path). The
peak is the larger of two moments: the loss (every kept activation alive, the head's gradient
just made) and the end of the backward pass (every gradient alive).

Speed is FLOPs per token (the count bench/gpu_throughput.py reports MFU with) over the GPU's
dense bf16 rate times an efficiency measured for each path on an H200 (docs/performance.md); for compiled
layers, a matmul time for the FLOPs done plus the rest of a step that recomputes every layer
(`COMPILED_STEP`), so that layers which skip recompute save matmuls and nothing else.

    cpt plan examples/seed.yaml
    python -m pytest tests/test_plan.py -q
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from cpt.config import EMBEDDING_MODULES, Config, ConfigError
from cpt.model import FUSED_PROJECTIONS, load_model_config
from cpt.optim.host_state import CHUNK_ELEMENTS
from cpt.plan.rules import FUSABLE_MODEL_TYPES, HOST_LEAD, checkpointing_mode, host_layer_indices, use_compile, use_split_masters

GIB = 2**30
# Dense bf16 rate by GPU name (datasheet); unknown GPUs fall back to the H100/H200 figure.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}
# Share of the peak rate each path reached on an H200 at micro-batch 2 x 2048 (bench/results):
# transformers + peft reference runs (gpu_anchor.md) and our measured rows.
# "ours": eager layers. "ours, compiled" (model.compile): bf16 reached 0.522 of the peak with every layer
# recomputing and 0.481 with none, counting only the FLOPs done; 0.50 sits between; nf4 0.487. Compiled
# layers use COMPILED_STEP below; "ours, compiled" remains for layers whose inputs are offloaded.
# The 4-bit baseline runs in two speed modes (5,479-7,116 tokens/s on the same machine): its share is the
# middle of them (6,250), within 15% of either end; the reference's 5,984 sits in the slow one.
EFFICIENCY = {("baseline", "bf16"): 0.337, ("baseline", "nf4"): 0.312, ("ours", "bf16"): 0.358, ("ours", "nf4"): 0.357,
              ("ours, compiled", "bf16"): 0.50, ("ours, compiled", "nf4"): 0.487}
# Compiled layers (H200, 8B, 2 x 2048): a step costs `gemm` seconds per
# FLOP done plus `rest` seconds per FLOP of the same step with every layer recomputing. Fitted to bf16
# with every layer recomputing (10,854 tokens/s, CUDA graphs) and with none (13,957, the memory-aware
# row): skipping recompute saves matmuls at 714 TFLOP/s and nothing else; nf4 has the same matmul rate
# and more of the rest (its dequantization and bitsandbytes ops), fitted to 10,698
# tokens/s with every layer recomputing (each recomputing layer's backward dequantizing once).
COMPILED_STEP = {"bf16": (1 / 714e12, 0.4678e-15), "nf4": (1 / 714e12, 0.4946e-15)}
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit absmax per 64 + float32 per 256 absmax
WORKSPACE_GIB = 0.6  # cuBLAS workspaces, SDPA scratch, allocator rounding
FIT_MARGIN = 0.92  # share of the GPU a plan may fill and still be called a fit
# Pinned host <-> GPU copy rate, each direction, both directions at once (H200 on PCIe 5, bench/results/host_link.md):
# train.offload_embedding_state moves 4 bytes per trained embedding element each way per step.
HOST_LINK_GB_S = 50.0
# Of the copies the early passes run beside the backward pass, the share the step still waited for
# (8B bf16: ~15 ms longer steps than without the switch, against ~85 ms of copies each way).
EARLY_EXPOSED_SHARE = 0.2
# Share of a step the forward pass takes (8B bf16 compiled on an H200: the GPU finished the forward
# pass and the loss ~127 ms into a ~380 ms step): the window in which the
# host layers' activations go out.
FORWARD_SHARE = 0.3
# At most this share of a 4-bit model's layers become host layers under 'auto' (see auto_host_layers).
HOST_LAYER_SHARE_4BIT = 0.5


@dataclass
class Shape:
    """A decoder's shapes, as its config gives them. head_dim: None where it is hidden / heads (Llama,
    Mistral, Qwen2, Phi-3, OLMo 2), set where the config sets it apart (Qwen3, Gemma 2/3: the attention
    width heads x head_dim may differ from hidden). fused: q/k/v and gate/up are one module each
    (Phi-3's qkv_proj and gate_up_proj)."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    head_dim: Optional[int] = None
    fused: bool = False

    @property
    def attn_dim(self) -> int:
        return (self.head_dim or self.hidden // self.heads) * self.heads

    @property
    def kv_dim(self) -> int:
        return (self.head_dim or self.hidden // self.heads) * self.kv_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection module of one layer, by its name in this family."""
        d, q, kv, f = self.hidden, self.attn_dim, self.kv_dim, self.intermediate
        if self.fused:
            return {"qkv_proj": (d, q + 2 * kv), "o_proj": (q, d), "gate_up_proj": (d, 2 * f), "down_proj": (f, d)}
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}

    def lora_shapes(self, targets: list[str]) -> list[tuple[int, int]]:
        """The projections a target list adapts here (q_proj, k_proj, v_proj name qkv_proj where fused)."""
        names = set(targets)
        if self.fused:
            names |= {fused for fused, parts in FUSED_PROJECTIONS.items() if names & set(parts)}
        return [io for name, io in self.linear_shapes().items() if name in names]

    @property
    def block_params(self) -> int:
        return self.layers * sum(i * o for i, o in self.linear_shapes().values())


# Config model types whose decoder layers fuse q/k/v and gate/up (Phi-3 and Phi-4 models).
FUSED_MODEL_TYPES = frozenset({"phi3"})


def shape_from_config(mc: Any) -> Shape:
    if getattr(mc, "hidden_size", None) is None and getattr(mc, "text_config", None) is not None:
        mc = mc.text_config  # a multimodal config (Gemma 3 4B and up): the language model's shape
    g = lambda *names: next((getattr(mc, n) for n in names if getattr(mc, n, None) is not None), None)
    heads = g("num_attention_heads")
    return Shape(hidden=g("hidden_size"), layers=g("num_hidden_layers"), heads=heads,
                 kv_heads=g("num_key_value_heads") or heads, intermediate=g("intermediate_size"),
                 vocab=g("vocab_size"), tied=bool(getattr(mc, "tie_word_embeddings", False)),
                 head_dim=g("head_dim"), fused=getattr(mc, "model_type", None) in FUSED_MODEL_TYPES)


def model_flops_per_token(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
                          r: int, n_lora_targets: int = 7, seq: int = 2048, recompute_layers: Optional[int] = None,
                          train_head: bool = True, host_layers: int = 0, head_dim: Optional[int] = None,
                          fused: bool = False) -> float:
    """6*N_frozen + 8*N_lora + 6*N_lm_head + 6*L*d*seq (gpu_anchor.md's count) with every layer
    recomputed; a layer that keeps its activations skips its recompute (2*N of its frozen and LoRA
    weights): 49.32 GFLOP with recompute and 34.69 without for Llama-3.1-8B, r=128, seq 2048.
    A host layer (adapter.host_activations) skips the recompute of its expanding projections (gate, up).
    head_dim / fused: as in Shape (Qwen3, Gemma; Phi-3)."""
    s = Shape(hidden, layers, heads, kv_heads, intermediate, vocab, False, head_dim, fused)
    shapes = list(s.linear_shapes().values())
    shapes = shapes[:n_lora_targets] if n_lora_targets < len(shapes) else shapes
    n_frozen = s.block_params
    n_lora = layers * sum(r * (i + o) for i, o in shapes)
    attn = 6 * layers * s.attn_dim * seq
    k = layers if recompute_layers is None else recompute_layers
    full = 6 * n_frozen + 8 * n_lora + (6 if train_head else 4) * vocab * hidden + attn
    # A layer that keeps its activations skips the recompute of its frozen and LoRA matmuls
    # (2N each); the anchor leaves the attention term as is.
    saved = (layers - k) / layers * (2 * n_frozen + 2 * n_lora)
    saved += host_layers * 2 * sum(i * o + r * (i + o) for i, o in s.linear_shapes().values() if o > i)
    return float(full - saved)


def layer_activation_bytes(s: Shape, tokens: int, fused: bool, r: int) -> float:
    """Bytes one decoder layer keeps for its backward pass (bf16 activations), per the tensors
    autograd saves: norms (transformers upcasts to float32; liger keeps the bf16 input), q/k/v
    around RoPE, attention output, the MLP's gate/up/product, and each LoRA's rank-r middle."""
    d, kv, f = s.hidden, s.kv_dim, s.intermediate
    q = s.attn_dim
    if fused:
        per_token = 8 * d + (6 * q + 4 * kv) + 6 * f + 14 * r
    else:
        per_token = 12 * d + (8 * q + 6 * kv) + 8 * f + 14 * r
    return float(per_token * tokens)


def host_activation_bytes(s: Shape, tokens: int) -> float:
    """Bytes a host layer moves each way per micro-batch: the outputs of its expanding projections
    (bf16), which speed/compile.py saves: gate and up; also q where heads x head_dim exceeds hidden
    (Gemma 2/3), and qkv_proj where fused (Phi-3)."""
    return float(2 * tokens * sum(o for i, o in s.linear_shapes().values() if o > i))


def _gpu(gpu_memory_gib: Optional[float]) -> tuple[str, float, float]:
    name, total = "unknown GPU", gpu_memory_gib or 80.0
    try:
        import torch
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            if gpu_memory_gib is None:
                total = torch.cuda.get_device_properties(0).total_memory / GIB
    except Exception:
        pass
    tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), PEAK_TFLOPS["H200"])
    return name, total, tflops


def plan(cfg: Config, model_config: Any = None, system: str = "ours", gpu_memory_gib: Optional[float] = None,
         recompute_layers: Optional[int] = None, host_layers: Optional[int] = None,
         offload_embedding_state: Optional[bool] = None) -> dict:
    """The estimate as a dict (GiB and tokens/s) for one set of choices. system: 'ours' (cpt as
    configured) or 'baseline' (transformers + peft as in gpu_anchor.md: bf16 embedding copies, plain
    loss and norms). recompute_layers (None: all when checkpointing), host_layers (None: what
    adapter.host_activations asks for) and offload_embedding_state (None: the config's literal true)
    are the run plan's choices (cpt.plan.decide makes them; this only counts)."""
    if model_config is None:
        try:
            model_config = load_model_config(cfg.model)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cpt plan: cannot read the config of model.name_or_path={cfg.model.name_or_path!r} "
                              f"(not a local folder, and not in the Hugging Face cache?): {str(e).splitlines()[0]}") from None
    if offload_embedding_state is None:
        offload_embedding_state = cfg.train.offload_embedding_state is True
    s = shape_from_config(model_config)
    if None in (s.hidden, s.layers, s.heads, s.intermediate, s.vocab):
        raise ConfigError(f"cpt plan: {cfg.model.name_or_path!r} is not a decoder shape plan knows (needs hidden_size, num_hidden_layers, ...)")
    a, t, m = cfg.adapter, cfg.train, cfg.model
    gpu_name, gpu_total, tflops = _gpu(gpu_memory_gib)
    nf4 = m.load_in_4bit
    mode = "nf4" if nf4 else "bf16"
    ours = system == "ours"
    # The fused head where the family's logits allow it (cpt.speed.loss); a model config without a type
    # (a bare shape) is counted as Llama-like.
    kind = getattr(model_config, "model_type", None)
    fused = ours and m.kernels in ("auto", "cpt", "liger") and (kind is None or kind in FUSABLE_MODEL_TYPES)
    tokens = t.per_device_train_batch_size * m.max_seq_length
    full_mode = a.method == "full"
    emb_elems = s.vocab * s.hidden
    trained_emb = [x for x in EMBEDDING_MODULES if cfg.trains_embeddings and (full_mode or x in a.target_modules)]
    n_trained_emb = emb_elems * (1 if s.tied else len(trained_emb))
    n_all_emb = emb_elems * (1 if s.tied else 2)
    master = 4 if (ours and a.embedding_master_dtype == "float32") else 2
    # Split masters (cpt.optim): the same 4 bytes as bf16 weight + low half, but bf16 gradients, no
    # bf16 copy of the head for the matmuls, and embed_tokens' gradient only for the rows used.
    split = ours and master == 4 and use_split_masters(cfg, torch.bfloat16, fsdp=bool(t.fsdp))
    sparse_embed = split and not s.tied and "embed_tokens" in trained_emb  # one process
    state_bytes = 2 if t.optim == "adamw_8bit" else 8

    mem: dict[str, float] = {}
    host = 0.0  # bytes the run keeps in pinned host memory instead (offloaded embedding states)
    exposed_bytes = 0.0  # of those, what each step copies each way while the GPU waits
    if full_mode:
        n = s.block_params + n_all_emb
        mem["weights (trained, float32 masters)"] = n * master
        grads = n * master
        mem["optimizer states"] = n * state_bytes
    else:
        mem["frozen block weights"] = s.block_params * (NF4_BYTES if nf4 else 2)
        untrained_emb = n_all_emb - (n_trained_emb if not s.tied else (emb_elems if trained_emb else 0))
        mem["frozen embeddings"] = max(0, untrained_emb) * 2
        # peft keeps the frozen original of each trained copy; cpt moves it to host memory.
        mem["frozen originals of trained embeddings"] = 0 if ours else n_trained_emb * 2
        mem["trained embeddings"] = n_trained_emb * master
        n_lora = s.layers * sum(a.r * (i + o) for i, o in s.lora_shapes(a.target_modules))
        mem["LoRA adapters (float32)"] = n_lora * 4
        mem["optimizer states"] = (n_trained_emb + n_lora) * state_bytes
        if split and offload_embedding_state:
            # Low halves and moment codes in host memory (twice: the early passes write a second set,
            # cpt.optim.host_state); on the GPU stay the block maxima (twice), three staging chunks (embed_tokens'
            # rows set aside for the step are read back only then, after the backward pass's peak).
            host = n_trained_emb * (2 + state_bytes) * 2
            mem["trained embeddings"] = n_trained_emb * 2
            mem["optimizer states"] = n_lora * state_bytes + 2 * n_trained_emb * 8 / 256 + 3 * CHUNK_ELEMENTS * 4
            # What cannot hide behind the backward pass: lm_head's update when gradients are clipped (it
            # needs the global norm) and embed_tokens' when its rows are not row-sparse; of the rest, the
            # share the measured steps still waited for.
            head = emb_elems if (s.tied or "lm_head" in trained_emb) else 0
            exposed = (head if t.max_grad_norm > 0 else 0) + (emb_elems if "embed_tokens" in trained_emb
                                                              and not sparse_embed and not s.tied else 0)
            exposed_bytes = (exposed + EARLY_EXPOSED_SHARE * (n_trained_emb - exposed)) * (2 + state_bytes)
        if split:
            head = emb_elems if (s.tied or "lm_head" in trained_emb) else 0
            embed = 0 if s.tied or "embed_tokens" not in trained_emb else (
                tokens * t.gradient_accumulation_steps * (s.hidden * 2 + 8) if sparse_embed else emb_elems * 2)
            grads = head * 2 + embed + n_lora * 4
        else:
            grads = n_trained_emb * master + n_lora * 4
    mem["norms"] = (2 * s.layers + 1) * s.hidden * 2
    static = sum(mem.values())

    gc = checkpointing_mode(a.use_gradient_checkpointing)
    checkpointing = gc != "off"
    offload = gc == "offload" and ours
    layer_act = layer_activation_bytes(s, tokens, fused, a.r)
    if recompute_layers is None:
        recompute_layers = s.layers if checkpointing else 0
    keep = s.layers - recompute_layers
    ckpt_in = tokens * s.hidden * 2
    acts = {
        "checkpointed layer inputs": (2 if offload else recompute_layers) * ckpt_in,
        "layers that keep their activations": keep * layer_act,
    }
    v_h = s.vocab * s.hidden
    if fused:
        chunk = min(tokens, max(1, (1 << 27) // s.vocab))
        # bf16 copy of the head for the matmuls and one chunk of bf16 logits, which the Triton pass
        # (kernels/ce_rows.py) turns into their gradient in place.
        loss = v_h * 2 * (master == 4 and not split) + chunk * s.vocab * 2
        head_grad_early = v_h * (2 if split else master) if "lm_head" in trained_emb or s.tied else 0
    else:
        # bf16 logits, their float32 upcast and its gradient, the bf16 gradient of the logits.
        loss = tokens * s.vocab * (2 + 4 + 4 + 2)
        head_grad_early = 0
    at_loss = acts["checkpointed layer inputs"] + acts["layers that keep their activations"] + loss + head_grad_early
    # One recomputing layer's backward pass: its activations and their gradients. Eager layers
    # (offloaded ones included): 1.5x, fitted on the long-context ladder. Compiled layers free them as
    # they go (the partitioner's schedule): nothing measurable beyond what is counted below (capped 8B
    # rows with 1 and 2 kept layers: 20.75 GiB bf16, 11.51 and 12.04 GiB 4-bit).
    compiled = ours and use_compile(m.compile, m.kernels, "cuda", bool(cfg.train.fsdp))  # the plan is for a CUDA GPU
    recompute_peak = (0.0 if compiled and not offload else 1.5) * layer_act if recompute_layers else 0.0
    if nf4 and fused and recompute_layers:
        # A recomputing 4-bit layer's backward holds its weights dequantized to bf16 (kernels/lora.py).
        recompute_peak += s.block_params / s.layers * 2
    # The backward pass is highest where it reaches the layers that kept their activations (all of them
    # still held, the adapters' gradients of every layer above complete), or at its end.
    lora_grads = 0 if full_mode else n_lora * 4
    boundary = keep * layer_act + lora_grads * recompute_layers / s.layers + grads - lora_grads
    at_end = max(grads, boundary) + recompute_peak + (2 * ckpt_in if offload else ckpt_in)

    eff = EFFICIENCY[("ours, compiled" if compiled else "ours" if ours else "baseline", mode)]
    n_targets = len(s.lora_shapes(a.target_modules)) or len(s.linear_shapes())

    def flops_at(k: int, host_n: int) -> float:
        return model_flops_per_token(s.hidden, s.layers, s.heads, s.kv_heads, s.intermediate, s.vocab, a.r,
                                     n_lora_targets=n_targets, seq=m.max_seq_length, recompute_layers=k,
                                     host_layers=host_n, head_dim=s.head_dim, fused=s.fused)

    def speed(host_n: int) -> tuple[float, float]:  # (FLOPs per token, tokens/s)
        flops = flops_at(recompute_layers, host_n)
        if compiled and not offload:
            # Recompute skipped (kept or host layers) saves matmul time only; the rest of the step
            # (norms, attention, optimizer, copies) scales with the whole model's work.
            gemm_s, rest_s = COMPILED_STEP[mode]
            scale = PEAK_TFLOPS["H200"] / tflops
            tps = 1 / (scale * (flops * gemm_s + flops_at(s.layers, 0) * rest_s))
        else:
            tps = eff * tflops * 1e12 / flops
        if exposed_bytes:  # copies to and from host memory that the step waits for
            step_s = tokens * t.gradient_accumulation_steps / tps + exposed_bytes / (HOST_LINK_GB_S * 1e9)
            tps = tokens * t.gradient_accumulation_steps / step_s
        return flops, tps

    host_bytes = host_activation_bytes(s, tokens)
    if host_layers is None:
        host_layers = auto_host_layers(cfg, s, recompute_layers, tokens, speed(0)[1], compiled and not full_mode
                                       and not offload and m.kernels in ("auto", "cpt") and "gate_proj" in a.target_modules)
    flops, tps = speed(host_layers)
    if host_layers:
        # The last host layer's copies still going out at the loss; in the backward pass the host
        # layers fetched ahead of the running one (its own fetched tensors replace what its
        # recompute would make). Measured: two layers' worth with a lead of two (docs/performance.md).
        candidates = max(1, recompute_layers - 2 * HOST_LEAD - 1)
        ahead = min(host_layers, -(-HOST_LEAD * host_layers // candidates))
        acts["host layers' activations in flight"] = host_bytes * max(1, ahead)
        at_loss += host_bytes
        at_end += host_bytes * ahead
    host_act = host_layers * host_bytes
    peak = static + max(at_loss, at_end) + WORKSPACE_GIB * GIB
    return {
        "model": m.name_or_path, "system": system, "mode": mode, "gpu": gpu_name, "gpu_memory_gib": gpu_total,
        "tokens_per_micro_batch": tokens, "recompute_layers": recompute_layers, "host_layers": host_layers,
        "offload": offload,
        "memory_gib": {k: v / GIB for k, v in mem.items()},
        "activations_gib": {**{k: v / GIB for k, v in acts.items()}, "loss": loss / GIB,
                            "one layer's activations": layer_act / GIB},
        "gradients_gib": grads / GIB, "host_memory_gib": (host + host_act) / GIB, "offload_embedding_state": bool(host),
        "peak_gib": peak / GIB, "peak_at": "loss" if at_loss >= at_end else "end of backward",
        "flops_per_token": flops, "assumed_efficiency": flops * tps / (tflops * 1e12), "peak_tflops": tflops,
        "tokens_per_s": tps,
        # 8% headroom: allocator fragmentation and reserved-but-free blocks (the baseline's 64k step,
        # estimated at 131 of 140 GiB, ran out of memory on the H200).
        "fits": peak / GIB <= FIT_MARGIN * gpu_total,
        "small_model": s.block_params < 1e9,
    }


def auto_host_layers(cfg: Config, s: Shape, recompute_layers: int, tokens: int, tokens_per_s: float,
                     possible: bool) -> int:
    """adapter.host_activations: a number is that many layers (of those that recompute); 'auto' is
    as many as the host link carries out during the forward pass (FORWARD_SHARE of the estimated
    step). Only compiled, fused LoRA layers can (cpt.speed.host_activations)."""
    want = cfg.adapter.host_activations
    if not possible or not recompute_layers or want in (0, False):
        return 0
    if want == "auto":
        per_pass = tokens / tokens_per_s  # one micro-batch's forward and backward
        # 80% of the window: what the link has not carried out by the loss waits on the GPU.
        want = int(0.8 * HOST_LINK_GB_S * 1e9 * FORWARD_SHARE * per_pass // host_activation_bytes(s, tokens))
        if cfg.model.load_in_4bit:
            # Host layers replay without CUDA graphs, and 4-bit layers cost the host more to launch:
            # 21 of 32 made the 8B step host-bound (450-510 ms against 406-414 without host layers),
            # 10 did not (381-406 ms). Since each recomputing layer's backward dequantizes once
            # (cpt.speed.lora), 16 ran 2% faster than 10 and 20 no faster than 16.
            want = min(want, int(HOST_LAYER_SHARE_4BIT * s.layers))
    return len(host_layer_indices(list(range(s.layers - recompute_layers, s.layers)), s.layers, int(want)))


def format_plan(p: dict) -> str:
    lines = [f"cpt plan: {p['model']} ({p['system']}, {p['mode']}) on {p['gpu']} ({p['gpu_memory_gib']:.0f} GiB)",
             f"  micro-batch tokens {p['tokens_per_micro_batch']}, recomputing layers {p['recompute_layers']}"
             f"{' (inputs offloaded to host)' if p['offload'] else ''}"
             f"{f', of them {h} with MLP activations in host memory' if (h := p.get('host_layers')) else ''}"]
    for k, v in p["memory_gib"].items():
        lines.append(f"  {k:<42} {v:8.2f} GiB")
    lines.append(f"  {'gradients':<42} {p['gradients_gib']:8.2f} GiB")
    if p.get("host_memory_gib"):
        what = ", ".join(x for x, on in (("embedding states", p.get("offload_embedding_state")),
                                         ("MLP activations of host layers", p.get("host_layers"))) if on)
        lines.append(f"  {'(in pinned host memory)':<42} {p['host_memory_gib']:8.2f} GiB  {what}")
    for k, v in p["activations_gib"].items():
        lines.append(f"  {k:<42} {v:8.2f} GiB")
    lines.append(f"  peak (at the {p['peak_at']})".ljust(45) + f"{p['peak_gib']:8.2f} GiB  {'fits' if p['fits'] else 'DOES NOT FIT'}")
    lines.append(f"  speed: {p['flops_per_token'] / 1e9:.1f} GFLOP/token at {100 * p['assumed_efficiency']:.0f}% of "
                 f"{p['peak_tflops']:.0f} TFLOP/s -> about {p['tokens_per_s']:,.0f} tokens/s"
                 + (" (efficiency measured on an 8B model; small models reach far less)" if p["small_model"] else ""))
    return "\n".join(lines)
