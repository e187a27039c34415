"""bench/vocab_extension.py: the man-page text it trains on, and the result page it writes (goals judged
from the numbers, each run's embedding learning rate shown)."""
import copy
import json
from pathlib import Path

from bench.vocab_extension import render, strip_roff

ROOT = Path(__file__).resolve().parents[1]


def test_strip_roff_keeps_the_text_and_drops_the_markup():
    page = '.\\" a comment\n.TH LS 1\n.SH 名称\nls \\- 列出目录内容\n.B \\-a\n显示\\fB所有\\fR文件\n'
    text = strip_roff(page)
    assert "comment" not in text and "\\f" not in text
    for kept in ("名称", "列出目录内容", "-a", "显示所有文件"):
        assert kept in text


def _result(none_after: float, sub_after: float) -> dict:
    r = json.loads((ROOT / "bench" / "results" / "vocab_extension.json").read_text())
    r = copy.deepcopy(r)
    runs = {x["name"]: x for x in r["runs"]}
    runs["none"].update(bpb_before=1.9, bpb_after=none_after, embedding_lr=1e-4)
    runs["subword"].update(bpb_before=2.4, bpb_after=sub_after, embedding_lr=1e-3)
    return r


def test_result_page_judges_the_goal_from_the_numbers_and_names_each_learning_rate():
    worse = render(_result(1.70, 1.95))
    assert "no worse than without extension: **not met** (1.9500 against 1.7000)" in worse
    assert "| 0.001 | 2.4000 | **1.9500** |" in worse and "| 0.0001 | 1.9000 | **1.7000** |" in worse
    assert "starts +0.5000 bits per byte" in worse and "ends +0.2500" in worse and "closed 50% of the gap." in worse
    better = render(_result(1.70, 1.65))
    assert "no worse than without extension: **met** (1.6500 against 1.7000)" in better
    assert "closed the gap and passed it." in better


def test_result_page_shows_the_gap_step_by_step_when_the_runs_were_scored_during_training():
    r = _result(1.50, 1.55)
    assert "During training" not in render(r)  # no curves: no table
    runs = {x["name"]: x for x in r["runs"]}
    runs["none"]["curve"] = [[0, 1.9], [100, 1.6], [200, 1.5]]
    runs["subword"]["curve"] = [[0, 2.4], [100, 1.75], [200, 1.55]]
    page = render(r)
    assert "| 100 | 1.6000 | 1.7500 | +0.1500 | 70% |" in page and "| 200 | 1.5000 | 1.5500 | +0.0500 | 90% |" in page
    assert "| 0 | 1.9000 | 2.4000 | +0.5000 | - |" in page
    r["runs"] = [runs["none"], runs["subword"]]
    assert "Two runs identical" in render(r)
