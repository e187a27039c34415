"""Streaming sources and mixing: packed on the fly, resumed at the right document, weights held.

    .venv/bin/python -m pytest tests/test_data_stream.py -q
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from cpt.data import build_data
from test_data import epoch_tokens, make_cfg, write_jsonl


def _rows(stream, B: int, n: int) -> list[list[int]]:
    return [r.tolist() for b in epoch_tokens(stream, B, n) for r in b["input_ids"]]


@pytest.fixture()
def shards(tmp_path, corpus) -> Path:
    """The corpus split over three JSON lines files, one of them gzipped (no seeking there)."""
    d = tmp_path / "shards"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [{"text": t} for t in corpus[:20]])
    write_jsonl(d / "b.jsonl", [{"text": t} for t in corpus[20:40]])
    with gzip.open(d / "c.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps({"text": t}) for t in corpus[40:]))
    return d


@pytest.mark.parametrize("packing", ["concat", "document"])
def test_stream_equals_cached_when_unshuffled(tmp_path, shards, tokenizer, packing):
    common = dict(data__shuffle=False, data__packing=packing)
    cached = build_data(make_cfg(tmp_path, [{"path": str(shards)}], **common), tokenizer)
    streamed = build_data(make_cfg(tmp_path, [{"path": str(shards)}], data__streaming=True, **common), tokenizer)
    assert streamed.train.blocks_per_epoch is None and streamed.stats["n_tokens"] is None
    n = cached.train.blocks_per_epoch
    a, b = epoch_tokens(cached.train, 1, n + 3), epoch_tokens(streamed.train, 1, n + 3)
    for x, y in zip(a, b):  # the epoch, then the next epoch's start
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("cut", [5, 17, 29])
def test_stream_resume_continues_at_the_right_document(tmp_path, shards, tokenizer, cut):
    cfg = make_cfg(tmp_path, [{"path": str(shards)}], data__streaming=True)
    ref = _rows(build_data(cfg, tokenizer).train, 2, 40)  # crosses an epoch (shuffled files) boundary
    first = build_data(cfg, tokenizer).train
    it = first.batches(2)
    for _ in range(cut):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["streams"]  # the stream position travels in the state
    again = build_data(cfg, tokenizer).train
    again.load_state_dict(state)
    assert _rows(again, 2, 40 - cut) == ref[2 * cut:]


def test_stream_from_iterable_dataset_resumes(tmp_path, corpus, tokenizer):
    import datasets

    def make():
        return datasets.Dataset.from_dict({"text": corpus[:8]}).to_iterable_dataset(num_shards=3)

    cfg = make_cfg(tmp_path, [])
    ref = _rows(build_data(cfg, tokenizer, train_dataset=make()).train, 1, 100)  # about 2.5 epochs
    first = build_data(cfg, tokenizer, train_dataset=make()).train
    it = first.batches(1)
    for _ in range(11):
        next(it)
    again = build_data(cfg, tokenizer, train_dataset=make()).train
    again.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert _rows(again, 1, 89) == ref[11:]
    n = build_data(cfg, tokenizer, train_dataset=datasets.Dataset.from_dict({"text": corpus[:8]})).train.blocks_per_epoch
    assert 2 * n < 100 and ref[:n] == ref[n:2 * n]  # each epoch restarts the stream from its beginning


def test_stream_holdout_excluded(tmp_path, tokenizer):
    texts = [f"streamed document {i} with words {'gamma ' * (i % 5 + 1)}stop" for i in range(120)]
    p = write_jsonl(tmp_path / "s.jsonl", [{"text": t} for t in texts])
    cfg = make_cfg(tmp_path, [{"path": str(p)}], data__streaming=True, data__shuffle=False,
                   eval__holdout_fraction=0.05, eval__holdout_max_docs=10)
    bundle = build_data(cfg, tokenizer)
    assert bundle.holdout_texts
    text = tokenizer.decode(torch.cat([r for b in epoch_tokens(bundle.train, 4, 50) for r in b["input_ids"]]).tolist())
    for t in bundle.holdout_texts:
        assert t + "<|endoftext|>" not in text
    assert sum(t + "<|endoftext|>" in text for t in texts) == len(texts) - len(bundle.holdout_texts)


def test_mixture_weights_hold_within_2_percent(tmp_path, corpus, tokenizer):
    dom = write_jsonl(tmp_path / "dom.jsonl", [{"text": t} for t in corpus[:30]])
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"body": t.upper()} for t in corpus[30:]])
    srcs = [{"path": str(dom), "weight": 3}, {"path": str(gen), "weight": 1, "text_field": "body"}]
    bundle = build_data(make_cfg(tmp_path, srcs), tokenizer)
    s = bundle.train
    dom_tokens = {tuple(b) for b in _block_set(tmp_path, dom, tokenizer)}
    rows = _rows(s, 4, 100)
    share = sum(tuple(r) in dom_tokens for r in rows) / len(rows)
    assert abs(share - 0.75) <= 0.02
    for n in (7, 50, 133, 400):  # every prefix holds its share to within one block per source
        c = s.source_counts(n)
        assert abs(c[str(dom)] - 0.75 * n) <= 1
    # an epoch ends when the domain source has been seen once
    assert s.blocks_per_epoch == pytest.approx(bundle.stats["sources"][0]["blocks"] / 0.75, abs=2)


def _block_set(tmp_path, path, tokenizer):
    alone = build_data(make_cfg(tmp_path, [{"path": str(path)}]), tokenizer).train
    return [r for r in _rows(alone, 1, alone.blocks_per_epoch)]


def test_mixture_of_streamed_and_cached_resumes(tmp_path, corpus, tokenizer):
    dom = write_jsonl(tmp_path / "dom.jsonl", [{"text": t} for t in corpus[:30]])
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"text": t.upper()} for t in corpus[30:]])
    srcs = [{"path": str(dom), "weight": 0.75}, {"path": str(gen), "weight": 0.25, "streaming": True}]
    cfg = make_cfg(tmp_path, srcs)
    ref = _rows(build_data(cfg, tokenizer, rank=1, world_size=2).train, 2, 25)
    a = build_data(cfg, tokenizer, rank=1, world_size=2).train
    it = a.batches(2)
    for _ in range(9):
        next(it)
    b = build_data(cfg, tokenizer, rank=1, world_size=2).train
    b.load_state_dict(a.state_dict())
    assert _rows(b, 2, 16) == ref[18:]
