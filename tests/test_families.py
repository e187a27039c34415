"""The model families people continue-pretrain, each as a tiny random model built from transformers' own
config class and saved to a folder: Qwen2 (q/k/v biases, tied), Qwen3 (q/k norms, head_dim apart from
hidden), Mistral, Gemma 2 (soft-capped logits, scaled embedding, tied), Gemma 3 text (q/k norms, scaled
embedding, tied), Phi-3 (fused qkv_proj and gate_up_proj), OLMo 2 (q/k norms, norms after).

For each: cpt's speed features (the chunked fused loss with Gemma 2's soft-cap, the LoRA op, compiled
layers) give the loss and gradients of plain transformers + peft on the same weights and batch; `cpt
train` runs end to end with the default target_modules and says which modules it adapted; the adapter
reloaded in plain PEFT and `cpt merge`'s folder give the trained model's logits; tied stays tied; and
`cpt plan` reads the family's shapes.

    python -m pytest tests/test_families.py -q
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from speed_helpers import batch, dynamo_counts, loss_and_grads, rel, speed_for

from cpt.speed import plain_causal_lm_loss

# name: (transformers config class, its family-specific arguments). Common to all: 2 layers, hidden 64,
# 4 heads, 2 key/value heads, intermediate 128, the fixture tokenizer's vocabulary.
FAMILIES = {
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 32, "tie_word_embeddings": False}),
    "mistral": ("MistralConfig", {"tie_word_embeddings": False}),
    "gemma2": ("Gemma2Config", {"head_dim": 32, "tie_word_embeddings": True, "final_logit_softcapping": 5.0}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 32, "tie_word_embeddings": True, "sliding_window": 8,
                                         "final_logit_softcapping": None}),
    "phi3": ("Phi3Config", {"tie_word_embeddings": False}),
    "olmo2": ("Olmo2Config", {"tie_word_embeddings": False}),
}
TIED = {name for name, (_, kw) in FAMILIES.items() if kw["tie_word_embeddings"]}
# What the default target_modules adapt in each layout.
LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTED = {name: LLAMA_LIKE for name in FAMILIES} | {"phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}


def family_model(name: str, tokenizer, folder: Path | None = None):
    """A random 2-layer model of the family (float32, fixed seed); saved with the tokenizer when `folder`."""
    import transformers

    cls, kw = FAMILIES[name]
    kw = dict(kw)
    cfg = getattr(transformers, cls)(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id, **kw)
    cfg._attn_implementation = "eager" if name == "gemma2" else "sdpa"  # transformers has no SDPA for Gemma 2
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # norms away from their initial ones and zeros, so that a misplaced norm shows
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    if folder is not None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    out = {}
    for name in FAMILIES:
        out[name] = tmp_path_factory.mktemp(name)
        family_model(name, tokenizer, out[name])
    return out


def _peft(model, targets):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    tied = model.config.tie_word_embeddings
    cfg = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=targets, init_lora_weights=False,
                     modules_to_save=["embed_tokens", "lm_head"], **({"ensure_weight_tying": True} if tied else {}))
    return get_peft_model(model, cfg)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_speed_features_give_the_plain_loss(name, tokenizer):
    """Same weights, same batch: transformers + peft's loss and gradients, then cpt's fused head and LoRA
    op, then the same with the decoder layers recomputing and compiled (aot_eager on CPU: dynamo's and
    autograd's graphs, traced without a break). float32: losses within 1e-5 relative, every gradient
    within 1e-4 relative (the chunked loss sums in another order)."""
    import torch._dynamo

    model = family_model(name, tokenizer)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = _peft(model, ADAPTED[name])
    model.train()
    b = batch(len(tokenizer), seed=3)
    n_items = int((b["labels"][:, 1:] != -100).sum())
    loss_ref, grads_ref = loss_and_grads(model, plain_causal_lm_loss, b, n_items)

    def check(speed, what):
        loss, grads = loss_and_grads(model, speed.loss_fn, b, n_items)
        assert rel(loss, loss_ref) < 1e-5, (what, loss.item(), loss_ref.item())
        assert grads.keys() == grads_ref.keys(), what
        for k in grads:
            assert rel(grads[k], grads_ref[k]) < 1e-4, (what, k, rel(grads[k], grads_ref[k]))

    speed = speed_for(model, kernels="cpt", checkpointing="off")
    assert speed.fallbacks == [], speed.fallbacks
    fused_loss = [a for a in speed.applied if "cross-entropy" in a]
    assert fused_loss and (("soft-capped at 5" in fused_loss[0]) == (name == "gemma2")), speed.applied
    assert any("LoRA update fused" in a for a in speed.applied)
    check(speed, "fused loss + LoRA op")
    speed.close()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    speed = speed_for(model, kernels="cpt", checkpointing="recompute", compile=True, compile_backend="aot_eager")
    try:
        check(speed, "compiled, recomputing layers")
        assert speed.compile_failed is None
        assert dynamo_counts()["breaks"] == 0
    finally:
        speed.close()
        torch._dynamo.reset()


def test_soft_capped_fused_loss_matches_the_capped_logits():
    """The chunked loss with a soft-cap is cross_entropy(cap * tanh(h @ W.T / cap)), gradients included,
    across several chunks (float32: 1e-6 relative for the loss, 1e-5 for the gradients); without a cap
    it is the plain cross-entropy as before."""
    from cpt.speed import fused_linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 9, 16, generator=g) * 3
    w = torch.randn(50, 16, generator=g)
    t = torch.randint(0, 50, (2, 9), generator=g)
    t[0, :2] = -100
    for cap in (None, 4.0):
        h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fused_linear_cross_entropy(h1, w1, t, chunk_tokens=4, softcap=cap)
        loss.backward()
        h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
        logits = h2 @ w2.T
        if cap:
            logits = cap * torch.tanh(logits / cap)
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), t.reshape(-1), ignore_index=-100)
        ref.backward()
        assert rel(loss, ref) < 1e-6, cap
        assert rel(h1.grad, h2.grad) < 1e-5 and rel(w1.grad, w2.grad) < 1e-5, cap


def test_a_family_the_fused_head_does_not_know_falls_back_and_says_so(caplog):
    """Cohere scales its logits (logit_scale): the fused head would compute another function, so the loss
    stays transformers' own, the LoRA op still applies, and the fallback is a warning with its reason."""
    import logging

    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    cfg = CohereConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, logit_scale=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = _peft(CohereForCausalLM(cfg), LLAMA_LIKE)
    model.train()
    b = batch(97, seed=1)
    loss_ref, grads_ref = loss_and_grads(model, plain_causal_lm_loss, b, 40)
    speed_log = logging.getLogger("cpt.speed")
    speed_log.addHandler(caplog.handler)  # directly: the command line's tests stop "cpt" from propagating
    try:
        speed = speed_for(model, kernels="cpt")
    finally:
        speed_log.removeHandler(caplog.handler)
    assert speed.fallbacks == ["fused loss: the fused head does not know how 'cohere' turns hidden states into logits"]
    assert any("speed: fell back: fused loss" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert speed.summary()["speed_fallbacks"] == speed.fallbacks
    assert any("LoRA update fused" in a for a in speed.applied)
    loss, grads = loss_and_grads(model, speed.loss_fn, b, 40)
    assert rel(loss, loss_ref) < 1e-5 and all(rel(grads[k], grads_ref[k]) < 1e-4 for k in grads)
    speed.close()


def _overrides(model_dir: Path, corpus_dir: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.name_or_path={model_dir}", "model.max_seq_length=32", "model.kernels=cpt", f"data.path={corpus_dir}",
            "adapter.r=8", "train.per_device_train_batch_size=2", "train.gradient_accumulation_steps=1",
            "train.learning_rate=1e-2",
            "train.embedding_learning_rate=1e-2", "train.warmup_ratio=0", "train.max_steps=3", f"output.output_dir={out}",
            "output.logging_steps=1", "output.save_steps=100", "output.report=false", "eval.eval_at_start=false",
            *extra]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_cpt_train_round_trips_on_each_family(name, family_dirs, corpus_dir, tmp_path, capsys):
    """`cpt train` with the default target_modules (fused loss and LoRA op on): the run log names the
    adapted modules (Phi-3's fused ones with no user action), the embeddings train, tied stays tied; the
    adapter in plain PEFT and `cpt merge`'s folder give the trained model's logits."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from cpt.cli import main as cli_main

    out = tmp_path / "run"
    assert cli_main(["train", *_overrides(family_dirs[name], corpus_dir, out)]) == 0
    log = capsys.readouterr().err
    adapted = next((line.split(" INFO ", 1)[-1] for line in log.splitlines() if " INFO adapted: " in line), log[-2000:])
    assert "speed: fell back" not in log
    lora_part, full_part = adapted.removeprefix("adapted: LoRA on ").split("; trained in full: ")
    assert sorted(lora_part.split(", ")) == sorted(f"{m} x2" for m in ADAPTED[name]), adapted
    assert full_part == "embed_tokens, lm_head" + (" (tied: one matrix)" if name in TIED else ""), adapted
    assert "cpt chunked linear cross-entropy" in " ".join(json.loads((out / "run_summary.json").read_text())["speed"])
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(l == l and l > 0 for l in losses)

    saved = load_file(str(out / "adapter_model.safetensors"))
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in saved if ".lora_" in k} == set(ADAPTED[name])
    base = AutoModelForCausalLM.from_pretrained(family_dirs[name], dtype=torch.float32)
    emb_before = base.get_input_embeddings().weight.detach().clone()
    ids = batch(len(emb_before), seed=5, t=20)["input_ids"]
    plain = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        logits_peft = plain(input_ids=ids).logits
    if name in TIED:
        assert plain.get_input_embeddings().modules_to_save["default"].weight is \
            plain.get_output_embeddings().modules_to_save["default"].weight
    trained_emb = plain.get_input_embeddings().modules_to_save["default"].weight.detach()
    assert not torch.equal(trained_emb, emb_before)  # the embeddings really trained

    assert cli_main(["merge", str(out), str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        logits_merged = merged(input_ids=ids).logits
    assert torch.equal(merged.get_input_embeddings().weight, trained_emb)
    if name in TIED:
        assert merged.config.tie_word_embeddings
        assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    else:
        assert not torch.equal(merged.get_output_embeddings().weight, merged.get_input_embeddings().weight)
    scale = logits_peft.abs().max().item()
    assert (logits_merged - logits_peft).abs().max().item() <= 1e-4 * max(scale, 1.0), name


@pytest.mark.parametrize("name", list(FAMILIES))
def test_plan_reads_each_familys_shapes(name, family_dirs):
    """`cpt plan`'s shape: head_dim where the config sets it apart, key/value heads, tied, vocabulary, fused
    projections; the LoRA count follows the layout (Phi-3's fused modules are adapted by the usual list)."""
    from transformers import AutoConfig

    from cpt.config import load_config
    from cpt.plan import plan, shape_from_config

    mc = AutoConfig.from_pretrained(family_dirs[name])
    s = shape_from_config(mc)
    assert (s.hidden, s.layers, s.heads, s.kv_heads, s.intermediate, s.vocab) == (64, 2, 4, 2, 128, mc.vocab_size)
    assert s.tied == (name in TIED) and s.fused == (name == "phi3")
    assert s.attn_dim == (128 if name in ("qwen3", "gemma2", "gemma3_text") else 64)
    assert sorted(s.linear_shapes()) == sorted(ADAPTED[name])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(family_dirs[name], dtype=torch.float32)
    real = {n.rsplit(".", 1)[-1]: (m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers.0." in n}
    assert real == s.linear_shapes()
    assert s.block_params == sum(m.weight.numel() for n, m in model.named_modules()
                                 if isinstance(m, torch.nn.Linear) and ".layers." in n)
    # The default target list, resolved by cpt for this layout, against peft's real LoRA parameters.
    cfg = load_config(None, [f"model.name_or_path={family_dirs[name]}", "adapter.r=8"])
    est = plan(cfg, mc)
    lora = sum(p.numel() for n, p in _peft(model, ADAPTED[name]).named_parameters() if "lora_" in n)
    assert est["memory_gib"]["LoRA adapters (float32)"] * 2**30 == pytest.approx(lora * 4)


def test_part_of_a_fused_projection_is_refused_naming_the_module(family_dirs, corpus_dir, tmp_path, capsys):
    """Phi-3 computes q, k and v in one module: asking for q_proj and v_proj alone would adapt k too, so
    `cpt train` stops with one line naming the key and the module to use; the fused name itself works."""
    from cpt.cli import main as cli_main

    args = _overrides(family_dirs["phi3"], corpus_dir, tmp_path / "run", "train.max_steps=1")
    assert cli_main(["train", *args, "adapter.target_modules=[q_proj,v_proj,embed_tokens,lm_head]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert any("adapter.target_modules" in line and "qkv_proj" in line and "q_proj, v_proj" in line for line in err), err
    assert cli_main(["train", *args, "adapter.target_modules=[qkv_proj,gate_up_proj,embed_tokens,lm_head]"]) == 0
    assert "adapted: LoRA on qkv_proj x2, gate_up_proj x2;" in capsys.readouterr().err
