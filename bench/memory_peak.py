"""What is allocated at the moment of peak GPU memory, grouped by the code that allocated it.

torch's allocator history (`torch.cuda.memory._record_memory_history`) logs every block allocated
and freed, with the Python stack. `peak_composition` replays that log, finds the moment the
allocated total was highest, and sums the blocks alive then by the innermost frame that belongs to
cpt, transformers, peft, bitsandbytes or the benchmark (torch's own frames are skipped). Memory
allocated before recording started (weights, adapters, optimizer states made at setup) is one line.

    python bench/gpu_throughput.py --worker ours ... --memory-trace mem.json   (on a CUDA GPU)
    python -m pytest tests/test_bench_memory_peak.py -q                        (the replay, anywhere)
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable

OWN = ("/cpt/", "transformers/", "peft/", "bitsandbytes/", "bench/", "accelerate/")
GIB = 2 ** 30


def _label(frames: list[dict]) -> str:
    for f in frames:
        name = f.get("filename", "")
        if any(k in name for k in OWN) and "/torch/" not in name:
            short = name.split("/src/")[-1].split("site-packages/")[-1]
            return f"{short}:{f.get('line')} ({f.get('name')})"
    return "torch internals / no Python frame"


def peak_composition(events: Iterable[dict], allocated_at_start: int, top: int = 20) -> dict:
    """events: a device trace (dicts with action, addr, size, frames). Returns the peak in GiB, when
    it happened (event index), and the blocks alive then, largest groups first."""
    live: dict[int, tuple[int, str]] = {}
    total = best = allocated_at_start
    best_live: dict[int, tuple[int, str]] = {}
    best_index = -1
    for i, e in enumerate(events):
        action = e.get("action")
        if action == "alloc":
            live[e["addr"]] = (e["size"], _label(e.get("frames") or []))
            total += e["size"]
            if total > best:
                best, best_index, best_live = total, i, dict(live)
        elif action in ("free_requested", "free"):
            # a block allocated before recording started is freed too: only its size is known
            total -= live.pop(e["addr"])[0] if e["addr"] in live else e.get("size", 0)
    groups: dict[str, int] = defaultdict(int)
    for size, label in best_live.values():
        groups[label] += size
    rows = sorted(groups.items(), key=lambda kv: -kv[1])
    shown = [{"where": k, "gib": v / GIB} for k, v in rows[:top]]
    rest = sum(v for _, v in rows[top:])
    return {"peak_gib": best / GIB, "event_index": best_index, "events": i + 1 if best_index >= 0 else 0,
            "allocated_before_recording_gib": allocated_at_start / GIB, "groups": shown, "other_gib": rest / GIB}


def format_composition(c: dict) -> str:
    lines = [f"peak {c['peak_gib']:.2f} GiB (event {c['event_index']} of {c['events']}); "
             f"allocated before recording: {c['allocated_before_recording_gib']:.2f} GiB"]
    lines += [f"  {g['gib']:7.3f} GiB  {g['where']}" for g in c["groups"]]
    lines.append(f"  {c['other_gib']:7.3f} GiB  everything else")
    return "\n".join(lines)
