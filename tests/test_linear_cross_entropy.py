"""The chunked, fused head + cross-entropy equals F.linear + F.cross_entropy in value and gradients."""
import pytest
import torch
import torch.nn.functional as F

import m3ae.linear_cross_entropy as lce
from m3ae.linear_cross_entropy import linear_cross_entropy


def inputs(rows=37, dim=8, vocab=53, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(vocab, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,), generator=g)
    token_weight = torch.rand(rows, generator=g, dtype=dtype)
    return hidden, weight, bias, targets, token_weight


def unfused(hidden, weight, bias, targets, token_weight):
    logits = F.linear(hidden, weight, bias)
    per_token = F.cross_entropy(logits, targets, reduction="none")
    return (per_token * token_weight).sum(), per_token, logits.argmax(-1) == targets


@pytest.mark.parametrize("chunk_rows", [1, 5, 37, 100])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_unfused_value_and_gradients(chunk_rows, with_bias):
    h, w, b, t, tw = inputs()
    b = b if with_bias else None
    loss, per_token, correct = linear_cross_entropy(h, w, b, t, tw, chunk_rows=chunk_rows)
    (3.0 * loss).backward()  # a non-unit upstream gradient must scale every gradient
    grads = [x.grad.clone() for x in (h, w, b) if x is not None]
    for x in (h, w, b):
        if x is not None:
            x.grad = None
    ref_loss, ref_per_token, ref_correct = unfused(h, w, b, t, tw)
    (3.0 * ref_loss).backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(per_token, ref_per_token.detach(), rtol=1e-12, atol=1e-12)
    assert torch.equal(correct, ref_correct)
    for got, x in zip(grads, [x for x in (h, w, b) if x is not None]):
        torch.testing.assert_close(got, x.grad, rtol=1e-10, atol=1e-12)


def test_float32_and_no_rows():
    h, w, b, t, tw = inputs(dtype=torch.float32)
    loss, _, _ = linear_cross_entropy(h, w, b, t, tw, chunk_rows=8)
    torch.testing.assert_close(loss, unfused(h, w, b, t, tw)[0], rtol=1e-5, atol=1e-6)
    empty = torch.zeros(0, 8, requires_grad=True)
    loss, per_token, correct = linear_cross_entropy(empty, w, b, t[:0], tw[:0])
    loss.backward()
    assert loss.item() == 0.0 and per_token.numel() == 0 and correct.numel() == 0
    assert torch.count_nonzero(w.grad) == 0 and empty.grad.shape == (0, 8)


@pytest.mark.parametrize("group_chunks", [None, 1, 3])
def test_bfloat16_autocast_is_close_and_gradients_stay_fp32(group_chunks, monkeypatch):
    """Weight-gradient products per group of chunks: all four chunks at once (default), one per
    chunk, or 3 + 1 (a full group, then a partial one at the end)."""
    h, w, b, t, tw = inputs(dtype=torch.float32, rows=64, dim=32, vocab=97)
    if group_chunks is not None:
        monkeypatch.setitem(lce.GRAD_GROUP_ELEMENTS, "cpu", 97 * 16 * group_chunks)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, _ = linear_cross_entropy(h, w, b, t, tw, chunk_rows=16)
    loss.backward()
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.float32 and h.grad.dtype == torch.float32
    ref = unfused(h.detach(), w.detach(), b.detach(), t, tw)[0]
    torch.testing.assert_close(loss.detach(), ref, rtol=2e-2, atol=1e-2)
    # Gradients summed over the 4 chunks (the first group writes the weight gradient, later ones add).
    h32, w32, b32 = (x.detach().clone().requires_grad_() for x in (h, w, b))
    unfused(h32, w32, b32, t, tw)[0].backward()
    for got, want in ((h.grad, h32.grad), (w.grad, w32.grad), (b.grad, b32.grad)):
        assert ((got - want).norm() / want.norm()).item() < 2e-2  # bf16 rounding, not a lost chunk


def test_low_precision_ties_follow_argmax():
    """Under bf16 autocast rounded logits tie; a target tied behind an earlier index is wrong, as
    with argmax. Rows 3 and 7 of the head are equal, so their logits always tie."""
    h, w, b, t, tw = inputs(dtype=torch.float32, rows=8, dim=4, vocab=10)
    with torch.no_grad():
        w[3] = w[7] = 5 * h[0] / h[0].norm()  # both give the largest logit for row 0
        b.zero_()
    t = torch.full((8,), 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, correct = linear_cross_entropy(h, w, b, t, tw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = F.linear(h, w, b).argmax(-1) == t
    assert not correct[0] and torch.equal(correct, expected)


def test_gradient_work_only_when_grad_is_enabled():
    from torch.utils.flop_counter import FlopCounterMode

    h, w, b, t, tw = inputs()
    head = 2 * h.shape[0] * h.shape[1] * w.shape[0]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        loss, _, _ = linear_cross_entropy(h, w, b, t, tw, chunk_rows=4)
    assert not loss.requires_grad and counter.get_total_flops() == head
    torch.testing.assert_close(loss, unfused(h, w, b, t, tw)[0].detach())
    with FlopCounterMode(display=False) as counter:  # forward + both gradient matmuls, once each
        linear_cross_entropy(h, w, b, t, tw, chunk_rows=4)[0].backward()
    assert counter.get_total_flops() == 3 * head


def test_second_backward_is_refused():
    h, w, b, t, tw = inputs()
    loss, _, _ = linear_cross_entropy(h, w, b, t, tw)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single-use"):
        loss.backward()


def test_bad_shapes_are_rejected():
    h, w, b, t, tw = inputs()
    with pytest.raises(ValueError, match="hidden"):
        linear_cross_entropy(h[:, :4], w, b, t, tw)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, b, t[:3], tw)
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(h, w, b, t, tw, chunk_rows=0)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("bf16", [False, True])
def test_inside_torch_compile_one_operator_with_the_same_values_and_gradients(with_bias, bf16):
    """Compiled (AOTAutograd, no code generation) the fused pass is the m3ae::linear_cross_entropy
    operator: no graph break, and the same loss, per-token losses, hits and gradients as eager."""
    from torch._dynamo.utils import counters

    def run(fn):
        h, w, b, t, tw = inputs(dtype=torch.float32, rows=45, dim=16, vocab=61)
        b = b if with_bias else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, per_token, correct = fn(h, w, b, t, tw, chunk_rows=16)
        (2.0 * loss).backward()
        return [loss.detach(), per_token, correct, *(x.grad for x in (h, w, b) if x is not None)]

    torch._dynamo.reset()
    counters.clear()
    compiled = run(torch.compile(linear_cross_entropy, backend="aot_eager", fullgraph=True))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    eager = run(linear_cross_entropy)
    for got, want in zip(compiled, eager):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("bf16", [False, True])
def test_compiled_operator_passes_torch_library_checks(bf16):
    """Schema, fake-tensor shapes, autograd registration and dynamic-shape AOT dispatch."""
    from m3ae.linear_cross_entropy import _compiled

    h, w, b, t, tw = inputs(dtype=torch.float32, rows=21, dim=8, vocab=29)
    dtype = torch.bfloat16 if bf16 else torch.float32
    for bias in (b, None):
        torch.library.opcheck(_compiled, (h, w, bias, t, tw, 8, dtype, True))
    torch.library.opcheck(_compiled, (h.detach(), w.detach(), b.detach(), t, tw, 8, dtype, False))
