"""The text head and its cross-entropy in one pass over row chunks, never holding the (M, V) logits.

A 30522-wide head over M hidden tokens makes an (M, V) logits tensor, its log-softmax, and in the
backward pass an (M, V) gradient: three huge, freshly allocated buffers per step. On CPU their
first touch (page faults) costs as much as the head's matmuls; on GPU they dominate activation
memory at large batch. Here each chunk of rows is projected, reduced to its loss, accuracy and
logit gradient while it is still in cache, and folded straight into the input, weight and bias
gradients. The loss is a weighted sum of per-token cross-entropies, so the gradient is known in the
forward pass; backward only scales it by the incoming scalar gradient. Same values as
`F.linear` + `F.cross_entropy` (tested), same FLOPs, a fraction of the memory traffic. Inside
torch.compile the pass is the operator `m3ae::linear_cross_entropy`, so a compiled model stays one
graph.
"""
from __future__ import annotations

import torch

_LOG2_E = 1.4426950408889634
DEFAULT_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 28}  # logits per chunk: 16 MiB / 1 GiB in fp32
# Low precision (autocast): the chunks' logit gradients wait, in the compute dtype, in a buffer of
# up to this many elements (64 MiB in bf16 on CPU) and go into the weight gradient one product per
# full buffer. A product per chunk was a (V, D) low-precision result cast-added into the fp32 sum:
# three extra (V, D) passes per step for the base text head at batch 16 (~4 % of a bf16 step on an
# AMX Xeon). One product over more rows also rounds once instead of once per chunk. On GPU a chunk
# already holds 1 GiB of logits, so the buffer is one chunk there.
GRAD_GROUP_ELEMENTS = {"cpu": 1 << 25, "cuda": 1 << 28}


def _round16(n: int) -> int:
    return -(-n // 16) * 16


def _chunked(hidden, weight, bias, targets, token_weight, chunk_rows: int, compute_dtype: torch.dtype,
             want_grad: bool):
    """The fused pass. Returns (weighted loss, per-token CE, correct, grad_hidden, grad_weight,
    grad_bias), the gradients those of the weighted loss (None where not wanted)."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    acc = torch.promote_types(compute_dtype, torch.float32)  # softmax, loss and gradient sums
    direct = compute_dtype == acc  # matmuls can write straight into the reused buffer
    h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)[:, None]
    token_weight = token_weight.to(acc)
    per_token = torch.empty(rows, dtype=acc, device=hidden.device)
    correct = torch.empty(rows, dtype=torch.bool, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_grad else None
    # The first chunk writes the weight gradient, later ones add to it: no zero-fill of a (V, D)
    # buffer (zeros only when there are no rows at all).
    grad_weight = ((torch.empty if rows else torch.zeros)(weight.shape, dtype=acc, device=weight.device)
                   if want_grad else None)
    grad_bias = torch.zeros(vocab, dtype=acc, device=weight.device) if want_grad and bias is not None else None
    # Logits are laid out (V, chunk): W @ h_c^T is the GEMM shape BLAS runs fastest here
    # (long M, short K), and every later reduction is over dim 0. Widths are padded to a
    # multiple of 16 columns: odd widths cost BLAS and the column reductions up to 5x. Padding
    # columns hold zeros and get a zero weight, so they add nothing to any gradient.
    width = _round16(min(chunk_rows, rows))
    buffer = torch.empty(vocab, width, dtype=acc, device=hidden.device)
    pending = group_start = None  # low precision: logit gradients not yet in the weight gradient
    if want_grad and not direct and rows:
        budget = GRAD_GROUP_ELEMENTS.get(hidden.device.type, GRAD_GROUP_ELEMENTS["cuda"])
        group_rows = min(rows, chunk_rows * max(1, budget // (vocab * chunk_rows)))
        pending, group_start = torch.empty(vocab, group_rows, dtype=compute_dtype, device=hidden.device), 0
    for start in range(0, rows, chunk_rows):
        stop = min(start + chunk_rows, rows)
        n, padded = stop - start, _round16(stop - start)
        hc, tc = h[start:stop], targets[start:stop]
        block = buffer[:, :padded]
        logits = block[:, :n]
        if direct:
            torch.mm(w, hc.t(), out=logits) if b is None else torch.addmm(b, w, hc.t(), out=logits)
        else:  # low-precision matmul, fp32 softmax (as autocast would do)
            logits.copy_(w @ hc.t() if b is None else torch.addmm(b, w, hc.t()))
        if padded > n:
            block[:, n:].zero_()
        block_top = block.amax(dim=0)
        top = block_top[:n]
        target_logit = logits.gather(0, tc[None, :]).squeeze(0)
        if direct:  # fp32/fp64 logits: ties at the maximum do not happen in practice, so
            correct[start:stop] = target_logit == top  # "attains the max" = argmax, cheaply
        else:  # low-precision logits do tie: argmax's first-index rule, as the unfused path
            correct[start:stop] = logits.argmax(dim=0) == tc
        # exp(x - max) as exp2((x - max) * log2 e): in place, about 2x faster than exp on CPU.
        exp = block.sub_(block_top).mul_(_LOG2_E).exp2_()
        total = exp.sum(dim=0)[:n]
        per_token[start:stop] = top + total.log() - target_logit
        if not want_grad:
            continue
        assert grad_hidden is not None and grad_weight is not None  # allocated when want_grad
        # d loss / d logits = token_weight * (softmax - onehot), built in place.
        scale = token_weight[start:stop]
        column_scale = torch.zeros(padded, dtype=acc, device=hidden.device)
        column_scale[:n] = scale / total
        grad = exp.mul_(column_scale)
        grad[:, :n].scatter_add_(0, tc[None, :], -scale[None, :])
        if direct:
            g = grad[:, :n]
            grad_hidden[start:stop] = g.t() @ w
            if start == 0:
                torch.mm(g, hc, out=grad_weight)
            else:
                torch.addmm(grad_weight, g, hc, out=grad_weight)  # (addmm_ escapes FLOP counters)
        else:
            assert pending is not None and group_start is not None
            g = pending[:, start - group_start:stop - group_start]
            g.copy_(grad[:, :n])  # rounded to the compute dtype, as autocast's matmul inputs are
            grad_hidden[start:stop] = g.t() @ w
            if stop - group_start == pending.shape[1] or stop == rows:
                part = pending[:, :stop - group_start] @ h[group_start:stop]
                if group_start == 0:
                    grad_weight.copy_(part)
                else:
                    grad_weight.add_(part)  # (add_ casts the low-precision product to fp32 first)
                group_start = stop
        if grad_bias is not None:
            grad_bias += grad.sum(dim=1)
    return (per_token * token_weight).sum(), per_token, correct, grad_hidden, grad_weight, grad_bias


class _LinearCrossEntropy(torch.autograd.Function):
    """Eager autograd: the gradients from the forward pass are scaled in place and handed over."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_weight, chunk_rows: int, compute_dtype, grad_enabled):
        want_grad = grad_enabled and any(ctx.needs_input_grad[:3])  # needs_input_grad ignores no_grad
        loss, per_token, correct, *grads = _chunked(hidden, weight, bias, targets, token_weight, chunk_rows,
                                                    compute_dtype, want_grad)
        # Kept as attributes, not saved tensors, so backward can scale them in place and hand them
        # over as the only reference (autograd then adopts them as .grad without another copy).
        ctx.grads = tuple(grads)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(per_token, correct)
        return loss, per_token, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_token, _grad_correct):
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy's backward ran twice (retain_graph); it is single-use")
        grads, ctx.grads = ctx.grads, None
        out: list[torch.Tensor | None] = []
        for grad, needed, dtype in zip(grads, ctx.needs_input_grad[:3], (None, ctx.weight_dtype, ctx.weight_dtype)):
            if grad is None or not needed:
                out.append(None)
                continue
            grad = grad.mul_(grad_loss.to(grad.dtype))
            out.append(grad if dtype is None else grad.to(dtype))
        del grads
        return (*out, None, None, None, None, None)


# Inside torch.compile the pass is one opaque operator: dynamo would otherwise unroll the chunk loop
# for each row count (or, as before, break the graph around an eager call). Its gradients are
# outputs saved for backward, which scales copies of them (a compiled graph may not write into
# its saved tensors): one (V, D) buffer more than the eager path, whose in-place hand-over
# compiled graphs cannot express. The schema is spelled out, so registering it does not depend on
# how a torch release infers schemas from this module's string (`from __future__`) annotations.
@torch.library.custom_op("m3ae::linear_cross_entropy", mutates_args=(), schema=(
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor token_weight, int chunk_rows, "
    "ScalarType compute_dtype, bool want_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"))
def _compiled(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
              token_weight: torch.Tensor, chunk_rows: int, compute_dtype: torch.dtype, want_grad: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.autocast(hidden.device.type, enabled=False):
        loss, per_token, correct, *grads = _chunked(hidden, weight, bias, targets, token_weight, chunk_rows,
                                                    compute_dtype, want_grad)
    # Operators return tensors: an empty one (each its own: outputs may not alias) is "no gradient".
    return (loss, per_token, correct, *(hidden.new_empty(0) if g is None else g for g in grads))


@_compiled.register_fake
def _compiled_shapes(hidden, weight, bias, targets, token_weight, chunk_rows, compute_dtype, want_grad):
    acc = torch.promote_types(compute_dtype, torch.float32)
    rows = hidden.shape[0]
    return (hidden.new_empty((), dtype=acc), hidden.new_empty((rows,), dtype=acc),
            hidden.new_empty((rows,), dtype=torch.bool),
            torch.empty_like(hidden) if want_grad else hidden.new_empty(0),
            weight.new_empty(weight.shape, dtype=acc) if want_grad else hidden.new_empty(0),
            weight.new_empty(weight.shape[:1], dtype=acc) if want_grad and bias is not None else hidden.new_empty(0))


def _compiled_save(ctx, inputs, output) -> None:
    ctx.save_for_backward(*output[3:])
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype, None if inputs[2] is None else inputs[2].dtype)


def _compiled_backward(ctx, grad_loss, *_unused):
    # Backward runs only when an input wanted a gradient, so the forward computed all of them.
    grads = [None if dtype is None else (grad * grad_loss.to(grad.dtype)).to(dtype)
             for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
    return (*grads, None, None, None, None, None)


_compiled.register_autograd(_compiled_backward, setup_context=_compiled_save)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, token_weight: torch.Tensor, chunk_rows: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sum_i token_weight[i] * CE(hidden[i] @ weight.T + bias, targets[i]), chunked over rows.

    hidden (M, D), weight (V, D), bias (V,) or None, targets (M,) long, token_weight (M,) float
    (no gradient flows into it). Returns (weighted loss, per-token CE (M,), correct (M,)), the last
    two detached; a token is correct when its target's logit is the maximum (in fp32/fp64 a tie
    counts, where argmax would take the first index; such ties do not occur in practice; under
    autocast, whose rounded logits can tie, argmax's rule is applied). Under autocast the
    matmuls run in the autocast dtype, the softmax and all sums in fp32. `chunk_rows`: rows per
    chunk (default: about 16 MiB of fp32 logits on CPU, 1 GiB on GPU).
    """
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (M, D) and weight (V, D) expected, got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or token_weight.shape != hidden.shape[:1]:
        raise ValueError("targets and token_weight must be (M,) for hidden (M, D)")
    device = hidden.device.type
    compute_dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                     else hidden.dtype)
    if chunk_rows is None:
        budget = DEFAULT_CHUNK_ELEMENTS.get(device, DEFAULT_CHUNK_ELEMENTS["cuda"])
        chunk_rows = max(1, budget // weight.shape[0])
        if chunk_rows > 32:  # keep the (V, chunk) rows 128-byte aligned for the GEMMs
            chunk_rows -= chunk_rows % 32
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if torch.compiler.is_compiling():
        want_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
        loss, per_token, correct, *_ = _compiled(hidden, weight, bias, targets, token_weight.detach(), chunk_rows,
                                                 compute_dtype, want_grad)
        return loss, per_token.detach(), correct
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, token_weight.detach(),
                                         chunk_rows, compute_dtype, torch.is_grad_enabled())
