"""Attention for a CPU bf16 training step: bf16 matmuls, softmax in fp32 math, probabilities kept (in
bf16) for the backward, a few (batch, head) slices at a time so each slice's scores stay in cache.

torch's fused CPU attention is slower in bf16 than in fp32 once it has a backward, so without this
form a CPU bf16 step casts q, k, v to fp32 for it (`m3ae.precision.attention_in_fp32`). This form
is faster than that at every shape the models here use. Forward + backward, batch 16, 2 threads on
an AVX512-BF16 EPYC (`benchmarks/attention_precision.py`, BENCHMARKS.md), against fp32 fused
attention with its casts: with 12 heads of 64, 2.6x at 50 tokens, 2.8x at 73, 2.3x at 197 and 1.9x
at 577; with 16 heads of 32 (the base decoder), 2.0x at 65, 1.8x at 197 and 1.3x at 289. Whole base
steps ran 1.06-1.08x faster than with the fused kernel beyond 2^21 scores (the rule before).

Chunks: the scores of one chunk are at most `CHUNK_SCORES` values. Unchunked, the score tensor leaves
the cache and the form was 0.4x at 289 tokens; chunks of 2^19 and 2^20 scores were fastest, 2^21
lost 10-25 % at 197-289 tokens.

Memory: the probabilities are kept in bf16, B x H x Q x K values, where the fused kernel keeps its
fp32 q, k, v and output, 4 x B x H x L x Dh values. `explicit_pays` takes this form while keys are at
most `KEYS_PER_HEAD_DIM` x the head dim, which bounds the attention's saved memory at about twice the
fused kernel's (289 keys with 32-dim heads: 1.1x; 1024 with 64: 2x); a base step's peak memory
rose 1 %. Recomputing the probabilities in the backward instead (keeping only their log-sum-exp)
took as long as the fused kernel.
"""
from __future__ import annotations

import torch

# Scores per chunk: 1 MiB in bf16, 2 MiB as fp32 inside the softmax; a core's share of cache.
CHUNK_SCORES = 1 << 19
# Keys per head dimension up to which the explicit form is used (see the module's note on memory).
KEYS_PER_HEAD_DIM = 16


def explicit_pays(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether to take the explicit form for (B, H, Q, Dh) queries and (B, H, K, Dh) keys: faster at
    every measured length, taken while its saved probabilities stay within ~2x the fused kernel's
    saved memory."""
    return k.shape[2] <= KEYS_PER_HEAD_DIM * q.shape[3]


def _chunk_rows(rows: int, scores_per_row: int) -> int:
    """(batch x head) slices per chunk: as evenly split as `CHUNK_SCORES` allows, at least one."""
    chunks = -(-rows * scores_per_row // CHUNK_SCORES)
    return max(1, -(-rows // chunks))


# Per chunk, forward: one GEMM that also scales and masks (baddbmm: alpha, additive -inf bias),
# softmax reading and writing the inputs' dtype with fp32 math inside, one GEMM. Backward: three
# GEMMs and torch's softmax backward (fp32 math inside), the scale applied by the GEMMs. Fewer
# passes over the scores than casting them to fp32 and back: 1.2-1.5x faster at 65-289 tokens.
#
# Both passes are custom operators, opaque to torch.compile: traced through, inductor turned the
# unrolled chunk loop's softmaxes into one generated kernel 3x slower than the whole eager block
# (a base decoder block, bf16: 951 vs 327 ms forward + backward; BENCHMARKS.md). Their schemas are
# spelled out, as in m3ae.linear_cross_entropy.
@torch.library.custom_op("m3ae::explicit_attention", mutates_args=(), schema=(
    "(Tensor q, Tensor k, Tensor v, Tensor? bias, float scale) -> (Tensor, Tensor)"))
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, Q, Dh) queries, (rows, K, Dh) keys and values, bias (rows, 1, K) or None -> (output
    (rows, Q, Dh), probabilities (rows, Q, K)), in the inputs' dtype."""
    rows, n_q, n_k = q.shape[0], q.shape[1], k.shape[1]
    unused = q.new_zeros(1, 1, 1)  # baddbmm takes an input even with beta=0
    out = q.new_empty(rows, n_q, v.shape[2])
    probs = q.new_empty(rows, n_q, n_k)
    step = _chunk_rows(rows, n_q * n_k)
    for s in range(0, rows, step):
        e = min(s + step, rows)
        scores = torch.baddbmm(unused if bias is None else bias[s:e], q[s:e], k[s:e].transpose(1, 2),
                               beta=0 if bias is None else 1, alpha=scale)
        torch.softmax(scores, dim=-1, out=probs[s:e])
        torch.bmm(probs[s:e], v[s:e], out=out[s:e])
    return out, probs


@_attention.register_fake
def _attention_shapes(q, k, v, bias, scale):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2]), q.new_empty(q.shape[0], q.shape[1], k.shape[1])


@torch.library.custom_op("m3ae::explicit_attention_backward", mutates_args=(), schema=(
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor probs, float scale) -> (Tensor, Tensor, Tensor)"))
def _attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        probs: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = q.shape[0]
    step = _chunk_rows(rows, q.shape[1] * k.shape[1])
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    unused = q.new_zeros(1, 1, 1)
    for s in range(0, rows, step):
        e = min(s + step, rows)
        p = probs[s:e]
        torch.bmm(p.transpose(1, 2), grad_out[s:e], out=grad_v[s:e])
        grad_p = torch.bmm(grad_out[s:e], v[s:e].transpose(1, 2))
        # the scores' gradient, before the scale: P * (dP - sum_j P dP)
        grad_s = torch._softmax_backward_data(grad_p, p, -1, p.dtype)
        torch.baddbmm(unused, grad_s, k[s:e], beta=0, alpha=scale, out=grad_q[s:e])
        torch.baddbmm(unused, grad_s.transpose(1, 2), q[s:e], beta=0, alpha=scale, out=grad_k[s:e])
    return grad_q, grad_k, grad_v


@_attention_backward.register_fake
def _attention_backward_shapes(grad_out, q, k, v, probs, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save(ctx, inputs, output) -> None:
    q, k, v, _bias, scale = inputs
    ctx.save_for_backward(q, k, v, output[1])
    ctx.scale = scale
    # The probabilities are saved for the backward, never differentiated: materialised, their unused
    # gradient would be a zero fill the size of every score matrix (11-12 ms per base bf16 step).
    ctx.set_materialize_grads(False)


def _gradients(ctx, grad_out, _grad_probs):
    if grad_out is None:  # the output took no part in the loss
        return None, None, None, None, None
    q, k, v, probs = ctx.saved_tensors
    grad_q, grad_k, grad_v = _attention_backward(grad_out.contiguous(), q, k, v, probs, ctx.scale)
    return grad_q, grad_k, grad_v, None, None


_attention.register_autograd(_gradients, setup_context=_save)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                       scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, padded keys excluded) v for (B, H, Q, Dh) queries and (B, H, K, Dh) keys
    and values, in the inputs' dtype (scores included), the softmax and its backward computed in fp32.
    `key_padding_mask` (B, K): True where a key is padding."""
    b, h, n_q, dim = q.shape
    n_k = k.shape[2]
    rows = b * h
    bias = None
    if key_padding_mask is not None:
        bias = q.new_zeros(b, n_k).masked_fill_(key_padding_mask, float("-inf"))
        bias = bias[:, None, None, :].expand(b, h, 1, n_k).reshape(rows, 1, n_k)
    with torch.autocast("cpu", enabled=False):
        out, _ = _attention(q.reshape(rows, n_q, dim), k.reshape(rows, n_k, dim), v.reshape(rows, n_k, dim),
                            bias, scale)
    return out.view(b, h, n_q, dim)
