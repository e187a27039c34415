"""cpt.build: the run plan is decided from the config and applied to the model it was decided for."""
import pytest
import torch

from cpt.build import build_model
from cpt.config import load_config
from cpt.model import SPLIT_MASTER

CPU = torch.device("cpu")


def _cfg(model_dir, *extra):
    return load_config(None, [f"model.name_or_path={model_dir}", "model.max_seq_length=64", "adapter.r=8", *extra])


def test_the_plan_is_applied_and_the_loss_comes_from_it(tiny_model_dir):
    """A budget too small for any kept layer: every layer recomputes; kernels none on a CPU: the plain loss."""
    b = build_model(_cfg(tiny_model_dir, "adapter.recompute_budget_gib=0.0001"), device=CPU)
    assert b.plan.checkpointing == "recompute" and b.plan.keep_layers == 0 and b.plan.kernels == "none"
    layers = b.model.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    ids = torch.randint(0, 300, (2, 16))
    loss = b.loss_fn(b.model, {"input_ids": ids, "labels": ids}, int(2 * 15))
    assert loss.requires_grad and torch.isfinite(loss)


def test_a_budget_keeps_the_lowest_layers_activations(tiny_model_dir):
    b = build_model(_cfg(tiny_model_dir, "adapter.recompute_budget_gib=500"), device=CPU)
    assert b.plan.keep_layers == 2
    assert not any(layer.gradient_checkpointing for layer in b.model.get_base_model().model.layers)


def test_on_the_cpu_a_model_that_fits_recomputes_nothing(tiny_model_dir):
    """Recomputation only costs time on a CPU: with no budget, layers keep their activations while the
    estimate stays under half the host memory (a tiny model: all of them)."""
    b = build_model(_cfg(tiny_model_dir), device=CPU)
    assert b.plan.checkpointing == "recompute" and b.plan.keep_layers == 2
    assert any("on the CPU" in r for r in b.plan.reasons)
    assert not any(layer.gradient_checkpointing for layer in b.model.get_base_model().model.layers)


@pytest.mark.parametrize("optim, split", [("adamw_8bit", False), ("adamw_torch", False)])
def test_split_masters_follow_the_plan_on_the_cpu(tiny_model_dir, optim, split):
    """Split masters need bf16 compute: a float32 CPU run keeps plain float32 masters, and the plan says so."""
    b = build_model(_cfg(tiny_model_dir, f"train.optim={optim}"), device=CPU)
    held = any(getattr(p, SPLIT_MASTER, False) for p in b.model.parameters())
    assert b.plan.split_masters == held == split


def test_split_masters_in_bf16_with_the_8bit_optimizer(tiny_model_dir):
    b = build_model(_cfg(tiny_model_dir, "model.dtype=bfloat16", "train.optim=adamw_8bit"), device=CPU)
    assert b.plan.split_masters and b.plan.sparse_embedding_grad
    assert any(getattr(p, SPLIT_MASTER, False) for p in b.model.parameters())


def test_adapters_added_before_the_plan_are_taken_as_built(tiny_model_dir):
    """The Python API adds adapters before the optimizer is known: a bf16 model it adapted has plain
    float32 masters, and a later adamw_8bit run's plan must say so rather than assume split masters."""
    from cpt.api import CPTModel

    model, tok = CPTModel.from_pretrained(str(tiny_model_dir), max_seq_length=64, dtype="bfloat16", device="cpu")
    model = CPTModel.get_peft_model(model, r=8, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"])
    cfg = _cfg(tiny_model_dir, "model.dtype=bfloat16", "train.optim=adamw_8bit")
    b = build_model(cfg, device=CPU, model=model, tokenizer=tok)
    assert not b.plan.split_masters and not b.plan.sparse_embedding_grad
    assert any("as built" in r for r in b.plan.reasons)
