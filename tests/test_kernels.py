"""Fused paths give the plain path's loss and gradients (CPU here; bench/gpu_throughput.py repeats
the model-level check on the GPU).

    python -m pytest tests/test_kernels.py -q
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cpt.kernels import apply_kernels, fused_linear_cross_entropy, output_head, plain_causal_lm_loss, set_recompute, shift_labels


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _inputs(n=37, h=16, v=53, seed=0, ignore=5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.3
    bias = torch.randn(v, generator=g) * 0.1
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.randperm(n, generator=g)[:ignore]] = -100
    return hidden, weight, bias, targets


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("use_bias", [False, True])
def test_linear_ce_matches_plain_fp32(chunk, use_bias):
    hidden, weight, bias, targets = _inputs(seed=chunk)
    num_items = 50  # as when the step's tokens span several micro-batches
    ref_args = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    logits = ref_args[0] @ ref_args[1].t() + (ref_args[2] if use_bias else 0)
    ref = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / num_items
    ref.backward()
    args = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = fused_linear_cross_entropy(args[0], args[1], targets, num_items, bias=args[2] if use_bias else None,
                                     chunk_tokens=chunk)
    (out * 3.0).backward()  # a non-unit upstream gradient must scale every gradient
    assert abs(out.item() - ref.item()) < 1e-5 * abs(ref.item())
    assert _rel(args[0].grad, 3 * ref_args[0].grad) < 1e-5
    assert _rel(args[1].grad, 3 * ref_args[1].grad) < 1e-5
    if use_bias:
        assert _rel(args[2].grad, 3 * ref_args[2].grad) < 1e-5
    else:
        assert args[2].grad is None


def test_linear_ce_default_num_items_is_token_mean():
    hidden, weight, _, targets = _inputs()
    out = fused_linear_cross_entropy(hidden, weight, targets)
    ref = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100)
    assert abs(out.item() - ref.item()) < 1e-5


def test_linear_ce_bf16_hidden_with_float32_master():
    """bf16 activations, float32 trained head (the embedding master), under autocast: same loss and
    gradients as the plain bf16 path within bf16 tolerance; the master's gradient stays float32."""
    hidden, weight, _, targets = _inputs(n=64, h=32, v=97, seed=3)
    h_ref = hidden.bfloat16().requires_grad_()
    w_ref = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = h_ref @ w_ref.t()
    ref = F.cross_entropy(logits.float(), targets, ignore_index=-100)
    ref.backward()
    h = hidden.bfloat16().requires_grad_()
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_linear_cross_entropy(h, w, targets, chunk_tokens=16)
    out.backward()
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    assert abs(out.item() - ref.item()) < 1e-2 * ref.item()
    assert _rel(h.grad, h_ref.grad) < 2e-2
    assert _rel(w.grad, w_ref.grad) < 2e-2


def test_linear_ce_rejects_mismatched_shapes():
    hidden, weight, _, targets = _inputs()
    with pytest.raises(ValueError, match="hidden size"):
        fused_linear_cross_entropy(hidden[:, :5], weight, targets)
    with pytest.raises(ValueError, match="targets"):
        fused_linear_cross_entropy(hidden, weight, targets[:-1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with Triton (run on the device)")
@pytest.mark.parametrize("vocab", [1000, 128256])
def test_cuda_ce_rows_kernel_matches_torch_path(vocab):
    """The Triton pass (loss per row, gradient over the bf16 logits) against the PyTorch path of the
    same chunk: losses to float32 rounding, gradients to one bf16 rounding."""
    from cpt.kernels.ce_rows import ce_rows_
    from cpt.kernels.linear_ce import _loss_and_grad

    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(96, vocab, device="cuda", generator=g) * 4).bfloat16()
    targets = torch.randint(0, vocab, (96,), device="cuda", generator=g)
    targets[::7] = -100
    total = torch.zeros((), device="cuda")
    ref = _loss_and_grad(logits.clone(), targets, 0.01, True, total)
    mine = logits.clone()
    loss = ce_rows_(mine, targets, 0.01, write_grad=True)
    assert (loss[::7] == 0).all()
    assert abs(loss.sum().item() - total.item()) < 1e-5 * total.item()
    assert (mine.float() - ref.float()).abs().max().item() <= 2 ** -7 * ref.float().abs().max().item()  # one bf16 step
    assert _rel(mine, ref) < 1e-3
    assert (mine[::7] == 0).all()
    only = logits.clone()
    assert torch.allclose(ce_rows_(only, targets, 0.01, write_grad=False), loss) and torch.equal(only, logits)


def test_shift_labels():
    labels = torch.tensor([[1, 2, 3], [4, -100, 6]])
    assert shift_labels(labels).tolist() == [[2, 3, -100], [-100, 6, -100]]


def _peft_model(model_dir, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, use_rslora=True,
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                     modules_to_save=["embed_tokens", "lm_head"], init_lora_weights=False)
    return get_peft_model(model, cfg)


def _batch(vocab: int, seed: int = 0, b: int = 2, t: int = 24) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    pos = torch.arange(t).repeat(b, 1)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def _loss_and_grads(model, loss_fn, batch, num_items):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch, num_items)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def test_patched_peft_model_matches_plain(tiny_model_dir):
    model = _peft_model(tiny_model_dir)
    model.train()
    batch = _batch(model.config.vocab_size)
    num_items = 40
    loss_ref, grads_ref = _loss_and_grads(model, apply_kernels(model, "none", torch.device("cpu")), batch, num_items)
    loss_fn = apply_kernels(model, "cpt", torch.device("cpu"))
    loss, grads = _loss_and_grads(model, loss_fn, batch, num_items)
    assert "cpt chunked linear cross-entropy" in model.get_base_model()._cpt_kernels
    assert abs(loss.item() - loss_ref.item()) < 1e-5 * loss_ref.item()
    assert grads.keys() == grads_ref.keys()
    # The gradient reaches the trained copy of lm_head, and every trained tensor matches.
    assert any("lm_head.modules_to_save" in n for n in grads)
    assert not any("original_module" in n for n in grads)
    for n in grads:
        assert _rel(grads[n], grads_ref[n]) < 1e-4, n
    # Without labels, or without gradients, the model still returns logits (generation, eval).
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    assert out.logits is not None and abs(out.loss.item() - model(**{k: batch[k] for k in ("input_ids", "labels")}).loss.item()) < 1e-4
    # Switching back restores the plain forward.
    apply_kernels(model, "none", torch.device("cpu"))
    assert _loss_and_grads(model, plain_causal_lm_loss, batch, num_items)[0].item() == pytest.approx(loss_ref.item(), rel=1e-6)


def test_fused_head_follows_disabled_adapters(tiny_model_dir):
    model = _peft_model(tiny_model_dir)
    apply_kernels(model, "cpt", torch.device("cpu"))
    causal_lm = model.get_base_model()
    assert output_head(causal_lm) is causal_lm.lm_head.modules_to_save["default"]
    with model.disable_adapter():
        assert output_head(causal_lm) is causal_lm.lm_head.original_module


def test_apply_kernels_rejects_unknown_mode(tiny_model_dir):
    model = _peft_model(tiny_model_dir)
    with pytest.raises(ValueError, match="model.kernels"):
        apply_kernels(model, "fast", torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA"):
        apply_kernels(model, "liger", torch.device("cpu"))


def test_auto_is_plain_on_cpu(tiny_model_dir):
    model = _peft_model(tiny_model_dir)
    apply_kernels(model, "auto", torch.device("cpu"))
    assert model.get_base_model()._cpt_kernels == []


@pytest.mark.parametrize("plan", [(None, False), (1, False), (None, True), (1, True), (0, False)])
def test_recompute_modes_match_plain(tiny_model_dir, plan):
    """keep / recompute / offload (and mixes of them) change memory and time, never the gradients."""
    recompute_layers, offload = plan
    model = _peft_model(tiny_model_dir)
    model.train()
    batch = _batch(model.config.vocab_size, seed=1)
    loss_ref, grads_ref = _loss_and_grads(model, plain_causal_lm_loss, batch, 45)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    summary = set_recompute(model, recompute_layers, offload)
    n = model.config.num_hidden_layers
    k = n if recompute_layers is None else recompute_layers
    assert summary == {"keep": n - k, "recompute": 0 if offload else k, "offload": k if offload else 0, "host": 0}
    loss, grads = _loss_and_grads(model, apply_kernels(model, "cpt", torch.device("cpu")), batch, 45)
    assert abs(loss.item() - loss_ref.item()) < 1e-5 * loss_ref.item()
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert _rel(grads[name], grads_ref[name]) < 1e-4, name


def test_set_recompute_needs_checkpointing_enabled(tiny_model_dir):
    model = _peft_model(tiny_model_dir)
    with pytest.raises(ValueError, match="gradient_checkpointing_enable"):
        set_recompute(model, None, offload=False)


def _cuda_lora_llama(layers: int = 2, intermediate: int = 704, seq: int = 256, checkpointing: bool = True) -> tuple:
    """A random Llama (hidden 256, 32k vocabulary) on the GPU with LoRA r=16 on all 7 projections
    and trained embeddings / head, in training mode; and one batch of 2 x seq random tokens."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(512, seq))
    model = LlamaForCausalLM(cfg).to("cuda")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, use_rslora=True, init_lora_weights=False,
                                             target_modules=_PROJECTIONS, modules_to_save=["embed_tokens", "lm_head"]))
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32000, (2, seq), generator=g).cuda()
    return model, {"input_ids": ids, "labels": ids, "position_ids": torch.arange(seq, device="cuda").repeat(2, 1)}


def _assert_bf16_close(loss, grads, loss_ref, grads_ref, grads_32) -> None:
    """A bf16 path's loss and float32 gradients against the plain bf16 path's (`*_ref`): about as far
    from the float32 result (`grads_32`) as the plain path is (deep gradients of a random model
    amplify rounding differently along two paths, so allow 2x)."""
    assert abs(loss.item() - loss_ref.item()) < 1e-2 * loss_ref.item()
    assert grads.keys() == grads_ref.keys()
    for n in grads:
        assert grads[n].dtype == torch.float32
        assert _rel(grads[n], grads_32[n]) <= 2 * _rel(grads_ref[n], grads_32[n]) + 0.02, (
            n, _rel(grads[n], grads_32[n]), _rel(grads_ref[n], grads_32[n]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device by bench/gpu_throughput.py's call)")
@pytest.mark.parametrize("mode", ["cpt", "liger"])
def test_cuda_fused_paths_match_plain_bf16(mode):
    """On the GPU: in float32 the fused paths (our loss and LoRA epilogue, or liger's loss; liger's
    RMSNorm/SwiGLU) give the plain path's loss and gradients to rounding; in bf16 with float32
    trained copies they stay within bf16 tolerance of the float32 result."""
    if mode == "liger":
        pytest.importorskip("liger_kernel")
    model, batch = _cuda_lora_llama(checkpointing=False)
    loss_32, grads_32 = _loss_and_grads(model, apply_kernels(model, "none", torch.device("cuda")), batch, 2 * 255)
    # All float32: the fused paths compute the same function as the plain one, to rounding.
    loss_f32, grads_f32 = _loss_and_grads(model, apply_kernels(model, mode, torch.device("cuda")), batch, 2 * 255)
    assert abs(loss_f32.item() - loss_32.item()) < 1e-5 * loss_32.item()
    for n in grads_32:
        assert _rel(grads_f32[n], grads_32[n]) < 1e-3, (n, _rel(grads_f32[n], grads_32[n]))
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.bfloat16()  # bf16 base, float32 trained tensors, as cpt.model makes them
    model.get_base_model().model.embed_tokens.register_forward_hook(lambda m, a, o: o.to(torch.bfloat16))

    def run(loss_fn):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return _loss_and_grads(model, loss_fn, batch, 2 * 255)

    loss_ref, grads_ref = run(apply_kernels(model, "none", torch.device("cuda")))
    loss, grads = run(apply_kernels(model, mode, torch.device("cuda")))
    assert any("liger" in k for k in model.get_base_model()._cpt_kernels) or mode == "cpt"
    _assert_bf16_close(loss, grads, loss_ref, grads_ref, grads_32)
    # The frozen originals went to host memory and still serve a disabled-adapter forward.
    head = model.get_base_model().lm_head
    assert head.original_module.weight.device.type == "cpu"
    with torch.no_grad(), model.disable_adapter(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert model(input_ids=batch["input_ids"]).logits.shape == (2, 256, 32000)
    assert head.original_module.weight.device.type == "cpu"


def test_lora_input_upcast_skipped_only_under_autocast(tiny_model_dir):
    """bf16 base + float32 LoRA: under autocast the skipped upcast changes nothing (same loss and
    gradients); outside autocast peft's upcast still happens (else the matmul would fail)."""
    from cpt.kernels import skip_lora_input_upcast

    model = _peft_model(tiny_model_dir, dtype=torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    batch = _batch(model.config.vocab_size, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref, grads_ref = _loss_and_grads(model, plain_causal_lm_loss, batch, 45)
    assert skip_lora_input_upcast(model) == 7 * model.config.num_hidden_layers
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(model, plain_causal_lm_loss, batch, 45)
    assert loss.item() == loss_ref.item()
    for n in grads:
        assert torch.equal(grads[n], grads_ref[n]), n
    lora = next(m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled") and hasattr(m, "lora_A"))
    assert lora.cast_input_dtype_enabled is False
    with torch.no_grad():  # no autocast: a bf16 input meets the float32 LoRA weights through the upcast
        out = lora(torch.randn(3, lora.in_features, dtype=torch.bfloat16))
    assert lora.cast_input_dtype_enabled is True and out.dtype == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_offloaded_recompute_matches_plain(tiny_model_dir):
    """Layer inputs parked in pinned host memory (side-stream copies, buffers reused across steps)
    give the same gradients as keeping everything on the GPU, step after step."""
    model = _peft_model(tiny_model_dir).to("cuda")
    model.train()
    batches = [{k: v.cuda() for k, v in _batch(model.config.vocab_size, seed=s).items()} for s in (3, 4)]
    ref = [_loss_and_grads(model, plain_causal_lm_loss, b, 45) for b in batches]
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert set_recompute(model, None, offload=True)["offload"] == model.config.num_hidden_layers
    for b, (loss_ref, grads_ref) in zip(batches, ref):
        loss, grads = _loss_and_grads(model, plain_causal_lm_loss, b, 45)
        assert abs(loss.item() - loss_ref.item()) < 1e-5 * loss_ref.item()
        for n in grads:
            assert _rel(grads[n], grads_ref[n]) < 1e-4, n


def test_fused_lora_matches_peft(tiny_model_dir):
    """The fused LoRA forward (cpt::lora_linear for these bias-free Linear bases) gives peft's
    outputs and gradients: exactly (fp32) and within bf16 tolerance under autocast; dropout or
    disabled adapters fall back to peft's forward."""
    from cpt.kernels import fuse_lora_projections
    from cpt.kernels.lora import unfuse_lora_projections

    model = _peft_model(tiny_model_dir)
    model.train()
    batch = _batch(model.config.vocab_size, seed=5)
    loss_ref, grads_ref = _loss_and_grads(model, plain_causal_lm_loss, batch, 45)
    assert fuse_lora_projections(model) == 7 * model.config.num_hidden_layers
    loss, grads = _loss_and_grads(model, plain_causal_lm_loss, batch, 45)
    assert abs(loss.item() - loss_ref.item()) < 1e-5 * loss_ref.item()
    for n in grads:
        assert _rel(grads[n], grads_ref[n]) < 1e-5, n
    # A LoRA-B change must show (the fused path really computes the adapter).
    lora = next(m for m in model.modules() if hasattr(m, "_cpt_plain_lora_forward"))
    x = torch.randn(5, lora.in_features)
    with torch.no_grad():
        before = lora(x)
        lora.lora_B["default"].weight.add_(0.5)
        assert not torch.allclose(lora(x), before)
        assert torch.allclose(lora(x), lora._cpt_plain_lora_forward(x), atol=1e-5)
        with model.disable_adapter():
            assert torch.allclose(lora(x), lora.base_layer(x))
    unfuse_lora_projections(model)
    assert not hasattr(lora, "_cpt_plain_lora_forward")

    # bf16 base with float32 LoRA under autocast (the GPU setting): the fused path is as close to
    # the float32 result as peft's own bf16 path is (bf16 noise on deep gradients is several %).
    model = _peft_model(tiny_model_dir)
    model.train()
    _, grads_32 = _loss_and_grads(model, plain_causal_lm_loss, batch, 45)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.bfloat16()
    model.get_base_model().model.embed_tokens.register_forward_hook(lambda m, a, o: o.to(torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_peft, grads_peft = _loss_and_grads(model, plain_causal_lm_loss, batch, 45)
    fuse_lora_projections(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(model, plain_causal_lm_loss, batch, 45)
    assert abs(loss.item() - loss_peft.item()) < 1e-2 * loss_peft.item()
    for n in grads:
        assert grads[n].dtype == torch.float32
        assert _rel(grads[n], grads_32[n]) <= 1.3 * _rel(grads_peft[n], grads_32[n]) + 2e-3, n


_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_lora_llama(layers: int = 2):
    """A random Llama (hidden 32) with LoRA on all 7 projections and trained embeddings / head."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False,
                                             target_modules=_PROJECTIONS, modules_to_save=["embed_tokens", "lm_head"]))
    model.train()
    return model


class _OpCalls:
    """Counts calls of the cpt:: custom ops (forward and backward) while active."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        calls = self.calls = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func)
                if name.startswith("cpt."):
                    calls[name] = calls.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def _lora_step(lora, x, g):
    """(output, x.grad, A.grad, B.grad) of one LoRA projection for output gradient g."""
    a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    a.grad = b.grad = None
    x = x.detach().requires_grad_(True)
    out = lora(x)
    out.backward(g)
    return out.detach(), x.grad, a.grad.clone(), b.grad.clone()


def test_lora_linear_op_matches_peft():
    """Every projection of a tiny Llama (plain bias-free Linear bases) runs cpt::lora_linear
    forward and cpt::lora_linear_backward backward, and gives peft's output and the gradients of
    the input and both LoRA matrices: to float32 rounding, and under CPU autocast (bf16 base,
    float32 LoRA masters) within bf16 rounding of peft's autocast result."""
    from cpt.kernels import fuse_lora_projections

    model = _tiny_lora_llama()
    loras = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert len(loras) == 7 * 2
    g = torch.Generator().manual_seed(8)
    data = [(torch.randn(2, 5, m.in_features, generator=g), torch.randn(2, 5, m.out_features, generator=g)) for m in loras]
    ref = [_lora_step(m, x, gy) for m, (x, gy) in zip(loras, data)]
    assert fuse_lora_projections(model) == 14
    with _OpCalls() as seen:
        got = [_lora_step(m, x, gy) for m, (x, gy) in zip(loras, data)]
    assert seen.calls == {"cpt.lora_linear.default": 14, "cpt.lora_linear_backward.default": 14}
    for m, r, o in zip(loras, ref, got):
        assert o[0].shape == r[0].shape == (2, 5, m.out_features)
        for what, u, v in zip(("out", "x", "A", "B"), o, r):
            assert _rel(u, v) < 1e-6, (what, _rel(u, v))

    # bf16 base, float32 LoRA masters, bf16 activations, under autocast (the GPU setting).
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.bfloat16()
    data16 = [(x.bfloat16(), gy.bfloat16()) for x, gy in data]
    plain = {}
    for m in loras:  # peft's own forward for the reference (its input upcast included)
        plain[m], m.forward = m.forward, m._cpt_plain_lora_forward
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref16 = [_lora_step(m, x, gy) for m, (x, gy) in zip(loras, data16)]
    for m in loras:
        m.forward = plain[m]
    with torch.autocast("cpu", dtype=torch.bfloat16), _OpCalls() as seen:
        got16 = [_lora_step(m, x, gy) for m, (x, gy) in zip(loras, data16)]
    assert seen.calls == {"cpt.lora_linear.default": 14, "cpt.lora_linear_backward.default": 14}
    for r, o, r32 in zip(ref16, got16, ref):
        assert o[0].dtype == o[1].dtype == torch.bfloat16 and o[2].dtype == o[3].dtype == torch.float32
        for what, u, v, v32 in zip(("out", "x", "A", "B"), o, r, r32):
            # As close to peft's bf16 result as bf16 rounding allows, and no farther from float32's.
            assert _rel(u, v) < 1e-2, (what, _rel(u, v))
            assert _rel(u, v32) < 2 * _rel(v, v32) + 1e-2, (what, _rel(u, v32), _rel(v, v32))

    # Without autocast, bf16 activations meet float32 LoRA weights: peft's forward, not the op.
    with torch.no_grad(), _OpCalls() as seen:
        out = loras[0](data16[0][0])
    assert seen.calls == {} and out.dtype == torch.bfloat16


def test_lora_over_a_biased_base_keeps_the_addmm_path():
    """A base Linear with a bias (Qwen2's q/k/v, for one) is not the op's case: the fused forward
    there is still the addmm epilogue over the base output, with peft's result."""
    from peft import LoraConfig, get_peft_model

    from cpt.kernels import fuse_lora_projections

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Linear(10, 6, bias=False))
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "1"], init_lora_weights=False))
    loras = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    x, gy = torch.randn(3, 4, 12), torch.randn(3, 4, 10)
    ref = _lora_step(loras[0], x, gy)
    assert fuse_lora_projections(model) == 2
    with _OpCalls() as seen:
        got = _lora_step(loras[0], x, gy)
        loras[1](torch.randn(3, 10))
    assert seen.calls == {"cpt.lora_linear.default": 1}  # only the bias-free one
    for u, v in zip(got, ref):
        assert _rel(u, v) < 1e-6


def _lora_over_4bit(dtype, nested=True, bias=False):
    """peft LoRA (r=4, random A and B) over two bitsandbytes NF4 Linear4bit bases, quantized on the CPU."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)

    def lin4(i, o):
        lin = bnb.nn.Linear4bit(i, o, bias=bias, compute_dtype=dtype, compress_statistics=nested, quant_type="nf4",
                                quant_storage=dtype)
        lin.weight = bnb.nn.Params4bit(torch.randn(o, i, dtype=dtype) * 0.1, requires_grad=False, compress_statistics=nested,
                                       quant_type="nf4", quant_storage=dtype)
        return lin.to("cpu")  # quantizes

    net = torch.nn.Sequential(lin4(128, 192), lin4(192, 64))
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1"], init_lora_weights=False))
    return model, [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


@pytest.mark.parametrize("nested", [True, False])
def test_lora_linear_4bit_op_matches_peft(nested):
    """QLoRA projections (bitsandbytes NF4 bases, double quantization or not) run cpt::lora_linear_4bit
    and its backward op, with peft's output and gradients: float32 bases to float32 rounding, bf16
    bases under autocast (float32 LoRA masters) within bf16 rounding. A biased 4-bit base keeps
    peft's forward plus the addmm epilogue."""
    from cpt.kernels import fuse_lora_projections

    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        model, loras = _lora_over_4bit(dtype, nested)
        g = torch.Generator().manual_seed(3)
        data = [(torch.randn(3, 5, m.in_features, generator=g).to(dtype), torch.randn(3, 5, m.out_features, generator=g).to(dtype))
                for m in loras]

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                return [_lora_step(m, x, gy) for m, (x, gy) in zip(loras, data)]

        ref = run()
        assert fuse_lora_projections(model) == 2
        with _OpCalls() as seen:
            got = run()
        assert seen.calls == {"cpt.lora_linear_4bit.default": 2, "cpt.lora_linear_4bit_backward.default": 2}, dtype
        for r, o in zip(ref, got):
            assert o[0].dtype == r[0].dtype and o[1].dtype == r[1].dtype
            for what, u, v in zip(("out", "x", "A", "B"), o, r):
                assert _rel(u, v) < tol, (dtype, what, _rel(u, v))
        # The quantized weight gets no gradient and is not replaced.
        assert all(m.base_layer.weight.grad is None and m.base_layer.weight.dtype == dtype for m in loras)

    model, loras = _lora_over_4bit(torch.float32, nested, bias=True)
    x, gy = torch.randn(3, 5, 128), torch.randn(3, 5, 192)
    ref = _lora_step(loras[0], x, gy)
    fuse_lora_projections(model)
    with _OpCalls() as seen:
        got = _lora_step(loras[0], x, gy)
    assert seen.calls == {}
    assert all(_rel(u, v) < 1e-6 for u, v in zip(got, ref))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with bitsandbytes (run on the device)")
def test_cuda_4bit_lora_op_matches_peft_eager_and_compiled(tiny_model_dir):
    """A QLoRA model on the GPU (NF4, double quantization, bf16 compute, float32 LoRA): the 4-bit op
    (eager, then in compiled layers of which one recomputes) stays as close to a float32 computation
    over the same 4-bit weights as peft's own bf16 path is. 2048 tokens per batch, as in training:
    below 1536 rows bitsandbytes' forward takes its fused small-batch kernel, which rounds otherwise."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, use_rslora=True, init_lora_weights=False,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    batch = {k: v.cuda() for k, v in _batch(model.config.vocab_size, seed=5, b=8, t=256).items()}
    n_items = 8 * 255 - 3
    cuda = torch.device("cuda")

    # Reference: the same 4-bit weights, everything else in float32, no autocast, peft's own path.
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    plain16 = [p for p in model.parameters() if p.dtype == torch.bfloat16 and not isinstance(p, bnb.nn.Params4bit)]
    for m in quantized:
        m.compute_dtype = torch.float32
    for p in plain16:
        p.data = p.data.float()
    _, grads_32 = _loss_and_grads(model, apply_kernels(model, "none", cuda), batch, n_items)
    for m in quantized:
        m.compute_dtype = torch.bfloat16
    for p in plain16:
        p.data = p.data.bfloat16()

    def run(loss_fn):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return _loss_and_grads(model, loss_fn, batch, n_items)

    loss_ref, grads_ref = run(apply_kernels(model, "none", cuda))
    assert len(grads_ref) == len(grads_32) == 7 * 2 * model.config.num_hidden_layers
    from cpt.kernels import compile as compiled, nf4

    nf4._TABLES.clear()  # as in a fresh process: patching the model puts the NF4 table on the GPU
    loss_fn = apply_kernels(model, "cpt", cuda)
    assert torch.device("cuda", torch.cuda.current_device()) in nf4._TABLES
    with _OpCalls() as seen:
        got = [run(loss_fn)]
    # Both layers recompute (eager checkpointing): each projection is the dequantization op and the
    # LoRA op; in backward the dequantization and the forward op rerun, and the gradient op runs once.
    assert seen.calls == {"cpt.dequantize_4bit.default": 28, "cpt.lora_linear.default": 28,
                          "cpt.lora_linear_backward.default": 14}
    set_recompute(model, 1)
    loss_fn = apply_kernels(model, "cpt", cuda, compile=True)
    got += [run(loss_fn) for _ in range(2)]
    # The same compiled layers replayed as CUDA graphs (recorded in the second step). Compiling must not
    # have failed (it falls back to the plain layers, silently but for a warning).
    loss_fn = apply_kernels(model, "cpt", cuda, compile=True, cuda_graphs=True)
    for _ in range(3):
        compiled.mark_step()
        got.append(run(loss_fn))
    assert not compiled._FAILED, compiled._FAILED
    assert compiled.graphs_recorded() > 0
    for loss, grads in got:
        _assert_bf16_close(loss, grads, loss_ref, grads_ref, grads_32)


def test_lora_linear_4bit_opcheck():
    """torch.library's checks of both 4-bit ops (schema, autograd registration, fake tensors, AOT
    dispatch), and the output against its definition over bitsandbytes' own dequantized weight."""
    _, loras = _lora_over_4bit(torch.float32)
    from cpt.kernels.lora import _4bit_args

    m = loras[0]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 128, generator=g, requires_grad=True)
    args4 = _4bit_args(m.base_layer, x, torch.float32)
    a = torch.randn(4, 128, generator=g, requires_grad=True)
    b = torch.randn(192, 4, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.cpt.lora_linear_4bit.default, (x, *args4, a, b, 0.5))
    gy = torch.randn(2, 3, 192, generator=g)
    torch.library.opcheck(torch.ops.cpt.lora_linear_4bit_backward.default, (gy, x.detach(), *args4, a.detach(), b.detach(), 0.5))
    import bitsandbytes.functional as bf

    wd = bf.dequantize_4bit(m.base_layer.weight, m.base_layer.weight.quant_state)
    out = torch.ops.cpt.lora_linear_4bit(x, *args4, a, b, 0.5)
    assert _rel(out, x @ wd.t() + (x @ a.t()) @ b.t() * 0.5) < 1e-6


def _tiny_4bit_lora_llama(layers: int = 2):
    """_tiny_lora_llama with every projection a bitsandbytes NF4 Linear4bit (float32 compute,
    double quantization), quantized on the CPU, under peft's 4-bit LoRA layers."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if name in _PROJECTIONS:
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32,
                                          compress_statistics=True, quant_type="nf4", quant_storage=torch.float32)
                    q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4", quant_storage=torch.float32)
                    setattr(parent, name, q.to("cpu"))  # quantizes
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False,
                                             target_modules=_PROJECTIONS))
    model.train()
    return model


def test_recomputing_4bit_layer_dequantizes_once_in_backward():
    """QLoRA layers that recompute in backward take the dequantized weight as an op output
    (cpt::dequantize_4bit, then cpt::lora_linear) instead of dequantizing inside cpt::lora_linear_4bit:
    the same loss and gradients, but backward dequantizes each weight once for both the recomputed
    forward and the gradient (eager: 14 dequantizations per step and layer instead of 21; compiled: 7
    in the backward graph, shared by the 6 reruns and the 7 gradient ops). Layers that keep their
    activations keep the one opaque op, so no dequantized weight waits for backward."""
    import torch._dynamo

    from cpt.kernels import compile_decoder_layers, decoder_layers
    from cpt.kernels.compile import uncompile_layer
    from cpt.kernels.recompute import mark_recomputed

    model = _tiny_4bit_lora_llama()
    batch = _batch(97, seed=12)
    loss_fn = apply_kernels(model, "cpt", torch.device("cpu"))
    assert set_recompute(model, 1) == {"keep": 1, "recompute": 1, "offload": 0, "host": 0}
    layers = decoder_layers(model)
    flags = [[getattr(m, "_cpt_recomputed", None) for m in l.modules() if hasattr(m, "_cpt_plain_lora_forward")] for l in layers]
    assert flags == [[False] * 7, [True] * 7]
    mark_recomputed(layers[1], False)
    with _OpCalls() as seen:
        loss_ref, grads_ref = _loss_and_grads(model, loss_fn, batch, 45)
    assert seen.calls == {"cpt.lora_linear_4bit.default": 21, "cpt.lora_linear_4bit_backward.default": 14}
    assert mark_recomputed(layers[1], True) == 7
    with _OpCalls() as seen:
        loss, grads = _loss_and_grads(model, loss_fn, batch, 45)
    assert seen.calls == {"cpt.lora_linear_4bit.default": 7, "cpt.lora_linear_4bit_backward.default": 7,
                          "cpt.dequantize_4bit.default": 14, "cpt.lora_linear.default": 14,
                          "cpt.lora_linear_backward.default": 7}
    assert abs(loss.item() - loss_ref.item()) < 1e-6 * loss_ref.item() and grads.keys() == grads_ref.keys()
    for n in grads:
        assert _rel(grads[n], grads_ref[n]) < 1e-5, n

    backend, graphs = _graph_keeping_backend()
    torch._dynamo.reset()
    try:
        assert compile_decoder_layers(model, backend=backend)["recompute"] == 1
        loss, grads = _loss_and_grads(model, loss_fn, batch, 45)
    finally:
        for layer in layers:
            uncompile_layer(layer)
        torch._dynamo.reset()
    assert abs(loss.item() - loss_ref.item()) < 1e-5 * loss_ref.item()
    for n in grads:
        assert _rel(grads[n], grads_ref[n]) < 1e-5, n
    ops = torch.ops.cpt
    kinds = [ops.dequantize_4bit.default, ops.lora_linear.default, ops.lora_linear_backward.default,
             ops.lora_linear_4bit.default, ops.lora_linear_4bit_backward.default]
    count = lambda gms: sorted(tuple(len(_calls(gm, op)) for op in kinds) for gm in gms)  # noqa: E731
    # keeping layer: 7 opaque 4-bit ops each way; recomputing layer: 7 dequantizations in each graph
    assert count(graphs["forward"]) == [(0, 0, 0, 7, 0), (7, 7, 0, 0, 0)]
    assert count(graphs["backward"]) == [(0, 0, 0, 0, 7), (7, 6, 7, 0, 0)]


def test_lora_linear_opcheck():
    """torch.library's own checks of both ops (schema, autograd registration, fake tensors, AOT
    dispatch with dynamic shapes), and a float64 gradcheck of the forward op's x, A and B gradients
    (the frozen base weight gets none)."""
    import cpt.kernels.lora  # noqa: F401  (registers the ops)

    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    w = torch.randn(6, 8, generator=g)
    a = torch.randn(3, 8, generator=g, requires_grad=True)
    b = torch.randn(6, 3, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.cpt.lora_linear.default, (x, w, a, b, 0.7))
    # The backward op has no autograd of its own (no double backward): check it on plain tensors.
    gy = torch.randn(2, 5, 6, generator=g)
    torch.library.opcheck(torch.ops.cpt.lora_linear_backward.default, (gy, x.detach(), w, a.detach(), b.detach(), 0.7))
    x64, a64, b64 = (t.detach().double().requires_grad_(True) for t in (x, a, b))
    assert torch.autograd.gradcheck(lambda x, a, b: torch.ops.cpt.lora_linear(x, w.double(), a, b, 0.7), (x64, a64, b64))


def _saved_bytes(model, loss_fn, batch, num_items) -> tuple:
    """(loss, grads, bytes of activations saved for backward outside parameters) of one step."""
    seen = {p.data_ptr() for p in model.parameters()}
    total = [0]

    def pack(t):
        if t.data_ptr() not in seen:  # each storage once (layers share RoPE tables, for one)
            seen.add(t.data_ptr())
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, grads = _loss_and_grads(model, loss_fn, batch, num_items)
    return loss, grads, total[0]


def _graph_keeping_backend() -> tuple:
    """aot_eager's own setup (min-cut partitioner, graphs run as traced), keeping the forward and
    backward graphs it compiles for inspection: (backend, {"forward": [...], "backward": [...]})."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    graphs = {"forward": [], "backward": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                        partition_fn=min_cut_rematerialization_partition), graphs


def _calls(gm, op) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is op]


def _dynamo_counts() -> dict:
    from torch._dynamo.utils import counters
    return {"graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values())}


def test_compiled_layers_match_eager():
    """Regional compile (aot_eager here: dynamo and autograd's graphs without inductor's codegen,
    which CI cannot afford on CPU) gives the eager loss and gradients, for a layer that keeps and
    layers that recompute (and they still recompute); traces without graph breaks; shares one
    graph between layers of the same kind; and leaves no-grad forwards (evaluation, generation)
    to the plain layers."""
    import torch._dynamo
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt.kernels import compile_decoder_layers, decoder_layers, skip_lora_input_upcast
    from cpt.kernels.compile import recomputes, uncompile_layer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                             modules_to_save=["embed_tokens", "lm_head"]))
    model.train()
    batch = _batch(97, seed=6)
    loss_fn = apply_kernels(model, "cpt", torch.device("cpu"))  # the fused LoRA forward, traced too
    skip_lora_input_upcast(model)  # its pre-hook (CUDA's setting) must not break the graph
    layers = decoder_layers(model)
    set_recompute(model, 0)
    saved_keep = _saved_bytes(model, loss_fn, batch, 45)[2]
    set_recompute(model, 2)  # layer 0 keeps its activations, layers 1 and 2 recompute
    loss_ref, grads_ref, saved_ref = _saved_bytes(model, loss_fn, batch, 45)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert compile_decoder_layers(model, backend="aot_eager") == {"compiled": 3, "recompute": 2, "eager": 0, "host": 0}
    assert [recomputes(l) for l in layers] == [False, True, True]
    for _ in range(2):  # the second step reuses the graphs
        loss, grads, saved = _saved_bytes(model, loss_fn, batch, 45)
        assert abs(loss.item() - loss_ref.item()) < 1e-5 * loss_ref.item()
        assert grads.keys() == grads_ref.keys()
        for n in grads:
            assert _rel(grads[n], grads_ref[n]) < 1e-5, n
        # The recomputing layers still recompute: the compiled step saves about what eager saves (a
        # little more: it holds layer inputs as saved tensors, eager in the checkpoint's closure).
        assert saved <= 1.25 * saved_ref < saved_keep, (saved, saved_ref, saved_keep)
    assert _dynamo_counts() == {"graphs": 2, "breaks": 0}
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    assert _dynamo_counts()["graphs"] == 2
    # Undo: the class's forward and the recompute choice come back.
    for layer in layers:
        was = recomputes(layer)
        assert uncompile_layer(layer) == was
        assert "forward" not in layer.__dict__ and layer.gradient_checkpointing == was
    torch._dynamo.reset()


@pytest.mark.parametrize("autocast", [False, True])
def test_compiled_recompute_reruns_lora_ops_only_where_backward_needs_them(autocast):
    """Regional compile with one layer keeping and one recomputing: the loss and gradients are
    eager's, and the partitioner sees cpt::lora_linear as one opaque op (7 per layer forward, 7
    backward ops). The recomputing layer's backward graph reruns 6 of the 7: q, k, v (attention's
    backward needs them), o (the post-attention RMSNorm's input) and gate / up (down_proj's input),
    but not down_proj, whose output backward never needs; the keeping layer reruns none. Had the
    op saved its rank-r middle `x @ A.T`, that output would be needed and down_proj's base GEMM
    would be recomputed too. Under CPU autocast too (its casts trace without graph breaks)."""
    import torch._dynamo

    from cpt.kernels import compile_decoder_layers, decoder_layers
    from cpt.kernels.compile import uncompile_layer

    backend, graphs = _graph_keeping_backend()
    calls = _calls

    torch._dynamo.reset()
    model = _tiny_lora_llama()
    batch = _batch(97, seed=10)
    loss_fn = apply_kernels(model, "cpt", torch.device("cpu"))
    set_recompute(model, 1)  # layer 0 keeps its activations, layer 1 recomputes

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return _loss_and_grads(model, loss_fn, batch, 45)

    loss_ref, grads_ref = step()
    breaks = _dynamo_counts()["breaks"]  # (dynamo's counters outlive its reset)
    try:
        assert compile_decoder_layers(model, backend=backend) == {"compiled": 2, "recompute": 1, "eager": 0, "host": 0}
        loss, grads = step()
        assert abs(loss.item() - loss_ref.item()) < 1e-5 * loss_ref.item()
        assert grads.keys() == grads_ref.keys()
        for n in grads:
            assert _rel(grads[n], grads_ref[n]) < (1e-3 if autocast else 1e-5), n
        assert _dynamo_counts()["breaks"] == breaks
    finally:
        for layer in decoder_layers(model):
            uncompile_layer(layer)
        torch._dynamo.reset()
    fw, bw = torch.ops.cpt.lora_linear.default, torch.ops.cpt.lora_linear_backward.default
    assert [len(calls(gm, fw)) for gm in graphs["forward"]] == [7, 7]
    assert sorted(len(calls(gm, bw)) for gm in graphs["backward"]) == [7, 7]
    reruns = sorted((calls(gm, fw) for gm in graphs["backward"]), key=len)
    assert [len(r) for r in reruns] == [0, 6]
    # Which ones, by base weight shape (out, in): down_proj's (32, 64) is the one missing.
    shapes = sorted(tuple(n.args[1].meta["val"].shape) for n in reruns[1])
    assert shapes == [(16, 32), (16, 32), (32, 32), (32, 32), (64, 32), (64, 32)]


def test_a_failing_compiler_leaves_the_plain_layers_training(caplog):
    """model.compile is on by default on CUDA: a machine whose compiler fails (no C compiler, no
    Triton, an op it cannot handle) must still train, with a warning, recomputing as planned."""
    import logging

    import torch._dynamo
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpt.kernels import compile_decoder_layers, decoder_layers
    from cpt.kernels.compile import _FAILED, recomputes

    def broken(gm, example_inputs):
        raise RuntimeError("no C compiler on this machine")

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = _batch(97, seed=7)
    loss_fn = apply_kernels(model, "cpt", torch.device("cpu"))
    set_recompute(model, 1)  # layer 0 keeps, layer 1 recomputes
    loss_ref, grads_ref, saved_ref = _saved_bytes(model, loss_fn, batch, 45)
    torch._dynamo.reset()
    try:
        assert compile_decoder_layers(model, backend=broken)["compiled"] == 2
        with caplog.at_level(logging.WARNING, logger="cpt.kernels.compile"):
            loss, grads, saved = _saved_bytes(model, loss_fn, batch, 45)
        assert "compiling the decoder layers failed" in caplog.text and "no C compiler" in caplog.text
        assert abs(loss.item() - loss_ref.item()) < 1e-6 * loss_ref.item()
        for n in grads_ref:
            assert _rel(grads[n], grads_ref[n]) < 1e-6, n
        assert saved <= 1.25 * saved_ref  # layer 1 still recomputes
        layers = decoder_layers(model)
        assert [recomputes(l) for l in layers] == [False, True]
        assert all("forward" not in l.__dict__ for l in layers)  # plain layers from now on
        loss2, _, _ = _saved_bytes(model, loss_fn, batch, 45)
        assert abs(loss2.item() - loss_ref.item()) < 1e-6 * loss_ref.item()
    finally:
        _FAILED.pop(broken, None)
        torch._dynamo.reset()


def test_use_compile_resolution():
    from cpt.kernels import use_compile

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_compile("auto", "auto", cuda) and use_compile("auto", "cpt", cuda) and use_compile("auto", "none", cuda)
    assert not use_compile("auto", "auto", cpu)
    assert not use_compile("auto", "liger", cuda) and not use_compile("auto", "auto", cuda, fsdp=True)
    assert use_compile("auto", "auto", cuda, load_in_4bit=True) and use_compile(True, "auto", cuda, load_in_4bit=True)
    assert use_compile(True, "auto", cpu) and use_compile("true", "liger", cuda)
    assert not use_compile(False, "auto", cuda) and not use_compile("false", "auto", cuda)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
def test_cuda_compiled_layers_match_eager_bf16(monkeypatch):
    """On the GPU, with inductor: compiled layers (recompute inside the graph, norms/RoPE/SwiGLU
    generated instead of liger's) give the eager path's loss and gradients within bf16 tolerance,
    against the same float32 reference; and they really ran compiled. (The eager path puts liger's
    RMSNorm/SwiGLU on its model's modules to stay, which dynamo cannot trace, so the compiled run takes
    a fresh copy of the model. On one model this test passed for sessions with its compile failing and
    the layers falling back to eager, and the failure, kept per process, turned later tests' layers
    eager too: bench/NOTES.md, session 16.)"""
    import torch._dynamo

    from cpt.kernels import compile as compile_mod

    monkeypatch.setattr(compile_mod, "_FAILED", {})
    torch._dynamo.reset()

    def model_in_bf16(grads: bool = False):
        model, batch = _cuda_lora_llama()
        set_recompute(model, 1)  # one layer keeps, one recomputes
        grads_32 = _loss_and_grads(model, apply_kernels(model, "none", torch.device("cuda")), batch, 2 * 255)[1] if grads else None
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.bfloat16()
        model.get_base_model().model.embed_tokens.register_forward_hook(lambda m, a, o: o.to(torch.bfloat16))
        return model, batch, grads_32

    def run(model, batch, loss_fn):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return _loss_and_grads(model, loss_fn, batch, 2 * 255)

    model, batch, grads_32 = model_in_bf16(grads=True)
    loss_ref, grads_ref = run(model, batch, apply_kernels(model, "cpt", torch.device("cuda")))
    model, batch, _ = model_in_bf16()  # the same seeded weights, without liger's modules
    loss_fn = apply_kernels(model, "cpt", torch.device("cuda"), compile=True)
    assert any("compiled" in k for k in model.get_base_model()._cpt_kernels)
    assert not any("liger" in k for k in model.get_base_model()._cpt_kernels)
    try:
        for _ in range(2):
            loss, grads = run(model, batch, loss_fn)
            _assert_bf16_close(loss, grads, loss_ref, grads_ref, grads_32)
        assert not compile_mod._FAILED, compile_mod._FAILED
    finally:
        apply_kernels(model, "none", torch.device("cuda"))


def test_compiled_recompute_marks_every_op_must_recompute(monkeypatch):
    """Under torch.compile a plain checkpoint only lets the partitioner prefer recomputation, and it
    saves the outputs of ops it will not recompute (bitsandbytes' 4-bit GEMM: +9 GiB on an 8B model,
    bench/NOTES.md). The compiled step must hand checkpoint a policy that recomputes every op."""
    from torch.utils.checkpoint import CheckpointPolicy

    from cpt.kernels import compile as compiled

    seen = {}

    def fake_checkpoint(fn, *args, context_fn=None, use_reentrant=None, **kwargs):
        seen["context_fn"], seen["use_reentrant"] = context_fn, use_reentrant
        return fn(*args, **kwargs)

    monkeypatch.setattr(compiled, "checkpoint", fake_checkpoint)
    layer = torch.nn.Linear(4, 4)
    compiled._layer_step(layer, True, torch.randn(2, 4))
    assert seen["context_fn"] is not None and seen["use_reentrant"] is False
    forward_ctx, recompute_ctx = seen["context_fn"]()
    assert compiled._must_recompute(None, torch.ops.aten.mm.default) == CheckpointPolicy.MUST_RECOMPUTE
    seen.clear()
    compiled._layer_step(layer, False, torch.randn(2, 4))
    assert not seen  # a layer that keeps its activations is not checkpointed at all


def test_use_cuda_graphs_resolution(monkeypatch):
    from cpt.kernels import use_cuda_graphs

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert use_cuda_graphs("auto", cuda) and not use_cuda_graphs("auto", cpu)
    assert not use_cuda_graphs("auto", cuda, fsdp=True)
    assert use_cuda_graphs(True, cpu) and use_cuda_graphs("true", cuda) and not use_cuda_graphs("false", cuda)
    monkeypatch.setenv("WORLD_SIZE", "2")  # several processes (DDP): not measured, so auto stays off
    assert not use_cuda_graphs("auto", cuda) and use_cuda_graphs(True, cuda)


@pytest.mark.parametrize("autocast", [False, True])
def test_host_activations_layer_saves_gate_and_up_in_host_memory(monkeypatch, autocast):
    """adapter.host_activations: a recomputing layer chosen as a host layer saves the outputs of its
    expanding projections (gate, up) instead of rerunning them, and those saved tensors leave for
    host memory and come back for backward; everything else recomputes as before. The loss and
    gradients stay eager's. Counted in the compiled graphs: the host layer's backward reruns 4 of
    its 7 projections (q, k, v, o), a plain recomputing layer 6, a keeping layer none."""
    import torch._dynamo

    from cpt.kernels import compile_decoder_layers, decoder_layers, host_activations
    from cpt.kernels.compile import uncompile_layer

    monkeypatch.setattr(host_activations, "MIN_BYTES", 0)  # toy tensors count
    backend, graphs = _graph_keeping_backend()
    calls = _calls

    torch._dynamo.reset()
    model = _tiny_lora_llama(layers=6)
    batch = _batch(97, seed=11)
    loss_fn = apply_kernels(model, "cpt", torch.device("cpu"))
    # Layer 0 keeps, 1-5 recompute; one of those becomes a host layer (never the top LEAD layers
    # or the bottom LEAD + 1).
    assert set_recompute(model, 5, host_layers=1) == {"keep": 1, "recompute": 5, "offload": 0, "host": 1}
    layers = decoder_layers(model)
    marked = [i for i, l in enumerate(layers) if hasattr(l, "_cpt_host_activations")]
    assert len(marked) == 1 and host_activations.LEAD < marked[0] < 6 - host_activations.LEAD
    host = layers[marked[0]]._cpt_host_activations

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return _loss_and_grads(model, loss_fn, batch, 45)

    loss_ref, grads_ref = step()  # eager: the host layer just recomputes
    assert host.count == 0
    try:
        assert compile_decoder_layers(model, backend=backend) == {"compiled": 6, "recompute": 5, "eager": 0, "host": 1}
        for _ in range(2):  # the second step reuses the host buffers
            loss, grads = step()
            assert abs(loss.item() - loss_ref.item()) < 1e-5 * loss_ref.item()
            assert grads.keys() == grads_ref.keys()
            for n in grads:
                assert _rel(grads[n], grads_ref[n]) < (1e-3 if autocast else 1e-5), n
            # gate's and up's outputs at least (the layer input, an input, never moves)
            assert host.count >= 2 and len(host.buffers) == host.count
            x_ptrs = {b.data_ptr() for b in host.buffers}
    finally:
        for layer in layers:
            uncompile_layer(layer)
        torch._dynamo.reset()
    assert {b.data_ptr() for b in host.buffers} == x_ptrs  # reused, not reallocated
    fw, bw = torch.ops.cpt.lora_linear.default, torch.ops.cpt.lora_linear_backward.default
    # Three kinds of layer: keep, recompute, host.
    assert len(graphs["forward"]) == 3 and len(graphs["backward"]) == 3
    assert sorted(len(calls(gm, bw)) for gm in graphs["backward"]) == [7, 7, 7]
    reruns = sorted((calls(gm, fw) for gm in graphs["backward"]), key=len)
    assert [len(r) for r in reruns] == [0, 4, 6]
    shapes = sorted(tuple(n.args[1].meta["val"].shape) for n in reruns[1])
    assert shapes == [(16, 32), (16, 32), (32, 32), (32, 32)]  # q, k, v, o: not gate/up (64, 32)


def test_host_layer_indices_spread_and_skip_the_top():
    from cpt.kernels.host_activations import LEAD, host_layer_indices

    assert host_layer_indices(list(range(32)), 32, 0) == []
    got = host_layer_indices(list(range(32)), 32, 10)
    assert len(got) == 10 and LEAD < min(got) and max(got) < 32 - LEAD
    gaps = [b - a for a, b in zip(got, got[1:])]
    assert max(gaps) - min(gaps) <= 1  # evenly spread
    assert host_layer_indices(list(range(5, 32)), 32, 100) == list(range(5, 32 - LEAD))
    assert host_layer_indices(list(range(32)), 32, 100) == list(range(LEAD + 1, 32 - LEAD))
    assert host_layer_indices([31, 0, 1], 32, 3) == []


def test_graphed_host_layers_let_go_of_saved_tensors_hold_layers_later(monkeypatch):
    """A graphed host layer's saved tensor lives in the CUDA graphs' pool, which a later replay writes
    whatever the copy stream reads: it is held until the forward pass reaches the layer HOLD above (or
    a new forward pass, or the backward pass, begins), and the current stream waits for its copy first."""
    from cpt.kernels import host_activations as ha

    waited = []

    class Stream:
        def wait_event(self, event):
            waited.append(event)

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(ha, "_HELD", [])
    monkeypatch.setattr(ha, "HOLD", 2)
    t = torch.zeros(1)
    ha._HELD.extend([(3, "copy 3", t), (4, "copy 4", t)])
    ha.release(4)  # layer 4 begins: layer 3's copy may still run, layer 4's is from an earlier pass
    assert waited == ["copy 4"] and [e[1] for e in ha._HELD] == ["copy 3"]
    ha.release(5)
    assert waited == ["copy 4", "copy 3"] and not ha._HELD
    ha._HELD.extend([(29, "copy 29", t), (30, "copy 30", t)])
    ha.release(31)
    assert waited[-1] == "copy 29" and len(ha._HELD) == 1
    ha.release(0)  # a new forward pass
    assert waited[-1] == "copy 30" and not ha._HELD
    ha._HELD.append((7, "copy 7", t))
    ha.release()  # the backward pass
    assert waited[-1] == "copy 7" and not ha._HELD


def test_graphed_host_layers_fetch_into_two_fixed_slots():
    """Graphed host layers' backward graphs read their saved tensors at the addresses they were
    recorded with, so the tensors come back into a ring of two slots (host layers alternate); a slot
    whose last owner's tensors were not read yet is not overwritten (new memory instead), and without
    graphs every fetch takes new memory."""
    from cpt.kernels.host_activations import HostActivations, _Stashed

    ring: dict = {}
    a, b, c = (HostActivations(i, slot=k % 2, ring=ring) for k, i in enumerate((2, 4, 6)))
    for h in (a, b, c):
        h.graphs = True
        h.stashed = [_Stashed(torch.zeros(3, 5), torch.device("cpu"), None), _Stashed(torch.zeros(3, 7), torch.device("cpu"), None)]

    def fetch(h):
        out = h._targets(h.stashed)
        for s, t in zip(h.stashed, out):
            s.gpu = t
        return [t.data_ptr() for t in out]

    def read(h):
        for s in h.stashed:
            s.gpu = None

    pa = fetch(a)
    assert [t.shape for t in ring[0]["tensors"]] == [(3, 5), (3, 7)]
    pc = fetch(c)  # slot 0's tensors are a's, not yet read: new memory
    assert c.fresh == 2 and not set(pc) & set(pa)
    read(a), read(c)
    assert fetch(b) != pa and b.fresh == 0
    assert fetch(c) == pa and c.fresh == 2  # slot 0 again, the same addresses
    read(c)
    assert fetch(a) == pa and a.fresh == 0
    read(a)
    a.stashed[1] = _Stashed(torch.zeros(3, 9), torch.device("cpu"), None)  # another shape: that slot is made anew
    assert fetch(a)[0] == pa[0] and ring[0]["tensors"][1].shape == (3, 9)
    read(a)
    earlier = _Stashed(torch.zeros(3, 5), torch.device("cpu"), None)  # of a forward pass before the last one
    t = a._targets([earlier])[0]
    assert t.data_ptr() not in pa and a.fresh == 1 and ring[0]["tensors"][0].data_ptr() == pa[0]
    a.graphs = False
    assert fetch(a)[0] != pa[0] and a.fresh == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
@pytest.mark.parametrize("host_graphs", [True, False])
def test_cuda_host_activations_match_plain_bf16(monkeypatch, host_graphs):
    """On the GPU, with inductor and CUDA graphs for the other layers: host layers (gate/up outputs
    copied to pinned memory on a side stream, fetched back one layer ahead) give the loss and
    gradients of the same compiled layers without host layers, within bf16 tolerance of the float32
    result, over five steps (graphs record in the second), every
    saved tensor comes back through the fetch ahead, and the buffers are pinned and reused.
    With graphs for the host layers too (host_graphs): no graph records again after the second step
    (the tensors come back into the same ring buffers every step), and none is fetched elsewhere."""
    import torch._dynamo

    from cpt.kernels import compile as compile_mod
    from cpt.kernels import decoder_layers
    from cpt.kernels.compile import graphs_recorded, mark_step

    monkeypatch.setattr(compile_mod, "HOST_LAYER_GRAPHS", host_graphs)
    monkeypatch.setattr(compile_mod, "_FAILED", {})  # a failure of an earlier test would make these layers eager

    # Earlier compiled tests of the same process may have used up dynamo's recompilations of the
    # layer step (it then runs eagerly: nothing stashed, call 3 of session 10).
    torch._dynamo.reset()
    # 2 x 1024 tokens: gate/up outputs of 5.8 MB each, over MIN_BYTES.
    model, batch = _cuda_lora_llama(layers=8, intermediate=1408, seq=1024)
    assert set_recompute(model, 7, host_layers=3)["host"] == 3  # layer 0 keeps, 1-7 recompute, 3 of them host layers
    layers = decoder_layers(model)
    hosts = [l._cpt_host_activations for l in layers if hasattr(l, "_cpt_host_activations")]
    n = 2 * 1023
    _, grads_32 = _loss_and_grads(model, apply_kernels(model, "none", torch.device("cuda")), batch, n)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.bfloat16()
    model.get_base_model().model.embed_tokens.register_forward_hook(lambda m, a, o: o.to(torch.bfloat16))

    def run(loss_fn):
        mark_step()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return _loss_and_grads(model, loss_fn, batch, n)

    # The reference: the same compiled layers without host layers. (Not the eager path: its liger
    # RMSNorm/SwiGLU patches would stay, and host layers are off under them.)
    held = {i: l.__dict__.pop("_cpt_host_activations") for i, l in enumerate(layers) if "_cpt_host_activations" in l.__dict__}
    loss_ref, grads_ref = run(apply_kernels(model, "cpt", torch.device("cuda"), compile=True))
    assert not compile_mod._FAILED, compile_mod._FAILED
    for i, h in held.items():
        layers[i]._cpt_host_activations = h
    assert all(h.count == 0 for h in hosts)
    loss_fn = apply_kernels(model, "cpt", torch.device("cuda"), compile=True, cuda_graphs=True)
    kernels = " ".join(model.get_base_model()._cpt_kernels)
    assert "compiled (8 of 8" in kernels and "CUDA graphs" in kernels
    assert all(h.graphs == host_graphs for h in hosts)
    try:
        for step in range(5):
            loss, grads = run(loss_fn)
            _assert_bf16_close(loss, grads, loss_ref, grads_ref, grads_32)
            assert all(h.count >= 2 for h in hosts), ([h.count for h in hosts], compile_mod._FAILED)
            if step == 0:
                ptrs = [b.data_ptr() for h in hosts for b in h.buffers]
            if step == 2:
                recorded = graphs_recorded()
                assert recorded > 0
        assert graphs_recorded() == recorded  # steps 4 and 5 replayed what steps 2 and 3 recorded
        assert all(h.late == 0 and h.fresh == 0 for h in hosts), [(h.late, h.fresh) for h in hosts]
        assert all(b.is_pinned() for h in hosts for b in h.buffers)
        assert [b.data_ptr() for h in hosts for b in h.buffers] == ptrs
        assert not compile_mod._FAILED
    finally:
        apply_kernels(model, "none", torch.device("cuda"))


def test_host_layer_that_stashes_nothing_warns_once(monkeypatch, caplog):
    """A host layer whose saved tensors never reach the hooks (all under MIN_BYTES here; under liger's
    SwiGLU on CUDA) would keep its gate and up outputs on the GPU: it says so, once."""
    import logging

    import torch._dynamo

    from cpt.kernels import compile_decoder_layers, decoder_layers, host_activations
    from cpt.kernels.compile import uncompile_layer

    monkeypatch.setattr(host_activations, "MIN_BYTES", 1 << 40)
    torch._dynamo.reset()
    model = _tiny_lora_llama(layers=4)
    loss_fn = apply_kernels(model, "cpt", torch.device("cpu"))
    assert set_recompute(model, 4, host_layers=1)["host"] == 1
    caplog.set_level(logging.WARNING, logger="cpt")
    try:
        assert compile_decoder_layers(model, backend="aot_eager")["host"] == 1
        for _ in range(2):
            _loss_and_grads(model, loss_fn, _batch(97, seed=3), 40)
        assert caplog.text.count("saved nothing to host memory") == 1
        # Off (liger's elementwise kernels in the model): the chosen layer just recomputes.
        assert compile_decoder_layers(model, backend="aot_eager", host_layers=False)["host"] == 0
    finally:
        for layer in decoder_layers(model):
            uncompile_layer(layer)
        torch._dynamo.reset()


def test_host_layer_survives_two_forward_passes_before_backward(monkeypatch):
    """The loop runs forward then backward; a caller may run two forward passes first (two losses
    summed). The second must not overwrite the first one's tensors in the host buffers."""
    import torch._dynamo

    from cpt.kernels import compile_decoder_layers, decoder_layers, host_activations
    from cpt.kernels.compile import uncompile_layer

    monkeypatch.setattr(host_activations, "MIN_BYTES", 0)
    torch._dynamo.reset()
    model = _tiny_lora_llama(layers=4)
    loss_fn = apply_kernels(model, "cpt", torch.device("cpu"))
    assert set_recompute(model, 4, host_layers=1)["host"] == 1
    a, b = _batch(97, seed=4), _batch(97, seed=5)

    def two_losses():
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, a, 40) + loss_fn(model, b, 40)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_ref, grads_ref = two_losses()
    try:
        compile_decoder_layers(model, backend="aot_eager")
        for _ in range(2):
            loss, grads = two_losses()
            assert abs(loss.item() - loss_ref.item()) < 1e-5 * loss_ref.item()
            for n in grads_ref:
                assert _rel(grads[n], grads_ref[n]) < 1e-5, n
    finally:
        for layer in decoder_layers(model):
            uncompile_layer(layer)
        torch._dynamo.reset()


def test_liger_elementwise_stays_on_its_own_model(monkeypatch):
    """liger patches classes and the RoPE function in transformers' modeling module; cpt keeps only what
    it did to the given model's modules and puts the module's names back, so a later model of the same
    process (a CPU one, say) is plain transformers. Run with a stand-in for liger (not installed here)."""
    import sys
    import types

    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    from cpt.kernels import _patch_liger_elementwise

    calls = []

    def fake_apply(model, **kw):  # what liger's apply_liger_kernel_to_llama does, in miniature
        calls.append(kw)
        modeling_llama.LlamaRMSNorm = type("LigerRMSNorm", (torch.nn.Module,), {})
        modeling_llama.apply_rotary_pos_emb = lambda *a, **k: None
        for layer in model.model.layers:
            layer.input_layernorm.forward = lambda x: x * 2  # patched on the instance

    fake = types.ModuleType("liger_kernel.transformers.monkey_patch")
    fake._apply_liger_kernel_to_instance = fake_apply
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", fake)
    plain_norm, plain_rope = modeling_llama.LlamaRMSNorm, modeling_llama.apply_rotary_pos_emb
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    first = LlamaForCausalLM(cfg)
    assert _patch_liger_elementwise(first) and first._cpt_liger_elementwise
    assert calls == [{"rope": False, "rms_norm": True, "swiglu": True, "cross_entropy": False, "fused_linear_cross_entropy": False}]
    assert modeling_llama.LlamaRMSNorm is plain_norm and modeling_llama.apply_rotary_pos_emb is plain_rope
    x = torch.ones(3)
    assert torch.equal(first.model.layers[0].input_layernorm(x), 2 * x)  # the model keeps its own patch
    second = LlamaForCausalLM(cfg)
    assert type(second.model.layers[0].input_layernorm) is plain_norm


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with Triton and bitsandbytes (run on the device)")
@pytest.mark.parametrize("nested", [True, False])
def test_cuda_nf4_dequantization_is_bitsandbytes_bit_for_bit(nested):
    """kernels/nf4.py against bitsandbytes' own dequantize_4bit, on its CUDA kernels: equal bit for bit
    in bf16, fp16 and float32, with and without the nested block maxima, for block sizes 64 and 128
    (packed in uint8 or, as cpt loads them, bf16 storage),
    for a size that ends inside a program's run of bytes, and for weights with zeros and huge blocks.
    It fails if the maxima's product and sum were fused (one rounding instead of two), or the two
    values of a byte swapped."""
    bf = pytest.importorskip("bitsandbytes.functional")
    from cpt.kernels import nf4

    nf4.prepare(torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape, bs in (((4096, 1024), 64), ((1024, 3000), 64), ((512, 768), 128)):
        w = torch.randn(shape, device="cuda", generator=g) * torch.logspace(-6, 3, shape[0], device="cuda")[:, None]
        w[:3] = 0
        w = w.bfloat16()
        storage = torch.bfloat16 if bs == 128 else torch.uint8  # cpt loads with bnb_4bit_quant_storage = the dtype
        q, st = bf.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=nested, quant_storage=storage)
        assert q.dtype == storage
        if nested:
            args = (st.absmax, st.state2.absmax, st.state2.code, st.offset, bs, st.state2.blocksize)
        else:
            args = (st.absmax, st.absmax.new_empty(0), st.absmax.new_empty(0), st.absmax.new_empty(0), bs, 0)
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            st.dtype = dt
            ref = bf.dequantize_4bit(q, st)
            for nb in (None, 512):
                got = nf4.dequantize_nf4(q, *args, shape, dt, bytes_per_program=nb)
                assert got.dtype == dt and got.shape == ref.shape
                assert torch.equal(got.view(torch.int8 if dt != torch.float32 else torch.int32),
                                   ref.view(torch.int8 if dt != torch.float32 else torch.int32)), (shape, bs, dt, nb)
    from cpt.kernels import lora

    # The 4-bit op's dequantization takes this kernel for NF4 on CUDA (and bitsandbytes' when it is off).
    assert lora._nf4 is nf4 and nf4.supported(q, "nf4", bs, st.absmax, torch.bfloat16)
    assert not nf4.supported(q, "fp4", bs, st.absmax, torch.bfloat16)
