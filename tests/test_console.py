"""Quiet by default: a run prints cpt's own lines only (no library warnings, no `datasets` bars, no
bitsandbytes kernel-hub message); -v lets the libraries speak.

    python -m pytest tests/test_console.py -q
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# A log line of cpt, a continuation of one (the run plan's indented lines), or the run's last words.
OWN = re.compile(r"^(\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) |  |report: )")


def _cpt(tmp_path: Path, *args: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / f"hf{len(args)}")}
    for var in ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        env.pop(var, None)
    p = subprocess.run([sys.executable, "-m", "cpt.cli", *args], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return (p.stdout + p.stderr).splitlines()


def _foreign(lines: list[str]) -> list[str]:
    return [line for line in lines if line.strip() and not OWN.match(line)]


def test_a_run_prints_only_its_own_lines(tmp_path, tiny_model_dir, corpus):
    """A `datasets` source (its loading bar) and gradient checkpointing (a transformers deprecation
    warning): the libraries' usual noise, none of which shows."""
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    lines = _cpt(tmp_path, "train", f"model.name_or_path={tiny_model_dir}", "model.max_seq_length=32",
                 "data.dataset=json", f"data.data_files={data}", "adapter.r=4", "train.max_steps=2",
                 "train.gradient_accumulation_steps=1", f"output.output_dir={tmp_path / 'run'}", "output.logging_steps=1",
                 "output.report=false", "output.report_to=none", "eval.eval_at_start=false",
                 f"data.cache_dir={tmp_path / 'cache'}")
    assert not _foreign(lines), "\n".join(_foreign(lines))
    assert sum("step 2/2" in line for line in lines) == 1 and not any("%|" in line for line in lines)


PROBE = """
import sys, warnings
from cpt.console import setup_logging
setup_logging(verbose=sys.argv[1] == "1")
import datasets
datasets.load_dataset("json", data_files=sys.argv[2], split="train")
warnings.warn_explicit("a library's deprecation", FutureWarning, "site-packages/lib.py", 1, module="lib")
warnings.warn_explicit("cpt's own", UserWarning, "cpt/data/mix.py", 1, module="cpt.data.mix")
"""


def test_verbose_lets_the_libraries_speak(tmp_path, corpus):
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    for var in ("TRANSFORMERS_VERBOSITY", "DATASETS_VERBOSITY", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        env.pop(var, None)
    out = {}
    for verbose in ("0", "1"):
        env["HF_DATASETS_CACHE"] = str(tmp_path / f"hf{verbose}")
        p = subprocess.run([sys.executable, "-c", PROBE, verbose, str(data)], capture_output=True, text=True, env=env,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        out[verbose] = p.stderr
    assert "cpt's own" in out["0"] and "deprecation" not in out["0"] and "Generating train split" not in out["0"]
    assert "cpt's own" in out["1"] and "deprecation" in out["1"] and "Generating train split" in out["1"]
