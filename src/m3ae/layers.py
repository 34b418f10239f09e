"""Pre-norm ViT blocks (ours; no timm) with key-padding masks and opt-in attention weights."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import cpu_attention
from .precision import attention_in_fp32


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The authors' GELU: the tanh form (flax's default); on bf16 inputs, computed as the exact (erf)
    form. The two differ by at most 4.7e-4, about a seventh (median) of what rounding the input to
    bf16 already moves the output: rounded to bf16 they differ on 2 % of the bf16 values in
    [-20, 20], and their worst error against the tanh form in fp64 is 8.2e-3 vs 7.8e-3. torch's
    CPU erf GELU is 2.2-2.7x faster than its tanh GELU, forward + backward, at the base model's
    shapes (`benchmarks/gelu_forms.py`). fp32 and fp64 inputs get the tanh form: parity with the
    reference."""
    return F.gelu(x) if x.dtype == torch.bfloat16 else F.gelu(x, approximate="tanh")


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (B, T, D), rows (B, K) -> (B, K, D)."""
    return x.gather(1, rows.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale the survivors."""

    def __init__(self, prob: float = 0.0):
        super().__init__()
        self.prob = prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep) / keep


class Attention(nn.Module):
    """Multi-head self-attention with one qkv projection laid out (3, heads, head_dim)."""

    def __init__(self, dim: int, num_heads: int, att_drop: float = 0.0, proj_drop: float = 0.0,
                 explicit: bool = False):
        super().__init__()
        self.explicit = explicit
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.att_drop = att_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                return_attention: bool = False, queries: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Self-attention over x (B, T, D); with `queries` (B, Q) only those rows attend (to all T)
        and the output is (B, Q, D): what a last block needs when only some outputs are used."""
        b, t, d = x.shape
        if queries is None:
            qkv = self.qkv(x).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            weight, bias = self.qkv.weight, self.qkv.bias
            x_q = gather_rows(x, queries)
            q = F.linear(x_q, weight[:d], bias[:d]).view(b, -1, self.num_heads, self.head_dim).transpose(1, 2)
            kv = F.linear(x, weight[d:], bias[d:]).view(b, t, 2, self.num_heads, self.head_dim)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
            t = q.shape[2]
        weights = None
        if return_attention or self.explicit:
            # Explicit path, only when asked: the reference replaces padded-key scores by -1e7.
            scores = (q @ k.transpose(-2, -1)) * self.scale
            if key_padding_mask is not None:
                scores = scores.masked_fill(key_padding_mask[:, None, None, :], -1e7)
            probs = scores.float().softmax(dim=-1).to(q.dtype)
            weights = probs if return_attention else None
            out = F.dropout(probs, self.att_drop, self.training) @ v
        else:
            mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
            dropout = self.att_drop if self.training else 0.0
            if attention_in_fp32(q) and dropout == 0.0 and cpu_attention.explicit_pays(q, k):
                out = cpu_attention.explicit_attention(q, k, v, key_padding_mask, self.scale)  # bf16 matmuls
            elif attention_in_fp32(q):  # very long sequences: torch's fused kernel, in fp32
                # CPU autocast would cast fp32 inputs back to bf16 for this op: off around it.
                with torch.autocast("cpu", enabled=False):
                    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                         dropout_p=dropout, scale=self.scale).to(q.dtype)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, t, d)
        return self.proj_drop(self.proj(out)), weights


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(gelu(self.fc1(x)))
        return self.drop(self.fc2(x))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0,
                 att_drop: float = 0.0, drop_path: float = 0.0, eps: float = 1e-6,
                 explicit_attention: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, att_drop, drop, explicit_attention)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                return_attention: bool = False, queries: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, weights = self.attn(self.norm1(x), key_padding_mask, return_attention, queries)
        if queries is not None:
            x = gather_rows(x, queries)
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, weights


class Transformer(nn.Module):
    """A stack of blocks followed by a final LayerNorm."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 drop: float = 0.0, att_drop: float = 0.0, drop_path: float = 0.0,
                 eps: float = 1e-6, grad_checkpointing: bool = False, explicit_attention: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, drop, att_drop, drop_path, eps, explicit_attention)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.grad_checkpointing = grad_checkpointing

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                return_attention: bool = False, output_rows: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Blocks then the final norm. `output_rows` (B, Q): return only those rows, (B, Q, D); the
        last block then computes nothing else (same values, fewer FLOPs)."""
        attentions: list[torch.Tensor] = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            queries = output_rows if i == last else None
            if self.grad_checkpointing and self.training and not return_attention:
                x, _ = checkpoint(block, x, key_padding_mask, False, queries, use_reentrant=False)
            else:
                x, weights = block(x, key_padding_mask, return_attention, queries)
                if weights is not None:
                    attentions.append(weights)
        if not self.blocks and output_rows is not None:
            x = gather_rows(x, output_rows)
        return self.norm(x), attentions


class OutputHead(nn.Module):
    """Decoder output head. depth=0: one Linear (the paper). depth>0: the authors' MLP head
    (input LayerNorm, then depth x [Linear, GELU, LayerNorm] with residuals after the first)."""

    def __init__(self, dim: int, out_dim: int, depth: int = 0, eps: float = 1e-6):
        super().__init__()
        self.input_norm = nn.LayerNorm(dim, eps=eps) if depth > 0 else nn.Identity()
        self.hidden = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.hidden_norms = nn.ModuleList(nn.LayerNorm(dim, eps=eps) for _ in range(depth))
        self.out = nn.Linear(dim, out_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the final Linear (what a fused head-and-loss consumes)."""
        x = self.input_norm(x)
        for i, (linear, norm) in enumerate(zip(self.hidden, self.hidden_norms)):
            y = norm(gelu(linear(x)))
            x = x + y if i > 0 else y
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))
