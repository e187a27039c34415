"""The report renders every plot from a complete run's files, and degrades gracefully on partial runs.

    python -m pytest tests/test_report.py -q
"""
from __future__ import annotations

import base64
import json
import math
import re
import struct
from pathlib import Path

import pytest

from cpt.config import Config
from cpt.report import PLOTS, _plot_eval_bpb, _plot_lr, read_run, report_main, write_report


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def _jsonl(path: Path, records: list[dict], torn_tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn_tail)


def write_full_run(d: Path, steps: int = 60) -> None:
    metrics = []
    for s in range(1, steps + 1):
        lr = 2e-4 * min(1.0, s / 10) * 0.5 * (1 + math.cos(math.pi * s / steps))
        metrics.append({"step": s, "loss": 3.0 * math.exp(-s / 30) + 1.2 + 0.05 * math.sin(s),
                        "grad_norm": 1.5 / math.sqrt(s), "tokens_per_s": 5000 + 10 * (s % 7), "tokens": s * 4096,
                        "elapsed_s": s * 0.8, "memory_gib": 3.2, "lr": {"adapter": lr, "embeddings": lr / 4}})
    _jsonl(d / "metrics.jsonl", metrics)
    evals = []
    for step, dom, gen in [(0, 1.90, 1.10), (30, 1.40, 1.13), (60, 1.20, 1.21)]:
        for name, bpb in (("domain", dom), ("general", gen)):
            rec = {"step": step, "set": name, "loss": bpb * 2.1, "perplexity": math.exp(bpb * 2.1),
                   "bits_per_byte": bpb, "tokens": 5000, "bytes": 15000, "documents": 20,
                   "forgetting_alarm": name == "general" and bpb > 1.10 * 1.05}
            if name == "general":
                rec["alarm_threshold"] = 1.10 * 1.05
            evals.append(rec)
    _jsonl(d / "eval.jsonl", evals)
    _jsonl(d / "samples.jsonl", [{"step": s, "prompt": "The court held", "completion": f" that <b>step {s}</b>"}
                                 for s in (0, 30, 60)])
    cfg = Config()
    cfg.eval.forgetting_limit = 0.05
    cfg.save(d / "config.yaml")
    (d / "run_summary.json").write_text(json.dumps({
        "train_runtime_s": 48.2, "tokens": steps * 4096, "step": steps, "total_steps": steps, "interrupted": False,
        "tokens_per_s": 5097.3, "eval": {"general": {"loss": 2.5}}, "eval_table": [{"set": "general"}],
        "data": {"n_tokens": 1234567, "sources": [{"name": "x"}]}}))


def test_full_run_renders_every_plot(tmp_path):
    write_full_run(tmp_path)
    path = write_report(tmp_path)
    assert path == tmp_path / "report.html"
    page = path.read_text()
    for stem, _, _ in PLOTS:
        png = tmp_path / "plots" / f"{stem}.png"
        w, h = _png_size(png.read_bytes())
        assert w > 400 and h > 200
        # the page embeds the same bytes: it is self-contained
        assert base64.b64encode(png.read_bytes()).decode() in page
    assert len(re.findall(r"src='data:image/png;base64,", page)) == len(PLOTS)
    assert not re.search(r"(src|href)=['\"]?(https?:|//|file:)", page)
    # the alarm is on the page, above the table, and the table has both sets
    assert page.index("Forgetting alarm: general") < page.index("Before and after")
    assert "+10.00%" in page  # general: 1.10 -> 1.21
    assert "-36.84%" in page  # domain: 1.90 -> 1.20
    # samples are escaped, config and timings present
    assert "&lt;b&gt;step 60&lt;/b&gt;" in page and "<b>step 60</b>" not in page
    assert "name_or_path" in page
    assert "48s (48.2 s)" in page and "No run_summary.json" not in page and "interrupted at" not in page
    assert "<td>tokens_per_s</td><td>5,097</td>" in page  # a rate, not a duration
    assert "<td>data.n_tokens</td><td>1,234,567</td>" in page
    assert "eval_table" not in page and "data.sources" not in page  # the table is shown once, above


def test_plot_contents(tmp_path):
    write_full_run(tmp_path)
    run = read_run(tmp_path)
    labels = [line.get_label() for line in _plot_lr(run).axes[0].get_lines()]
    assert labels == ["adapter", "embeddings"]
    ax = _plot_eval_bpb(run).axes[0]
    by_label = {line.get_label(): line for line in ax.get_lines()}
    assert list(by_label["domain"].get_ydata()) == [1.90, 1.40, 1.20]
    assert list(by_label["general: forgetting alarm"].get_xdata()) == [60.0]
    assert by_label["general: forgetting limit"].get_ydata()[0] == pytest.approx(1.155)


def test_partial_run(tmp_path):
    """Killed early: no config, no summary, keys missing, a NaN step, a torn last line, a repeated step."""
    _jsonl(tmp_path / "metrics.jsonl", [
        {"step": 1, "loss": 3.0, "lr": 1e-4},
        {"step": 2, "loss": float("nan"), "grad_norm": None},
        {"step": 2, "loss": 2.5},  # resumed run logged step 2 again: this one wins
        {"loss": 9.0},  # no step: ignored
    ], torn_tail='{"step": 3, "lo')
    _jsonl(tmp_path / "eval.jsonl", [{"step": 0, "set": "domain", "loss": 3.1, "bits_per_byte": 1.9}])
    path = write_report(tmp_path)
    page = path.read_text()
    assert "No run_summary.json" in page and "last logged step 2" in page
    assert "metrics.jsonl: 1 unreadable line(s) skipped" in page
    assert "config.yaml not found" in page
    made = {p.stem for p in (tmp_path / "plots").glob("*.png")}
    assert made == {"loss", "lr", "eval_bits_per_byte"}
    assert "Not plotted (nothing logged): grad_norm, tokens_per_s, memory" in page
    run = read_run(tmp_path)
    assert [(r["step"], r.get("loss")) for r in run.metrics] == [(1, 3.0), (2, 2.5)]


def test_empty_and_broken_files(tmp_path):
    (tmp_path / "config.yaml").write_text("model: [unclosed\n")
    (tmp_path / "run_summary.json").write_text("{")
    (tmp_path / "eval.jsonl").write_text("")
    page = write_report(tmp_path).read_text()
    assert "Nothing logged yet" in page and "No evaluation was recorded" in page
    assert "config.yaml is not valid YAML" in page and "run_summary.json is not valid JSON" in page
    assert list((tmp_path / "plots").glob("*.png")) == []


def test_interrupted_run(tmp_path):
    write_full_run(tmp_path)
    (tmp_path / "run_summary.json").write_text(json.dumps({"step": 30, "total_steps": 60, "interrupted": True}))
    assert "interrupted at step 30 of 60" in write_report(tmp_path).read_text()


def test_a_run_whose_layers_failed_to_compile_says_so(tmp_path):
    write_full_run(tmp_path)
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    assert "Compiling the decoder layers failed" not in write_report(tmp_path).read_text()
    summary["compile_failed"] = "RuntimeError: <no C compiler>"
    (tmp_path / "run_summary.json").write_text(json.dumps(summary))
    html = write_report(tmp_path).read_text()
    assert "Compiling the decoder layers failed (RuntimeError: &lt;no C compiler&gt;)" in html


def test_stale_plots_are_removed(tmp_path):
    write_full_run(tmp_path)
    write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    write_report(tmp_path)
    assert not (tmp_path / "plots" / "grad_norm.png").exists()


def test_report_main(tmp_path, capsys):
    write_full_run(tmp_path)
    assert report_main([str(tmp_path)]) == 0
    assert str(tmp_path / "report.html") in capsys.readouterr().out
    assert report_main([str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err
