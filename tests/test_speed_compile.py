"""Regional compile of the decoder layers (cpt.speed.compile) gives the eager loss and gradients, traces
whole, shares one graph between layers, recomputes only what backward needs, and survives a failing
compiler, whose failure stays with its run. (aot_eager on CPU: dynamo's and autograd's graphs without
inductor's code generation; inductor and CUDA graphs on a GPU.)

    python -m pytest tests/test_speed_compile.py -q
"""
from __future__ import annotations

import pytest
import torch
from speed_helpers import (assert_bf16_close, batch, calls, cuda_lora_llama, dynamo_counts, graph_keeping_backend,
                           loss_and_grads, rel, saved_bytes, speed_for, tiny_lora_llama, to_bf16_base)

from cpt.speed import decoder_layers


def test_compiled_layers_match_eager():
    """Regional compile gives the eager loss and gradients, for a layer that keeps and layers that
    recompute (and they still recompute); traces without graph breaks; shares one graph between
    layers of the same kind; and leaves no-grad forwards (evaluation, generation) to the plain layers.
    Closing the run puts the class's forward and transformers' checkpointing switch back."""
    import torch._dynamo

    from cpt.speed.lora import skip_lora_input_upcast

    model = tiny_lora_llama(layers=3)
    b = batch(97, seed=6)
    plan = dict(kernels="cpt", checkpointing="recompute")  # the fused LoRA forward, traced too
    saved_keep = saved_bytes(model, speed_for(model, **plan, keep_layers=3).loss_fn, b, 45)[2]
    eager = speed_for(model, **plan, keep_layers=1)  # layer 0 keeps its activations, layers 1 and 2 recompute
    loss_ref, grads_ref, saved_ref = saved_bytes(model, eager.loss_fn, b, 45)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    speed = speed_for(model, **plan, keep_layers=1, compile=True, compile_backend="aot_eager")
    _, undo_hook = skip_lora_input_upcast(model)  # its pre-hook (CUDA's setting) must not break the graph
    layers = decoder_layers(model)
    try:
        assert speed.layers == {"keep": 1, "recompute": 2, "offload": 0, "host": 0, "compiled": 3}
        assert "decoder layers compiled (3 of 3, 2 recompute inside the graph)" in speed.applied
        assert all("forward" in l.__dict__ and not l.gradient_checkpointing for l in layers)  # recompute in the graph
        for _ in range(2):  # the second step reuses the graphs
            loss, grads, saved = saved_bytes(model, speed.loss_fn, b, 45)
            assert abs(loss.item() - loss_ref.item()) < 1e-5 * loss_ref.item()
            assert grads.keys() == grads_ref.keys()
            for n in grads:
                assert rel(grads[n], grads_ref[n]) < 1e-5, n
            # The recomputing layers still recompute: the compiled step saves about what eager saves (a
            # little more: it holds layer inputs as saved tensors, eager in the checkpoint's closure).
            assert saved <= 1.25 * saved_ref < saved_keep, (saved, saved_ref, saved_keep)
        assert dynamo_counts() == {"graphs": 2, "breaks": 0}
        with torch.no_grad():
            model(input_ids=b["input_ids"])
        assert dynamo_counts()["graphs"] == 2
        assert speed.compile_failed is None and speed.summary() == {"speed": speed.applied}
    finally:
        undo_hook()
        speed.close()
        torch._dynamo.reset()
    # Undone: the class's forward and transformers' switch (enabled on every layer) come back.
    assert all("forward" not in l.__dict__ and l.gradient_checkpointing for l in layers)
    assert not any("_cpt_lora" in m.__dict__ or "forward" in m.__dict__ for m in model.modules())


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

    backend, graphs = graph_keeping_backend()
    torch._dynamo.reset()
    model = tiny_lora_llama()
    b = batch(97, seed=10)
    plan = dict(kernels="cpt", checkpointing="recompute", keep_layers=1)  # layer 0 keeps, layer 1 recomputes

    def step(loss_fn):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return loss_and_grads(model, loss_fn, b, 45)

    loss_ref, grads_ref = step(speed_for(model, **plan).loss_fn)
    breaks = dynamo_counts()["breaks"]  # (dynamo's counters outlive its reset)
    speed = speed_for(model, **plan, compile=True, compile_backend=backend)
    try:
        assert speed.layers["compiled"] == 2 and "1 recompute inside the graph" in " ".join(speed.applied)
        loss, grads = step(speed.loss_fn)
        assert abs(loss.item() - loss_ref.item()) < 1e-5 * loss_ref.item()
        assert grads.keys() == grads_ref.keys()
        for n in grads:
            assert rel(grads[n], grads_ref[n]) < (1e-3 if autocast else 1e-5), n
        assert dynamo_counts()["breaks"] == breaks and speed.compile_failed is None
    finally:
        speed.close()
        torch._dynamo.reset()
    fw, bw = torch.ops.cpt.lora_linear.default, torch.ops.cpt.lora_linear_backward.default
    assert [len(calls(gm, fw)) for gm in graphs["forward"]] == [7, 7]
    assert sorted(len(calls(gm, bw)) for gm in graphs["backward"]) == [7, 7]
    reruns = sorted((calls(gm, fw) for gm in graphs["backward"]), key=len)
    assert [len(r) for r in reruns] == [0, 6]
    # Which ones, by base weight shape (out, in): down_proj's (32, 64) is the one missing.
    shapes = sorted(tuple(n.args[1].meta["val"].shape) for n in reruns[1])
    assert shapes == [(16, 32), (16, 32), (32, 32), (32, 32), (64, 32), (64, 32)]


def _plain_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def test_a_failing_compiler_leaves_the_plain_layers_training(caplog):
    """model.compile is on by default on CUDA: a machine whose compiler fails (no C compiler, no
    Triton, an op it cannot handle) must still train, with a warning, recomputing as planned; the
    run's summary names the failure."""
    import logging

    import torch._dynamo

    def broken(gm, example_inputs):
        raise RuntimeError("no C compiler on this machine")

    model = _plain_llama()
    b = batch(97, seed=7)
    plan = dict(kernels="cpt", checkpointing="recompute", keep_layers=1)  # layer 0 keeps, layer 1 recomputes
    loss_ref, grads_ref, saved_ref = saved_bytes(model, speed_for(model, **plan).loss_fn, b, 45)
    torch._dynamo.reset()
    speed = speed_for(model, **plan, compile=True, compile_backend=broken)
    try:
        assert speed.layers["compiled"] == 2
        with caplog.at_level(logging.WARNING, logger="cpt"):
            loss, grads, saved = saved_bytes(model, speed.loss_fn, b, 45)
        assert "compiling the decoder layers failed" in caplog.text and "no C compiler" in caplog.text
        assert abs(loss.item() - loss_ref.item()) < 1e-6 * loss_ref.item()
        for n in grads_ref:
            assert rel(grads[n], grads_ref[n]) < 1e-6, n
        assert saved <= 1.25 * saved_ref  # layer 1 still recomputes
        layers = decoder_layers(model)
        assert [l.gradient_checkpointing for l in layers] == [False, True]
        assert all("forward" not in l.__dict__ for l in layers)  # plain layers from now on
        loss2, _, _ = saved_bytes(model, speed.loss_fn, b, 45)
        assert abs(loss2.item() - loss_ref.item()) < 1e-6 * loss_ref.item()
        summary = speed.summary()
        assert summary["speed"] == speed.applied and "no C compiler on this machine" in summary["compile_failed"]
    finally:
        speed.close()
        torch._dynamo.reset()


def test_a_compile_failure_stays_with_its_run():
    """One run's failed compile must not make the next run's layers eager (a later test's, or the
    second run of a process): a fresh Speed compiles again, and a failing one fails on its own."""
    import torch._dynamo

    def broken(gm, example_inputs):
        raise RuntimeError("no C compiler on this machine")

    model = _plain_llama()
    b = batch(97, seed=8)
    plan = dict(kernels="cpt", checkpointing="recompute", keep_layers=1, compile=True)
    torch._dynamo.reset()
    try:
        failed = speed_for(model, **plan, compile_backend=broken)
        loss_ref, _ = loss_and_grads(model, failed.loss_fn, b, 45)
        assert failed.compile_failed is not None
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        fresh = speed_for(model, **plan, compile_backend="aot_eager")
        assert failed.compile_failed is not None  # (the closed run keeps its record)
        loss, _ = loss_and_grads(model, fresh.loss_fn, b, 45)
        assert fresh.compile_failed is None and "compile_failed" not in fresh.summary()
        assert dynamo_counts()["graphs"] == 2 and all("forward" in l.__dict__ for l in decoder_layers(model))
        assert abs(loss.item() - loss_ref.item()) < 1e-5 * loss_ref.item()
        torch._dynamo.reset()
        again = speed_for(model, **plan, compile_backend=broken)
        loss_and_grads(model, again.loss_fn, b, 45)
        assert again.compile_failed == failed.compile_failed and fresh.compile_failed is None
        again.close()
    finally:
        torch._dynamo.reset()


def test_compiled_recompute_marks_every_op_must_recompute(monkeypatch):
    """Under torch.compile a plain checkpoint only lets the partitioner prefer recomputation, and it
    saves the outputs of ops it will not recompute (bitsandbytes' 4-bit GEMM: +9 GiB on an 8B model,
    docs/performance.md). The compiled step must hand checkpoint a policy that recomputes every op."""
    from torch.utils.checkpoint import CheckpointPolicy

    from cpt.speed import compile as compiled

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


def test_host_layers_save_only_the_expanding_projections():
    """A host layer's policy saves the outputs of cpt's LoRA projections with more outputs than inputs
    (gate, up; plain and 4-bit ops, read from each op's own arguments) and recomputes everything else."""
    from torch.utils.checkpoint import CheckpointPolicy

    from cpt.speed import compile as compiled

    x = torch.zeros(2, 8)
    op, op4 = torch.ops.cpt.lora_linear.default, torch.ops.cpt.lora_linear_4bit.default
    save = lambda op, *args: compiled._save_if_expanding(None, op, *args)  # noqa: E731
    assert save(op, x, torch.zeros(16, 8), None, None, 1.0) == CheckpointPolicy.MUST_SAVE
    assert save(op, x, torch.zeros(8, 8), None, None, 1.0) == CheckpointPolicy.MUST_RECOMPUTE
    args4 = (x, None, None, None, None, None, None, 64, 256, "nf4")
    assert save(op4, *args4, 16, None, None, 1.0) == CheckpointPolicy.MUST_SAVE
    assert save(op4, *args4, 4, None, None, 1.0) == CheckpointPolicy.MUST_RECOMPUTE
    assert save(torch.ops.aten.mm.default, x, x.t()) == CheckpointPolicy.MUST_RECOMPUTE


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
def test_cuda_compiled_layers_match_eager_bf16():
    """On the GPU, with inductor: compiled layers (recompute inside the graph, norms/RoPE/SwiGLU
    generated instead of liger's) give the eager path's loss and gradients within bf16 tolerance,
    against the same float32 reference; and they really ran compiled. (The eager path puts liger's
    RMSNorm/SwiGLU on its model's modules to stay, which dynamo cannot trace, so the compiled run takes
    a fresh copy of the model. On one model this test could pass with its compile failing and the
    layers falling back to eager.)"""
    import torch._dynamo

    torch._dynamo.reset()
    plan = dict(kernels="cpt", checkpointing="recompute", keep_layers=1)  # one layer keeps, one recomputes

    def model_in_bf16(grads: bool = False):
        model, b = cuda_lora_llama()
        plain = dict(plan, kernels="none")
        grads_32 = loss_and_grads(model, speed_for(model, "cuda", **plain).loss_fn, b, 2 * 255)[1] if grads else None
        to_bf16_base(model)
        return model, b, grads_32

    def run(model, b, loss_fn):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return loss_and_grads(model, loss_fn, b, 2 * 255)

    model, b, grads_32 = model_in_bf16(grads=True)
    loss_ref, grads_ref = run(model, b, speed_for(model, "cuda", **plan).loss_fn)
    model, b, _ = model_in_bf16()  # the same seeded weights, without liger's modules
    speed = speed_for(model, "cuda", **plan, compile=True)
    assert any("compiled" in k for k in speed.applied)
    assert not any("liger" in k for k in speed.applied)
    try:
        for _ in range(2):
            loss, grads = run(model, b, speed.loss_fn)
            assert_bf16_close(loss, grads, loss_ref, grads_ref, grads_32)
        assert speed.compile_failed is None, speed.compile_failed
    finally:
        speed.close()
