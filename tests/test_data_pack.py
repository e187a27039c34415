"""Document packing: positions, labels, masks, and the loss identity on a tiny random Llama.

    .venv/bin/python -m pytest tests/test_data_pack.py -q
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cpt.data import build_data, document_attention_mask
from cpt.data.pack import Block, collate, document_ids
from test_data import epoch_tokens, make_cfg, write_jsonl


def test_collate_document_positions_and_labels():
    toks = np.arange(10, 22)
    b = collate([Block(toks, np.array([0, 5, 9])), Block(np.arange(30, 37), np.array([3]))], 12, "document", 0)
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]
    assert b["labels"][0].tolist() == [-100, 11, 12, 13, 14, -100, 16, 17, 18, -100, 20, 21]
    # a short (final) block: its continuation chunk, a new document, then padding as its own sequence
    assert b["position_ids"][1].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4]
    assert b["labels"][1].tolist() == [30, 31, 32, -100, 34, 35, 36] + [-100] * 5
    assert b["input_ids"][1, 7:].tolist() == [0] * 5
    c = collate([Block(toks, np.array([0, 5, 9]))], 12, "concat", 0)
    assert c["position_ids"][0].tolist() == list(range(12)) and c["labels"][0].tolist() == toks.tolist()
    assert document_ids(b["position_ids"])[0].tolist() == [1] * 5 + [2] * 4 + [3] * 3


def test_long_document_split_never_truncated(tmp_path, tokenizer):
    text = " ".join(f"w{i}" for i in range(200))
    p = write_jsonl(tmp_path / "long.jsonl", [{"text": text}])
    for packing in ("concat", "document"):
        s = build_data(make_cfg(tmp_path, [{"path": str(p)}], data__shuffle=False, data__packing=packing),
                       tokenizer).train
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        batches = epoch_tokens(s, 1, s.blocks_per_epoch)
        got = torch.cat([b["input_ids"][0] for b in batches])[: len(ids)].tolist()
        assert got == ids and s.blocks_per_epoch == -(-len(ids) // 32)
        assert all(b["input_ids"].shape == (1, 32) for b in batches)  # never a zero-length or short row


def _summed_loss(model, input_ids, labels, **kw) -> torch.Tensor:
    logits = model(input_ids=input_ids, **kw).logits.float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def _separate_loss(model, batch) -> torch.Tensor:
    """Each document of the block run alone (positions from 0, its first token not predicted)."""
    total = torch.zeros(())
    for ids, pos, lab in zip(batch["input_ids"], batch["position_ids"], batch["labels"]):
        starts = [i for i in range(len(pos)) if pos[i] == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:]):
            seg, seg_lab = ids[a:b][None], lab[a:b].clone()[None]
            seg_lab[0, 0] = -100
            if (seg_lab != -100).any():
                total = total + _summed_loss(model, seg, seg_lab, use_cache=False)
    return total


@pytest.fixture(scope="module")
def packed_batch(tmp_path_factory, corpus, tokenizer):
    tmp = tmp_path_factory.mktemp("pack")
    short = [" ".join(c.split()[: 3 + i % 9]) for i, c in enumerate(corpus)]  # several documents per block
    p = write_jsonl(tmp / "short.jsonl", [{"text": t} for t in short])
    s = build_data(make_cfg(tmp, [{"path": str(p)}], data__packing="document"), tokenizer).train
    batch = next(s.batches(3))
    assert (batch["position_ids"] == 0).sum() >= 6  # really several documents per row
    return batch


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_document_packing_loss_identity(tiny_model_dir, packed_batch, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    b = packed_batch
    with torch.no_grad():
        sep = _separate_loss(model, b)
        # position_ids alone: transformers derives the block-diagonal mask (needs use_cache=False)
        packed = _summed_loss(model, b["input_ids"], b["labels"], position_ids=b["position_ids"], use_cache=False)
        # the explicit mask works on any path, even with a KV cache in play
        masked = _summed_loss(model, b["input_ids"], b["labels"], position_ids=b["position_ids"],
                              attention_mask=document_attention_mask(b["position_ids"]))
        # attention across documents (what concat packing does) gives a different loss
        leaky = _summed_loss(model, b["input_ids"], b["labels"],
                             position_ids=torch.arange(b["input_ids"].shape[1]).expand_as(b["input_ids"]),
                             use_cache=False)
    assert torch.allclose(packed, sep, rtol=1e-5), (packed, sep)
    assert torch.allclose(masked, sep, rtol=1e-5), (masked, sep)
    assert not torch.allclose(leaky, sep, rtol=1e-3)


def test_kv_cache_disables_packed_detection(tiny_model_dir, packed_batch):
    """Why the model must run with use_cache=False (or take document_attention_mask): with the
    config's default use_cache=True, transformers builds a cache and then ignores the packing."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    assert model.config.use_cache
    b = packed_batch
    with torch.no_grad():
        sep = _separate_loss(model, b)
        default = _summed_loss(model, b["input_ids"], b["labels"], position_ids=b["position_ids"])
    assert not torch.allclose(default, sep, rtol=1e-3)
