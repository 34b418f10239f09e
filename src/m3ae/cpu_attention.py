"""Short-sequence attention for a CPU bf16 training step: bf16 matmuls, fp32 softmax, probabilities
kept for the backward.

A CPU bf16 step runs torch's fused attention in fp32 (`m3ae.precision.attention_in_fp32`), because
its bf16 kernel is slower with a backward. For short sequences this explicit form is faster still:
two bf16 batched matmuls forward and three backward, on a score tensor small enough to stay in
cache. Forward + backward at 2 threads on an AVX512-BF16 EPYC, against fp32 fused attention with
its casts (`benchmarks/attention_precision.py`, BENCHMARKS.md): 2.7x at 16 x 12 heads x 73 tokens
(the base encoder at 256 px), 0.9-2x (noisy) at the MAE-mode sizes, 0.6x at 16 x 16 x 97 and 0.4x
at 289 tokens, where the scores no longer fit in cache; whole steps ran 1.01-1.04x faster. Hence
`explicit_pays`: at most `MAX_SCORES` scores per call. The probabilities are kept in bf16 for the
backward (2 bytes per score, at most 4 MiB).
"""
from __future__ import annotations

import torch

# Scores per call (batch x heads x queries x keys) up to which the explicit form is used: 2^21
# fp32 scores are 8 MiB. Measured: 1.0M scores 2.7x and 1.2x faster; 2.4M 0.6x, 7.4M 0.8x slower.
MAX_SCORES = 1 << 21


def explicit_pays(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the explicit form is the faster one for (B, H, Q, Dh) queries and (B, H, K, Dh) keys."""
    return q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= MAX_SCORES


class _ShortAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, scale: float):
        scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale)
        if key_padding_mask is not None:
            scores.masked_fill_(key_padding_mask[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale = scale
        return torch.matmul(probs, v)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)
        grad_probs = torch.matmul(grad_out, v.transpose(-1, -2)).float()
        p = probs.float()
        # softmax backward: dS = P * (dP - sum_j P dP), then the scale of the scores
        grad_scores = grad_probs.sub_((grad_probs * p).sum(-1, keepdim=True)).mul_(p).mul_(ctx.scale).to(q.dtype)
        grad_q = torch.matmul(grad_scores, k)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q)
        return grad_q, grad_k, grad_v, None, None


def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """softmax(q k^T * scale, padded keys excluded) v for (B, H, T, Dh) bf16 tensors, in the inputs'
    dtype with fp32 scores and softmax. `key_padding_mask` (B, K): True where a key is padding."""
    with torch.autocast("cpu", enabled=False):
        return _ShortAttention.apply(q, k, v, key_padding_mask, scale)
