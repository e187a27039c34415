"""The fused head (cpt.speed.loss, liger) gives the plain path's loss and gradients, follows peft's
adapters, and leaves models it cannot handle on the plain loss (CPU here; the CUDA test runs on a GPU).

    python -m pytest tests/test_speed_loss.py -q
"""
from __future__ import annotations

import pytest
import torch
from speed_helpers import assert_bf16_close, batch, cuda_lora_llama, loss_and_grads, peft_model, rel, speed_for, to_bf16_base

from cpt.plan.run_plan import RunPlan
from cpt.speed import apply, output_head, plain_causal_lm_loss


def test_patched_peft_model_matches_plain(tiny_model_dir):
    model = peft_model(tiny_model_dir)
    model.train()
    b = batch(model.config.vocab_size)
    num_items = 40
    loss_ref, grads_ref = loss_and_grads(model, speed_for(model, kernels="none").loss_fn, b, num_items)
    speed = speed_for(model, kernels="cpt")
    loss, grads = loss_and_grads(model, speed.loss_fn, b, num_items)
    assert "cpt chunked linear cross-entropy" in speed.applied
    assert abs(loss.item() - loss_ref.item()) < 1e-5 * loss_ref.item()
    assert grads.keys() == grads_ref.keys()
    # The gradient reaches the trained copy of lm_head, and every trained tensor matches.
    assert any("lm_head.modules_to_save" in n for n in grads)
    assert not any("original_module" in n for n in grads)
    for n in grads:
        assert rel(grads[n], grads_ref[n]) < 1e-4, n
    # Without labels, or without gradients, the model still returns logits (generation, eval).
    with torch.no_grad():
        out = model(input_ids=b["input_ids"], labels=b["labels"])
    assert out.logits is not None and abs(out.loss.item() - model(**{k: b[k] for k in ("input_ids", "labels")}).loss.item()) < 1e-4
    # Applying the plain plan closes the fused one: the causal LM's own forward is back.
    speed_for(model, kernels="none")
    assert "forward" not in model.get_base_model().__dict__
    assert loss_and_grads(model, plain_causal_lm_loss, b, num_items)[0].item() == pytest.approx(loss_ref.item(), rel=1e-6)


def test_fused_head_follows_disabled_adapters(tiny_model_dir):
    model = peft_model(tiny_model_dir)
    speed_for(model, kernels="cpt")
    lm = model.get_base_model()
    assert output_head(lm) is lm.lm_head.modules_to_save["default"]
    with model.disable_adapter():
        assert output_head(lm) is lm.lm_head.original_module


def test_apply_rejects_unknown_kernels_and_liger_on_cpu(tiny_model_dir):
    model = peft_model(tiny_model_dir)
    with pytest.raises(ValueError, match="kernels"):
        apply(model, RunPlan(kernels="fast"))
    with pytest.raises(ValueError, match="CUDA"):
        apply(model, RunPlan(kernels="liger"))
    assert "forward" not in model.get_base_model().__dict__


def test_plain_kernels_apply_nothing(tiny_model_dir):
    model = peft_model(tiny_model_dir)
    speed = speed_for(model, kernels="none")
    assert speed.applied == [] and speed.loss_fn is plain_causal_lm_loss
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_a_model_the_fused_head_cannot_compute_keeps_the_plain_loss(tiny_model_dir):
    """Logit soft-capping (Gemma 2's) sits between lm_head and the loss: the fused head would compute
    another function, so the loss stays plain and `applied` says why; the LoRA projections still fuse."""
    model = peft_model(tiny_model_dir)
    model.train()
    b = batch(model.config.vocab_size, seed=4)
    loss_ref, _ = loss_and_grads(model, plain_causal_lm_loss, b, 40)
    model.get_base_model().config.final_logit_softcapping = 30.0
    speed = speed_for(model, kernels="cpt")
    assert any(a.startswith("plain loss") and "'llama'" in a for a in speed.applied), speed.applied
    assert not any("cross-entropy" in a for a in speed.applied)
    assert any("LoRA update fused" in a for a in speed.applied)
    assert "forward" not in model.get_base_model().__dict__
    model.get_base_model().config.final_logit_softcapping = None
    assert loss_and_grads(model, speed.loss_fn, b, 40)[0].item() == pytest.approx(loss_ref.item(), rel=1e-5)


def test_liger_elementwise_stays_on_its_own_model(monkeypatch):
    """liger patches classes and the RoPE function in transformers' modeling module; cpt keeps only what
    it did to the given model's modules and puts the module's names back, so a later model of the same
    process (a CPU one, say) is plain transformers. Run with a stand-in for liger (not installed here)."""
    import sys
    import types

    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    from cpt.speed import liger

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
    liger.patch_elementwise(first)
    assert liger.has_elementwise(first)
    assert calls == [{"rope": False, "rms_norm": True, "swiglu": True, "cross_entropy": False, "fused_linear_cross_entropy": False}]
    assert modeling_llama.LlamaRMSNorm is plain_norm and modeling_llama.apply_rotary_pos_emb is plain_rope
    x = torch.ones(3)
    assert torch.equal(first.model.layers[0].input_layernorm(x), 2 * x)  # the model keeps its own patch
    second = LlamaForCausalLM(cfg)
    assert type(second.model.layers[0].input_layernorm) is plain_norm and not liger.has_elementwise(second)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
@pytest.mark.parametrize("kernels", ["cpt", "liger"])
def test_cuda_fused_paths_match_plain_bf16(kernels):
    """On the GPU: in float32 the fused paths (our loss and LoRA epilogue, or liger's loss; liger's
    RMSNorm/SwiGLU) give the plain path's loss and gradients to rounding; in bf16 with float32
    trained copies they stay within bf16 tolerance of the float32 result."""
    if kernels == "liger":
        pytest.importorskip("liger_kernel")
    model, b = cuda_lora_llama(checkpointing=False)

    def speed(k):
        return speed_for(model, "cuda", kernels=k, frozen_originals_on_host=k != "none")

    loss_32, grads_32 = loss_and_grads(model, speed("none").loss_fn, b, 2 * 255)
    # All float32: the fused paths compute the same function as the plain one, to rounding.
    loss_f32, grads_f32 = loss_and_grads(model, speed(kernels).loss_fn, b, 2 * 255)
    assert abs(loss_f32.item() - loss_32.item()) < 1e-5 * loss_32.item()
    for n in grads_32:
        assert rel(grads_f32[n], grads_32[n]) < 1e-3, (n, rel(grads_f32[n], grads_32[n]))
    to_bf16_base(model)

    def run(loss_fn):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return loss_and_grads(model, loss_fn, b, 2 * 255)

    loss_ref, grads_ref = run(speed("none").loss_fn)
    head = model.get_base_model().lm_head
    assert head.original_module.weight.device.type == "cuda"  # closing the fused run put it back
    fused = speed(kernels)
    loss, grads = run(fused.loss_fn)
    assert any("liger" in k for k in fused.applied) or kernels == "cpt"
    assert any("frozen embedding originals in host memory" in k for k in fused.applied)
    assert_bf16_close(loss, grads, loss_ref, grads_ref, grads_32)
    # The frozen originals went to host memory and still serve a disabled-adapter forward.
    assert head.original_module.weight.device.type == "cpu"
    with torch.no_grad(), model.disable_adapter(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert model(input_ids=b["input_ids"]).logits.shape == (2, 256, 32000)
    assert head.original_module.weight.device.type == "cpu"
    fused.close()
    assert head.original_module.weight.device.type == "cuda"
