"""Transformer blocks: computing only some output rows gives exactly those rows of the full output;
a CPU bf16 training step runs its attention in fp32 (m3ae.precision.attention_in_fp32), or for
short sequences in the explicit form of m3ae.cpu_attention; the GELU is the tanh form in fp32 and
within bf16 rounding of it in bf16."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from m3ae.layers import Attention, Transformer, gather_rows, gelu


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_output_rows_equal_rows_of_full_output(explicit, checkpointing):
    torch.manual_seed(0)
    net = Transformer(16, depth=2, num_heads=4, grad_checkpointing=checkpointing,
                      explicit_attention=explicit).double()
    x = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True)
    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[0, 7:] = True
    padding[2, 4:] = True
    rows = torch.stack([torch.randperm(9)[:5] for _ in range(3)])
    full, _ = net(x, padding)
    part, _ = net(x, padding, output_rows=rows)
    torch.testing.assert_close(part, gather_rows(full, rows))
    weight = torch.randn_like(part)
    g_part = torch.autograd.grad((part * weight).sum(), [x, *net.parameters()])
    g_full = torch.autograd.grad((gather_rows(full, rows) * weight).sum(), [x, *net.parameters()])
    for a, b in zip(g_part, g_full):
        torch.testing.assert_close(a, b)


def test_output_rows_without_blocks_is_a_gather():
    net = Transformer(8, depth=0, num_heads=2)
    x = torch.randn(2, 5, 8)
    rows = torch.tensor([[4, 0], [1, 1]])
    out, _ = net(x, output_rows=rows)
    torch.testing.assert_close(out, net.norm(gather_rows(x, rows)))


class _SdpaDtypes(TorchDispatchMode):
    """Records the input dtype of every fused attention kernel that runs."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.name() and "backward" not in func.name():
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("short", [True, False])
def test_cpu_bf16_training_attention_runs_in_fp32_and_inference_in_bf16(short, monkeypatch):
    # torch's CPU bf16 flash attention is slower than fp32 with a backward (benchmarks/attention_precision.py),
    # and CPU autocast would cast fp32 inputs back to bf16: the layer must step out of autocast for it.
    # Sequences up to 16 keys per head dim take the explicit bf16-matmul / fp32-softmax form
    # instead (m3ae.cpu_attention).
    from m3ae import cpu_attention

    if not short:
        monkeypatch.setattr(cpu_attention, "KEYS_PER_HEAD_DIM", 0)
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4)
    x = torch.randn(2, 7, 32)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with _SdpaDtypes() as train:
            out, _ = attn(x, padding)
        out.float().sum().backward()
        with torch.no_grad(), _SdpaDtypes() as infer:
            out_infer, _ = attn(x, padding)
    assert train.dtypes == [] if short else (train.dtypes and set(train.dtypes) == {torch.float32})
    assert infer.dtypes and set(infer.dtypes) == {torch.bfloat16}
    assert out.dtype == out_infer.dtype == torch.bfloat16  # the layer's output dtype is unchanged
    assert attn.qkv.weight.grad is not None and torch.isfinite(attn.qkv.weight.grad).all()
    reference, _ = attn.float()(x, padding)
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)


def test_gelu_is_the_tanh_form_in_fp32_and_within_bf16_rounding_in_bf16():
    x = torch.linspace(-8, 8, 4001)
    assert torch.equal(gelu(x), F.gelu(x, approximate="tanh"))  # fp32: the reference's function, exactly
    assert torch.equal(gelu(x.double()), F.gelu(x.double(), approximate="tanh"))
    # bf16: every finite bf16 value in [-20, 20]; against the tanh form in fp64, the output is off
    # by at most half a bf16 unit of the output plus the tanh-vs-erf gap (4.7e-4).
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    xb = bits[torch.isfinite(bits) & (bits.float().abs() <= 20)]
    want = F.gelu(xb.double(), approximate="tanh")
    half_unit = want.abs().clamp(min=2.0**-126) * 2.0**-8  # a bound on half a bf16 unit
    err = (gelu(xb).double() - want).abs()
    assert bool((err <= half_unit + 4.8e-4).all())
    rounded_tanh = F.gelu(xb, approximate="tanh")
    assert (gelu(xb) != rounded_tanh).double().mean() < 0.03  # rounded, the two forms mostly agree
    # and the gradient, likewise within the gap of the two forms' derivatives
    xg = xb.clone().requires_grad_()
    gelu(xg).backward(torch.ones_like(xg))
    want_grad = torch.func.grad(lambda t: F.gelu(t, approximate="tanh").sum())(xb.double())
    assert (xg.grad.double() - want_grad).abs().max() < 6e-3  # the tanh form in bf16: 3.9e-3
