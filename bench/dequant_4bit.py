"""NF4 dequantization on a GPU: cpt's one-launch Triton kernel against bitsandbytes' two launches.

A QLoRA step of an 8B Llama dequantizes each decoder layer's seven frozen weights twice (forward, and
once in backward): 448 calls per step. This times one layer's worth (q, k, v, o, gate, up, down of the
Llama-3.1-8B shape, NF4 with nested block maxima, bf16 out), both ways, interleaved so that they share
the GPU's clock, and checks that the outputs are equal bit for bit:

- bitsandbytes: `dequantize_blockwise` of the 8-bit block maxima, `+ offset`, `dequantize_4bit`
  (what bitsandbytes' Linear4bit runs, and cpt with apply(..., nf4_kernel=False));
- cpt: `cpt.speed.nf4.dequantize_nf4` (block maxima rebuilt inside the one kernel).

    python bench/dequant_4bit.py [--out bench/results] [--reps 20] [--sweep]

--sweep also times the kernel at other bytes-per-program settings. Writes dequant_4bit.md /
dequant_4bit.json: microseconds per layer (CUDA events, after warm-up), launched eagerly and replayed as a
CUDA graph, the bandwidth that is
(packed bytes + block-maxima codes read, bf16 values written), and the ratio.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

HIDDEN, KV, INTER = 4096, 1024, 14336
SHAPES = {"q": (HIDDEN, HIDDEN), "k": (KV, HIDDEN), "v": (KV, HIDDEN), "o": (HIDDEN, HIDDEN),
          "gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    import torch
    import bitsandbytes.functional as bf
    from cpt.speed import nf4

    dev = torch.device("cuda", torch.cuda.current_device())
    code = nf4.code_table(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    weights = []
    for name, shape in SHAPES.items():
        w = (torch.randn(shape, device=dev, generator=gen) * 0.02).bfloat16()
        q, st = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        weights.append((name, shape, q, st))
        del w
    torch.cuda.empty_cache()

    def bnb_layer():
        for _, shape, q, st in weights:
            absmax = torch.ops.bitsandbytes.dequantize_blockwise(st.absmax, st.state2.absmax, st.state2.code,
                                                                st.state2.blocksize, torch.float32) + st.offset
            torch.ops.bitsandbytes.dequantize_4bit(q, absmax, 64, "nf4", list(shape), torch.bfloat16)

    def cpt_layer(nb=None):
        def run():
            for _, shape, q, st in weights:
                nf4.dequantize_nf4(q, st.absmax, st.state2.absmax, st.state2.code, st.offset, code, 64,
                                   st.state2.blocksize, shape, torch.bfloat16, bytes_per_program=nb)
        return run

    # Equality first, weight by weight.
    exact = {}
    for name, shape, q, st in weights:
        st.dtype = torch.bfloat16
        ref = bf.dequantize_4bit(q, st)
        got = nf4.dequantize_nf4(q, st.absmax, st.state2.absmax, st.state2.code, st.offset, code, 64,
                                 st.state2.blocksize, shape, torch.bfloat16)
        exact[name] = bool(torch.equal(got.view(torch.int16), ref.view(torch.int16)))
        del ref, got

    variants = {"bitsandbytes": bnb_layer, f"cpt ({nf4.BYTES_PER_PROGRAM} bytes/program)": cpt_layer()}
    if args.sweep:
        for nb in (512, 1024, 4096, 8192):
            if nb != nf4.BYTES_PER_PROGRAM:
                variants[f"cpt ({nb} bytes/program)"] = cpt_layer(nb)
    # Eager: launched from Python one after another (as in the layers that run without CUDA graphs: then
    # the host's launch work can be what the GPU waits for). Graph: the same calls captured once and
    # replayed (the GPU's own time, as in the layers that replay graphs).
    graphs = {}
    for name, fn in variants.items():
        fn()
        torch.cuda.synchronize()
        graphs[name] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[name]):
            fn()
    times: dict = {(k, how): [] for k in variants for how in ("eager", "graph")}
    for rep in range(args.warmup + args.reps):
        for name, fn in variants.items():
            for how, call in (("eager", fn), ("graph", graphs[name].replay)):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                call()
                b.record()
                torch.cuda.synchronize()
                if rep >= args.warmup:
                    times[(name, how)].append(a.elapsed_time(b) * 1000)
    elems = sum(s[0] * s[1] for s in SHAPES.values())
    traffic = elems // 2 + elems // 64 + elems * 2  # packed codes, block-maxima codes, bf16 out
    rows = []
    for (name, how), ts in times.items():
        bt = times[("bitsandbytes", how)]
        base = sorted(bt)[len(bt) // 2]
        med = sorted(ts)[len(ts) // 2]
        rows.append({"variant": name, "launch": how, "median_us": round(med, 1), "min_us": round(min(ts), 1),
                     "gb_per_s": round(traffic / med / 1e3, 1), "speedup": round(base / med, 2)})
    rows.sort(key=lambda r: (r["launch"], r["variant"] != "bitsandbytes"))
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "bitsandbytes": __import__("bitsandbytes").__version__, "triton": __import__("triton").__version__,
              "layer": {k: list(v) for k, v in SHAPES.items()}, "elements_per_layer": elems,
              "bytes_moved_per_layer": traffic, "reps": args.reps, "bit_for_bit": exact, "rows": rows,
              "per_step_calls": 448, "command": "python bench/dequant_4bit.py" + (" --sweep" if args.sweep else "")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dequant_4bit.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# NF4 dequantization: cpt's Triton kernel vs bitsandbytes (one 8B decoder layer's seven weights)", "",
             f"{result['gpu']}, torch {result['torch']}, bitsandbytes {result['bitsandbytes']}, triton {result['triton']}. "
             f"`{result['command']}`; median of {args.reps} timed repetitions after {args.warmup} warm-up, CUDA events. "
             f"{elems / 1e6:.1f}M values per layer, {traffic / 1e6:.0f} MB moved (packed codes and block-maxima codes read, "
             "bf16 values written). An 8B QLoRA step runs this 64 times (each layer in forward and in backward).", "",
             "Eager: the calls launched from Python (what a layer without CUDA graphs pays, host work included); "
             "graph: the same calls replayed as one CUDA graph (the GPU's own time).", "",
             "| launch | variant | median us per layer | min us | GB/s | speedup |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['launch']} | {r['variant']} | {r['median_us']} | {r['min_us']} | {r['gb_per_s']} | {r['speedup']}x |"
              for r in rows]
    lines += ["", "Bit for bit equal to bitsandbytes' `dequantize_4bit`: "
              + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in exact.items()) + "."]
    (out / "dequant_4bit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(exact.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
