"""bench/trace_summary.py: busy time per stream, kernel groups and the busiest stream's gaps."""
import gzip
import json
from bench.trace_summary import group, host_gaps, summarize, union


def _k(name, ts, dur, stream=7, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def test_union_counts_overlaps_once():
    assert union([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20


def test_groups_by_kernel_name():
    assert group("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "gemm"
    assert group("cudnn_generated_fort_native_sdpa_sm90_flash_bprop") == "attention"
    assert group("Memcpy DtoH (Device -> Pinned)") == "memcpy DtoH"
    assert group("triton_poi_fused_add_mul_silu_7") == "triton (compiled layers)"


def test_summary_of_a_written_trace(tmp_path):
    events = [
        _k("nvjet_sm90_tst_a", 0, 1000),
        _k("triton_poi_fused_mul_1", 1000, 500),
        _k("nvjet_sm90_tst_a", 3500, 1000),  # a 2 ms gap before it on the main stream
        _k("Memcpy DtoH (Device -> Pinned)", 1600, 1500, stream=20, cat="gpu_memcpy"),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5000},  # host side: ignored
    ]
    p = tmp_path / "t.trace.json.gz"
    with gzip.open(p, "wt") as f:
        json.dump({"traceEvents": events}, f)
    text = summarize(p, gap_ms=1.0)
    assert "span 4.5 ms, some stream busy 4.0 ms" in text
    assert "stream 7: 3 events, busy 2.5 ms: gemm 2.0, triton (compiled layers) 0.5" in text
    assert "1 gaps of >= 1.0 ms, 2.0 in all" in text.replace(" ms in all", " in all")
    assert "other streams busy 1.50" in text


def test_host_gaps_list_where_a_thread_ran_without_calling_into_torch(tmp_path):
    events = [
        _k("nvjet_sm90_tst_a", 1000, 1000),
        {"ph": "X", "cat": "cpu_op", "name": "aten::coalesce", "ts": 0, "dur": 2000, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::_values", "ts": 500, "dur": 10, "tid": 1},  # nested: not a gap
        {"ph": "X", "cat": "cpu_op", "name": "aten::_foreach_norm", "ts": 7700, "dur": 300, "tid": 1},  # 5.7 ms later
        {"ph": "X", "cat": "cpu_op", "name": "aten::stack", "ts": 8100, "dur": 100, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100, "tid": 2},
    ]
    p = tmp_path / "t.trace.json"
    p.write_text(json.dumps({"traceEvents": events}))
    text = host_gaps(p, 1.0)
    assert "thread 1: 4 events, 1 stretches, 5.7 ms in all" in text
    assert "5.70 ms at     1.0 ms: after 'aten::coalesce', before 'aten::_foreach_norm'" in text
    assert "thread 2: 1 events, 0 stretches" in text
