"""cpt's NF4 dequantization kernel (cpt.speed.nf4) is bitsandbytes' dequantize_4bit bit for bit, and a
run takes it only where it put the NF4 table (CUDA, Triton, the nf4_kernel option on).

    python -m pytest tests/test_speed_nf4.py -q      (the kernel itself on a CUDA machine)
"""
from __future__ import annotations

import pytest
import torch
from speed_helpers import OpCalls, lora_layers, lora_over_4bit, lora_step, rel

from cpt.speed.lora import _dequantize, fuse_lora_projections


def test_without_a_table_4bit_weights_take_bitsandbytes_dequantization():
    """An empty table (a CPU weight, no Triton, or nf4_kernel=False) leaves dequantization to
    bitsandbytes' functions, with the op's result unchanged; a table is looked up only for CUDA weights."""
    model, loras = lora_over_4bit(torch.float32)
    calls = []
    fused, _ = fuse_lora_projections(model, nf4_code=lambda device: calls.append(device))
    assert not calls and all(s.is_4bit and s.code.numel() == 0 for s in fused)
    m = loras[0]
    qs = m.base_layer.weight.quant_state
    wd = _dequantize(m.base_layer.weight, qs.absmax, qs.state2.absmax, qs.state2.code, torch.as_tensor(qs.offset),
                     torch.empty(0), qs.blocksize, qs.state2.blocksize, "nf4", 192, 128, torch.float32)
    import bitsandbytes.functional as bf

    assert torch.equal(wd, bf.dequantize_4bit(m.base_layer.weight, qs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with Triton and bitsandbytes (run on the device)")
@pytest.mark.parametrize("nested", [True, False])
def test_cuda_nf4_dequantization_is_bitsandbytes_bit_for_bit(nested):
    """speed/nf4.py against bitsandbytes' own dequantize_4bit, on its CUDA kernels: equal bit for bit
    in bf16, fp16 and float32, with and without the nested block maxima, for block sizes 64 and 128
    (packed in uint8 or, as cpt loads them, bf16 storage),
    for a size that ends inside a program's run of bytes, and for weights with zeros and huge blocks.
    It fails if the maxima's product and sum were fused (one rounding instead of two), or the two
    values of a byte swapped."""
    bf = pytest.importorskip("bitsandbytes.functional")
    from cpt.speed import nf4

    code = nf4.code_table(torch.device("cuda", torch.cuda.current_device()))
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape, bs in (((4096, 1024), 64), ((1024, 3000), 64), ((512, 768), 128)):
        w = torch.randn(shape, device="cuda", generator=g) * torch.logspace(-6, 3, shape[0], device="cuda")[:, None]
        w[:3] = 0
        w = w.bfloat16()
        storage = torch.bfloat16 if bs == 128 else torch.uint8  # cpt loads with bnb_4bit_quant_storage = the dtype
        q, st = bf.quantize_4bit(w, blocksize=bs, quant_type="nf4", compress_statistics=nested, quant_storage=storage)
        assert q.dtype == storage
        if nested:
            args = (st.absmax, st.state2.absmax, st.state2.code, st.offset, code, bs, st.state2.blocksize)
        else:
            args = (st.absmax, st.absmax.new_empty(0), st.absmax.new_empty(0), st.absmax.new_empty(0), code, bs, 0)
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            st.dtype = dt
            ref = bf.dequantize_4bit(q, st)
            for nb in (None, 512):
                got = nf4.dequantize_nf4(q, *args, shape, dt, bytes_per_program=nb)
                assert got.dtype == dt and got.shape == ref.shape
                assert torch.equal(got.view(torch.int8 if dt != torch.float32 else torch.int32),
                                   ref.view(torch.int8 if dt != torch.float32 else torch.int32)), (shape, bs, dt, nb)
    from cpt.speed import lora

    # The 4-bit op's dequantization takes this kernel for NF4 on CUDA (and bitsandbytes' without a table).
    assert lora._nf4 is nf4 and nf4.supported(q, "nf4", bs, st.absmax, torch.bfloat16, code)
    assert not nf4.supported(q, "fp4", bs, st.absmax, torch.bfloat16, code)
    assert not nf4.supported(q, "nf4", bs, st.absmax, torch.bfloat16, torch.empty(0, device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with Triton and bitsandbytes (run on the device)")
def test_cuda_nf4_kernel_option_off_gives_the_same_projection():
    """apply(..., nf4_kernel=False) (bench/gpu_throughput.py --bnb-dequant): the 4-bit projections get
    no table and dequantize with bitsandbytes' functions, to the same outputs and gradients (the two
    dequantizations are equal bit for bit)."""
    from cpt.plan.run_plan import RunPlan
    from cpt.speed import apply

    model, loras = lora_over_4bit(torch.bfloat16)
    model.to("cuda")
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(3, 5, m.in_features, generator=g).bfloat16().cuda(),
             torch.randn(3, 5, m.out_features, generator=g).bfloat16().cuda()) for m in loras]

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16), OpCalls() as seen:
            return [lora_step(m, x, gy) for m, (x, gy) in zip(loras, data)], seen.calls

    plan = RunPlan(device="cuda", kernels="cpt")
    speed = apply(model, plan)
    assert all(m._cpt_lora.code.numel() == 16 for m in lora_layers(model))
    got, seen = run()
    assert seen == {"cpt.lora_linear_4bit.default": 2, "cpt.lora_linear_4bit_backward.default": 2}
    speed = apply(model, plan, nf4_kernel=False)
    assert all(m._cpt_lora.code.numel() == 0 for m in lora_layers(model))
    ref, _ = run()
    speed.close()
    for r, o in zip(ref, got):
        for u, v in zip(o, r):
            assert rel(u, v) < 1e-6
