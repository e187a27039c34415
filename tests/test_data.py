"""Core data path: reading sources, the token stream, exact resume, holdout, sharding, cache.

    .venv/bin/python -m pytest tests/test_data.py -q
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from cpt.config import Config, ConfigError, EvalSetConfig, SourceConfig, config_from_dict
from cpt.data import DataError, DataWarning, build_data, holdout_indices, read_documents
from cpt.data.sources import iter_docs


def make_cfg(tmp_path: Path, sources: list[dict], **over) -> Config:
    raw = {"data": {"sources": sources, "cache_dir": str(tmp_path / "cache")}, "model": {"max_seq_length": 32},
           "train": {"seed": 7}}
    for k, v in over.items():
        sec, key = k.split("__")
        raw.setdefault(sec, {})[key] = v
    return config_from_dict(raw)


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def epoch_tokens(stream, batch_size: int, n_batches: int) -> list[torch.Tensor]:
    it = stream.batches(batch_size)
    return [next(it) for _ in range(n_batches)]


def real_tokens(batch: dict) -> list[list[int]]:
    """Each row's tokens without padding (in concat packing the only -100 labels are tail padding)."""
    return [ids[lab != -100].tolist() for ids, lab in zip(batch["input_ids"], batch["labels"])]


# ---------------------------------------------------------------------------- reading


def test_read_txt_folder_and_jsonl(corpus_dir, corpus, tmp_path):
    docs = list(read_documents(SourceConfig(path=str(corpus_dir))))
    assert docs == corpus  # doc000.txt, doc001.txt, ... in file order
    p = write_jsonl(tmp_path / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(corpus[:5])])
    assert list(read_documents(SourceConfig(path=str(p)))) == corpus[:5]
    assert list(read_documents(SourceConfig(path=str(p)), max_docs=2)) == corpus[:2]


def test_formats_agree(tmp_path, corpus):
    import pandas as pd

    rows = [{"body": t, "score": i % 5} for i, t in enumerate(corpus[:12])]
    df = pd.DataFrame(rows)
    df.to_parquet(tmp_path / "d.parquet", row_group_size=5)
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_csv(tmp_path / "d.tsv.gz", index=False, sep="\t")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    want = [r["body"] for r in rows if r["score"] >= 2]
    for name in ("d.parquet", "d.csv", "d.tsv.gz", "d.json", "d.jsonl.gz"):
        src = SourceConfig(path=str(tmp_path / name), text_field="body", filters=["score >= 2"])
        assert list(read_documents(src)) == want, name


def test_bad_rows_counted_and_strict(tmp_path):
    p = tmp_path / "bad.jsonl"
    with open(p, "wb") as f:
        f.write(b'{"text": "good one"}\n')
        f.write(b'{"text": ""}\n')
        f.write(b'{"text": "   \\n "}\n')
        f.write(b'{"text": 42}\n')
        f.write(b'{"text": "broken\n')
        f.write(b'{"text": "bad \xff byte"}\n')
        f.write(b'{"text": "good two"}\n')
    with pytest.warns(DataWarning) as rec:
        docs = list(read_documents(SourceConfig(path=str(p))))
    assert docs == ["good one", "good two"]
    msg = str(rec[0].message)
    assert "skipped 5 rows" in msg and "2 empty" in msg and "1 non-string" in msg
    assert f"malformed JSON (first at {p}:5)" in msg and f"invalid UTF-8 (first at {p}:6)" in msg
    with pytest.raises(DataError, match=rf"{p}:2: empty"):
        list(read_documents(SourceConfig(path=str(p)), strict=True))


def test_csv_invalid_utf8_row_reported_with_file_and_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_bytes(b'id,text\n1,first good row\n2,"bad \xff\xfe byte"\n3,"a quoted\nmultiline row"\n4,last good\n')
    with pytest.warns(DataWarning) as rec:
        docs = list(read_documents(SourceConfig(path=str(p))))
    assert docs == ["first good row", "a quoted\nmultiline row", "last good"]
    assert f"invalid UTF-8 (first at {p}:3)" in str(rec[0].message)
    with pytest.raises(DataError, match=rf"{p}:3: invalid UTF-8.*column 'text'"):
        list(read_documents(SourceConfig(path=str(p)), strict=True))


def test_tsv_reads_tabs_and_counts_a_row_with_an_unquoted_tab(tmp_path):
    p = tmp_path / "pages.tsv"
    p.write_text('id\ttext\n1\tcomma, and "quotes" inside\n2\ta stray\ttab\n3\t"a quoted\ttab"\n')
    with pytest.warns(DataWarning) as rec:
        docs = list(read_documents(SourceConfig(path=str(tmp_path))))  # a folder picks up .tsv files
    assert docs == ['comma, and "quotes" inside', "a quoted\ttab"]
    assert f"malformed CSV/TSV row (first at {p}:3)" in str(rec[0].message)
    with pytest.raises(DataError, match=rf"{p}:3: malformed CSV/TSV row: 3 cells, the header names 2 \(quote cells that hold a tab\)"):
        list(read_documents(SourceConfig(path=str(p)), strict=True))


def test_missing_text_field_names_fields(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [{"content": "a", "url": "u"}])
    with pytest.raises(DataError, match=r"no text field 'text'; the fields are: content, url"):
        list(read_documents(SourceConfig(path=str(p))))
    assert issubclass(DataError, ConfigError)  # callers that catch ConfigError see data errors too


def test_datasets_objects_and_folders(tmp_path, corpus):
    import datasets

    ds = datasets.Dataset.from_dict({"text": corpus[:10], "lang": ["en", "ja"] * 5})
    assert list(read_documents(ds)) == corpus[:10]
    ds.save_to_disk(str(tmp_path / "saved"))
    src = SourceConfig(dataset=str(tmp_path / "saved"), filters=['lang == "ja"'], split="train[:6]")
    assert list(read_documents(src)) == [corpus[1], corpus[3], corpus[5]]
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    assert list(read_documents(SourceConfig(dataset=str(tmp_path / "dd"), split="train[50%:]"))) == corpus[5:10]


def test_bad_filter_and_path(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl", [{"text": "a", "score": 1}])
    with pytest.raises(DataError, match="not `column op value`"):
        list(read_documents(SourceConfig(path=str(p), filters=["score ~ 3"])))
    with pytest.raises(DataError, match="no column .scroe.; the fields are: text, score"):
        list(read_documents(SourceConfig(path=str(p), filters=["scroe >= 3"])))
    with pytest.raises(DataError, match="no such file"):
        list(read_documents(SourceConfig(path=str(tmp_path / "nope.jsonl"))))


def test_iter_docs_resumes_from_loc(tmp_path, corpus):
    p = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in corpus[:20]])
    docs = list(iter_docs(SourceConfig(path=str(p))))
    again = [d.text for d in iter_docs(SourceConfig(path=str(p)), start=docs[13].loc)]
    assert again == corpus[13:20]
    assert docs[13].loc["byte"] > 0  # JSON lines reopen by seeking, not by re-reading


# ---------------------------------------------------------------------------- the stream


def _all_doc_tokens(tokenizer, texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]


def test_concat_epoch_covers_every_token_once(tmp_path, corpus_dir, corpus, tokenizer):
    cfg = make_cfg(tmp_path, [{"path": str(corpus_dir)}])
    bundle = build_data(cfg, tokenizer)
    s = bundle.train
    want = [t for doc in _all_doc_tokens(tokenizer, corpus) for t in doc]
    assert bundle.stats["n_tokens"] == len(want) == s.tokens_per_epoch
    assert bundle.stats["n_documents"] == len(corpus)
    n = s.blocks_per_epoch
    assert n == -(-len(want) // 32)
    batches = epoch_tokens(s, 1, n)
    seen = sorted(tuple(b) for batch in batches for b in real_tokens(batch))
    # the shuffled blocks are exactly the token stream's 32-token pieces, each once
    assert seen == sorted(tuple(want[i:i + 32]) for i in range(0, len(want), 32))
    assert [tuple(b) for batch in batches[:5] for b in real_tokens(batch)] != [tuple(want[i:i + 32]) for i in range(0, 160, 32)]
    b = batches[0]
    assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == (1, 32)
    assert torch.equal(b["position_ids"][0], torch.arange(32))
    assert sum((bb["labels"] == -100).sum().item() for bb in batches) == n * 32 - len(want)


def test_same_seed_same_order_other_seed_differs(tmp_path, corpus_dir, tokenizer):
    a = build_data(make_cfg(tmp_path, [{"path": str(corpus_dir)}]), tokenizer).train
    b = build_data(make_cfg(tmp_path, [{"path": str(corpus_dir)}]), tokenizer).train
    c = build_data(make_cfg(tmp_path, [{"path": str(corpus_dir)}], train__seed=8), tokenizer).train
    ta, tb, tc = (torch.cat([x["input_ids"] for x in epoch_tokens(s, 2, 10)]) for s in (a, b, c))
    assert torch.equal(ta, tb) and not torch.equal(ta, tc)


def test_epochs_reshuffle_and_repeat_content(tmp_path, corpus_dir, tokenizer):
    s = build_data(make_cfg(tmp_path, [{"path": str(corpus_dir)}]), tokenizer).train
    n = s.blocks_per_epoch
    rows = [r for b in epoch_tokens(s, 1, 2 * n) for r in b["input_ids"]]
    e1, e2 = rows[:n], rows[n:]
    assert sorted(map(tuple, map(torch.Tensor.tolist, e1))) == sorted(map(tuple, map(torch.Tensor.tolist, e2)))
    assert [r.tolist() for r in e1] != [r.tolist() for r in e2]


@pytest.mark.parametrize("packing", ["concat", "document"])
def test_resume_is_exact_and_o1(tmp_path, corpus_dir, tokenizer, packing):
    cfg = make_cfg(tmp_path, [{"path": str(corpus_dir)}], data__packing=packing)
    full = build_data(cfg, tokenizer).train
    ref = epoch_tokens(full, 3, 40)
    first = build_data(cfg, tokenizer).train
    it = first.batches(3)
    for _ in range(17):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_data(cfg, tokenizer).train
    resumed.load_state_dict(state)
    rest = epoch_tokens(resumed, 3, 23)
    for a, b in zip(ref[17:], rest):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert state["slot"] == 17 * 3  # a position, not a history: loading it replays nothing


def test_resume_refuses_changed_plan(tmp_path, corpus_dir, tokenizer):
    s = build_data(make_cfg(tmp_path, [{"path": str(corpus_dir)}]), tokenizer).train
    other = build_data(make_cfg(tmp_path, [{"path": str(corpus_dir)}], train__seed=9), tokenizer).train
    with pytest.raises(ValueError, match="seed was 7 and is now 9"):
        other.load_state_dict(s.state_dict())


def test_ranks_get_disjoint_blocks_covering_the_epoch(tmp_path, corpus_dir, tokenizer):
    cfg = make_cfg(tmp_path, [{"path": str(corpus_dir)}])
    single = build_data(cfg, tokenizer).train
    n = single.blocks_per_epoch
    W, B = 3, 2
    rounds = n // (W * B)
    ref = [r.tolist() for b in epoch_tokens(single, W * B, rounds) for r in b["input_ids"]]
    per_rank = [[r.tolist() for b in epoch_tokens(build_data(cfg, tokenizer, rank=k, world_size=W).train, B, rounds)
                 for r in b["input_ids"]] for k in range(W)]
    flat = [r for rows in per_rank for r in rows]
    assert sorted(flat) == sorted(ref)
    blocks = [tuple(r) for r in flat]
    assert len(set(blocks)) == len(blocks) or len(set(map(tuple, ref))) < len(ref)


def test_world_size_change_continues_same_slots(tmp_path, corpus_dir, tokenizer):
    cfg = make_cfg(tmp_path, [{"path": str(corpus_dir)}])
    ref = [r.tolist() for b in epoch_tokens(build_data(cfg, tokenizer).train, 1, 30) for r in b["input_ids"]]
    two = [build_data(cfg, tokenizer, rank=k, world_size=2).train for k in range(2)]
    its = [s.batches(2) for s in two]
    for _ in range(3):
        for it in its:
            next(it)  # 3 rounds of 2 ranks x 2 blocks = 12 slots
    one = build_data(cfg, tokenizer).train
    one.load_state_dict(two[0].state_dict())
    assert [r.tolist() for b in epoch_tokens(one, 1, 5) for r in b["input_ids"]] == ref[12:17]


# ---------------------------------------------------------------------------- holdout


def test_holdout_never_trained_on(tmp_path, tokenizer):
    texts = [f"document number {i} says {'alpha beta ' * (i % 7 + 1)}end" for i in range(200)]
    p = write_jsonl(tmp_path / "h.jsonl", [{"text": t} for t in texts])
    cfg = make_cfg(tmp_path, [{"path": str(p)}], eval__holdout_fraction=0.1, eval__holdout_max_docs=8,
                   data__shuffle=False)  # unshuffled: the stream reads as the documents in order
    bundle = build_data(cfg, tokenizer)
    assert len(bundle.holdout_texts) == 8 and set(bundle.holdout_texts) <= set(texts)
    idx = holdout_indices(0.1, 8, 200)
    assert bundle.holdout_texts == [texts[i] for i in idx]
    s = bundle.train
    stream = torch.cat([b["input_ids"][0] for b in epoch_tokens(s, 1, s.blocks_per_epoch)]).tolist()
    stream_text = tokenizer.decode(stream)
    for t in bundle.holdout_texts:
        assert t not in stream_text
    kept = [t for i, t in enumerate(texts) if i not in set(idx)]
    assert bundle.stats["n_documents"] == len(kept)
    for t in kept[:20]:
        assert t in stream_text
    # same documents again on a second build (cache hit), and none when a "domain" set is named
    assert build_data(cfg, tokenizer).holdout_texts == bundle.holdout_texts
    cfg.eval.sets = [EvalSetConfig(name="domain", path=str(p))]
    assert build_data(cfg, tokenizer).holdout_texts == []


def test_a_short_stream_that_holds_nothing_out_says_so(tmp_path, tokenizer):
    first = holdout_indices(0.01, 8)[0]  # the first index the hash holds out, on any stream
    assert first > 5
    p = write_jsonl(tmp_path / "s.jsonl", [{"text": f"short stream document {i}"} for i in range(5)])
    cfg = make_cfg(tmp_path, [{"path": str(p)}], data__streaming=True, eval__holdout_fraction=0.01)
    with pytest.warns(DataWarning, match=r"s.jsonl.*nothing held out for evaluation; raise eval.holdout_fraction"):
        bundle = build_data(cfg, tokenizer)
    assert bundle.holdout_texts == [] and bundle.stats["holdout_documents"] == 0


# ---------------------------------------------------------------------------- cache


def test_cache_reused_and_invalidated(tmp_path, corpus_dir, tokenizer):
    cfg = make_cfg(tmp_path, [{"path": str(corpus_dir)}])
    first = build_data(cfg, tokenizer).stats["sources"][0]
    assert first["cached"] is False
    again = build_data(cfg, tokenizer).stats["sources"][0]
    assert again["cached"] is True and again["cache_path"] == first["cache_path"]
    f = sorted(corpus_dir.iterdir())[3]
    f.write_text(f.read_text() + " changed")
    changed = build_data(cfg, tokenizer).stats["sources"][0]
    assert changed["cached"] is False and changed["cache_path"] != first["cache_path"]
    cfg.data.add_eos = False
    assert build_data(cfg, tokenizer).stats["sources"][0]["cached"] is False
    entries = [p for p in Path(cfg.data.cache_dir).iterdir() if p.is_dir()]
    assert all((p / "meta.json").exists() for p in entries) and not any(p.name.startswith(".") for p in entries)


def test_cache_hit_reads_no_rows_and_tokenizer_change_rebuilds(tmp_path, corpus, tokenizer, tokenizer_dir,
                                                                monkeypatch):
    from transformers import AutoTokenizer

    import cpt.data.sources as sources

    p = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in corpus])
    cfg = make_cfg(tmp_path, [{"path": str(p)}])
    ref = epoch_tokens(build_data(cfg, tokenizer).train, 2, 5)

    def no_reading(*a, **k):
        raise AssertionError("a cache hit must not read the source")

    monkeypatch.setattr(sources, "_iter_jsonl", no_reading)
    hit = build_data(cfg, tokenizer)
    assert hit.stats["sources"][0]["cached"]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(ref, epoch_tokens(hit.train, 2, 5)))
    monkeypatch.undo()
    other = AutoTokenizer.from_pretrained(tokenizer_dir)
    other.add_tokens(["statute"])  # same vocabulary file, different ids for one word
    assert build_data(cfg, other).stats["sources"][0]["cached"] is False


def test_failed_build_leaves_no_entry(tmp_path, corpus, tokenizer):
    p = tmp_path / "x.jsonl"
    write_jsonl(p, [{"text": t} for t in corpus[:10]] + ["{not json"] + [{"text": t} for t in corpus[10:]])
    cfg = make_cfg(tmp_path, [{"path": str(p)}], data__strict=True)
    with pytest.raises(DataError, match=rf"{p}:11: malformed JSON"):
        build_data(cfg, tokenizer)
    assert [q for q in Path(cfg.data.cache_dir).iterdir() if q.is_dir()] == []  # no half-written entry
    cfg.data.strict = False
    with pytest.warns(DataWarning, match="1 malformed JSON"):
        ok = build_data(cfg, tokenizer)
    assert ok.stats["n_documents"] == len(corpus)
    with pytest.warns(DataWarning, match="1 malformed JSON"):  # a cache hit repeats the build's warning
        assert build_data(cfg, tokenizer).stats["sources"][0]["cached"]


def test_worker_processes_give_identical_tokens(tmp_path, corpus_dir, tokenizer):
    one = build_data(make_cfg(tmp_path / "a", [{"path": str(corpus_dir)}]), tokenizer)
    two = build_data(make_cfg(tmp_path / "b", [{"path": str(corpus_dir)}], data__dataset_num_proc=2), tokenizer)
    assert one.stats["n_tokens"] == two.stats["n_tokens"]
    for a, b in zip(epoch_tokens(one.train, 4, 10), epoch_tokens(two.train, 4, 10)):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_load_dataset_builder_and_train_dataset(tmp_path, corpus, tokenizer):
    import datasets

    p = write_jsonl(tmp_path / "d.jsonl", [{"content": t, "n": i} for i, t in enumerate(corpus)])
    src = {"dataset": "json", "data_files": str(p), "text_field": "content", "filters": ["n < 30"],
           "split": "train[:50%]"}
    via_builder = build_data(make_cfg(tmp_path, [src]), tokenizer)
    assert via_builder.stats["n_documents"] == 30
    cfg = make_cfg(tmp_path, [])
    cfg.data.dataset_text_field = "content"
    ds = datasets.Dataset.from_dict({"content": corpus[:30]})
    via_api = build_data(cfg, tokenizer, train_dataset=ds)
    assert via_api.stats["n_tokens"] == via_builder.stats["n_tokens"]
    assert build_data(cfg, tokenizer, train_dataset=ds).stats["sources"][0]["cached"]


def test_invalid_utf8_text_file_reported_with_line(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.txt").write_bytes(b"line one\nline two \xff\xfe here\n")
    (d / "b.md").write_text("# fine\n")
    with pytest.warns(DataWarning, match=rf"1 files with invalid UTF-8, bad bytes replaced by U\+FFFD \(first at {d / 'a.txt'}:2\)"):
        docs = list(read_documents(SourceConfig(path=str(d))))
    assert docs[0].startswith("line one\nline two \ufffd") and docs[1] == "# fine\n"
    with pytest.raises(DataError, match=rf"{d / 'a.txt'}:2"):
        list(read_documents(SourceConfig(path=str(d)), strict=True))


def test_worker_processes_surface_read_errors(tmp_path, corpus, tokenizer):
    p = tmp_path / "x.jsonl"
    write_jsonl(p, [{"text": t} for t in corpus[:5]] + ['{"text": 3}'])
    cfg = make_cfg(tmp_path, [{"path": str(p)}], data__strict=True, data__dataset_num_proc=2)
    with pytest.raises(DataError, match=rf"{p}:6: non-string text"):
        build_data(cfg, tokenizer)
