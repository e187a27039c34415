"""The run report: PNG plots and one self-contained report.html, built from what a run leaves behind.

Inputs, all in the run's output_dir and all optional (a run killed at any moment still gets a report):
metrics.jsonl (one record per logged step), eval.jsonl and samples.jsonl (written by
cpt.evaluate.Evaluator), config.yaml and run_summary.json (written at the end of a run).
Outputs: output_dir/plots/*.png and output_dir/report.html, which embeds the same PNGs so that the
page can be mailed or copied on its own.

    cpt report outputs/cpt-run
    python -m pytest tests/test_report.py -q
"""
from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cpt.evaluate import is_general, summarize_records

PLOTS_DIR = "plots"
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]


@dataclass
class RunFiles:
    """Everything read from an output_dir, plus notes on what was missing or unreadable."""

    metrics: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    config_text: str | None = None
    config: dict = field(default_factory=dict)
    summary: dict | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- reading


def _read_jsonl(path: Path, notes: list[str]) -> list[dict]:
    if not path.is_file():
        return []
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1  # typically the torn last line of a run killed while writing
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    if bad:
        notes.append(f"{path.name}: {bad} unreadable line(s) skipped")
    return records


def _last_per_step(records: list[dict], key: tuple[str, ...] = ()) -> list[dict]:
    """A resumed run logs some steps again; the later record wins. Sorted by step."""
    latest: dict[tuple, dict] = {}
    for r in records:
        if isinstance(r.get("step"), (int, float)):
            latest[(r["step"], *(str(r.get(k)) for k in key))] = r
    return [latest[k] for k in sorted(latest, key=lambda k: k[0])]


def read_run(output_dir: Path) -> RunFiles:
    run = RunFiles()
    run.metrics = _last_per_step(_read_jsonl(output_dir / "metrics.jsonl", run.notes))
    run.evals = _last_per_step(_read_jsonl(output_dir / "eval.jsonl", run.notes), key=("set",))
    run.samples = _last_per_step(_read_jsonl(output_dir / "samples.jsonl", run.notes), key=("prompt",))
    cfg_path = output_dir / "config.yaml"
    if cfg_path.is_file():
        run.config_text = cfg_path.read_text(encoding="utf-8", errors="replace")
        try:
            loaded = yaml.safe_load(run.config_text)
            run.config = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError as e:
            run.notes.append(f"config.yaml is not valid YAML ({e.__class__.__name__}); shown as text")
    summary_path = output_dir / "run_summary.json"
    if summary_path.is_file():
        try:
            loaded = json.loads(summary_path.read_text(encoding="utf-8"))
            run.summary = loaded if isinstance(loaded, dict) else None
        except json.JSONDecodeError:
            run.notes.append("run_summary.json is not valid JSON; ignored")
    return run


def _num(v: Any) -> float | None:
    """A finite number, or None (missing keys, strings, NaN from a skipped step)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        y = _num(r.get(key))
        if y is not None:
            xs.append(float(r["step"]))
            ys.append(y)
    return xs, ys


def _cfg(cfg: dict, section: str, key: str) -> Any:
    sec = cfg.get(section)
    return sec.get(key) if isinstance(sec, dict) else None


# ---------------------------------------------------------------------------- plots


def _figure(title: str, ylabel: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=(7.0, 3.4), dpi=110)
    FigureCanvasAgg(fig)  # Agg: renders without a display, the same on every machine
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _finish(fig: Figure, ax: Any) -> Figure:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def _ema(ys: list[float], alpha: float) -> list[float]:
    out, acc = [], None
    for y in ys:
        acc = y if acc is None else alpha * y + (1 - alpha) * acc
        out.append(acc)
    return out


def _plot_loss(run: RunFiles) -> Figure | None:
    xs, ys = _series(run.metrics, "loss")
    held_out = {}
    for r in run.evals:
        y = _num(r.get("loss"))
        if y is not None:
            held_out.setdefault(str(r.get("set")), ([], []))
            held_out[str(r.get("set"))][0].append(float(r["step"]))
            held_out[str(r.get("set"))][1].append(y)
    if not xs and not held_out:
        return None
    fig, ax = _figure("Loss (nats per token)", "loss")
    if xs:
        ax.plot(xs, ys, color=COLORS[0], alpha=0.35 if len(xs) > 20 else 1.0, lw=1, label="train")
        if len(xs) > 20:  # the raw curve is noisy; the trend is what the reader looks for
            ax.plot(xs, _ema(ys, 2 / (1 + max(5, len(xs) // 20))), color=COLORS[0], lw=2, label="train (smoothed)")
    for i, (name, (hx, hy)) in enumerate(sorted(held_out.items())):
        ax.plot(hx, hy, "o--", color=COLORS[(i + 1) % len(COLORS)], ms=4, lw=1, label=f"held-out: {name}")
    return _finish(fig, ax)


def _plot_lr(run: RunFiles) -> Figure | None:
    groups: dict[str, tuple[list[float], list[float]]] = {}
    for r in run.metrics:
        lr = r.get("lr")
        items = lr.items() if isinstance(lr, dict) else [("lr", lr)]
        for name, v in items:
            y = _num(v)
            if y is not None:
                groups.setdefault(str(name), ([], []))
                groups[str(name)][0].append(float(r["step"]))
                groups[str(name)][1].append(y)
    if not groups:
        return None
    fig, ax = _figure("Learning rate per parameter group", "learning rate")
    for i, (name, (xs, ys)) in enumerate(sorted(groups.items())):
        ax.plot(xs, ys, color=COLORS[i % len(COLORS)], lw=1.5, label=name)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    return _finish(fig, ax)


def _plot_grad_norm(run: RunFiles) -> Figure | None:
    xs, ys = _series(run.metrics, "grad_norm")
    if not xs:
        return None
    fig, ax = _figure("Gradient norm (before clipping)", "global L2 norm")
    ax.plot(xs, ys, color=COLORS[2], lw=1)
    clip = _num(_cfg(run.config, "train", "max_grad_norm"))
    if clip:
        ax.axhline(clip, color="#d62728", ls="--", lw=1, label=f"clip at {clip:g}")
    if min(ys) > 0 and max(ys) / min(ys) > 100:  # spikes would flatten the rest of the curve
        ax.set_yscale("log")
    return _finish(fig, ax)


def _plot_metric(run: RunFiles, key: str, title: str, ylabel: str, color: str, headroom: float | None = None) -> Figure | None:
    """One logged metric over steps, from zero up (with `headroom`: to that multiple of its maximum)."""
    xs, ys = _series(run.metrics, key)
    if not xs:
        return None
    fig, ax = _figure(title, ylabel)
    ax.plot(xs, ys, color=color, lw=1.2)
    if headroom is None:
        ax.set_ylim(bottom=0)
    else:
        ax.set_ylim(0, max(ys) * headroom or 1.0)
    return _finish(fig, ax)


def _plot_throughput(run: RunFiles) -> Figure | None:
    return _plot_metric(run, "tokens_per_s", "Throughput", "tokens / s", COLORS[3])


def _plot_eval_bpb(run: RunFiles) -> Figure | None:
    by_set: dict[str, list[dict]] = {}
    for r in run.evals:
        if _num(r.get("bits_per_byte")) is not None:
            by_set.setdefault(str(r.get("set")), []).append(r)
    if not by_set:
        return None
    fig, ax = _figure("Held-out bits per byte (lower is better)", "bits per byte")
    for i, (name, rs) in enumerate(sorted(by_set.items())):
        color = COLORS[i % len(COLORS)]
        xs = [float(r["step"]) for r in rs]
        ax.plot(xs, [r["bits_per_byte"] for r in rs], "o-", color=color, ms=4, lw=1.5, label=name)
        threshold = _num(rs[-1].get("alarm_threshold"))
        if is_general(name) and threshold is not None:
            ax.axhline(threshold, color=color, ls=":", lw=1, label=f"{name}: forgetting limit")
        alarmed = [r for r in rs if r.get("forgetting_alarm")]
        if alarmed:
            ax.plot([float(r["step"]) for r in alarmed], [r["bits_per_byte"] for r in alarmed], "x", color="#d62728",
                    ms=10, mew=2.5, label=f"{name}: forgetting alarm")
    return _finish(fig, ax)


def _plot_memory(run: RunFiles) -> Figure | None:
    return _plot_metric(run, "memory_gib", "Peak memory (GPU allocated, or process RSS on CPU)", "GiB", COLORS[4], headroom=1.15)


PLOTS = [  # file stem, caption, builder; the order is the page's order
    ("loss", "Training loss, with the held-out sets' loss at each evaluation", _plot_loss),
    ("eval_bits_per_byte", "Bits per byte of each held-out set over steps", _plot_eval_bpb),
    ("lr", "Learning rate of each parameter group", _plot_lr),
    ("grad_norm", "Global gradient norm", _plot_grad_norm),
    ("tokens_per_s", "Training throughput", _plot_throughput),
    ("memory", "Peak memory", _plot_memory),
]


def write_plots(run: RunFiles, plots_dir: Path) -> dict[str, Path]:
    """Render every plot the data allows; returns {stem: png path}. Stale PNGs of absent plots go."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for stem, _, build in PLOTS:
        path = plots_dir / f"{stem}.png"
        fig = build(run)
        if fig is not None:
            fig.savefig(path, format="png")
            out[stem] = path
        elif path.exists():
            path.unlink()
    return out


# ---------------------------------------------------------------------------- HTML

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1000px;margin:0 auto;padding:20px 28px 60px}
h1{font-size:24px;margin:8px 0 2px} h2{font-size:18px;margin:28px 0 10px;border-bottom:1px solid #d8dce3;padding-bottom:4px}
.sub{color:#5b6475;font-size:13px}
.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:14px 18px;margin:10px 0}
.alarm{background:#fdecea;border:2px solid #d62728;color:#7a1010;border-radius:8px;padding:12px 18px;margin:16px 0;font-size:15px}
.alarm b{font-size:17px} .ok{background:#eaf6ec;border:1px solid #2ca02c;color:#185d22;border-radius:8px;padding:10px 18px;margin:16px 0}
.warn{background:#fff7e0;border:1px solid #e0a800;color:#6b5200;border-radius:8px;padding:10px 18px;margin:16px 0}
table{border-collapse:collapse;width:100%;font-size:13.5px} th,td{padding:5px 9px;border-bottom:1px solid #e4e7ec;text-align:right;vertical-align:top}
th{background:#f0f2f5;font-weight:600} td.l,th.l{text-align:left}
tr.bad td{background:#fdecea} .better{color:#185d22;font-weight:600} .worse{color:#b11b1b;font-weight:600}
.kv td:first-child{text-align:left;color:#5b6475;width:40%} .kv td{text-align:left}
.plots{display:grid;grid-template-columns:1fr 1fr;gap:12px} .plots figure{margin:0;background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:6px}
.plots img{width:100%} figcaption{font-size:12px;color:#5b6475;padding:2px 6px}
pre{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:12px;overflow:auto;font-size:12px;max-height:480px}
.sample td.c{text-align:left;white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px}
.prompt{font-family:ui-monospace,Menlo,Consolas,monospace;background:#eef1f6;padding:2px 6px;border-radius:4px}
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v: Any, spec: str = ".4f") -> str:
    n = _num(v)
    return format(n, spec) if n is not None else "–"


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def _alarm_html(run: RunFiles, rows: list[dict]) -> str:
    if not run.evals:
        return ""
    limit = _num(_cfg(run.config, "eval", "forgetting_limit"))
    now = [r for r in rows if r["forgetting_alarm"]]
    earlier = sorted({str(r.get("set")) for r in run.evals if r.get("forgetting_alarm")} - {r["set"] for r in now})
    parts = []
    for r in now:
        change = f"{r['bits_per_byte_change'] * 100:+.1f}%" if r["bits_per_byte_change"] is not None else "?"
        parts.append(f"<b>Forgetting alarm: {_e(r['set'])}</b> bits per byte rose from {_fmt(r['bits_per_byte_before'])} "
                     f"(step {_e(r['step_before'])}) to {_fmt(r['bits_per_byte_after'])} (step {_e(r['step_after'])}), "
                     f"{change}{f', above the limit of +{limit * 100:.1f}%' if limit is not None else ''}.")
    if parts:
        return "<div class='alarm'>" + "<br>".join(parts) + \
            "<br>Consider a lower learning rate, fewer steps, a lower rank, or mixing general text back in.</div>"
    if earlier:
        return (f"<div class='warn'>The forgetting alarm fired during the run for {_e(', '.join(earlier))}, "
                "but the latest evaluation is back within the limit.</div>")
    generals = [r for r in rows if is_general(r["set"])]
    if generals:
        return "<div class='ok'>No forgetting alarm: every general set stayed within the limit.</div>"
    return ""


def _table_html(rows: list[dict]) -> str:
    if not rows:
        return "<p class='sub'>No evaluation was recorded (eval.jsonl is missing or empty).</p>"
    head = ("<tr><th class='l'>set</th><th>steps</th><th>loss before</th><th>loss after</th><th>ppl before</th>"
            "<th>ppl after</th><th>bits/byte before</th><th>bits/byte after</th><th>change</th><th>tokens</th></tr>")
    body = []
    for r in rows:
        ch = r["bits_per_byte_change"]
        cls = "" if ch is None or ch == 0 else ("better" if ch < 0 else "worse")
        change = f"<span class='{cls}'>{ch * 100:+.2f}%</span>" if ch is not None else "–"
        flag = " ⚠ forgetting" if r["forgetting_alarm"] else ""
        body.append(
            f"<tr class='{'bad' if r['forgetting_alarm'] else ''}'><td class='l'>{_e(r['set'])}{_e(flag)}</td>"
            f"<td>{'–' if r['step_before'] is None else _e(r['step_before'])} → {_e(r['step_after'])}</td>"
            f"<td>{_fmt(r['loss_before'])}</td><td>{_fmt(r['loss_after'])}</td>"
            f"<td>{_fmt(r['perplexity_before'], '.2f')}</td><td>{_fmt(r['perplexity_after'], '.2f')}</td>"
            f"<td>{_fmt(r['bits_per_byte_before'])}</td><td>{_fmt(r['bits_per_byte_after'])}</td>"
            f"<td>{change}</td><td>{_e(r['tokens']) if r['tokens'] is not None else '–'}</td></tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _timings(run: RunFiles) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(from the logged steps, from run_summary.json) as label/value rows."""
    logged: list[tuple[str, str]] = []
    m = run.metrics
    if m:
        last = m[-1]
        logged.append(("last logged step", str(last.get("step"))))
        if _num(last.get("tokens")) is not None:
            logged.append(("tokens trained (at last log)", f"{int(last['tokens']):,}"))
        if _num(last.get("elapsed_s")) is not None:
            logged.append(("elapsed (at last log)", _duration(last["elapsed_s"])))
        tps = _series(m, "tokens_per_s")[1]
        if tps:
            logged.append(("tokens / s (mean of logged steps)", f"{sum(tps) / len(tps):,.1f}"))
        mem = _series(m, "memory_gib")[1]
        if mem:
            logged.append(("peak memory", f"{max(mem):.2f} GiB"))
    summary: list[tuple[str, str]] = []
    for k, v in (run.summary or {}).items():
        if k in ("eval", "eval_table", "report"):
            continue  # shown above as the before/after table, or this page itself
        items = [(f"{k}.{kk}", vv) for kk, vv in v.items()] if isinstance(v, dict) else [(k, v)]
        for key, val in items:
            if isinstance(val, (dict, list)):
                continue
            n = _num(val)
            if key.endswith("_s") and not key.endswith("per_s") and n is not None:
                text = f"{_duration(n)} ({n:,.1f} s)"
            elif n is not None and not isinstance(val, bool):
                text = f"{int(n):,}" if n.is_integer() else f"{n:,.4g}"
            else:
                text = str(val)
            summary.append((key, text))
    return logged, summary


def _samples_html(samples: list[dict]) -> str:
    by_prompt: dict[str, list[dict]] = {}
    for s in samples:
        by_prompt.setdefault(str(s.get("prompt", "")), []).append(s)
    if not by_prompt:
        return "<p class='sub'>No samples (eval.prompts is empty, or no evaluation ran).</p>"
    out = []
    for prompt, ss in by_prompt.items():
        rows = "".join(f"<tr><td>{_e(s.get('step'))}</td><td class='c'>{_e(s.get('completion', ''))}</td></tr>"
                       for s in ss)
        out.append(f"<div class='card'><div>Prompt: <span class='prompt'>{_e(prompt)}</span></div>"
                   f"<table class='sample'><tr><th style='width:60px'>step</th><th class='l'>greedy continuation</th>"
                   f"</tr>{rows}</table></div>")
    return "".join(out)


def render_html(run: RunFiles, plots: dict[str, Path], output_dir: Path) -> str:
    rows = summarize_records(run.evals)
    model = _cfg(run.config, "model", "name_or_path") or "unknown model"
    method = _cfg(run.config, "adapter", "method")
    r = _cfg(run.config, "adapter", "r")
    what = f"{model}" + (f" · {method}" if method else "") + (f" r={r}" if method == "lora" and r else "")
    status = ""
    if run.summary is not None and run.summary.get("interrupted"):
        status = (f"<div class='warn'>The run was interrupted at step {_e(run.summary.get('step', '?'))} of "
                  f"{_e(run.summary.get('total_steps', '?'))}; run the same command again to resume.</div>")
    elif run.summary is None:
        last = run.metrics[-1].get("step") if run.metrics else None
        status = ("<div class='warn'>No run_summary.json: the run is still going or stopped early"
                  + (f" (last logged step {_e(last)})" if last is not None else " (no step logged yet)") + ".</div>")
    if run.summary is not None and run.summary.get("compile_failed"):
        status += (f"<div class='warn'>Compiling the decoder layers failed ({_e(run.summary['compile_failed'])}); the run "
                   "went on with the plain layers, which on a GPU are much slower. Set model.compile: false to skip the "
                   "attempt, or fix what the message names.</div>")
    notes = "".join(f"<li>{_e(n)}</li>" for n in run.notes)
    figures = []
    for stem, caption, _ in PLOTS:
        if stem in plots:
            data = base64.b64encode(plots[stem].read_bytes()).decode("ascii")
            figures.append(f"<figure><img alt='{_e(caption)}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{_e(caption)} ({_e(PLOTS_DIR + '/' + stem + '.png')})</figcaption></figure>")
    missing = [stem for stem, _, _ in PLOTS if stem not in plots]
    logged, summary = _timings(run)
    timings = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in logged)
    if summary:
        timings += "<tr><th colspan='2' class='l'>run_summary.json</th></tr>"
        timings += "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in summary)
    generated = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cpt report: {_e(output_dir.name)}</title>
<style>{CSS}</style></head><body><main>
<h1>Continued pretraining report</h1>
<div class="sub">{_e(what)} · {_e(output_dir.resolve())} · generated {_e(generated)}</div>
{_alarm_html(run, rows)}{status}
<h2>Before and after</h2>
<div class="sub">First evaluation (the base model when eval_at_start) against the latest. Bits per byte does not
depend on the tokenizer; a negative change means the text got easier for the model.</div>
<div class="card">{_table_html(rows)}</div>
<h2>Plots</h2>
{('<div class="plots">' + ''.join(figures) + '</div>') if figures else '<p class="sub">Nothing logged yet.</p>'}
{f'<p class="sub">Not plotted (nothing logged): {_e(", ".join(missing))}.</p>' if figures and missing else ''}
<h2>Samples</h2>
{_samples_html(run.samples)}
<h2>Timings</h2>
<div class="card">{f'<table class="kv">{timings}</table>' if timings else '<p class="sub">No timings logged.</p>'}</div>
<h2>Configuration</h2>
{f'<pre>{_e(run.config_text)}</pre>' if run.config_text else '<p class="sub">config.yaml not found.</p>'}
{f'<h2>Notes</h2><ul>{notes}</ul>' if notes else ''}
</main></body></html>
"""


def write_report(output_dir: str | Path) -> Path:
    """Write output_dir/plots/*.png and output_dir/report.html; returns the HTML path."""
    out = Path(output_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such run folder")
    run = read_run(out)
    plots = write_plots(run, out / PLOTS_DIR)
    path = out / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render_html(run, plots, out), encoding="utf-8")
    tmp.replace(path)  # a reader never sees half a page
    return path


def report_main(argv: list[str]) -> int:
    """`cpt report OUTPUT_DIR`; returns the exit code."""
    p = argparse.ArgumentParser(prog="cpt report", description="Write report.html and plots/*.png for a run folder.")
    p.add_argument("output_dir", help="The run's output_dir (holds metrics.jsonl, eval.jsonl, config.yaml).")
    args = p.parse_args(argv)
    problem = _not_a_run_folder(Path(args.output_dir))
    if problem:
        print(f"cpt report: error: {problem}", file=sys.stderr)
        return 2
    try:
        path = write_report(args.output_dir)
    except OSError as e:  # a folder that cannot be written: the report goes nowhere else
        print(f"cpt report: error: cannot write the report into {args.output_dir}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


RUN_FILES = ("metrics.jsonl", "eval.jsonl", "config.yaml", "run_summary.json")


def _not_a_run_folder(out: Path) -> str | None:
    """Why `out` is not a run's output_dir (what to give instead), or None. A page built from a folder
    that holds none of a run's files would only say that nothing was logged, and write into it."""
    if not out.exists():
        return f"{out}: no such run folder; give a run's output_dir"
    if not out.is_dir():
        return f"{out} is a file; give the run's output_dir, the folder that holds {RUN_FILES[0]}"
    in_run = (out / "COMPLETE").is_file() or (out.parent / RUN_FILES[0]).is_file()
    if re.fullmatch(r"checkpoint-\d+", out.name) and in_run:
        # A checkpoint holds a config.yaml too; the report is of the run and belongs in the run's folder.
        return f"{out} is a checkpoint; the report is of the whole run: cpt report {out.parent}"
    if any((out / f).is_file() for f in RUN_FILES):
        return None
    runs = sorted(str(d) for d in out.iterdir() if d.is_dir() and any((d / f).is_file() for f in RUN_FILES))
    inside = f"; the runs inside it: {', '.join(runs[:5])}{' ...' if len(runs) > 5 else ''}" if runs else ""
    return f"{out} is not a run folder (it holds none of {', '.join(RUN_FILES)}){inside}"
