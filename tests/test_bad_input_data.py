"""Bad input data, every format cpt reads: each case ends in a message naming the file (and line or
field) and what to do, or a counted skip that keeps every good row; never a traceback, never lost data.

Each case goes through the public entry points: `cpt.data.build_data` (what `cpt train` runs) and
`cpt inspect` (`cpt.cli.main(["inspect", path])`, its exit code and stderr). The formats are those of
data/sources.py: .txt/.md, .jsonl, .json, .csv, .parquet (each optionally .gz), folders, globs and
`datasets` folders. docs/reliability.md ("Data sources") lists the cases by class.

    .venv/bin/python -m pytest tests/test_bad_input_data.py -q
"""
from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from cpt.cli import main as cli_main
from cpt.config import ConfigError, config_from_dict
from cpt.data import DataError, DataWarning, build_data
from cpt.data.cache import TokenShards
from cpt.data.tokenize import Encoder


def build(cache: Path, path: Path | str, tokenizer, **data):
    cfg = config_from_dict({"data": {"path": str(path), "cache_dir": str(cache), **data},
                            "model": {"max_seq_length": 32}, "eval": {"holdout_fraction": 0.0}})
    return build_data(cfg, tokenizer)


def jsonl(rows: list) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def parquet_bytes(tmp_path: Path, table: dict) -> bytes:
    import pandas as pd

    f = tmp_path / "_scratch.parquet"
    pd.DataFrame(table).to_parquet(f)
    data = f.read_bytes()
    f.unlink()
    return data


def csv_bytes(header: str | None, docs: list[str]) -> bytes:
    lines = ([header] if header else []) + ['"' + d.replace('"', '""') + '"' for d in docs]
    return ("\n".join(lines) + "\n").encode()


def zip_bytes(tmp_path: Path) -> bytes:
    import zipfile

    f = tmp_path / "_scratch.zip"
    with zipfile.ZipFile(f, "w") as z:
        z.writestr("word/document.xml", "<w:document>hello</w:document>")
    data = f.read_bytes()
    f.unlink()
    return data


# ---------------------------------------------------------------------------- the case table
#
# ("error", needles):     build_data raises a ConfigError naming the file and saying each needle;
#                         `cpt inspect` exits 2 with the same kind of one-line message.
# ("no_docs", needles):   the file reads, but nothing in it is usable: build_data raises a ConfigError
#                         naming the file; `cpt inspect` exits 0 and shows what it found.
# ("skip", needle, kept): the bad rows are skipped and counted in a DataWarning naming the file; the
#                         `kept` good documents all reach training; `cpt inspect` exits 0.

def _cases(tmp_path: Path, docs: list[str]) -> list[tuple[str, str, bytes, tuple]]:
    rows = [{"text": t} for t in docs]
    good_parquet = parquet_bytes(tmp_path, {"text": docs})
    return [
        # truncated
        ("truncated-parquet", "t.parquet", good_parquet[: len(good_parquet) // 2],
         ("error", ["not a readable Parquet file", "truncated", "again"])),
        ("truncated-jsonl-gz", "t.jsonl.gz", gzip.compress(jsonl(rows))[:60],
         ("error", ["truncated or not gzip", "again"])),
        ("truncated-csv", "t.csv", b'text\n"' + docs[0].encode() + b"\n",
         ("error", [":2", "malformed CSV", "unclosed quote"])),
        ("truncated-json", "t.json", json.dumps(rows).encode()[:-40],
         ("error", ["malformed JSON", "truncated"])),
        ("truncated-jsonl-last-line", "t.jsonl", jsonl(rows)[:-20], ("skip", "malformed JSON", len(docs) - 1)),
        ("truncated-txt-mid-character", "t.txt", (docs[0] + " café").encode()[:-1],
         ("skip", "invalid UTF-8, bad bytes replaced", 1)),
        # empty
        ("empty-txt", "e.txt", b"", ("no_docs", ["no documents", "empty"])),
        ("empty-jsonl", "e.jsonl", b"", ("no_docs", ["no documents"])),
        ("empty-json", "e.json", b"", ("error", ["malformed JSON", "empty"])),
        ("empty-csv", "e.csv", b"", ("no_docs", ["no documents"])),
        ("empty-parquet-file", "e.parquet", b"", ("error", ["not a readable Parquet file"])),
        ("parquet-no-rows", "e.parquet", parquet_bytes(tmp_path, {"text": []}), ("no_docs", ["no documents"])),
        ("whitespace-rows", "w.jsonl", jsonl([{"text": "  "}, {"text": "\n"}]), ("no_docs", ["2 empty"])),
        # wrong encoding
        ("latin1-txt", "l.txt", (docs[0] + " café").encode("latin-1"),
         ("skip", "invalid UTF-8, bad bytes replaced", 1)),
        ("latin1-jsonl-row", "l.jsonl", jsonl(rows[:3] + [b'{"text": "caf\xe9"}'] + rows[3:]),
         ("skip", "invalid UTF-8 (first at {f}:4)", len(docs))),
        ("latin1-csv-row", "l.csv", csv_bytes("text", docs[:2]) + b'"caf\xe9"\n', ("skip", "invalid UTF-8", 2)),
        ("latin1-json", "l.json", json.dumps(rows).encode()[:-2] + b', {"text": "caf\xe9"}]',
         ("error", ["invalid UTF-8"])),
        ("utf16-txt", "u.txt", docs[0].encode("utf-16"), ("error", ["UTF-16", "convert it to UTF-8"])),
        ("utf16-jsonl-no-bom", "u.jsonl", jsonl(rows).decode().encode("utf-16-le"), ("error", ["NUL bytes", "UTF-8"])),
        ("utf8-bom-jsonl", "b.jsonl", b"\xef\xbb\xbf" + jsonl(rows), ("skip", None, len(docs))),
        ("utf8-bom-csv", "b.csv", b"\xef\xbb\xbf" + csv_bytes("text", docs), ("skip", None, len(docs))),
        # wrong schema
        ("missing-field-jsonl", "m.jsonl", jsonl([{"body": t} for t in docs]),
         ("no_docs", ["no text field 'text'", "body", "text_field"])),
        ("missing-field-parquet", "m.parquet", parquet_bytes(tmp_path, {"body": docs}),
         ("no_docs", ["no column 'text'", "body", "text_field"])),
        ("csv-without-header", "h.csv", csv_bytes(None, docs),
         ("no_docs", ["no header row", "add a header line", "text_field"])),
        ("nested-text", "n.jsonl", jsonl([{"meta": {"text": t}} for t in docs]),
         ("no_docs", ["no text field 'text'", "meta"])),
        ("text-not-string", "s.jsonl", jsonl(rows[:2] + [{"text": 5}, {"text": ["a", "b"]}, {"text": {"t": "x"}}]),
         ("skip", "3 non-string text (first at {f}:3)", 2)),
        ("text-all-non-string", "s.jsonl", jsonl([{"text": 5}, {"text": None}]), ("no_docs", ["2 non-string"])),
        ("parquet-int-text", "i.parquet", parquet_bytes(tmp_path, {"text": [1, 2]}), ("no_docs", ["non-string"])),
        ("json-list-of-strings", "l.json", json.dumps(docs[:3]).encode(), ("no_docs", ["malformed JSON"])),
        ("json-object-without-rows", "o.json", b'{"a": 1}', ("error", ["list of rows"])),
        ("jsonl-row-not-object", "r.jsonl", jsonl(rows[:2] + [[1, 2], "x"]), ("skip", "malformed JSON", 2)),
        ("csv-unquoted-comma", "c.csv",
         b"text,id\nhello, world,1\n" + csv_bytes(None, docs[:2]).replace(b'"\n', b'",1\n'),
         ("skip", "malformed CSV/TSV row", 2)),
        ("csv-short-row", "c.csv", b"id,text\n1\n" + b"".join(f'2,"{d}"\n'.encode() for d in docs[:2]),
         ("skip", "malformed CSV/TSV row", 2)),
        # huge rows
        ("huge-jsonl-row", "g.jsonl", jsonl([{"text": " ".join(docs) * 300}] + rows[:2]), ("skip", None, 3)),
        ("huge-csv-cell", "g.csv", csv_bytes("text", [" ".join(docs) * 300, docs[0]]), ("skip", None, 2)),
        # wrong extension or not text at all
        ("parquet-named-jsonl", "p.jsonl", good_parquet, ("error", ["Parquet", "name it .parquet"])),
        ("parquet-named-txt", "p.txt", good_parquet, ("error", ["Parquet", "name it .parquet"])),
        ("gzip-without-gz", "z.jsonl", gzip.compress(jsonl(rows)), ("error", ["gzip", "add .gz"])),
        ("jsonl-named-parquet", "j.parquet", jsonl(rows), ("error", ["not a readable Parquet file", "not Parquet"])),
        ("plain-named-gz", "p.jsonl.gz", jsonl(rows), ("error", ["not gzip"])),
        ("docx", "d.docx", zip_bytes(tmp_path), ("error", ["unsupported file type .docx", ".txt"])),
        ("docx-named-txt", "d.txt", zip_bytes(tmp_path), ("error", ["ZIP archive", "export its text"])),
        ("pdf-named-txt", "d.txt", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", ("error", ["PDF", "pdftotext"])),
        ("rtf", "d.rtf", b"{\\rtf1 hello}", ("error", ["unsupported file type .rtf"])),
        ("binary-named-csv", "b.csv", bytes(range(256)) * 4, ("error", ["NUL bytes"])),
    ]


def _case_ids() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return [c[0] for c in _cases(Path(d), ["a b", "c d"])]


@pytest.mark.parametrize("case", _case_ids())
def test_bad_file(case, tmp_path, corpus, tokenizer, capsys):
    docs = corpus[:6]
    name, fname, data, expect = next(c for c in _cases(tmp_path, docs) if c[0] == case)
    f = tmp_path / "data" / fname
    f.parent.mkdir()
    f.write_bytes(data)
    kind = expect[0]

    if kind in ("error", "no_docs"):
        with pytest.raises(ConfigError) as e, warnings.catch_warnings():
            warnings.simplefilter("ignore", DataWarning)
            build(tmp_path / "cache", f, tokenizer)
        msg = str(e.value)
        assert str(f) in msg, msg
        for needle in expect[1]:
            assert needle in msg, (needle, msg)
        assert len(msg) < 600, msg  # one line a user reads, not a dump of the data
    else:
        needle, kept = expect[1], expect[2]
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            b = build(tmp_path / "cache", f, tokenizer)
        said = [str(x.message) for x in w if issubclass(x.category, DataWarning)]
        if needle is None:
            assert not said, said
        else:
            assert any(needle.format(f=f) in s and str(f) in s for s in said), (needle, said)
        assert b.stats["n_documents"] == kept

    rc = cli_main(["inspect", str(f)])
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    if kind == "error":
        assert rc == 2 and str(f) in out.err and out.err.count("\n") == 1, out.err
    else:
        assert rc == 0, out.err


def test_truncated_parquet_names_the_file_in_train_and_inspect(tmp_path, corpus, tokenizer, capsys):
    """Was `pyarrow.lib.ArrowInvalid: Parquet magic bytes not found`, no file named, in both commands."""
    d = tmp_path / "shards"
    d.mkdir()
    good = parquet_bytes(tmp_path, {"text": corpus[:10]})
    (d / "a.parquet").write_bytes(good)
    (d / "b.parquet").write_bytes(good[:-30])
    with pytest.raises(DataError, match=r"b\.parquet: not a readable Parquet file .*write or download it again"):
        build(tmp_path / "cache", d, tokenizer)
    assert cli_main(["inspect", str(d)]) == 2
    err = capsys.readouterr().err
    assert "b.parquet: not a readable Parquet file" in err and "Traceback" not in err


@pytest.mark.parametrize("bad", ["truncated-parquet", "csv-without-header", "parquet-named-jsonl"])
def test_cpt_train_on_bad_data_is_one_line(bad, tmp_path, corpus, tiny_model_dir, capsys):
    """`cpt train` reads data through build_data; its error reaches the user as one line, exit code 2."""
    name, fname, data, _ = next(c for c in _cases(tmp_path, corpus[:6]) if c[0] == bad)
    f = tmp_path / fname
    f.write_bytes(data)
    rc = cli_main(["train", f"model.name_or_path={tiny_model_dir}", "model.max_seq_length=32", f"data.path={f}",
                   f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=2", f"output.output_dir={tmp_path / 'run'}",
                   "output.report=false", "eval.eval_at_start=false"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if str(f) in line], err


def test_csv_without_header_says_so_in_a_line(tmp_path, corpus, tokenizer, capsys):
    """Was: "no text field 'text'; the fields are: <the first document's whole text>"."""
    long_doc = " ".join(corpus)  # thousands of characters: none of it belongs in the message
    f = tmp_path / "notes.csv"
    f.write_bytes(csv_bytes(None, [long_doc] + corpus[:3]))
    with pytest.raises(DataError) as e:
        build(tmp_path / "cache", f, tokenizer)
    msg = str(e.value)
    assert msg.startswith(f"{f}: has no header row naming the column 'text'") and "add a header line" in msg
    quoted = msg.split("its first line reads ", 1)[1].split(")", 1)[0]
    assert len(quoted) <= 62 and long_doc[:40] in quoted
    assert cli_main(["inspect", str(f)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "has no header row naming the column 'text'" in out and long_doc[:200] not in out


# ---------------------------------------------------------------------------- strict and the cache


def test_strict_run_refuses_a_cache_built_without_strict(tmp_path, corpus, tokenizer):
    """A lenient run caches the source with its bad line skipped; a strict run must still fail there,
    with the message a strict run on a fresh cache gives (it used to warn and train)."""
    f = tmp_path / "a.jsonl"
    f.write_bytes(jsonl([{"text": t} for t in corpus[:5]] + [b'{"text": broken'] + [{"text": t} for t in corpus[5:9]]))
    with pytest.warns(DataWarning, match="1 malformed JSON"):
        lenient = build(tmp_path / "cache", f, tokenizer)
    assert lenient.stats["n_documents"] == 9
    with pytest.raises(DataError) as cached:
        build(tmp_path / "cache", f, tokenizer, strict=True)
    with pytest.raises(DataError) as fresh:
        build(tmp_path / "fresh-cache", f, tokenizer, strict=True)
    assert str(cached.value) == str(fresh.value)
    assert str(cached.value).startswith(f"{f}:6: malformed JSON") and "data.strict is on" in str(cached.value)


def test_strict_run_reuses_a_clean_cache(tmp_path, corpus, tokenizer):
    f = tmp_path / "a.jsonl"
    f.write_bytes(jsonl([{"text": t} for t in corpus[:9]]))
    build(tmp_path / "cache", f, tokenizer)
    again = build(tmp_path / "cache", f, tokenizer, strict=True)
    assert again.stats["sources"][0]["cached"]


# ---------------------------------------------------------------------------- folders, globs, datasets


def test_folder_reports_the_files_it_does_not_read(tmp_path, corpus, tokenizer, capsys):
    d = tmp_path / "docs"
    d.mkdir()
    for i, t in enumerate(corpus[:4]):
        (d / f"{i}.txt").write_text(t)
    (d / "contract.docx").write_bytes(zip_bytes(tmp_path))
    (d / ".DS_Store").write_bytes(b"\0\0")
    with pytest.warns(DataWarning, match=r"ignored 1 file\(s\) of other types \(1 \.docx\), first .*contract\.docx"):
        b = build(tmp_path / "cache", d, tokenizer)
    assert b.stats["n_documents"] == 4
    assert cli_main(["inspect", str(d)]) == 0
    assert "ignored 1 file(s)" in capsys.readouterr().out


@pytest.mark.parametrize("what", ["empty-folder", "folder-of-docx", "glob-matching-nothing", "missing-path"])
def test_folders_and_globs_with_nothing_to_read(what, tmp_path, tokenizer, capsys):
    d = tmp_path / "docs"
    d.mkdir()
    if what == "folder-of-docx":
        (d / "a.docx").write_bytes(zip_bytes(tmp_path))
    path = {"empty-folder": str(d), "folder-of-docx": str(d), "glob-matching-nothing": str(d / "*.jsonl"),
            "missing-path": str(d / "nope.jsonl")}[what]
    with pytest.raises(DataError) as e:
        build(tmp_path / "cache", path, tokenizer)
    assert path in str(e.value)
    if what == "folder-of-docx":
        assert "1 .docx" in str(e.value) and "convert them" in str(e.value)
    assert cli_main(["inspect", path]) == 2
    err = capsys.readouterr().err
    assert path in err and "Traceback" not in err


def _datasets_folder(tmp_path: Path, corpus: list[str], name: str) -> Path:
    import datasets

    out = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        datasets.Dataset.from_dict({"text": corpus[:8]}).save_to_disk(str(out))
    return out


def test_datasets_folder_given_as_path_says_use_dataset(tmp_path, corpus, tokenizer, capsys):
    d = _datasets_folder(tmp_path, corpus, "ds")
    with pytest.raises(DataError, match=r"is a `datasets` folder .*`dataset: "):
        build(tmp_path / "cache", d, tokenizer)
    assert cli_main(["inspect", str(d)]) == 0  # inspect knows the folder for what it is
    capsys.readouterr()


def test_damaged_datasets_folder_names_itself(tmp_path, corpus, tokenizer, capsys):
    d = _datasets_folder(tmp_path, corpus, "ds")
    arrow = next(d.glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])
    cfg = config_from_dict({"data": {"dataset": str(d), "cache_dir": str(tmp_path / "cache")},
                            "model": {"max_seq_length": 32}})
    with pytest.raises(DataError, match=r"ds: this `datasets` folder cannot be loaded .*save it again"):
        build_data(cfg, tokenizer)
    assert cli_main(["inspect", str(d)]) == 2
    err = capsys.readouterr().err
    assert str(d) in err and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path, corpus, tokenizer, capsys):
    f = tmp_path / "a.jsonl"
    f.write_bytes(jsonl([{"text": t} for t in corpus[:3]]))
    f.chmod(0)
    try:
        with pytest.raises(DataError, match=r"a\.jsonl: cannot be read \(PermissionError"):
            build(tmp_path / "cache", f, tokenizer)
        assert cli_main(["inspect", str(f)]) == 2
        assert "Traceback" not in capsys.readouterr().err
    finally:
        f.chmod(0o644)


# ---------------------------------------------------------------------------- one huge document


def _mixed_text(n_words: int, seed: int = 0) -> str:
    """Words with the separators that matter to a pre-tokenizer: runs of spaces, newlines, tabs,
    punctuation, digits and non-ASCII letters."""
    from conftest import WORDS

    rng = random.Random(seed)
    seps = [" ", " ", " ", "  ", "   ", "\n", "\n\n", ". ", ".\n", ", ", " 12345 ", " café ", "\t",
            " 日本語 ", " (x) "]
    return "".join(rng.choice(WORDS) + rng.choice(seps) for _ in range(n_words))


@pytest.mark.parametrize("fast", [True, False], ids=["fast-bpe", "tokenizers"])
def test_long_document_in_pieces_gets_the_whole_documents_ids(tokenizer, fast):
    text = _mixed_text(25_000)  # about 170k characters
    enc = Encoder(tokenizer, fast=fast, piece_chars=1000)
    pieces = list(enc.pieces(text))
    assert len(pieces) > 100 and max(map(len, pieces)) <= 16_000 and "".join(pieces) == text
    whole = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    got = enc.encode([text, "a short one", text])
    assert got[0].tolist() == whole and got[2].tolist() == whole
    assert got[1].tolist() == tokenizer("a short one", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_long_document_through_build_data_keeps_its_ids(tmp_path, tokenizer):
    text = _mixed_text(40_000, seed=1)  # several pieces of the default size
    f = tmp_path / "long.txt"
    f.write_text(text)
    b = build(tmp_path / "cache", f, tokenizer)
    ids = TokenShards(Path(b.stats["sources"][0]["cache_path"])).doc(0)
    assert ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_whitespace_free_stretch_is_cut_and_decodes_to_the_same_text(tokenizer):
    text = "".join(random.Random(2).choice("abcdefghij0123456789") for _ in range(60_000))
    enc = Encoder(tokenizer, add_eos=False, piece_chars=1000)
    assert len(list(enc.pieces(text))) >= 60
    assert tokenizer.decode(enc.encode([text])[0].tolist()) == text


_MEMORY_CHILD = """
import resource, sys, warnings
from transformers import AutoTokenizer
from cpt.config import config_from_dict
from cpt.data import build_data
tok = AutoTokenizer.from_pretrained(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cfg = config_from_dict({"data": {"path": sys.argv[2], "cache_dir": sys.argv[3]}, "model": {"max_seq_length": 32},
                        "eval": {"holdout_fraction": 0.0}})
b = build_data(cfg, tok)
print(b.stats["n_tokens"], (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_huge_single_line_document_memory_is_bounded(tmp_path, tokenizer_dir):
    """A 20 MB one-line file: whole-document tokenisation peaked at about 3 GB over the process's
    baseline (50 MB: 7.7 GB); in pieces the rise stays a small multiple of the file."""
    line = _mixed_text(2000, seed=3).replace("\n", " ")
    f = tmp_path / "huge.txt"
    size = 20 << 20
    f.write_text((line * (size // len(line) + 1))[:size])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(tokenizer_dir), str(f), str(tmp_path / "cache")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    n_tokens, rise_mb = map(int, out.stdout.split()[-2:])
    assert n_tokens > 5_000_000
    assert rise_mb < 500, f"peak memory rose {rise_mb} MB for a 20 MB document"


def test_a_stream_with_no_documents_names_the_source_in_one_line(tmp_path, tiny_model_dir, capsys):
    """Every row of a streamed file filtered out: `cpt train` says which source and what to check."""
    f = tmp_path / "docs.jsonl"
    f.write_bytes(jsonl([{"text": f"document {i}", "lang": "de"} for i in range(8)]))
    sources = json.dumps([{"path": str(f), "filters": ["lang == 'en'"]}])
    rc = cli_main(["train", f"model.name_or_path={tiny_model_dir}", "model.max_seq_length=32", f"data.sources={sources}",
                   "data.streaming=true", "train.max_steps=2", f"output.output_dir={tmp_path / 'run'}",
                   "output.report=false", "eval.eval_at_start=false", "eval.holdout_fraction=0"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert "docs.jsonl: the streamed source yields no documents" in err and "filters" in err, err
