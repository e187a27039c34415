"""The fused LoRA projections (cpt.speed.lora: cpt::lora_linear, lora_linear_4bit, the addmm epilogue)
give peft's outputs and gradients; recomputing 4-bit layers dequantize once in backward.

    python -m pytest tests/test_speed_lora.py -q
"""
from __future__ import annotations

import pytest
import torch
from speed_helpers import (PROJECTIONS, OpCalls, assert_bf16_close, batch, calls, graph_keeping_backend, lora_layers,
                           lora_over_4bit, lora_step, loss_and_grads, peft_model, rel, speed_for, tiny_4bit_lora_llama,
                           tiny_lora_llama)

from cpt.speed import decoder_layers, plain_causal_lm_loss
from cpt.speed.lora import fuse_lora_projections, skip_lora_input_upcast


def test_fused_lora_matches_peft(tiny_model_dir):
    """The fused LoRA forward (cpt::lora_linear for these bias-free Linear bases) gives peft's
    outputs and gradients: exactly (fp32) and within bf16 tolerance under autocast; dropout or
    disabled adapters fall back to peft's forward."""
    model = peft_model(tiny_model_dir)
    model.train()
    b = batch(model.config.vocab_size, seed=5)
    loss_ref, grads_ref = loss_and_grads(model, plain_causal_lm_loss, b, 45)
    fused, unfuse = fuse_lora_projections(model)
    assert len(fused) == 7 * model.config.num_hidden_layers
    loss, grads = loss_and_grads(model, plain_causal_lm_loss, b, 45)
    assert abs(loss.item() - loss_ref.item()) < 1e-5 * loss_ref.item()
    for n in grads:
        assert rel(grads[n], grads_ref[n]) < 1e-5, n
    # A LoRA-B change must show (the fused path really computes the adapter).
    lora = next(m for m in model.modules() if "_cpt_lora" in m.__dict__)
    x = torch.randn(5, lora.in_features)
    with torch.no_grad():
        before = lora(x)
        lora.lora_B["default"].weight.add_(0.5)
        assert not torch.allclose(lora(x), before)
        assert torch.allclose(lora(x), lora._cpt_lora.plain(x), atol=1e-5)
        with model.disable_adapter():
            assert torch.allclose(lora(x), lora.base_layer(x))
    unfuse()
    assert "_cpt_lora" not in lora.__dict__ and "forward" not in lora.__dict__

    # bf16 base with float32 LoRA under autocast (the GPU setting): the fused path is as close to
    # the float32 result as peft's own bf16 path is (bf16 noise on deep gradients is several %).
    model = peft_model(tiny_model_dir)
    model.train()
    _, grads_32 = loss_and_grads(model, plain_causal_lm_loss, b, 45)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.bfloat16()
    model.get_base_model().model.embed_tokens.register_forward_hook(lambda m, a, o: o.to(torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_peft, grads_peft = loss_and_grads(model, plain_causal_lm_loss, b, 45)
    fuse_lora_projections(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, plain_causal_lm_loss, b, 45)
    assert abs(loss.item() - loss_peft.item()) < 1e-2 * loss_peft.item()
    for n in grads:
        assert grads[n].dtype == torch.float32
        assert rel(grads[n], grads_32[n]) <= 1.3 * rel(grads_peft[n], grads_32[n]) + 2e-3, n


def test_lora_linear_op_matches_peft():
    """Every projection of a tiny Llama (plain bias-free Linear bases) runs cpt::lora_linear
    forward and cpt::lora_linear_backward backward, and gives peft's output and the gradients of
    the input and both LoRA matrices: to float32 rounding, and under CPU autocast (bf16 base,
    float32 LoRA masters) within bf16 rounding of peft's autocast result."""
    model = tiny_lora_llama()
    loras = lora_layers(model)
    assert len(loras) == 7 * 2
    g = torch.Generator().manual_seed(8)
    data = [(torch.randn(2, 5, m.in_features, generator=g), torch.randn(2, 5, m.out_features, generator=g)) for m in loras]
    ref = [lora_step(m, x, gy) for m, (x, gy) in zip(loras, data)]
    assert len(fuse_lora_projections(model)[0]) == 14
    with OpCalls() as seen:
        got = [lora_step(m, x, gy) for m, (x, gy) in zip(loras, data)]
    assert seen.calls == {"cpt.lora_linear.default": 14, "cpt.lora_linear_backward.default": 14}
    for m, r, o in zip(loras, ref, got):
        assert o[0].shape == r[0].shape == (2, 5, m.out_features)
        for what, u, v in zip(("out", "x", "A", "B"), o, r):
            assert rel(u, v) < 1e-6, (what, rel(u, v))

    # bf16 base, float32 LoRA masters, bf16 activations, under autocast (the GPU setting).
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.bfloat16()
    data16 = [(x.bfloat16(), gy.bfloat16()) for x, gy in data]
    fused = {}
    for m in loras:  # peft's own forward for the reference (its input upcast included)
        fused[m], m.forward = m.forward, m._cpt_lora.plain
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref16 = [lora_step(m, x, gy) for m, (x, gy) in zip(loras, data16)]
    for m in loras:
        m.forward = fused[m]
    with torch.autocast("cpu", dtype=torch.bfloat16), OpCalls() as seen:
        got16 = [lora_step(m, x, gy) for m, (x, gy) in zip(loras, data16)]
    assert seen.calls == {"cpt.lora_linear.default": 14, "cpt.lora_linear_backward.default": 14}
    for r, o, r32 in zip(ref16, got16, ref):
        assert o[0].dtype == o[1].dtype == torch.bfloat16 and o[2].dtype == o[3].dtype == torch.float32
        for what, u, v, v32 in zip(("out", "x", "A", "B"), o, r, r32):
            # As close to peft's bf16 result as bf16 rounding allows, and no farther from float32's.
            assert rel(u, v) < 1e-2, (what, rel(u, v))
            assert rel(u, v32) < 2 * rel(v, v32) + 1e-2, (what, rel(u, v32), rel(v, v32))

    # Without autocast, bf16 activations meet float32 LoRA weights: peft's forward, not the op.
    with torch.no_grad(), OpCalls() as seen:
        out = loras[0](data16[0][0])
    assert seen.calls == {} and out.dtype == torch.bfloat16


def test_lora_op_option_off_takes_the_addmm_epilogue(tiny_model_dir):
    """apply(..., lora_op=False) (bench/gpu_throughput.py --lora-addmm): the projections add the LoRA
    update in the base output's addmm epilogue instead of the custom op, with the same loss and
    gradients; another run of the same process takes the op again."""
    model = peft_model(tiny_model_dir)
    model.train()
    b = batch(model.config.vocab_size, seed=6)
    loss_ref, grads_ref = loss_and_grads(model, plain_causal_lm_loss, b, 45)
    speed = speed_for(model, kernels="cpt", lora_op=False)
    assert any("addmm epilogue" in a for a in speed.applied)
    with OpCalls() as seen:
        loss, grads = loss_and_grads(model, speed.loss_fn, b, 45)
    assert seen.calls == {}
    assert abs(loss.item() - loss_ref.item()) < 1e-5 * loss_ref.item()
    for n in grads_ref:
        assert rel(grads[n], grads_ref[n]) < 1e-4, n
    speed = speed_for(model, kernels="cpt")
    with OpCalls() as seen:
        loss_and_grads(model, speed.loss_fn, b, 45)
    assert seen.calls["cpt.lora_linear.default"] == 7 * model.config.num_hidden_layers


def test_lora_over_a_biased_base_keeps_the_addmm_path():
    """A base Linear with a bias (Qwen2's q/k/v, for one) is not the op's case: the fused forward
    there is still the addmm epilogue over the base output, with peft's result."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.Linear(10, 6, bias=False))
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "1"], init_lora_weights=False))
    loras = lora_layers(model)
    x, gy = torch.randn(3, 4, 12), torch.randn(3, 4, 10)
    ref = lora_step(loras[0], x, gy)
    assert len(fuse_lora_projections(model)[0]) == 2
    with OpCalls() as seen:
        got = lora_step(loras[0], x, gy)
        loras[1](torch.randn(3, 10))
    assert seen.calls == {"cpt.lora_linear.default": 1}  # only the bias-free one
    for u, v in zip(got, ref):
        assert rel(u, v) < 1e-6


@pytest.mark.parametrize("nested", [True, False])
def test_lora_linear_4bit_op_matches_peft(nested):
    """QLoRA projections (bitsandbytes NF4 bases, double quantization or not) run cpt::lora_linear_4bit
    and its backward op, with peft's output and gradients: float32 bases to float32 rounding, bf16
    bases under autocast (float32 LoRA masters) within bf16 rounding. A biased 4-bit base keeps
    peft's forward plus the addmm epilogue."""
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        model, loras = lora_over_4bit(dtype, nested)
        g = torch.Generator().manual_seed(3)
        data = [(torch.randn(3, 5, m.in_features, generator=g).to(dtype), torch.randn(3, 5, m.out_features, generator=g).to(dtype))
                for m in loras]

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                return [lora_step(m, x, gy) for m, (x, gy) in zip(loras, data)]

        ref = run()
        assert len(fuse_lora_projections(model)[0]) == 2
        with OpCalls() as seen:
            got = run()
        assert seen.calls == {"cpt.lora_linear_4bit.default": 2, "cpt.lora_linear_4bit_backward.default": 2}, dtype
        for r, o in zip(ref, got):
            assert o[0].dtype == r[0].dtype and o[1].dtype == r[1].dtype
            for what, u, v in zip(("out", "x", "A", "B"), o, r):
                assert rel(u, v) < tol, (dtype, what, rel(u, v))
        # The quantized weight gets no gradient and is not replaced.
        assert all(m.base_layer.weight.grad is None and m.base_layer.weight.dtype == dtype for m in loras)

    model, loras = lora_over_4bit(torch.float32, nested, bias=True)
    x, gy = torch.randn(3, 5, 128), torch.randn(3, 5, 192)
    ref = lora_step(loras[0], x, gy)
    fuse_lora_projections(model)
    with OpCalls() as seen:
        got = lora_step(loras[0], x, gy)
    assert seen.calls == {}
    assert all(rel(u, v) < 1e-6 for u, v in zip(got, ref))


def test_lora_linear_4bit_opcheck():
    """torch.library's checks of both 4-bit ops (schema, autograd registration, fake tensors, AOT
    dispatch), and the output against its definition over bitsandbytes' own dequantized weight."""
    _, loras = lora_over_4bit(torch.float32)
    from cpt.speed.lora import _4bit_args

    m = loras[0]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 128, generator=g, requires_grad=True)
    args4 = _4bit_args(m.base_layer, x, torch.float32, torch.empty(0))
    a = torch.randn(4, 128, generator=g, requires_grad=True)
    b = torch.randn(192, 4, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.cpt.lora_linear_4bit.default, (x, *args4, a, b, 0.5))
    gy = torch.randn(2, 3, 192, generator=g)
    torch.library.opcheck(torch.ops.cpt.lora_linear_4bit_backward.default, (gy, x.detach(), *args4, a.detach(), b.detach(), 0.5))
    import bitsandbytes.functional as bf

    wd = bf.dequantize_4bit(m.base_layer.weight, m.base_layer.weight.quant_state)
    out = torch.ops.cpt.lora_linear_4bit(x, *args4, a, b, 0.5)
    assert rel(out, x @ wd.t() + (x @ a.t()) @ b.t() * 0.5) < 1e-6


def test_lora_linear_opcheck():
    """torch.library's own checks of both ops (schema, autograd registration, fake tensors, AOT
    dispatch with dynamic shapes), and a float64 gradcheck of the forward op's x, A and B gradients
    (the frozen base weight gets none)."""
    import cpt.speed.lora  # noqa: F401  (registers the ops)

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


def test_lora_input_upcast_skipped_only_under_autocast(tiny_model_dir):
    """bf16 base + float32 LoRA: under autocast the skipped upcast changes nothing (same loss and
    gradients); outside autocast peft's upcast still happens (else the matmul would fail); undone,
    peft's upcast is back."""
    model = peft_model(tiny_model_dir, dtype=torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    b = batch(model.config.vocab_size, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref, grads_ref = loss_and_grads(model, plain_causal_lm_loss, b, 45)
    n, undo = skip_lora_input_upcast(model)
    assert n == 7 * model.config.num_hidden_layers
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, plain_causal_lm_loss, b, 45)
    assert loss.item() == loss_ref.item()
    for name in grads:
        assert torch.equal(grads[name], grads_ref[name]), name
    lora = next(m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled") and hasattr(m, "lora_A"))
    assert lora.cast_input_dtype_enabled is False
    with torch.no_grad():  # no autocast: a bf16 input meets the float32 LoRA weights through the upcast
        out = lora(torch.randn(3, lora.in_features, dtype=torch.bfloat16))
    assert lora.cast_input_dtype_enabled is True and out.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lora(torch.randn(3, lora.in_features, dtype=torch.bfloat16))
    assert lora.cast_input_dtype_enabled is False
    undo()
    assert lora.cast_input_dtype_enabled is True and not lora._forward_pre_hooks


def test_recomputing_4bit_layer_dequantizes_once_in_backward():
    """QLoRA layers that recompute in backward take the dequantized weight as an op output
    (cpt::dequantize_4bit, then cpt::lora_linear) instead of dequantizing inside cpt::lora_linear_4bit:
    the same loss and gradients, but backward dequantizes each weight once for both the recomputed
    forward and the gradient (eager: 14 dequantizations per step and layer instead of 21; compiled: 7
    in the backward graph, shared by the 6 reruns and the 7 gradient ops). Layers that keep their
    activations keep the one opaque op, so no dequantized weight waits for backward."""
    import torch._dynamo

    model = tiny_4bit_lora_llama()
    b = batch(97, seed=12)
    plan = dict(kernels="cpt", checkpointing="recompute", keep_layers=1)
    layers = decoder_layers(model)

    def flags():
        return [[m._cpt_lora.recomputed for m in l.modules() if "_cpt_lora" in m.__dict__] for l in layers]

    speed = speed_for(model, **plan, dequantize_once=False)  # (bench/gpu_throughput.py --no-dequant-reuse)
    assert speed.layers == {"keep": 1, "recompute": 1, "offload": 0, "host": 0, "compiled": 0}
    assert flags() == [[False] * 7, [False] * 7]
    with OpCalls() as seen:
        loss_ref, grads_ref = loss_and_grads(model, speed.loss_fn, b, 45)
    assert seen.calls == {"cpt.lora_linear_4bit.default": 21, "cpt.lora_linear_4bit_backward.default": 14}
    speed = speed_for(model, **plan)
    assert flags() == [[False] * 7, [True] * 7]
    assert "4-bit weights of recomputing layers dequantized once in backward (7 projections)" in speed.applied
    with OpCalls() as seen:
        loss, grads = loss_and_grads(model, speed.loss_fn, b, 45)
    assert seen.calls == {"cpt.lora_linear_4bit.default": 7, "cpt.lora_linear_4bit_backward.default": 7,
                          "cpt.dequantize_4bit.default": 14, "cpt.lora_linear.default": 14,
                          "cpt.lora_linear_backward.default": 7}
    assert abs(loss.item() - loss_ref.item()) < 1e-6 * loss_ref.item() and grads.keys() == grads_ref.keys()
    for n in grads:
        assert rel(grads[n], grads_ref[n]) < 1e-5, n
    speed = speed_for(model, **plan, dequantize_once_skip_lowest=1)  # (bench/gpu_throughput.py --reuse-skip-low)
    assert flags() == [[False] * 7, [False] * 7]

    backend, graphs = graph_keeping_backend()
    torch._dynamo.reset()
    try:
        speed = speed_for(model, **plan, compile=True, compile_backend=backend)
        assert speed.layers["compiled"] == 2 and "1 recompute inside the graph" in " ".join(speed.applied)
        loss, grads = loss_and_grads(model, speed.loss_fn, b, 45)
        assert speed.compile_failed is None
    finally:
        speed.close()
        torch._dynamo.reset()
    assert abs(loss.item() - loss_ref.item()) < 1e-5 * loss_ref.item()
    for n in grads:
        assert rel(grads[n], grads_ref[n]) < 1e-5, n
    ops = torch.ops.cpt
    kinds = [ops.dequantize_4bit.default, ops.lora_linear.default, ops.lora_linear_backward.default,
             ops.lora_linear_4bit.default, ops.lora_linear_4bit_backward.default]
    count = lambda gms: sorted(tuple(len(calls(gm, op)) for op in kinds) for gm in gms)  # noqa: E731
    # keeping layer: 7 opaque 4-bit ops each way; recomputing layer: 7 dequantizations in each graph
    assert count(graphs["forward"]) == [(0, 0, 0, 7, 0), (7, 7, 0, 0, 0)]
    assert count(graphs["backward"]) == [(0, 0, 0, 0, 7), (7, 6, 7, 0, 0)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with bitsandbytes (run on the device)")
def test_cuda_4bit_lora_op_matches_peft_eager_and_compiled(tiny_model_dir):
    """A QLoRA model on the GPU (NF4, double quantization, bf16 compute, float32 LoRA): the 4-bit op
    (eager, then in compiled layers of which one recomputes) stays as close to a float32 computation
    over the same 4-bit weights as peft's own bf16 path is. 2048 tokens per batch, as in training:
    below 1536 rows bitsandbytes' forward takes its fused small-batch kernel, which rounds otherwise."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from cpt.speed import graphs_recorded

    torch.manual_seed(0)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": 0})
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, use_rslora=True, init_lora_weights=False,
                                             target_modules=PROJECTIONS))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.train()
    b = {k: v.cuda() for k, v in batch(model.config.vocab_size, seed=5, b=8, t=256).items()}
    n_items = 8 * 255 - 3

    def speed(**kw):
        return speed_for(model, "cuda", checkpointing="recompute", **kw)

    # Reference: the same 4-bit weights, everything else in float32, no autocast, peft's own path.
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    plain16 = [p for p in model.parameters() if p.dtype == torch.bfloat16 and not isinstance(p, bnb.nn.Params4bit)]
    for m in quantized:
        m.compute_dtype = torch.float32
    for p in plain16:
        p.data = p.data.float()
    _, grads_32 = loss_and_grads(model, speed(kernels="none").loss_fn, b, n_items)
    for m in quantized:
        m.compute_dtype = torch.bfloat16
    for p in plain16:
        p.data = p.data.bfloat16()

    def run(loss_fn):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return loss_and_grads(model, loss_fn, b, n_items)

    loss_ref, grads_ref = run(speed(kernels="none").loss_fn)
    assert len(grads_ref) == len(grads_32) == 7 * 2 * model.config.num_hidden_layers
    eager = speed(kernels="cpt")
    # Converting the model put the NF4 table on the GPU (never inside a step) for every 4-bit projection.
    states = [m._cpt_lora for m in lora_layers(model)]
    assert all(s.is_4bit and s.code.numel() == 16 and s.code.device == torch.device("cuda", torch.cuda.current_device())
               for s in states)
    with OpCalls() as seen:
        got = [run(eager.loss_fn)]
    # Both layers recompute (eager checkpointing): each projection is the dequantization op and the
    # LoRA op; in backward the dequantization and the forward op rerun, and the gradient op runs once.
    assert seen.calls == {"cpt.dequantize_4bit.default": 28, "cpt.lora_linear.default": 28,
                          "cpt.lora_linear_backward.default": 14}
    compiled = speed(kernels="cpt", keep_layers=1, compile=True)
    got += [run(compiled.loss_fn) for _ in range(2)]
    assert compiled.compile_failed is None, compiled.compile_failed
    # The same compiled layers replayed as CUDA graphs (recorded in the second step). Compiling must not
    # have failed (it falls back to the plain layers, silently but for a warning).
    graphed = speed(kernels="cpt", keep_layers=1, compile=True, cuda_graphs=True)
    assert graphed.graphs
    for _ in range(3):
        graphed.before_micro_batch()
        got.append(run(graphed.loss_fn))
    assert graphed.compile_failed is None, graphed.compile_failed
    assert graphs_recorded() > 0
    graphed.close()
    for loss, grads in got:
        assert_bf16_close(loss, grads, loss_ref, grads_ref, grads_32)
