"""Adapters, trained embeddings, parameter groups and the HF-native round trip."""
import math

import pytest
import torch

from cpt.config import load_config
from cpt.build import build_model as _build_model
from cpt.model import GROUP_EMBEDDINGS, load_for_inference, save_trained

CPU = torch.device("cpu")


def build_model(cfg, device=CPU):
    """These tests build their batches on the CPU: keep the model there on a GPU machine too."""
    return _build_model(cfg, device=device)


def _cfg(model_dir, *extra):
    return load_config(None, [f"model.name_or_path={model_dir}", "model.max_seq_length=64", "adapter.r=8",
                              "adapter.use_gradient_checkpointing=false", *extra])


def _batch(vocab=300, b=2, t=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(t).expand(b, -1)}


@pytest.mark.parametrize("rslora, expected", [(True, 32 / math.sqrt(8)), (False, 32 / 8)])
def test_rslora_scaling(tiny_model_dir, rslora, expected):
    b = build_model(_cfg(tiny_model_dir, f"adapter.use_rslora={str(rslora).lower()}"))
    scalings = [m.scaling["default"] for n, m in b.model.named_modules() if hasattr(m, "scaling") and "q_proj" in n and isinstance(m.scaling, dict)]
    assert scalings and all(abs(s - expected) < 1e-9 for s in scalings)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_tied_model_dir"])
def test_embeddings_trained_in_full_base_frozen(request, fixture):
    b = build_model(_cfg(request.getfixturevalue(fixture)))
    trainable = [n for n, p in b.model.named_parameters() if p.requires_grad]
    assert any("embed_tokens.modules_to_save" in n for n in trainable)
    tied = fixture == "tiny_tied_model_dir"
    # A tied model holds one matrix, listed once under embed_tokens; an untied one trains both.
    assert any("lm_head.modules_to_save" in n for n in trainable) != tied
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    for n, p in b.model.named_parameters():
        if "modules_to_save" in n or "lora_" in n:
            assert p.dtype == torch.float32
    if tied:
        base = b.model.get_base_model()
        assert base.model.embed_tokens.modules_to_save["default"].weight is base.lm_head.modules_to_save["default"].weight


def test_groups_learning_rates_and_decay(tiny_model_dir):
    b = build_model(_cfg(tiny_model_dir, "train.learning_rate=1e-3", "train.embedding_learning_rate=1e-4", "train.weight_decay=0.1"))
    by = {g["name"]: g for g in b.groups}
    assert by["adapter"]["lr"] == 1e-3 and by["adapter"]["weight_decay"] == 0.1
    assert by[GROUP_EMBEDDINGS]["lr"] == 1e-4 and by[GROUP_EMBEDDINGS]["weight_decay"] == 0.0
    assert all("lora_" in n for n in by["adapter"]["param_names"])


def test_bf16_masters_make_tiny_updates_land(tiny_model_dir):
    """With bf16 weights an update of ~1e-6 rounds away; the float32 masters keep it."""
    b = build_model(_cfg(tiny_model_dir, "model.dtype=bfloat16", "train.learning_rate=5e-6", "train.embedding_learning_rate=1e-6"))
    emb = b.model.get_base_model().model.embed_tokens.modules_to_save["default"].weight
    head = b.model.get_base_model().lm_head.modules_to_save["default"].weight
    assert emb.dtype == torch.float32
    before_e, before_h = emb.detach().clone(), head.detach().clone()
    opt = torch.optim.AdamW([{"params": g["params"], "lr": g["lr"]} for g in b.groups], weight_decay=0.0)
    for s in range(3):
        batch = _batch(seed=s)
        b.loss_fn(b.model, batch, int((batch["labels"][:, 1:] != -100).sum())).backward()
        opt.step()
        opt.zero_grad()
    seen = torch.zeros(emb.shape[0], dtype=torch.bool)
    for s in range(3):
        seen[_batch(seed=s)["input_ids"].unique()] = True
    changed_e = (emb.detach() != before_e)[seen].float().mean().item()
    changed_h = (head.detach() != before_h).float().mean().item()
    assert changed_e > 0.9 and changed_h > 0.99
    # The same update applied to a bf16 copy is mostly lost: that is what the masters prevent.
    lost = ((before_h.bfloat16() + (head.detach() - before_h).bfloat16()) == before_h.bfloat16()).float().mean().item()
    assert lost > 0.5


def _train_a_little(b, steps=3):
    opt = torch.optim.AdamW([p for g in b.groups for p in g["params"]], lr=1e-2)
    for s in range(steps):
        batch = _batch(seed=s)
        b.loss_fn(b.model, batch, 60).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_tied_model_dir"])
def test_save_reload_merge_same_logits(request, tmp_path, fixture):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cpt.export import merge

    model_dir = request.getfixturevalue(fixture)
    b = build_model(_cfg(model_dir))
    _train_a_little(b)
    b.model.eval()
    x = _batch(seed=9)["input_ids"]
    with torch.no_grad():
        live = b.model(input_ids=x).logits
        base_logits = AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=x).logits
    assert (live - base_logits).abs().max() > 1e-3  # training changed the model

    save_trained(b.model, tmp_path / "adapter", b.tokenizer)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=x).logits, live, atol=1e-5)

    model, _ = load_for_inference(str(tmp_path / "adapter"), device="cpu")
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, live, atol=1e-5)

    merge(tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x).logits, live, atol=1e-4)
    assert merged.config.tie_word_embeddings == (fixture == "tiny_tied_model_dir")


def test_full_mode_trains_everything(tiny_model_dir):
    b = build_model(_cfg(tiny_model_dir, "adapter.method=full"))
    assert all(p.requires_grad for p in b.model.parameters())
    assert not hasattr(b.model, "peft_config")


def test_max_seq_length_above_model_limit_fails_before_loading(tiny_model_dir):
    from cpt.config import ConfigError
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        build_model(_cfg(tiny_model_dir, "model.max_seq_length=100000"))


def test_4bit_on_cpu_fails_clearly(tiny_model_dir):
    from cpt.config import ConfigError
    with pytest.raises(ConfigError, match="load_in_4bit needs a CUDA GPU"):
        build_model(_cfg(tiny_model_dir, "model.load_in_4bit=true"), device=torch.device("cpu"))


@pytest.mark.parametrize("named", ["as is", "with an index"])
def test_prepare_leaves_the_frozen_originals_where_the_kernels_put_them(tiny_model_dir, monkeypatch, named):
    """On a GPU the kernels move the frozen embed_tokens/lm_head originals to host memory; accelerate's
    prepare must not move the model again (model.to(device) would bring ~2 GiB back for an 8B model).
    Here the originals go to the meta device, which any model.to() would fail on. 'with an index':
    the accelerator names the device differently from the tensors, as on one GPU (accelerate says
    `cuda`, the tensors `cuda:0`): the same device all the same (an 8B run's memory trace showed the
    2 GiB coming back through exactly this)."""
    from cpt.distributed import Parallel, build_accelerator

    cfg = _cfg(tiny_model_dir)
    b = build_model(cfg)
    originals = [m.original_module for m in b.model.modules()
                 if hasattr(m, "modules_to_save") and getattr(m, "original_module", None) is not None]
    assert originals
    for o in originals:
        o.to("meta")
    acc = build_accelerator(cfg, b.device)
    if named == "with an index":
        monkeypatch.setattr(type(acc), "device", property(lambda self: torch.device("cpu", 0)))
    par = Parallel.setup(cfg, b, acc)
    opt = torch.optim.AdamW([p for p in b.model.parameters() if p.requires_grad])
    model, _ = par.prepare(b.model, opt)
    assert all(p.device.type == "meta" for o in originals for p in o.parameters())
    assert all(p.device == b.device for p in model.parameters() if p.requires_grad)


def test_building_a_model_settles_cpu_math_first(tiny_model_dir, monkeypatch):
    """MKL picks a vector-math kernel on a function's first call, and a first call split across threads
    gave one process in ten a rotary cos a few ulps off: build_model makes one-element calls of each
    function on this thread before the model can run."""
    sizes = []
    real_cos = torch.cos
    monkeypatch.setattr(torch, "cos", lambda x, *a, **k: (sizes.append(x.numel()), real_cos(x, *a, **k))[1])
    build_model(_cfg(tiny_model_dir))
    assert sizes[:2] == [1, 1]
