"""How fast pinned host memory and the GPU exchange data, and whether the copies hide behind compute.

train.offload_embedding_state streams the trained embeddings' optimizer states between pinned host memory
and the GPU every step; its cost is this link's rate. Measured here: copies one way and both ways at once
on the copy engines, a Triton kernel reading and writing pinned host memory directly (zero-copy), and each
beside bf16 matmuls on the compute stream (do they overlap?). Writes bench/results/host_link.{json,md}.

    python bench/host_link.py          (a CUDA GPU)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _time(fn, repeat: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--gib", type=float, default=1.0)
    args = ap.parse_args()
    n = int(args.gib * 2**30)
    dev = torch.device("cuda")
    host, host2 = (torch.empty(n, dtype=torch.uint8, pin_memory=True) for _ in range(2))
    gpu, gpu2 = (torch.empty(n, dtype=torch.uint8, device=dev) for _ in range(2))
    s_in, s_out = torch.cuda.Stream(), torch.cuda.Stream()
    main_stream = torch.cuda.current_stream()

    def both_ways():
        with torch.cuda.stream(s_in):
            gpu.copy_(host, non_blocking=True)
        with torch.cuda.stream(s_out):
            host2.copy_(gpu2, non_blocking=True)
        main_stream.wait_stream(s_in)
        main_stream.wait_stream(s_out)

    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)

    def matmuls():
        for _ in range(10):
            a @ a

    def matmuls_beside_copies():
        with torch.cuda.stream(s_in):
            gpu.copy_(host, non_blocking=True)
        with torch.cuda.stream(s_out):
            host2.copy_(gpu2, non_blocking=True)
        matmuls()
        main_stream.wait_stream(s_in)
        main_stream.wait_stream(s_out)

    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "bytes": n,
           "h2d_gb_s": n / _time(lambda: gpu.copy_(host, non_blocking=True)) / 1e9,
           "d2h_gb_s": n / _time(lambda: host.copy_(gpu, non_blocking=True)) / 1e9,
           "both_ways_each_gb_s": n / _time(both_ways) / 1e9,
           "ten_matmuls_ms": 1e3 * _time(matmuls),
           "ten_matmuls_beside_copies_both_ways_ms": 1e3 * _time(matmuls_beside_copies)}
    try:
        import triton
        import triton.language as tl

        @triton.jit
        def _add_one(src, dst, count, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < count
            tl.store(dst + offs, tl.load(src + offs, mask=mask) + 1, mask=mask)

        hi, gi = host.view(torch.int32), gpu.view(torch.int32)
        grid = (triton.cdiv(hi.numel(), 4096),)
        res["zero_copy_read_gb_s"] = n / _time(lambda: _add_one[grid](hi, gi, hi.numel(), BLOCK=4096)) / 1e9
        res["zero_copy_write_gb_s"] = n / _time(lambda: _add_one[grid](gi, hi, hi.numel(), BLOCK=4096)) / 1e9

        def matmuls_beside_zero_copy():
            with torch.cuda.stream(s_in):
                _add_one[grid](hi, gi, hi.numel(), BLOCK=4096)
            matmuls()
            main_stream.wait_stream(s_in)

        res["ten_matmuls_beside_zero_copy_read_ms"] = 1e3 * _time(matmuls_beside_zero_copy)
    except Exception as e:  # noqa: BLE001 - no Triton, or it cannot address host memory here
        res["zero_copy"] = f"{type(e).__name__}: {e}"[:300]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_link.json").write_text(json.dumps(res, indent=1))
    lines = [f"# Host link: pinned host memory <-> GPU ({res['device']}, {args.gib:g} GiB buffers)", "",
             "`python bench/host_link.py`", "", "| measurement | value |", "|---|---|"]
    lines += [f"| {k} | {v:,.1f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in res.items() if k not in ("device",)]
    (out / "host_link.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
