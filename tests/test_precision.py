"""The precision rule (auto / fp32 / bf16 / bf32) and the contexts a training step runs in."""
import pytest
import torch

from m3ae.precision import (Bf32Matmuls, _fp32_matmul_precision, autocast, cpu_has_amx, cpu_has_native_bf16,
                            resolve_precision, slow_precision_warning, step_context, uses_bf16)

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


@pytest.mark.parametrize("native_bf16, amx", [(False, False), (True, False), (True, True)])
def test_slow_precision_warned_where_the_cpu_lacks_the_instructions(monkeypatch, native_bf16, amx):
    import m3ae.precision as precision
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(precision, "cpu_has_amx", lambda: amx)
    bf16, bf32 = slow_precision_warning("bf16", CPU), slow_precision_warning("bf32", CPU)
    assert (bf16 is not None) == (not native_bf16) and (bf32 is not None) == (not amx)
    assert bf16 is None or ("AVX512-BF16" in bf16 and "precision=auto" in bf16)
    assert bf32 is None or "no AMX" in bf32
    assert slow_precision_warning("fp32", CPU) is None
    assert slow_precision_warning("bf16", CUDA) is None
    # auto never resolves to a warned mode
    assert slow_precision_warning(precision.resolve_precision("auto", CPU), CPU) is None


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
