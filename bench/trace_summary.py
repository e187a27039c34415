"""Where one profiled step's GPU time goes, from a torch profiler chrome trace (`--profile` of
gpu_throughput.py writes one beside its table, gzipped).

    python bench/trace_summary.py logs/profile_ours_budget_bf16.trace.json.gz [--gaps 0.3] [--host-gaps 0.5]

Prints, per CUDA stream, the busy time and the kernel groups; the time when some stream is busy
(their union) against the span of the step; and the longest gaps of the busiest stream with the last
kernel before each and the first after it. --host-gaps (traces with the host's operators): where each
host thread went that long without calling into torch.
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
from collections import defaultdict
from pathlib import Path

GROUPS = [  # first match wins; the names are the kernels' own
    ("memcpy HtoD", re.compile(r"Memcpy HtoD|Memcpy PtoD|Pinned -> Device|Pageable -> Device")),
    ("memcpy DtoH", re.compile(r"Memcpy DtoH|Device -> Pinned|Device -> Pageable|Memcpy DtoP")),
    ("memcpy DtoD", re.compile(r"Memcpy DtoD|Device -> Device")),
    ("memset", re.compile(r"Memset")),
    ("attention", re.compile(r"sdpa|flash|fmha|attention", re.I)),
    ("gemm", re.compile(r"nvjet|gemm|cutlass|xmma|sm90_.*tst|s16816|wgmma", re.I)),
    ("4-bit dequantize", re.compile(r"kDequantize|dequantize", re.I)),
    ("optimizer", re.compile(r"adam|optimizer|_update|kOptimizer", re.I)),
    ("loss", re.compile(r"ce_rows|logsumexp|cross_entropy|nll", re.I)),
    ("triton (compiled layers)", re.compile(r"^triton_")),
    ("other triton", re.compile(r"_kernel$")),
    ("reduce", re.compile(r"reduce", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|unrolled", re.I)),
]


def group(name: str) -> str:
    for g, pat in GROUPS:
        if pat.search(name):
            return g
    return "other"


GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATS = ("cpu_op", "user_annotation", "cuda_runtime")


def load(path: Path, cats: tuple = GPU_CATS) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and e.get("cat") in cats]


def host_gaps(path: Path, gap_ms: float, top: int = 12) -> str:
    """A trace with the host's operators (not --profile-gpu-only): per host thread, the stretches of at
    least gap_ms between its top-level operators, i.e. where that thread ran Python (or waited) without
    calling into torch, with the operator before and after, on the GPU timeline's clock."""
    ev = load(path, GPU_CATS + HOST_CATS)
    gpu = [e for e in ev if e["cat"] in GPU_CATS]
    if not gpu:
        return f"{path}: no GPU events"
    t0 = min(e["ts"] for e in gpu)
    threads: dict = defaultdict(list)
    for e in ev:
        if e["cat"] in HOST_CATS:
            threads[e.get("tid")].append(e)
    lines = [f"{path.name}: host threads' stretches of >= {gap_ms} ms between top-level operators"]
    for tid, es in sorted(threads.items(), key=lambda kv: -len(kv[1])):
        es.sort(key=lambda e: e["ts"])
        gaps, end, before = [], None, None
        for e in es:
            if end is not None and e["ts"] - end >= gap_ms * 1e3:
                gaps.append((e["ts"] - end, end, before, e["name"]))
            if end is None or e["ts"] + e["dur"] > end:
                end, before = e["ts"] + e["dur"], e["name"]
        lines.append(f"  thread {tid}: {len(es)} events, {len(gaps)} stretches, {sum(g[0] for g in gaps) / 1e3:.1f} ms in all")
        for g, at, a, b in sorted(gaps, key=lambda x: -x[0])[:top]:
            lines.append(f"    {g / 1e3:7.2f} ms at {(at - t0) / 1e3:7.1f} ms: after {a[:60]!r}, before {b[:60]!r}")
    return "\n".join(lines)


def union(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def summarize(path: Path, gap_ms: float = 0.3, top: int = 12) -> str:
    ev = load(path)
    if not ev:
        return f"{path}: no GPU events"
    t0 = min(e["ts"] for e in ev)
    t1 = max(e["ts"] + e["dur"] for e in ev)
    by_stream: dict = defaultdict(list)
    for e in ev:
        by_stream[e["args"].get("stream", e.get("tid"))].append(e)
    lines = [f"{path.name}: span {(t1 - t0) / 1e3:.1f} ms, some stream busy {union([(e['ts'], e['ts'] + e['dur']) for e in ev]) / 1e3:.1f} ms"]
    for s, es in sorted(by_stream.items(), key=lambda kv: -sum(e["dur"] for e in kv[1])):
        busy = union([(e["ts"], e["ts"] + e["dur"]) for e in es])
        groups: dict = defaultdict(float)
        for e in es:
            groups[group(e["name"])] += e["dur"]
        parts = ", ".join(f"{g} {v / 1e3:.1f}" for g, v in sorted(groups.items(), key=lambda kv: -kv[1]))
        lines.append(f"  stream {s}: {len(es)} events, busy {busy / 1e3:.1f} ms: {parts}")
    main = max(by_stream.values(), key=lambda es: sum(e["dur"] for e in es))
    main.sort(key=lambda e: e["ts"])
    others = [(e["ts"], e["ts"] + e["dur"]) for s, es in by_stream.items() if es is not main for e in es]
    gaps = []
    for a, b in zip(main, main[1:]):
        g = b["ts"] - (a["ts"] + a["dur"])
        if g >= gap_ms * 1e3:
            gaps.append((g, a, b))
    total_gap = sum(g for g, _, _ in gaps)
    lines.append(f"  busiest stream: {len(gaps)} gaps of >= {gap_ms} ms, {total_gap / 1e3:.1f} ms in all; the longest:")
    for g, a, b in sorted(gaps, key=lambda x: -x[0])[:top]:
        at = (a["ts"] + a["dur"] - t0) / 1e3
        side = union([(max(x, a["ts"] + a["dur"]), min(y, b["ts"])) for x, y in others if y > a["ts"] + a["dur"] and x < b["ts"]])
        lines.append(f"    {g / 1e3:6.2f} ms at {at:7.1f} ms (other streams busy {side / 1e3:.2f}): after {a['name'][:60]!r}, before {b['name'][:60]!r}")
    kernels: dict = defaultdict(lambda: [0.0, 0])
    for e in ev:
        k = kernels[e["name"][:90]]
        k[0] += e["dur"]
        k[1] += 1
    lines.append("  top kernels (ms, count):")
    for name, (d, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top * 2]:
        lines.append(f"    {d / 1e3:8.2f} {n:6d}  {name}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", nargs="+", type=Path)
    p.add_argument("--gaps", type=float, default=0.3, help="list gaps of the busiest stream at least this long (ms)")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--host-gaps", type=float, default=None,
                   help="also list each host thread's stretches of at least this many ms between its top-level operators")
    args = p.parse_args()
    for t in args.traces:
        print(summarize(t, args.gaps, args.top))
        if args.host_gaps is not None:
            print(host_gaps(t, args.host_gaps, args.top))


if __name__ == "__main__":
    main()
