"""Host layers (cpt.speed.host_activations): a recomputing, compiled layer that saves its MLP's gate and
up outputs in host memory instead of rerunning them, with eager's loss and gradients.

    python -m pytest tests/test_speed_host_activations.py -q
"""
from __future__ import annotations

import pytest
import torch
from speed_helpers import (assert_bf16_close, batch, calls, cuda_lora_llama, graph_keeping_backend, loss_and_grads, rel,
                           speed_for, tiny_lora_llama, to_bf16_base)

from cpt.plan.rules import HOST_LEAD, host_layer_indices
from cpt.speed import decoder_layers, graphs_recorded


@pytest.mark.parametrize("autocast", [False, True])
def test_host_activations_layer_saves_gate_and_up_in_host_memory(autocast):
    """A recomputing layer chosen as a host layer saves the outputs of its expanding projections (gate,
    up) instead of rerunning them, and those saved tensors leave for host memory and come back for
    backward; everything else recomputes as before. The loss and gradients stay eager's. Counted in the
    compiled graphs: the host layer's backward reruns 4 of its 7 projections (q, k, v, o), a plain
    recomputing layer 6, a keeping layer none."""
    import torch._dynamo

    backend, graphs = graph_keeping_backend()
    torch._dynamo.reset()
    model = tiny_lora_llama(layers=6)
    b = batch(97, seed=11)
    # Layer 0 keeps, 1-5 recompute; one of those becomes a host layer (never the top HOST_LEAD layers
    # or the bottom HOST_LEAD + 1).
    hosts = tuple(host_layer_indices(list(range(1, 6)), 6, 1))
    assert len(hosts) == 1 and HOST_LEAD < hosts[0] < 6 - HOST_LEAD
    plan = dict(kernels="cpt", checkpointing="recompute", keep_layers=1, host_layers=hosts)

    def step(loss_fn):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return loss_and_grads(model, loss_fn, b, 45)

    eager = speed_for(model, **plan)  # uncompiled, the host layer just recomputes
    assert eager.hosts == [] and eager.layers["host"] == 0
    loss_ref, grads_ref = step(eager.loss_fn)
    speed = speed_for(model, **plan, compile=True, compile_backend=backend, host_min_bytes=0)  # toy tensors count
    try:
        assert speed.layers == {"keep": 1, "recompute": 5, "offload": 0, "host": 1, "compiled": 6}
        assert "1 with MLP activations in host memory" in " ".join(speed.applied)
        (host,) = speed.hosts
        assert host.index == hosts[0]
        for i in range(2):  # the second step reuses the host buffers
            loss, grads = step(speed.loss_fn)
            assert abs(loss.item() - loss_ref.item()) < 1e-5 * loss_ref.item()
            assert grads.keys() == grads_ref.keys()
            for n in grads:
                assert rel(grads[n], grads_ref[n]) < (1e-3 if autocast else 1e-5), n
            # gate's and up's outputs at least (the layer input, an input, never moves)
            assert host.count >= 2 and len(host.buffers) == host.count
            ptrs = [t.data_ptr() for t in host.buffers]
            if i == 0:
                first = ptrs
        assert ptrs == first  # reused, not reallocated
    finally:
        speed.close()
        torch._dynamo.reset()
    assert host.buffers == []  # released with the run
    fw, bw = torch.ops.cpt.lora_linear.default, torch.ops.cpt.lora_linear_backward.default
    # Three kinds of layer: keep, recompute, host.
    assert len(graphs["forward"]) == 3 and len(graphs["backward"]) == 3
    assert sorted(len(calls(gm, bw)) for gm in graphs["backward"]) == [7, 7, 7]
    reruns = sorted((calls(gm, fw) for gm in graphs["backward"]), key=len)
    assert [len(r) for r in reruns] == [0, 4, 6]
    shapes = sorted(tuple(n.args[1].meta["val"].shape) for n in reruns[1])
    assert shapes == [(16, 32), (16, 32), (32, 32), (32, 32)]  # q, k, v, o: not gate/up (64, 32)


def test_host_layer_that_stashes_nothing_warns_once(caplog):
    """A host layer whose saved tensors never reach the hooks (all under host_min_bytes here; under
    liger's SwiGLU on CUDA) would keep its gate and up outputs on the GPU: it says so, once. With
    liger's elementwise kernels in the model there are no host layers: the chosen layer just recomputes."""
    import logging

    import torch._dynamo

    from cpt.speed import causal_lm, liger

    torch._dynamo.reset()
    model = tiny_lora_llama(layers=4)
    plan = dict(kernels="cpt", checkpointing="recompute", host_layers=tuple(host_layer_indices(list(range(4)), 4, 1)),
                compile=True, compile_backend="aot_eager")
    assert len(plan["host_layers"]) == 1
    caplog.set_level(logging.WARNING, logger="cpt")
    speed = speed_for(model, **plan, host_min_bytes=1 << 40)
    try:
        assert speed.layers["host"] == 1
        for _ in range(2):
            loss_and_grads(model, speed.loss_fn, batch(97, seed=3), 40)
        assert caplog.text.count("saved nothing to host memory") == 1
        setattr(causal_lm(model), liger.ELEMENTWISE, True)  # as liger.patch_elementwise leaves a model
        speed = speed_for(model, **plan)
        assert speed.layers["host"] == 0 and speed.layers["recompute"] == 4 and speed.hosts == []
    finally:
        causal_lm(model).__dict__.pop(liger.ELEMENTWISE, None)
        speed.close()
        torch._dynamo.reset()


def test_host_layer_survives_two_forward_passes_before_backward():
    """The loop runs forward then backward; a caller may run two forward passes first (two losses
    summed). The second must not overwrite the first one's tensors in the host buffers."""
    import torch._dynamo

    torch._dynamo.reset()
    model = tiny_lora_llama(layers=4)
    plan = dict(kernels="cpt", checkpointing="recompute", host_layers=tuple(host_layer_indices(list(range(4)), 4, 1)))
    a, b = batch(97, seed=4), batch(97, seed=5)

    def two_losses(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model, a, 40) + loss_fn(model, b, 40)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_ref, grads_ref = two_losses(speed_for(model, **plan).loss_fn)
    speed = speed_for(model, **plan, compile=True, compile_backend="aot_eager", host_min_bytes=0)
    try:
        assert speed.layers["host"] == 1
        for _ in range(2):
            loss, grads = two_losses(speed.loss_fn)
            assert abs(loss.item() - loss_ref.item()) < 1e-5 * loss_ref.item()
            for n in grads_ref:
                assert rel(grads[n], grads_ref[n]) < 1e-5, n
            assert speed.hosts[0].count >= 2
    finally:
        speed.close()
        torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")
def test_cuda_host_activations_match_plain_bf16():
    """On the GPU, with inductor and CUDA graphs for the other layers: host layers (gate/up outputs
    copied to pinned memory on a side stream, fetched back one layer ahead, replayed without CUDA
    graphs) give the loss and gradients of the same compiled layers without host layers, within bf16
    tolerance of the float32 result, over five steps (graphs record in the second); no graph records
    again after that, every saved tensor comes back through the fetch ahead, and the buffers are
    pinned and reused."""
    import torch._dynamo

    # Earlier compiled tests of the same process may have used up dynamo's recompilations of the
    # layer step (it then runs eagerly, and nothing is stashed).
    torch._dynamo.reset()
    # 2 x 1024 tokens: gate/up outputs of 5.8 MB each, over host_min_bytes.
    model, b = cuda_lora_llama(layers=8, intermediate=1408, seq=1024)
    hosts = tuple(host_layer_indices(list(range(1, 8)), 8, 3))
    assert len(hosts) == 3  # layer 0 keeps, 1-7 recompute, 3 of them host layers
    plan = dict(kernels="cpt", checkpointing="recompute", keep_layers=1)
    n = 2 * 1023
    _, grads_32 = loss_and_grads(model, speed_for(model, "cuda", **dict(plan, kernels="none")).loss_fn, b, n)
    to_bf16_base(model)

    def run(speed):
        speed.before_micro_batch()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return loss_and_grads(model, speed.loss_fn, b, n)

    # The reference: the same compiled layers without host layers. (Not the eager path: its liger
    # RMSNorm/SwiGLU patches would stay, and host layers are off under them.)
    ref = speed_for(model, "cuda", **plan, compile=True)
    loss_ref, grads_ref = run(ref)
    assert ref.compile_failed is None, ref.compile_failed
    speed = speed_for(model, "cuda", **plan, compile=True, cuda_graphs=True, host_layers=hosts)
    applied = " ".join(speed.applied)
    assert "compiled (8 of 8" in applied and "CUDA graphs" in applied and speed.layers["host"] == 3
    try:
        for step in range(5):
            loss, grads = run(speed)
            assert_bf16_close(loss, grads, loss_ref, grads_ref, grads_32)
            assert all(h.count >= 2 for h in speed.hosts), ([h.count for h in speed.hosts], speed.compile_failed)
            if step == 0:
                ptrs = [t.data_ptr() for h in speed.hosts for t in h.buffers]
            if step == 2:
                recorded = graphs_recorded()
                assert recorded > 0
        assert graphs_recorded() == recorded  # steps 4 and 5 replayed what steps 2 and 3 recorded
        assert all(h.late == 0 for h in speed.hosts), [h.late for h in speed.hosts]
        assert all(t.is_pinned() for h in speed.hosts for t in h.buffers)
        assert [t.data_ptr() for h in speed.hosts for t in h.buffers] == ptrs
        assert speed.compile_failed is None
    finally:
        speed.close()
    assert not any("forward" in l.__dict__ for l in decoder_layers(model))
