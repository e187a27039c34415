"""Per-layer keep / recompute / offload (cpt.speed.recompute, cpt.speed.offload) change memory and time,
never the loss or the gradients.

    python -m pytest tests/test_speed_recompute.py -q
"""
from __future__ import annotations

import pytest
import torch
from speed_helpers import batch, loss_and_grads, peft_model, rel, saved_bytes, speed_for

from cpt.speed import decoder_layers, plain_causal_lm_loss
from cpt.speed.recompute import layer_choices


def test_layer_choices_keep_the_lowest_layers():
    assert layer_choices(4, "off", 2) == ["keep"] * 4
    assert layer_choices(4, "recompute", 0) == ["recompute"] * 4
    assert layer_choices(4, "recompute", 1) == ["keep", "recompute", "recompute", "recompute"]
    assert layer_choices(4, "offload", 3) == ["keep"] * 3 + ["offload"]
    assert layer_choices(4, "recompute", 9) == ["keep"] * 4
    with pytest.raises(ValueError, match="checkpointing"):
        layer_choices(4, "unsloth", 0)


@pytest.mark.parametrize("checkpointing,keep", [("recompute", 0), ("recompute", 1), ("offload", 0), ("offload", 1),
                                                ("recompute", 2), ("off", 0)])
def test_recompute_modes_match_plain(tiny_model_dir, checkpointing, keep):
    """keep / recompute / offload (and mixes of them) change memory and time, never the gradients; the
    recomputing and offloaded layers really keep less."""
    model = peft_model(tiny_model_dir)
    model.train()
    b = batch(model.config.vocab_size, seed=1)
    loss_ref, grads_ref, saved_all = saved_bytes(model, plain_causal_lm_loss, b, 45)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # (the fused loss saves less too: compared with the keeping plan's own)
    _, _, saved_keep = saved_bytes(model, speed_for(model, kernels="cpt", checkpointing="off").loss_fn, b, 45)
    assert saved_keep < saved_all
    speed = speed_for(model, kernels="cpt", checkpointing=checkpointing, keep_layers=keep)
    n = model.config.num_hidden_layers
    k = 0 if checkpointing == "off" else n - min(keep, n)  # layers that recompute
    assert speed.layers == {"keep": n - k, "recompute": k if checkpointing == "recompute" else 0,
                            "offload": k if checkpointing == "offload" else 0, "host": 0, "compiled": 0}
    loss, grads, saved = saved_bytes(model, speed.loss_fn, b, 45)
    assert abs(loss.item() - loss_ref.item()) < 1e-5 * loss_ref.item()
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert rel(grads[name], grads_ref[name]) < 1e-4, name
    if checkpointing != "offload":  # (an offloaded layer's recompute saves inside backward, where this counts too)
        assert saved < saved_keep if k else saved == saved_keep
    speed.close()
    assert all(l.gradient_checkpointing and "forward" not in l.__dict__ for l in decoder_layers(model))


def test_recompute_needs_checkpointing_enabled(tiny_model_dir):
    """A layer that recomputes through transformers' checkpointing needs it enabled on the model; the
    plan is not half-applied."""
    model = peft_model(tiny_model_dir)
    with pytest.raises(ValueError, match="gradient_checkpointing_enable"):
        speed_for(model, kernels="cpt", checkpointing="recompute", keep_layers=1)
    assert not any("forward" in m.__dict__ or "_cpt_lora" in m.__dict__ for m in model.modules())
    assert not any(l.gradient_checkpointing for l in decoder_layers(model))
    speed_for(model, checkpointing="offload")  # its own checkpoint: nothing of transformers' needed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_offloaded_recompute_matches_plain(tiny_model_dir):
    """Layer inputs parked in pinned host memory (side-stream copies, buffers reused across steps)
    give the same gradients as keeping everything on the GPU, step after step."""
    model = peft_model(tiny_model_dir).to("cuda")
    model.train()
    batches = [{k: v.cuda() for k, v in batch(model.config.vocab_size, seed=s).items()} for s in (3, 4)]
    ref = [loss_and_grads(model, plain_causal_lm_loss, b, 45) for b in batches]
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    speed = speed_for(model, "cuda", checkpointing="offload")
    assert speed.layers["offload"] == model.config.num_hidden_layers
    for b, (loss_ref, grads_ref) in zip(batches, ref):
        loss, grads = loss_and_grads(model, speed.loss_fn, b, 45)
        assert abs(loss.item() - loss_ref.item()) < 1e-5 * loss_ref.item()
        for n in grads:
            assert rel(grads[n], grads_ref[n]) < 1e-4, n
    speed.close()
