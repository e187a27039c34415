"""cpt.runtime: devices, dtypes and the launch, read from the machine and the environment."""
import pytest
import torch

from cpt.runtime import (launched_with_fsdp, launched_world_size, local_device, mixed_precision, model_device, resolve_dtype,
                         same_device, settle_cpu_math, to_device, to_host)


def test_launch_facts_come_from_the_launcher_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert launched_world_size() == 1 and not launched_with_fsdp()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "True")
    assert launched_world_size() == 4 and launched_with_fsdp()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU answers")
def test_cpu_answers(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_device() == torch.device("cpu")  # no GPU: LOCAL_RANK names none
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert mixed_precision(torch.device("cpu"), torch.bfloat16, bf16=True) == "no"  # no autocast on the CPU here


def test_mixed_precision_rule():
    cuda = torch.device("cuda")
    assert mixed_precision(cuda, torch.bfloat16) == "bf16"
    assert mixed_precision(cuda, torch.float16) == "fp16"
    assert mixed_precision(cuda, torch.float32) == "no"
    assert mixed_precision(cuda, torch.float32, bf16=True) == "bf16"
    assert mixed_precision(cuda, torch.bfloat16, fp16=True) == "fp16"
    assert mixed_precision(cuda, torch.bfloat16, bf16=False) == "no"


def test_same_device_ignores_how_a_device_is_named():
    assert same_device(torch.device("cpu"), torch.device("cpu", 0))
    assert not same_device(torch.device("cpu"), torch.device("meta"))


def test_settling_cpu_math_makes_one_element_calls(monkeypatch):
    sizes = []
    real = torch.exp
    monkeypatch.setattr(torch, "exp", lambda x, *a, **k: (sizes.append(x.numel()), real(x, *a, **k))[1])
    settle_cpu_math()
    assert sizes == [1, 1]  # float32 and float64, one element each


def test_host_copies_round_trip():
    t = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(to_device(to_host(t), torch.device("cpu")), t)


def test_the_model_device_is_where_it_computes_not_its_first_parameter():
    # (meta stands in for a GPU here: any device off the host)
    partly_on_host = torch.nn.Sequential(torch.nn.Embedding(4, 2), torch.nn.Linear(2, 2, device="meta"))
    assert model_device(partly_on_host) == torch.device("meta")
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")
