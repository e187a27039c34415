"""Shared pieces of the cpt.speed tests (tests/test_speed*.py): tiny LoRA models, batches, one step's
loss and gradients, counters of cpt's custom ops and of dynamo's graphs."""
from __future__ import annotations

import pytest
import torch

from cpt.plan.run_plan import RunPlan
from cpt.speed import apply

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def peft_model(model_dir, dtype=torch.float32):
    """The tiny test model (conftest's tiny_model_dir) with LoRA r=8 on all 7 projections and trained
    embeddings / head."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, use_rslora=True, target_modules=PROJECTIONS,
                     modules_to_save=["embed_tokens", "lm_head"], init_lora_weights=False)
    return get_peft_model(model, cfg)


def batch(vocab: int, seed: int = 0, b: int = 2, t: int = 24) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100
    pos = torch.arange(t).repeat(b, 1)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def loss_and_grads(model, loss_fn, batch, num_items):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, batch, num_items)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def speed_for(model, device="cpu", **plan_and_options):
    """cpt.speed.apply with a RunPlan made of the RunPlan fields among the keywords, the rest as options."""
    fields = set(RunPlan.__dataclass_fields__)
    plan = RunPlan(device=str(device), **{k: v for k, v in plan_and_options.items() if k in fields})
    return apply(model, plan, **{k: v for k, v in plan_and_options.items() if k not in fields})


def tiny_lora_llama(layers: int = 2, checkpointing: bool = True):
    """A random Llama (hidden 32) with LoRA on all 7 projections and trained embeddings / head."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False,
                                             target_modules=PROJECTIONS, modules_to_save=["embed_tokens", "lm_head"]))
    model.train()
    return model


def cuda_lora_llama(layers: int = 2, intermediate: int = 704, seq: int = 256, checkpointing: bool = True) -> tuple:
    """A random Llama (hidden 256, 32k vocabulary) on the GPU with LoRA r=16 on all 7 projections
    and trained embeddings / head, in training mode; and one batch of 2 x seq random tokens."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(512, seq))
    model = LlamaForCausalLM(cfg).to("cuda")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, use_rslora=True, init_lora_weights=False,
                                             target_modules=PROJECTIONS, modules_to_save=["embed_tokens", "lm_head"]))
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32000, (2, seq), generator=g).cuda()
    return model, {"input_ids": ids, "labels": ids, "position_ids": torch.arange(seq, device="cuda").repeat(2, 1)}


def to_bf16_base(model) -> None:
    """Frozen weights in bf16, trained tensors float32, embeddings' output bf16: as cpt.model makes them."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.bfloat16()
    model.get_base_model().model.embed_tokens.register_forward_hook(lambda m, a, o: o.to(torch.bfloat16))


def assert_bf16_close(loss, grads, loss_ref, grads_ref, grads_32) -> None:
    """A bf16 path's loss and float32 gradients against the plain bf16 path's (`*_ref`): about as far
    from the float32 result (`grads_32`) as the plain path is (deep gradients of a random model
    amplify rounding differently along two paths, so allow 2x)."""
    assert abs(loss.item() - loss_ref.item()) < 1e-2 * loss_ref.item()
    assert grads.keys() == grads_ref.keys()
    for n in grads:
        assert grads[n].dtype == torch.float32
        assert rel(grads[n], grads_32[n]) <= 2 * rel(grads_ref[n], grads_32[n]) + 0.02, (
            n, rel(grads[n], grads_32[n]), rel(grads_ref[n], grads_32[n]))


class OpCalls:
    """Counts calls of the cpt:: custom ops (forward and backward) while active."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        calls = self.calls = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func)
                if name.startswith("cpt."):
                    calls[name] = calls.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def lora_step(lora, x, g):
    """(output, x.grad, A.grad, B.grad) of one LoRA projection for output gradient g."""
    a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    a.grad = b.grad = None
    x = x.detach().requires_grad_(True)
    out = lora(x)
    out.backward(g)
    return out.detach(), x.grad, a.grad.clone(), b.grad.clone()


def lora_layers(model) -> list:
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def lora_over_4bit(dtype, nested=True, bias=False):
    """peft LoRA (r=4, random A and B) over two bitsandbytes NF4 Linear4bit bases, quantized on the CPU."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)

    def lin4(i, o):
        lin = bnb.nn.Linear4bit(i, o, bias=bias, compute_dtype=dtype, compress_statistics=nested, quant_type="nf4",
                                quant_storage=dtype)
        lin.weight = bnb.nn.Params4bit(torch.randn(o, i, dtype=dtype) * 0.1, requires_grad=False, compress_statistics=nested,
                                       quant_type="nf4", quant_storage=dtype)
        return lin.to("cpu")  # quantizes

    net = torch.nn.Sequential(lin4(128, 192), lin4(192, 64))
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "1"], init_lora_weights=False))
    return model, lora_layers(model)


def tiny_4bit_lora_llama(layers: int = 2):
    """tiny_lora_llama with every projection a bitsandbytes NF4 Linear4bit (float32 compute,
    double quantization), quantized on the CPU, under peft's 4-bit LoRA layers."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if name in PROJECTIONS:
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.float32,
                                          compress_statistics=True, quant_type="nf4", quant_storage=torch.float32)
                    q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4", quant_storage=torch.float32)
                    setattr(parent, name, q.to("cpu"))  # quantizes
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False,
                                             target_modules=PROJECTIONS))
    model.train()
    return model


def saved_bytes(model, loss_fn, batch, num_items) -> tuple:
    """(loss, grads, bytes of activations saved for backward outside parameters) of one step."""
    seen = {p.data_ptr() for p in model.parameters()}
    total = [0]

    def pack(t):
        if t.data_ptr() not in seen:  # each storage once (layers share RoPE tables, for one)
            seen.add(t.data_ptr())
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, grads = loss_and_grads(model, loss_fn, batch, num_items)
    return loss, grads, total[0]


def graph_keeping_backend() -> tuple:
    """aot_eager's own setup (min-cut partitioner, graphs run as traced), keeping the forward and
    backward graphs it compiles for inspection: (backend, {"forward": [...], "backward": [...]})."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    graphs = {"forward": [], "backward": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                        partition_fn=min_cut_rematerialization_partition), graphs


def calls(gm, op) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is op]


def dynamo_counts() -> dict:
    from torch._dynamo.utils import counters
    return {"graphs": counters["stats"]["unique_graphs"], "breaks": sum(counters["graph_break"].values())}
