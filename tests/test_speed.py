"""The speed stage's seam (cpt.speed.apply and the Speed it returns): a plan is applied once, applying
again or closing puts the model back, and the loop's hooks act only where CUDA graphs are in use.

    python -m pytest tests/test_speed.py -q
"""
from __future__ import annotations

import torch
from speed_helpers import batch, loss_and_grads, peft_model, rel, speed_for, tiny_lora_llama

from cpt.plan.run_plan import RunPlan
from cpt.speed import Speed, apply, causal_lm, decoder_layers, plain_causal_lm_loss


def _patched(model) -> list[str]:
    """What of the model carries a speed conversion: instance forwards, fused LoRA state, the run."""
    out = [n for n, m in model.named_modules() if "forward" in m.__dict__ or "_cpt_lora" in m.__dict__]
    return out + (["speed"] if "_cpt_speed" in causal_lm(model).__dict__ else [])


def test_apply_again_closes_the_earlier_run_and_close_puts_the_model_back():
    """A second apply on the same model first undoes the first (fused LoRA, fused loss, compiled and
    offloaded layers, checkpointing switches); closing the last leaves the model as it was, with the
    plain loss and gradients."""
    model = tiny_lora_llama(layers=3)
    b = batch(97, seed=2)
    gc_before = [l.gradient_checkpointing for l in decoder_layers(model)]
    loss_ref, grads_ref = loss_and_grads(model, plain_causal_lm_loss, b, 45)
    assert _patched(model) == []
    first = speed_for(model, kernels="cpt", checkpointing="offload", keep_layers=1, compile=True, compile_backend="eager")
    assert first.layers == {"keep": 1, "recompute": 0, "offload": 2, "host": 0, "compiled": 1}
    assert "speed" in _patched(model) and len(_patched(model)) > 7
    second = speed_for(model, kernels="cpt", checkpointing="recompute", keep_layers=2)
    assert first._closed and not second._closed
    assert [l.gradient_checkpointing for l in decoder_layers(model)] == [False, False, True]
    assert not any("forward" in l.__dict__ for l in decoder_layers(model))  # nothing compiled or offloaded now
    loss, grads = loss_and_grads(model, second.loss_fn, b, 45)
    assert abs(loss.item() - loss_ref.item()) < 1e-5 * loss_ref.item()
    second.close()
    second.close()  # a second close does nothing
    first.close()
    assert _patched(model) == [] and second.loss_fn is plain_causal_lm_loss
    assert [l.gradient_checkpointing for l in decoder_layers(model)] == gc_before
    loss, grads = loss_and_grads(model, plain_causal_lm_loss, b, 45)
    assert loss.item() == loss_ref.item() and all(torch.equal(grads[n], grads_ref[n]) for n in grads_ref)


def test_a_plan_that_cannot_be_applied_leaves_the_model_as_it_was(tiny_model_dir):
    model = peft_model(tiny_model_dir)
    try:
        apply(model, RunPlan(kernels="cpt", checkpointing="recompute"))  # checkpointing not enabled on the model
    except ValueError as e:
        assert "gradient_checkpointing_enable" in str(e)
    else:
        raise AssertionError("expected a ValueError")
    assert _patched(model) == []


def test_step_hooks_act_only_under_cuda_graphs(monkeypatch):
    """before_micro_batch marks a new CUDA-graph step, after_backward copies gradients out of the graphs'
    memory after a micro-batch that is not the step's last (dense and row-sparse ones); without graphs
    both do nothing. (Checked on the CPU with a stand-in for a backward graph's output buffer.)"""
    model = tiny_lora_llama(layers=1)
    speed = speed_for(model, kernels="cpt")
    assert speed.graphs is False
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    dense, emb = torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(10, 4))
    graph_out = torch.randn(5, 4)  # stands for a backward graph's output buffer
    dense.grad = graph_out[:3]
    emb.grad = torch.sparse_coo_tensor(torch.tensor([[1, 2, 2, 7, 9]]), graph_out, (10, 4))
    speed.before_micro_batch()
    speed.after_backward([dense, emb], last=False)
    assert marks == [] and dense.grad.data_ptr() == graph_out.data_ptr()
    speed.graphs = True  # as when some compiled layers replay as CUDA graphs
    speed.before_micro_batch()
    assert marks == [1]
    speed.after_backward([dense, emb], last=True)  # the step's last: the optimizer reads them now
    assert dense.grad.data_ptr() == graph_out.data_ptr()
    speed.after_backward([dense, emb], last=False)
    before = graph_out.clone()
    graph_out.fill_(7.0)  # the next replay writes the buffer
    assert torch.equal(dense.grad, before[:3])
    assert torch.equal(emb.grad.to_dense(), torch.sparse_coo_tensor(torch.tensor([[1, 2, 2, 7, 9]]), before, (10, 4)).to_dense())
    speed.close()


def test_summary_lists_what_was_applied(tiny_model_dir):
    model = peft_model(tiny_model_dir)
    model.train()
    speed = speed_for(model, kernels="cpt")
    assert isinstance(speed, Speed)
    assert speed.summary() == {"speed": ["cpt chunked linear cross-entropy", "LoRA update fused into the projection "
                                         "(cpt::lora_linear, lora_linear_4bit for 4-bit bases, or addmm for others)"]}
    b = batch(model.config.vocab_size)
    assert rel(loss_and_grads(model, speed.loss_fn, b, 40)[0], loss_and_grads(model, plain_causal_lm_loss, b, 40)[0]) < 1e-5
