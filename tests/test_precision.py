"""The precision rule (auto / fp32 / bf16 / bf32) and the contexts a training step runs in."""
import pytest
import torch

from m3ae.precision import (Bf32Matmuls, _fp32_matmul_precision, autocast, cpu_has_amx, cpu_has_native_bf16,
                            resolve_precision, step_context, uses_bf16)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_precision_rule():
    assert uses_bf16("bf16", CPU) and not uses_bf16("fp32", CUDA)
    assert uses_bf16("auto", CUDA)
    assert uses_bf16("auto", CPU) == cpu_has_native_bf16()
    assert resolve_precision("bf32", CPU) == "bf32" and not uses_bf16("bf32", CPU)
    with pytest.raises(ValueError, match="precision"):
        uses_bf16("fp16", CPU)
    with pytest.raises(ValueError, match="bf32 is a CPU mode"):
        resolve_precision("bf32", CUDA)
    x = torch.randn(4, 4)
    with autocast(CPU, True):
        assert (x @ x).dtype == torch.bfloat16
    with autocast(CPU, False):
        assert (x @ x).dtype == torch.float32


def test_bf32_matmuls_set_and_restore_onednn_math_nested_and_on_errors():
    before = _fp32_matmul_precision()
    context = step_context(CPU, "bf32")
    assert isinstance(context, Bf32Matmuls)
    with context:
        assert _fp32_matmul_precision() in ("bf16", "medium")
        with context:  # re-entrant: the step reuses one context object
            assert _fp32_matmul_precision() in ("bf16", "medium")
        assert _fp32_matmul_precision() in ("bf16", "medium")
    assert _fp32_matmul_precision() == before
    with pytest.raises(RuntimeError), context:
        raise RuntimeError("a failing step")
    assert _fp32_matmul_precision() == before
    x = torch.randn(8, 8)
    with context:
        assert (x @ x).dtype == torch.float32  # no casts: every tensor stays fp32


@pytest.mark.amx
@pytest.mark.skipif(not cpu_has_amx(), reason="oneDNN runs bf32 matmuls on AMX CPUs only")
def test_bf32_rounds_matmul_inputs_to_bf16_on_amx():
    """Where oneDNN has the kernels, fp32 matmuls inside the context use bf16-rounded inputs: the
    result moves off fp32 by about bf16's rounding, and matches the product of rounded inputs."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 768, generator=g), torch.randn(768, 1024, generator=g)
    exact = a.double() @ b.double()
    with Bf32Matmuls():
        bf32 = a @ b
    rounded = a.bfloat16().double() @ b.bfloat16().double()
    rel = lambda x, ref: ((x.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert rel(a @ b, exact) < 1e-6
    assert 1e-4 < rel(bf32, exact) < 1e-2
    assert rel(bf32, rounded) < 1e-5
