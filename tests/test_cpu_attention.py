"""m3ae.cpu_attention: the explicit attention equals torch's fused attention (exactly up to fp32
rounding in fp32, within bf16 rounding in bf16), with padded keys, fewer queries than keys and
any split into chunks, and is chosen only while its saved probabilities stay small."""
import pytest
import torch
import torch.nn.functional as F

from m3ae import cpu_attention
from m3ae.cpu_attention import KEYS_PER_HEAD_DIM, explicit_attention, explicit_pays


def _inputs(dtype, queries=6, keys=9, seed=0, batch=3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 4, queries, 16, generator=g)
    k, v = (torch.randn(batch, 4, keys, 16, generator=g) for _ in range(2))
    padding = torch.zeros(batch, keys, dtype=torch.bool)
    padding[1, 6:] = True
    padding[2, 3:5] = True
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], padding


@pytest.mark.parametrize("queries", [9, 5])
@pytest.mark.parametrize("chunks", ["one", "one slice each", "uneven"])
def test_equals_fused_attention_in_fp32(queries, chunks, monkeypatch):
    # 20 (batch, head) slices of queries x 9 scores; "uneven": chunks of 3 slices, the last of 2
    budget = {"one": 1 << 19, "one slice each": 1, "uneven": 3 * queries * 9}[chunks]
    monkeypatch.setattr(cpu_attention, "CHUNK_SCORES", budget)
    assert cpu_attention._chunk_rows(20, queries * 9) == {"one": 20, "one slice each": 1, "uneven": 3}[chunks]
    (q, k, v), padding = _inputs(torch.float32, queries=queries, batch=5)
    weight = torch.randn(5, 4, queries, 16)
    ours = explicit_attention(q, k, v, padding, 0.25)
    grads = torch.autograd.grad((ours * weight).sum(), (q, k, v))
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=~padding[:, None, None, :], scale=0.25)
    fused_grads = torch.autograd.grad((fused * weight).sum(), (q, k, v))
    torch.testing.assert_close(ours, fused, atol=1e-6, rtol=1e-5)
    for a, b in zip(grads, fused_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # padded keys get no attention, so no gradient
    assert grads[1][1, :, 6:].abs().max() == 0 and grads[2][2, :, 3:5].abs().max() == 0


def test_bf16_within_bf16_rounding_of_fp32():
    (q, k, v), padding = _inputs(torch.bfloat16)
    weight = torch.randn(3, 4, 6, 16)
    ours = explicit_attention(q, k, v, padding, 0.25)
    assert ours.dtype == torch.bfloat16
    grads = torch.autograd.grad((ours.float() * weight).sum(), (q, k, v))
    exact = [t.detach().float().requires_grad_() for t in (q, k, v)]
    fused = F.scaled_dot_product_attention(*exact, attn_mask=~padding[:, None, None, :], scale=0.25)
    exact_grads = torch.autograd.grad((fused * weight).sum(), exact)
    torch.testing.assert_close(ours.float(), fused, atol=2e-2, rtol=2e-2)
    for a, b in zip(grads, exact_grads):
        assert a.dtype == torch.bfloat16
        assert ((a.float() - b).norm() / b.norm()) < 1e-2


def test_runs_under_autocast_with_fp32_softmax():
    (q, k, v), padding = _inputs(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = explicit_attention(q, k, v, padding, 0.25)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and all(t.grad.dtype == torch.bfloat16 for t in (q, k, v))


def test_backward_writes_no_gradient_for_the_probabilities():
    # The probabilities are an output only so the backward can read them; a materialised gradient
    # for them would be a zero fill as large as all the scores (11-12 ms of a base bf16 step).
    from torch.utils._python_dispatch import TorchDispatchMode

    class ZeroFills(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.split(".")[0] in ("zeros", "new_zeros", "zeros_like", "zero_", "fill_"):
                self.largest = max(self.largest, out.numel())
            return out

    (q, k, v), padding = _inputs(torch.bfloat16, queries=6, keys=9)
    out = explicit_attention(q, k, v, padding, 0.25)
    seen = ZeroFills()
    with seen:
        out.sum().backward()
    assert seen.largest < 3 * 4 * 6 * 9, seen.largest  # no zero fill the size of the scores (648)
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


def test_explicit_pays_while_keys_are_few_per_head_dim():
    encoder = torch.empty(16, 12, 73, 64)  # the base encoder at 256 px
    decoder = torch.empty(16, 16, 289, 32)  # the base decoder at 256 px
    assert explicit_pays(encoder, encoder) and explicit_pays(decoder, decoder)
    assert not explicit_pays(torch.empty(2, 16, 600, 32), torch.empty(2, 16, 600, 32))
    q = torch.empty(1, 1, 3, 8)
    assert explicit_pays(q, torch.empty(1, 1, KEYS_PER_HEAD_DIM * 8, 8))
    assert not explicit_pays(q, torch.empty(1, 1, KEYS_PER_HEAD_DIM * 8 + 1, 8))


def test_chunks_split_rows_evenly_within_the_score_budget(monkeypatch):
    monkeypatch.setattr(cpu_attention, "CHUNK_SCORES", 1000)
    assert cpu_attention._chunk_rows(10, 100) == 10  # all fit in one chunk
    assert cpu_attention._chunk_rows(10, 101) == 5  # two chunks of 5, not 9 + 1
    assert cpu_attention._chunk_rows(10, 5000) == 1  # one slice is over the budget: one per chunk


def test_layer_compiles_in_one_graph_with_it():
    """A compiled CPU bf16 step keeps the explicit form (custom operators): one graph, the eager values."""
    from m3ae.layers import Attention

    torch.manual_seed(0)
    attn = Attention(32, num_heads=4)
    x = torch.randn(2, 7, 32)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True

    def loss(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = attn(x, padding)
        return out.float().sum()

    eager = loss(x)
    eager.backward()
    eager_grad = attn.qkv.weight.grad.clone()
    attn.zero_grad()
    from torch._dynamo.backends.common import aot_autograd

    graphs = []  # the forward and backward graphs the compiler is handed

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(loss, fullgraph=True, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))(x)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(attn.qkv.weight.grad, eager_grad)
    # The chunk loops stay inside the operators: a compiler never sees (or rewrites) their softmaxes.
    targets = [{str(n.target) for n in g.graph.nodes} for g in graphs]
    assert "m3ae.explicit_attention.default" in targets[0]
    assert "m3ae.explicit_attention_backward.default" in targets[1]
    assert not any("softmax" in t for ts in targets for t in ts)
