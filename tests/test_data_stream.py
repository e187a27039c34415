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


# ---------------------------------------------------------------------------- a slice of a streamed split


def _hub_like(folder: Path, texts: list[str], parquet: bool, info: bool = False) -> Path:
    """A local data set laid out as on the Hub: a `sample-10BT` configuration declared in the README over
    Parquet or JSON lines files (and, with `info`, the split's size in the README's dataset_info)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "sample").mkdir(parents=True)
    half = len(texts) // 2
    for i, part in enumerate((texts[:half], texts[half:])):
        if parquet:
            pq.write_table(pa.table({"text": part}), folder / "sample" / f"{i:03d}.parquet")
        else:
            write_jsonl(folder / "sample" / f"{i:03d}.jsonl", [{"text": t} for t in part])
    meta = ("dataset_info:\n- config_name: sample-10BT\n  splits:\n  - name: train\n"
            f"    num_examples: {len(texts)}\n") if info else ""
    (folder / "README.md").write_text(f"---\n{meta}configs:\n- config_name: sample-10BT\n  data_files:\n"
                                      "  - split: train\n    path: sample/*\n---\n")
    return folder


@pytest.mark.parametrize("parquet, info", [(True, False), (False, True)])
def test_streamed_split_takes_its_slice(tmp_path, corpus, monkeypatch, parquet, info):
    """train[:10%] of a streamed split is the split's first 10% (the size from the Parquet footers or the
    README's metadata, nothing downloaded whole); train[a:b] needs no size."""
    import datasets

    from cpt.config import SourceConfig
    from cpt.data.sources import load_hf

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))  # no size remembered from another load
    folder = _hub_like(tmp_path / "fineweb-edu", corpus, parquet, info)
    for split, rows in (("train[:10%]", corpus[:6]), ("train[55:]", corpus[55:]), ("train[3:7]", corpus[3:7]),
                        ("train[-4:]", corpus[-4:])):
        ds = load_hf(SourceConfig(dataset=str(folder), name="sample-10BT", split=split), streaming=True)
        assert isinstance(ds, datasets.IterableDataset)
        assert [r["text"] for r in ds] == rows, split


def test_streamed_percentage_without_a_known_size_fails_before_the_model_loads(tmp_path, corpus, monkeypatch):
    from cpt.api import run_training
    from cpt.config import ConfigError, load_config

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    folder = _hub_like(tmp_path / "plain", corpus, parquet=False)
    cfg = load_config(None, ["model.name_or_path=someone/not-downloaded", f"data.dataset={folder}",
                             "data.name=sample-10BT", "data.split=train[:10%]", "data.streaming=true",
                             "train.max_steps=1", f"output.output_dir={tmp_path / 'out'}"])
    with pytest.raises(ConfigError, match=r"data.sources\[0\].*train\[:100000\].*streaming: false"):
        run_training(cfg)  # the model is never looked for (it does not exist)


def test_seed_yaml_streams_ten_percent(tmp_path, corpus, tokenizer, monkeypatch):
    """examples/seed.yaml as shipped (streaming, train[:10%] of sample-10BT), the data set's name pointed
    at a local copy laid out as on the Hub."""
    from cpt.config import load_config

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    docs = [f"doc{i:03d} {t}" for i, t in enumerate(corpus)]
    folder = _hub_like(tmp_path / "fineweb-edu", docs, parquet=True)
    seed = Path(__file__).resolve().parents[1] / "examples" / "seed.yaml"
    cfg = load_config(seed, [f"data.sources.0.dataset={folder}", f"data.cache_dir={tmp_path / 'cache'}",
                             "model.max_seq_length=64", "data.shuffle=false"])
    assert cfg.data.streaming and cfg.data.sources[0].split == "train[:10%]"
    bundle = build_data(cfg, tokenizer)
    assert bundle.train.blocks_per_epoch is None  # streamed
    ids = [t for b in epoch_tokens(bundle.train, 1, 100) for t in b["input_ids"][0].tolist()]
    import re

    seen = set(re.findall(r"doc(\d{3})", tokenizer.decode(ids)))
    assert seen == {f"{i:03d}" for i in range(6)}  # the first 6 of 60 documents, over and over
