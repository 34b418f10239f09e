"""AdamW with decay / no-decay groups, optax-equivalent clipping, warmup + cosine schedule."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

DECAY_MODES = ("mae", "reference")


def param_groups(model: nn.Module, weight_decay: float, mode: str = "mae") -> list[dict]:
    """Two groups, decayed and not. The model names what it keeps undecayed (`no_weight_decay(mode)`:
    "mae" = our default, "reference" = the authors' lists); any other module: biases and
    non-matrix tensors."""
    if mode not in DECAY_MODES:
        raise ValueError(f"unknown weight-decay mode {mode!r}; use 'mae' or 'reference'")
    own_rule = getattr(model, "no_weight_decay", None)
    if callable(own_rule):
        skip = own_rule(mode)
    else:
        skip = {n for n, p in model.named_parameters() if n.endswith(".bias") or p.ndim != 2}
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), eps: float = 1e-8,
                    decay_mode: str = "mae", fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW; fused kernels by default when every parameter is a float tensor on CUDA or CPU
    (torch has fused AdamW for both; on CPU the default would be a slow per-tensor loop)."""
    groups = param_groups(model, weight_decay, decay_mode)
    if fused is None:
        fused = all(p.device.type in ("cuda", "cpu") and p.is_floating_point()
                    for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """The linear scaling rule of MAE/M3AE: lr = base_lr x global batch / 256."""
    return base_lr * batch_size / 256


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup from 0, then cosine to `min_lr`; `step` = updates done so far (optax count)."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Global-norm clipping as optax does it (g * max_norm / max(norm, max_norm)); returns the norm.

    No host sync: the scale is applied on-device. A non-finite norm leaves grads non-finite,
    which the caller detects.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = [torch.linalg.vector_norm(g.float()) for g in grads]
    if hasattr(norms[0], "full_tensor"):  # FSDP2 DTensor shards: reduce each partial norm to its total
        norms = [n.full_tensor() for n in norms]
    norm = torch.linalg.vector_norm(torch.stack(norms))
    if max_norm is not None and max_norm > 0:
        scale = max_norm / norm.clamp(min=max_norm)  # = max_norm / max(norm, max_norm); NaN stays NaN
        torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return norm
