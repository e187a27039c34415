"""The price of making the embeddings' early update undoable, on a GPU: an UndoLog against a copy of the weights.

cpt.optim.host_state starts lm_head's 8-bit AdamW update (and embed_tokens' rows outside the batch) during the
backward pass, before the loop knows whether the step is finite. A skipped step must be undone. The
old way copied the weights out first (2 bytes per element to host memory, over a link the step
already saturates); now the update itself checks, element by element, that its inverse gives the old
weight back, and logs on the GPU the few it cannot (cpt.optim.split_master.UndoLog). This times, on one
128256 x 4096 matrix (an 8B Llama-3's lm_head) with a dense gradient:

- plain: the update alone (the kernel the old way ran, beside its copy);
- copy: the old way's copy of the weights to pinned host memory, alone (it ran on another stream, on
  the host link);
- undoable: the update with the log (the new way: no copy);
- undo: taking the update back (only on a skipped step), and whether that was bit for bit.

    python bench/undo_update.py [--out bench/results] [--reps 10]

Writes undo_update.md / undo_update.json (milliseconds, CUDA events, after warm-up; the variants
interleaved so that they share the GPU's clock).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

VOCAB, HIDDEN = 128256, 4096


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    import torch
    from cpt.optim import split_master as sm
    from cpt.optim.adamw8bit import AdamW8bit

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(VOCAB, HIDDEN, device=dev, generator=gen) * 0.02
    hi, lo = sm.split_float32(w)
    del w
    blocks = -(-VOCAB * HIDDEN // sm.BLOCK)
    opt = AdamW8bit([torch.nn.Parameter(torch.zeros(1, device=dev))])
    maps, kernel = opt._maps(dev), opt.kernel  # bitsandbytes' 8-bit maps; the Triton update
    state = {"lo": lo, "state1": torch.full((blocks * sm.BLOCK,), maps.zero1, dtype=torch.uint8, device=dev),
             "state2": torch.full((blocks * sm.BLOCK,), maps.zero2, dtype=torch.uint8, device=dev),
             "absmax1": torch.zeros(blocks, device=dev), "absmax2": torch.zeros(blocks, device=dev)}
    backup = torch.empty(hi.shape, dtype=hi.dtype, pin_memory=True)
    log = sm.UndoLog(dev)
    times: dict = {k: [] for k in ("plain", "copy", "undoable", "undo")}
    exact, logged = [], []
    step = 0
    # (the copy variant leaves the weights as they are; the others go on from their update)
    for rep in range(args.warmup + args.reps):
        for variant in ("plain", "copy", "undoable"):
            step += 1
            g = torch.randn(VOCAB, HIDDEN, device=dev, generator=gen, dtype=torch.bfloat16)
            hp = sm.hyperparameters(0.9, 0.999, 1e-5, 1e-8, 0.0, step, dev)
            old = {k: v.clone() for k, v in state.items()} if variant == "undoable" else None
            before = hi.clone() if variant == "undoable" else None
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            if variant == "copy":
                backup.copy_(hi, non_blocking=True)
            else:
                if variant == "undoable":
                    log.reset()
                sm.update_split_rows(hi, state["lo"], g, None, state["state1"], state["state2"], state["absmax1"],
                                     state["absmax2"], maps, hp, kernel=kernel, log=log if variant == "undoable" else None)
            b.record()
            torch.cuda.synchronize()
            if rep >= args.warmup:
                times[variant].append(a.elapsed_time(b))
            if variant == "undoable":  # take it back, check it, and go on from the update
                made, new_lo = hi.clone(), state["lo"].clone()
                a.record()
                sm.undo_split_rows(hi, new_lo, old["lo"], g, None, old["state1"], old["state2"], old["absmax1"],
                                   old["absmax2"], maps, hp, kernel=kernel)
                b.record()
                log.apply(hi)
                torch.cuda.synchronize()
                if rep >= args.warmup:
                    times["undo"].append(a.elapsed_time(b))
                    exact.append(bool(torch.equal(hi.view(torch.int16), before.view(torch.int16))))
                    logged.append(int(log.count.item()))
                hi.copy_(made)
    res = {"matrix": [VOCAB, HIDDEN], "device": torch.cuda.get_device_name(), "reps": args.reps,
           "ms_mean": {k: sum(v) / len(v) for k, v in times.items()}, "ms_min": {k: min(v) for k, v in times.items()},
           "undo_exact_every_time": all(exact), "logged_per_update": logged,
           "triton": not kernel.failed}  # False: the Triton kernel failed and PyTorch operations were timed
    m = res["ms_mean"]
    res["undoable_vs_plain"] = m["undoable"] / m["plain"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "undo_update.json").write_text(json.dumps(res, indent=1))
    lines = ["# Undoable embedding update: a log on the GPU against a copy of the weights", "",
             f"One {VOCAB} x {HIDDEN} split master (lm_head of an 8B Llama-3), dense bf16 gradient, {res['device']}, "
             f"mean of {args.reps} (min in brackets). `python bench/undo_update.py`", "",
             "| variant | ms |", "|---|---|"]
    for k, what in (("plain", "update (before: beside the copy)"), ("copy", "copy of the old weights to host (before; host link)"),
                    ("undoable", "update with the undo log (now; no copy)"), ("undo", "taking it back (skipped steps only)")):
        lines.append(f"| {what} | {m[k]:.2f} ({res['ms_min'][k]:.2f}) |")
    lines += ["", f"undoable / plain: {res['undoable_vs_plain']:.2f}x (GPU time the log adds: {m['undoable'] - m['plain']:.2f} ms; "
              f"host-link time it saves: {m['copy']:.2f} ms). "
              f"Undo bit for bit every time: {res['undo_exact_every_time']}; elements logged per update: {logged}."]
    (out / "undo_update.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
