"""The `cpt` command: a thin face over the stages.

    cpt train CONFIG [key=value ...]     continued pretraining (resumes automatically)
    cpt sft CONFIG [key=value ...]       instruction fine-tuning: cpt train with train.stage=sft
    cpt demo                             SmolLM2-135M on the Python standard library's docs, on CPU
    cpt inspect SOURCE                   fields, sizes, labeled vs unlabeled, training budget
    cpt eval MODEL --data PATH           loss, perplexity, bits per byte
    cpt report OUTPUT_DIR                the HTML report of a run
    cpt merge ADAPTER_DIR OUT_DIR        a merged model for AutoModelForCausalLM
    cpt export RUN --format gguf         a GGUF file of the merged model for llama.cpp / Ollama
    cpt generate MODEL --prompt TEXT     sample text
    cpt plan CONFIG                      memory and speed estimate before a run
    cpt vocab extend --data P --add N    new tokens learned from a corpus (a new language)
    cpt config                           every config key with its default and meaning
    cpt convert-config OTHER.yaml        a LLaMA-Factory (stage: pt) or axolotl config as a cpt config
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def setup_logging(verbose: bool = False) -> None:
    """cpt's lines only, unless verbose (cpt.console)."""
    from cpt.console import setup_logging as setup
    from cpt.data.sources import DataWarning

    setup(verbose, keep_warnings=(DataWarning,))


def print_eval_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    if not rows:
        return
    table = Table(title="held-out evaluation: before -> after")
    for col in ("set", "loss before", "loss after", "ppl before", "ppl after", "bits/byte before", "bits/byte after", "change"):
        table.add_column(col, justify="right" if col != "set" else "left")
    def num(r: dict, k: str, fmt: str, scale: float = 1.0) -> str:
        v = r.get(k)
        return "-" if v is None else format(scale * v, fmt)

    for r in rows:
        table.add_row(str(r.get("set")), num(r, "loss_before", ".4f"), num(r, "loss_after", ".4f"),
                      num(r, "perplexity_before", ".2f"), num(r, "perplexity_after", ".2f"),
                      num(r, "bits_per_byte_before", ".4f"), num(r, "bits_per_byte_after", ".4f"),
                      num(r, "bits_per_byte_change", "+.1f", 100.0) + ("%" if r.get("bits_per_byte_change") is not None else ""))
    Console(width=None if sys.stdout.isatty() else 110).print(table)  # logs and CI: room for every column


def _config_and_overrides(args: argparse.Namespace) -> tuple:
    """`cpt train key=value ...` without a file: the first positional is an override too."""
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        return None, [args.config, *args.overrides]
    return args.config, args.overrides


def cmd_train(args: argparse.Namespace) -> int:
    from cpt.api import run_training
    from cpt.config import load_config

    cfg = load_config(*_config_and_overrides(args))
    summary = run_training(cfg)
    _print_summary(summary, cfg.output.output_dir)
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from cpt.api import run_training
    from cpt.config import load_config

    config, overrides = _config_and_overrides(args)
    cfg = load_config(config, [*overrides, "train.stage=sft"])
    summary = run_training(cfg)
    _print_summary(summary, cfg.output.output_dir)
    return 0


def _print_summary(summary: dict, output_dir: str) -> None:
    log = logging.getLogger("cpt")
    if summary.get("interrupted"):
        log.info("interrupted at step %d of %d; run the same command again to resume", summary["step"], summary["total_steps"])
        return
    print_eval_table(summary.get("eval_table") or [])
    read, trained = summary.get("tokens_read", summary["tokens"]), summary["tokens"]
    log.info("done: %d steps, %d tokens in %.0fs (%.0f tokens/s)%s", summary["step"], read, summary["train_runtime_s"],
             summary["tokens_per_s"], f"; {trained} of them carried loss" if trained < 0.9 * read else "")
    log.info("adapter: %s", output_dir)
    if summary.get("report"):
        print(f"report: {summary['report']}")


def cmd_demo(args: argparse.Namespace) -> int:
    from cpt.api import run_training
    from cpt.demo import answers_before_after, demo_config, sft_demo_config

    cfg = demo_config(args.output_dir, args.overrides)
    summary = run_training(cfg)
    _print_summary(summary, cfg.output.output_dir)
    if summary.get("interrupted") or args.cpt_only:
        return 0
    # The second stage: instruction tuning that continues the adapter just trained.
    sft_cfg = sft_demo_config(cfg.output.output_dir, args.output_dir.rstrip("/") + "-sft", args.overrides)
    summary = run_training(sft_cfg)
    _print_summary(summary, sft_cfg.output.output_dir)
    for a in answers_before_after(sft_cfg.output.output_dir):
        print(f"\nQ: {a['prompt']}\n  before: {a['before'].strip()}\n  after:  {a['after'].strip()}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from cpt.export import merge

    out = merge(args.adapter_dir, args.out_dir, dtype=args.dtype)
    print(out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cpt.export import export_gguf

    print(export_gguf(args.model, args.out, outtype=args.outtype, gguf_file=args.gguf_file))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from cpt.export import generate
    from cpt.model import load_for_inference

    model, tok = load_for_inference(args.model, gguf_file=args.gguf_file, device=args.device)
    chat = args.chat if args.chat is not None else _is_sft_run(args.model)
    for prompt in args.prompt:
        text = generate(model, tok, prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed, chat=chat)
        print(json.dumps({"prompt": prompt, "completion": text}, ensure_ascii=False) if args.json else prompt + text)
    return 0


def _is_sft_run(path: str) -> bool:
    from pathlib import Path

    import yaml

    for c in (Path(path) / "config.yaml", Path(path).parent / "config.yaml"):
        if c.is_file():
            try:
                raw = yaml.safe_load(c.read_text()) or {}
            except yaml.YAMLError:
                return False
            return (raw.get("train") or {}).get("stage") == "sft" or raw.get("stage") == "sft"
    return False


def cmd_config(args: argparse.Namespace) -> int:
    from cpt.config import Config, help_fields, load_config

    if args.config:
        print(load_config(*_config_and_overrides(args)).to_yaml())
    else:
        print(Config().to_yaml() if args.defaults else help_fields())
    return 0


def cmd_convert_config(args: argparse.Namespace) -> int:
    from pathlib import Path

    import yaml

    from cpt.compat import convert_config
    from cpt.config import ConfigError, read_yaml_file

    raw = read_yaml_file(args.config)
    converted, skipped = convert_config(raw, args.config, base=str(Path(args.config).expanduser().parent))
    lines = [f"# {args.config} converted by `cpt convert-config`; keys not set here take cpt's defaults (`cpt config`)."]
    lines += [f"# not converted (cpt has no such setting): {s}" for s in skipped]
    text = "\n".join(lines) + "\n" + yaml.safe_dump(converted, sort_keys=False, allow_unicode=True)
    if args.output:
        out = Path(args.output).expanduser()
        if out.exists():
            raise ConfigError(f"-o {args.output}: the file exists; choose another name or remove it")
        try:
            out.write_text(text)
        except OSError as e:
            raise ConfigError(f"-o {args.output}: cannot be written ({e.strerror})") from None
        for s in skipped:
            logging.getLogger("cpt").warning("not converted: %s", s)
        logging.getLogger("cpt").info("wrote %s; train with: cpt train %s", out, out)
    else:
        print(text, end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpt", description="Continued pretraining of language models on unlabeled domain text.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run continued pretraining from a YAML config")
    t.add_argument("config", nargs="?", help="YAML config (optional: defaults plus overrides)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    t.set_defaults(func=cmd_train)

    f = sub.add_parser("sft", help="instruction fine-tuning from a YAML config (cpt train with train.stage=sft)")
    f.add_argument("config", nargs="?", help="YAML config (optional: defaults plus overrides)")
    f.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.path=chat.jsonl")
    f.set_defaults(func=cmd_sft)

    d = sub.add_parser("demo", help="the embedded default: SmolLM2-135M learns Python's own docs, then answers questions about them; CPU, under 10 minutes")
    d.add_argument("--output-dir", default="outputs/demo")
    d.add_argument("--cpt-only", action="store_true", help="stop after continued pretraining")
    d.add_argument("overrides", nargs="*")
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("merge", help="merge an adapter into its base model")
    m.add_argument("adapter_dir")
    m.add_argument("out_dir")
    m.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    m.set_defaults(func=cmd_merge)

    e = sub.add_parser("export", help="write the merged model as a GGUF file for llama.cpp and Ollama")
    e.add_argument("model", help="a run's output folder, a checkpoint-N folder, an adapter, a model folder or a .gguf file")
    e.add_argument("--format", choices=["gguf"], default="gguf", help="the file format (gguf)")
    e.add_argument("--outtype", choices=["f16", "bf16", "q8_0"], default="f16",
                   help="tensor type of the weight matrices (norms stay float32); default f16")
    e.add_argument("--out", default=None, help="the .gguf file to write (default: MODEL-OUTTYPE.gguf beside MODEL)")
    e.add_argument("--gguf-file", default=None, help="which .gguf file of a folder holding several to read")
    e.set_defaults(func=cmd_export)

    g = sub.add_parser("generate", help="sample text from a base model, adapter or merged model")
    g.add_argument("model")
    g.add_argument("--prompt", action="append", required=True)
    g.add_argument("--gguf-file", default=None)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default=None)
    g.add_argument("--json", action="store_true")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="send each prompt as a user turn through the chat template (default: on for an sft run)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("config", help="print the configuration reference, or a resolved config")
    c.add_argument("config", nargs="?")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--defaults", action="store_true", help="print the default config as YAML")
    c.set_defaults(func=cmd_config)

    cc = sub.add_parser("convert-config", help="turn a LLaMA-Factory (stage: pt) or axolotl pretraining config into a cpt config")
    cc.add_argument("config", help="the other tool's YAML file")
    cc.add_argument("-o", "--output", default=None, help="write the cpt config here (default: print it)")
    cc.set_defaults(func=cmd_convert_config)

    # Faces of other stages parse their own arguments.
    for name, help_text in (("inspect", "inspect a data source: fields, sizes, labeled or unlabeled, budget"),
                            ("vocab", "extend the tokenizer with new tokens learned from a corpus (cpt vocab extend)"),
                            ("eval", "evaluate a model, adapter or merged model on held-out text"),
                            ("report", "write the HTML report of a run"),
                            ("plan", "estimate memory and speed of a config before running it")):
        s = sub.add_parser(name, help=help_text, add_help=False)
        s.add_argument("rest", nargs=argparse.REMAINDER)
        s.set_defaults(func=lambda a, name=name: _delegate(name, a.rest))
    return p


def _delegate(name: str, argv: list[str]) -> int:
    if name == "inspect":
        from cpt.data.inspect import inspect_main
        return inspect_main(argv, extender=_extender)
    if name == "vocab":
        from cpt.data.inspect import token_rates
        from cpt.model.vocab import vocab_main
        return vocab_main(argv, read_texts=_read_texts, measure=token_rates)
    if name == "eval":
        from cpt.evaluate import eval_main
        return eval_main(argv)
    if name == "report":
        from cpt.report import report_main
        return report_main(argv)
    from cpt.plan.decide import plan_main
    return plan_main(argv)


def _extender(tokenizer, texts: list[str], add: int):
    """`cpt inspect --vocab-add N`: the model stage's learner, handed to the data stage's inspection."""
    from cpt.model.vocab import extended_tokenizer, learn_extension

    return extended_tokenizer(tokenizer, learn_extension(tokenizer, texts, add))


def _read_texts(path: str, text_field: str, max_docs: Optional[int]):
    """`cpt vocab extend --data PATH`: the data stage's reader, handed to the model stage's command."""
    from cpt.config import SourceConfig
    from cpt.data.sources import read_documents, resolve_files

    resolve_files(path)  # a missing path is a one-line error naming it
    return read_documents(SourceConfig(path=path), text_field, max_docs=max_docs)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = bool(argv) and argv[0] in ("-v", "--verbose")
    rest = argv[1:] if verbose else argv
    if rest and rest[0] in DELEGATED:
        # These faces parse their own arguments (argparse would swallow their --help and options).
        setup_logging(verbose)
        return _guard(lambda: _delegate(rest[0], rest[1:]))
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return _guard(lambda: args.func(args))


DELEGATED = ("inspect", "eval", "report", "plan", "vocab")


def _guard(run) -> int:
    """Known failures become one clear line and an exit code; anything else keeps its traceback."""
    from cpt.config import ConfigError

    try:
        return run()
    except ConfigError as e:
        print(f"cpt: configuration error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError) as e:
        print(f"cpt: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # A folder that cannot be read or written, a full disk, a hub that cannot be reached: str(e) names
        # the path or the cause. The traceback is for -v (logged at debug level).
        logging.getLogger("cpt").debug("traceback", exc_info=True)
        print(f"cpt: {e} (run with -v for the traceback)", file=sys.stderr)
        return 2
    except Exception as e:
        from cpt.checkpoint import CheckpointError
        from cpt.export import ExportError
        from cpt.train import NonFiniteError
        if isinstance(e, (CheckpointError, NonFiniteError)):
            print(f"cpt: {e}", file=sys.stderr)
            return 1
        if isinstance(e, ExportError):
            print(f"cpt: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
