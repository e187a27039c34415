"""bench/memory_peak.py: replaying an allocator log finds the peak and what was alive at it."""
from bench.memory_peak import GIB, format_composition, peak_composition


def _ev(action, addr, size, file="/x/src/cpt/optim.py", line=1):
    return {"action": action, "addr": addr, "size": size,
            "frames": [{"filename": "/usr/lib/python3/site-packages/torch/nn/functional.py", "line": 9, "name": "f"},
                       {"filename": file, "line": line, "name": "g"}]}


def test_peak_is_found_and_grouped_by_our_innermost_frame():
    events = [
        _ev("free_requested", 99, 1 * GIB),  # allocated before recording: 10 -> 9 GiB
        _ev("alloc", 1, 3 * GIB, "/x/src/cpt/kernels/linear_ce.py", 60),
        _ev("alloc", 2, 1 * GIB, "/x/src/cpt/optim.py", 10),
        _ev("free_requested", 1, 3 * GIB),  # freed before the peak
        _ev("alloc", 3, 2 * GIB, "/x/src/cpt/optim.py", 10),
        _ev("alloc", 4, 2 * GIB, "/y/site-packages/peft/tuners/lora/layer.py", 5),  # peak: 1 + 2 + 2 (+ 9 before)
        _ev("free_requested", 4, 2 * GIB),
        _ev("free_requested", 3, 2 * GIB),
        _ev("alloc", 5, 1 * GIB),
    ]
    c = peak_composition(events, allocated_at_start=10 * GIB)
    assert c["peak_gib"] == 14 and c["event_index"] == 5
    groups = {g["where"]: g["gib"] for g in c["groups"]}
    assert groups == {"cpt/optim.py:10 (g)": 3.0, "peft/tuners/lora/layer.py:5 (g)": 2.0}
    assert "14.00 GiB" in format_composition(c)
