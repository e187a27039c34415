"""Vocabulary extension for a language the base tokenizer handles badly: Chinese with SmolLM2-135M.

Corpus: Debian's Chinese man pages (package manpages-zh: /usr/share/man/zh_CN and zh_TW, simplified and
traditional), roff markup stripped, one document per page. Pages are split by a hash of their path into
training text and held-out text (never trained on, never learned from).

What is measured:

1. tokens per byte and per character on the held-out pages, SmolLM2's tokenizer against the extended one
   (`--add` tokens learned by cpt.model.vocab from the training pages);
2. that old text keeps its ids: every ASCII-only line of the man pages and the Python standard library's
   own source files (English and code) tokenise to exactly the same ids;
3. three continued-pretraining runs at equal compute, the same in everything but the vocabulary: the
   same optimizer steps, micro-batches, sequence length in tokens (so the same tokens per step and, but for
   the larger output layer, the same FLOPs), learning rates, LoRA and seed:
     none     SmolLM2's tokenizer
     mean     extended, new rows drawn around the mean of all rows (transformers' default resize)
     subword  extended, each new row the mean of the rows of the tokens it was made of (cpt's default)
   each evaluated on the same held-out pages before and after, in bits per byte (the summed negative log
   likelihood over the UTF-8 bytes, which does not depend on the tokenizer);
4. generation speed after training, in characters of Chinese text per second (greedy, same prompts, same
   number of new tokens).

    apt-get install -y manpages-zh
    .venv/bin/python bench/vocab_extension.py                          # the committed result
    .venv/bin/python bench/vocab_extension.py --steps 4 --add 2000     # a quick look
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import platform
import re
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MAN_DIRS = ("/usr/share/man/zh_CN", "/usr/share/man/zh_TW")
PROMPTS = ["ls 命令用于列出目录内容。", "选项\n", "描述\n该程序"]

_ESCAPES = [(re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""), (re.compile(r"\\s[+-]?\d"), ""), (re.compile(r"\\[*n]\(.."), ""),
            (re.compile(r"\\\((em|en|hy)"), "-"), (re.compile(r"\\\((lq|rq|dq)"), '"'), (re.compile(r"\\\(..?"), ""),
            (re.compile(r"\\[-]"), "-"), (re.compile(r"\\e"), "\\\\"), (re.compile(r"\\[&,/|^)%:]"), ""),
            (re.compile(r"\\ "), " "), (re.compile(r'\\".*$'), "")]
_KEEP_ARGS = {"SH", "SS", "TP", "IP", "B", "I", "BI", "BR", "IB", "IR", "RB", "RI", "SM", "SB", "TH", "UR", "MT", "Nm", "Nd"}


def strip_roff(src: str) -> str:
    """Plain text of a man page: comments and formatting requests dropped, the text of headings and font
    macros kept, inline escapes resolved or removed."""
    out = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].strip().split(None, 1)
            if not parts or parts[0] not in _KEEP_ARGS or len(parts) < 2:
                continue
            line = parts[1].replace('"', " ") if parts[0] != "TH" else " ".join(parts[1].replace('"', " ").split()[:1])
        for pat, rep in _ESCAPES:
            line = pat.sub(rep, line)
        line = line.strip()
        if line:
            out.append(line)
    return "\n".join(out)


def build_corpus(folder: Path, held_every: int, eval_docs: int, eval_chars: int) -> dict:
    """train.jsonl and held.jsonl under `folder` from the installed Chinese man pages."""
    pages = sorted(p for d in MAN_DIRS for p in Path(d).rglob("*.gz")) if all(Path(d).is_dir() for d in MAN_DIRS) else []
    if not pages and (folder / "corpus.json").is_file():  # a machine without the package: the corpus built elsewhere
        return json.loads((folder / "corpus.json").read_text())
    if not pages:
        raise SystemExit("no Chinese man pages: apt-get install -y manpages-zh (or copy a --work folder built elsewhere)")
    folder.mkdir(parents=True, exist_ok=True)
    train, held, skipped = [], [], 0
    for p in pages:
        try:
            text = strip_roff(gzip.decompress(p.read_bytes()).decode("utf-8"))
        except (UnicodeDecodeError, OSError, EOFError):
            skipped += 1
            continue
        if sum(1 for c in text if "\u4e00" <= c <= "\u9fff") < 50:  # a page that is still English, or a stub
            skipped += 1
            continue
        key = str(p.relative_to("/usr/share/man"))
        bucket = int(hashlib.sha256(key.encode()).hexdigest(), 16) % held_every
        (held if bucket == 0 else train).append({"text": text, "id": key})
    # The scored text: the start of each held-out page, so that no single long page dominates the measure.
    scored = [{"text": r["text"][:eval_chars], "id": r["id"]} for r in held[:eval_docs]]
    for name, rows in (("train.jsonl", train), ("held.jsonl", held), ("held_eval.jsonl", scored)):
        with open(folder / name, "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    info = {"pages": len(pages), "skipped": skipped, "train_docs": len(train), "held_docs": len(held),
            "train_bytes": sum(len(r["text"].encode()) for r in train), "held_bytes": sum(len(r["text"].encode()) for r in held),
            "scored_docs": len(scored), "scored_bytes": sum(len(r["text"].encode()) for r in scored)}
    (folder / "corpus.json").write_text(json.dumps(info))
    return info


def old_text_samples(folder: Path, max_files: int = 300) -> list[str]:
    """English and code: the man pages' ASCII-only lines and the standard library's source files."""
    lines = []
    for line in (folder / "train.jsonl").read_text().splitlines():
        lines += [s for s in json.loads(line)["text"].splitlines() if s.isascii() and len(s) > 20]
    src = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:max_files]
    return lines + [p.read_text(errors="replace") for p in src]


def run_one(name: str, args: argparse.Namespace, folder: Path, tokenizer_dir: Path | None, init: str) -> dict:
    from cpt.api import run_training
    from cpt.config import config_from_dict
    from cpt.demo import GGUF_NAME, smollm2_folder

    out = folder / f"run-{name}"
    embedding_lr = args.embedding_lr if tokenizer_dir is None or args.extended_embedding_lr is None else args.extended_embedding_lr
    raw = {
        "model": {"name_or_path": str(smollm2_folder()), "gguf_file": GGUF_NAME, "max_seq_length": args.seq,
                  "tokenizer": str(tokenizer_dir) if tokenizer_dir else None},
        "adapter": {"r": args.r, "lora_alpha": 32, "use_rslora": True, "use_gradient_checkpointing": False},
        "data": {"sources": [{"path": str(folder / "train.jsonl")}], "cache_dir": str(folder / "cache")},
        "train": {"per_device_train_batch_size": args.batch, "gradient_accumulation_steps": args.accum,
                  "max_steps": args.steps, "learning_rate": args.lr, "embedding_learning_rate": embedding_lr,
                  "warmup_ratio": 0.1, "lr_scheduler_type": "cosine", "seed": 3407},
        "vocab": {"init": init},
        "eval": {"sets": [{"name": "domain", "path": str(folder / "held_eval.jsonl")}],
                 "per_device_eval_batch_size": 4, "eval_steps": args.eval_steps},
        "output": {"output_dir": str(out), "logging_steps": 5, "save_steps": 0, "resume": False,
                   "overwrite_output_dir": True, "report": False, "report_to": []},
    }
    t0 = time.time()
    summary = run_training(config_from_dict(raw), device=torch.device(args.device))
    row = next(r for r in summary["eval_table"] if r["set"] == "domain")
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines() if line.strip()]
    curve = [[e["step"], e["bits_per_byte"]] for e in evals if e.get("set") == "domain"]
    return {"name": name, "init": init if tokenizer_dir else None, "embedding_lr": embedding_lr, "seconds": time.time() - t0,
            "steps": summary["step"], "tokens": summary["tokens"], "bpb_before": row["bits_per_byte_before"],
            "bpb_after": row["bits_per_byte_after"], "curve": curve, "output_dir": str(out)}


@torch.no_grad()
def generation_speed(output_dir: str, new_tokens: int, device: str) -> dict:
    from cpt.model import load_for_inference
    from cpt.runtime import model_device

    model, tok = load_for_inference(output_dir, device=device)
    chars = tokens = 0
    seconds = 0.0
    for prompt in PROMPTS:
        enc = tok(prompt, return_tensors="pt").to(model_device(model))
        model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)  # warm
        t0 = time.perf_counter()
        ids = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, enc["input_ids"].shape[1]:]
        seconds += time.perf_counter() - t0
        text = tok.decode(ids, skip_special_tokens=True)
        chars += len(text)
        tokens += len(ids)
    return {"chars_per_s": chars / seconds, "tokens_per_s": tokens / seconds, "chars_per_token": chars / tokens,
            "sample": text[:80]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/cpt-bench-vocab", help="corpus, tokenizers and runs go here")
    ap.add_argument("--add", type=int, default=8000, help="new tokens to learn")
    ap.add_argument("--learn-chars", type=int, default=6_000_000, help="training characters the tokens are learned from")
    ap.add_argument("--held-every", type=int, default=20, help="one page in this many is held out")
    ap.add_argument("--eval-docs", type=int, default=40, help="held-out pages scored in bits per byte")
    ap.add_argument("--eval-chars", type=int, default=1000, help="characters scored from the start of each")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--embedding-lr", type=float, default=1e-4)
    ap.add_argument("--extended-embedding-lr", type=float, default=None,
                    help="embedding learning rate of the runs with the extended vocabulary (default: --embedding-lr); "
                         "thousands of new rows learn faster at a higher rate than the unextended model's best")
    ap.add_argument("--eval-steps", type=int, default=0,
                    help="also score the held-out pages every N steps (the result shows the gap step by step)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of each run (default: torch's)")
    ap.add_argument("--gen-tokens", type=int, default=48)
    ap.add_argument("--device", default="cpu", help="where the runs train and generate (cpu, cuda)")
    ap.add_argument("--runs", default="none,mean,subword")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vocab_extension"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoTokenizer

    from cpt.cli import setup_logging
    from cpt.data.inspect import token_rates
    from cpt.demo import GGUF_NAME, smollm2_folder
    from cpt.model.vocab import check_unchanged, learn_extension, save_extension

    setup_logging()
    work = Path(args.work)
    t0 = time.time()
    corpus = build_corpus(work, args.held_every, args.eval_docs, args.eval_chars)
    print("corpus:", corpus, flush=True)
    train = [json.loads(l)["text"] for l in (work / "train.jsonl").read_text().splitlines()]
    held = [json.loads(l)["text"] for l in (work / "held.jsonl").read_text().splitlines()]
    base = AutoTokenizer.from_pretrained(str(smollm2_folder()), gguf_file=GGUF_NAME)
    tok_dir = work / "tokenizer-zh"
    wanted = {"add": args.add, "learn_chars": args.learn_chars}
    saved = json.loads((tok_dir / "vocab_extension.json").read_text()) if (tok_dir / "vocab_extension.json").is_file() else {}
    if {k: saved.get("stats", {}).get(k) for k in wanted} == wanted:  # learned by an earlier run of these settings
        new = AutoTokenizer.from_pretrained(tok_dir)
        added, learn_s = len(saved["tokens"]), saved["stats"]["learn_seconds"]
    else:
        t = time.time()
        ext = learn_extension(base, train, args.add, max_chars=args.learn_chars)
        learn_s = time.time() - t
        added = len(ext.tokens)
        if tok_dir.exists():
            import shutil
            shutil.rmtree(tok_dir)
        new = save_extension(base, ext, tok_dir, {**wanted, "learn_seconds": learn_s})
    before, after = token_rates(base, held), token_rates(new, held)
    after_train = token_rates(new, train[:200])
    before_train = token_rates(base, train[:200])
    old = old_text_samples(work)
    changed = check_unchanged(base, new, old)
    print(f"learned {added} tokens in {learn_s:.0f}s; tokens/byte {before['tokens_per_byte']:.4f} -> "
          f"{after['tokens_per_byte']:.4f}; old text unchanged: {changed is None} ({len(old)} texts)", flush=True)
    runs = []
    settings = json.dumps({k: v for k, v in vars(args).items() if k != "runs"}, sort_keys=True)
    for name in [n for n in args.runs.split(",") if n]:
        done = work / f"run-{name}.json"  # a finished run of the same settings is kept (a rerun after a crash)
        if done.is_file() and json.loads(done.read_text()).get("settings") == settings:
            runs.append(json.loads(done.read_text())["result"])
        else:
            runs.append(run_one(name, args, work, None if name == "none" else tok_dir, "subword" if name == "none" else name))
            done.write_text(json.dumps({"settings": settings, "result": runs[-1]}))
        print(runs[-1], flush=True)
    for r in runs:
        if r["name"] in ("none", "subword"):
            r["generation"] = generation_speed(r["output_dir"], args.gen_tokens, args.device)
            print(r["name"], r["generation"], flush=True)
    result = {
        "command": "python bench/vocab_extension.py " + " ".join(sys.argv[1:]),
        "machine": (torch.cuda.get_device_name() if args.device.startswith("cuda") else
                    f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads") + f", torch {torch.__version__}",
        "corpus": corpus, "settings": {k: v for k, v in vars(args).items() if k not in ("work", "out")},
        "extension": {"added": added, "learn_seconds": learn_s, "vocab_before": len(base), "vocab_after": len(new)},
        "held_out_rates": {"before": before, "after": after},
        "train_sample_rates": {"before": before_train, "after": after_train},
        "old_text": {"texts": len(old), "bytes": sum(len(s.encode()) for s in old), "identical": changed is None},
        "runs": runs, "seconds": time.time() - t0,
    }
    Path(args.out + ".json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    Path(args.out + ".md").write_text(render(result))
    print(render(result))


_COUNT = {1: "One", 2: "Two", 3: "Three"}


def curve_table(runs: dict) -> list[str]:
    """Held-out bits per byte at each evaluation of the unextended and the extended (subword) run, and how
    much of the starting gap is closed: empty unless both were scored during training (--eval-steps)."""
    if "none" not in runs or "subword" not in runs:
        return []
    a, b = dict(runs["none"].get("curve") or []), dict(runs["subword"].get("curve") or [])
    steps = sorted(set(a) & set(b))
    if len(steps) < 3 or steps[0] != 0:
        return []
    gap0 = b[0] - a[0]
    lines = ["", "**During training** (the same runs, scored every few steps):", "",
             "| step | SmolLM2's vocabulary | extended (pieces) | gap | of the starting gap closed |", "|---|---|---|---|---|"]
    for step in steps:
        gap = b[step] - a[step]
        closed = f"{1 - gap / gap0:.0%}" if gap0 > 0 and step else "-"
        lines.append(f"| {step} | {a[step]:.4f} | {b[step]:.4f} | {gap:+.4f} | {closed} |")
    return lines


def render(r: dict) -> str:
    b, a = r["held_out_rates"]["before"], r["held_out_rates"]["after"]
    s = r["settings"]
    runs = {x["name"]: x for x in r["runs"]}
    tokens_per_step = s["batch"] * s["accum"] * s["seq"]
    trained_s = sum(x["seconds"] for x in r["runs"])  # more than the invocation's time when runs were kept
    lines = [
        "# Vocabulary extension: Chinese man pages, SmolLM2-135M",
        "",
        f"`{r['command']}` on {r['machine']}; {r['seconds'] / 60:.1f} min in all"
        + (f" (training runs kept from an earlier invocation with the same settings included: {trained_s / 60:.0f} min "
           "of training)." if trained_s > r["seconds"] else "."),
        "",
        f"Corpus: Debian's Chinese man pages (manpages-zh, zh_CN and zh_TW), roff stripped: {r['corpus']['train_docs']} "
        f"training pages ({r['corpus']['train_bytes'] / 1e6:.1f} MB), {r['corpus']['held_docs']} held-out pages "
        f"({r['corpus']['held_bytes'] / 1e6:.2f} MB, one in {s['held_every']} by a hash of the path, never trained or "
        "learned on). The man pages mix Chinese prose with English option names and code.",
        "",
        f"**Tokens.** {r['extension']['added']:,} new tokens learned from {s['learn_chars'] / 1e6:.0f}M characters of the "
        f"training pages in {r['extension']['learn_seconds']:.0f} s (vocabulary {r['extension']['vocab_before']:,} -> "
        f"{r['extension']['vocab_after']:,}). On the held-out pages:",
        "",
        "| text | tokens/byte before | after | tokens/char before | after | fewer tokens |",
        "|---|---|---|---|---|---|",
        f"| all held-out text | {b['tokens_per_byte']:.4f} | {a['tokens_per_byte']:.4f} | {b['tokens_per_char']:.4f} | "
        f"{a['tokens_per_char']:.4f} | **{b['tokens'] / a['tokens']:.2f}x** |",
    ]
    for script in ("Han", "Latin", "common"):
        if script in b["scripts"] and script in a["scripts"]:
            x, y = b["scripts"][script], a["scripts"][script]
            lines.append(f"| {script} ({x['bytes'] / b['bytes']:.0%} of the bytes) | {x['tokens_per_byte']:.4f} | "
                         f"{y['tokens_per_byte']:.4f} | {x['tokens_per_char']:.4f} | {y['tokens_per_char']:.4f} | "
                         f"{x['tokens'] / max(y['tokens'], 1):.2f}x |")
    o = r["old_text"]
    lines += [
        "",
        f"Old text keeps its ids: {o['texts']:,} English and code texts ({o['bytes'] / 1e6:.1f} MB: the pages' ASCII "
        f"lines and the Python standard library's source files) tokenise to {'exactly the same' if o['identical'] else 'DIFFERENT'} ids.",
        "",
    ]
    if not runs:
        ratio = b["tokens"] / a["tokens"]
        return "\n".join(lines + [f"Goal of at least 1.8x fewer tokens for the same text: **{'met' if ratio >= 1.8 else 'not met'}** "
                                   f"({ratio:.2f}x). The training comparison was not run with this command (`--runs` empty)."]) + "\n"
    lines += [
        f"**Equal compute.** {_COUNT.get(len(runs), len(runs))} runs identical but for the vocabulary: {s['steps']} optimizer steps of "
        f"{s['batch']} x {s['accum']} sequences of {s['seq']} tokens ({tokens_per_step:,} tokens per step), LoRA r={s['r']} "
        f"(rsLoRA) on every projection, embeddings and head trained in full, learning rate {s['lr']:g}, embedding learning "
        f"rate as in the table, cosine with 10% warmup, seed 3407. What is held equal is the number of token "
        "positions processed (steps x batch x sequence length), hence the FLOPs of every layer but the output layer, "
        f"which is {r['extension']['vocab_after'] / r['extension']['vocab_before'] - 1:.0%} wider with the extension. "
        f"Held-out bits per byte over the first {s['eval_chars']:,} characters of {r['corpus']['scored_docs']} held-out pages "
        f"({r['corpus']['scored_bytes'] / 1e3:.0f} kB, the same bytes for every tokenizer):",
        "",
        "| vocabulary | new rows start from | embedding lr | bits/byte before training | after | text seen in training |",
        "|---|---|---|---|---|---|",
    ]
    label = {"none": ("SmolLM2's (49,152)", "-"), "mean": ("extended", "mean of all rows (transformers' default)"),
             "subword": ("extended", "mean of their pieces (cpt)")}
    for name in ("none", "mean", "subword"):
        if name in runs:
            x = runs[name]
            rate = b if name == "none" else a
            lr = x.get("embedding_lr", s["embedding_lr"])
            lines.append(f"| {label[name][0]} | {label[name][1]} | {lr:g} | {x['bpb_before']:.4f} | **{x['bpb_after']:.4f}** | "
                         f"~{x['tokens'] / rate['tokens_per_byte'] / 1e3:.0f} kB |")
    if "none" in runs and "subword" in runs:
        g0, g1 = runs["none"].get("generation"), runs["subword"].get("generation")
        if g0 and g1:
            lines += ["", f"**Generation** ({s['gen_tokens']} new tokens, greedy, after training, {s.get('device', 'cpu')}): "
                      f"{g0['chars_per_s']:.1f} characters/s without the extension ({g0['chars_per_token']:.2f} characters per token), "
                      f"{g1['chars_per_s']:.1f} with it ({g1['chars_per_token']:.2f}): **{g1['chars_per_s'] / g0['chars_per_s']:.2f}x**."]
        lines += curve_table(runs)
        none, sub = runs["none"]["bpb_after"], runs["subword"]["bpb_after"]
        gap0, gap1 = runs["subword"]["bpb_before"] - runs["none"]["bpb_before"], sub - none
        lines += ["", f"The extended model starts {gap0:+.4f} bits per byte from the unextended one (its {r['extension']['added']:,} new "
                  f"rows start as estimates) and ends {gap1:+.4f} from it: in {s['steps']} steps training "
                  + (f"closed {1 - gap1 / gap0:.0%} of the gap." if gap1 > 0 else "closed the gap and passed it.")
                  if gap0 > 0 else ""]
        ratio = b["tokens"] / a["tokens"]
        lines += ["", "Goals: at least 1.8x fewer tokens for the same text: "
                  f"**{'met' if ratio >= 1.8 else 'not met'}** ({ratio:.2f}x); held-out bits per byte at equal compute no "
                  f"worse than without extension: **{'met' if sub <= none else 'not met'}** ({sub:.4f} against {none:.4f})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
