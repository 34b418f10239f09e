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
    # The module that names its parameters: a torch.compile result or a DDP / DataParallel wrapper
    # prefixes every name (_orig_mod., module.), so its rule would match none of them.
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module) and isinstance(model, (nn.parallel.DistributedDataParallel,
                                                                  nn.DataParallel)):
            inner = model.module
        if not isinstance(inner, nn.Module):
            break
        model = inner
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
def grad_norm(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients (fp32), without a host sync. Plain tensors
    are reduced with one `_foreach_norm` per device and dtype (one operator, not one per tensor:
    a small model's step has a hundred gradients); FSDP2 shards (DTensor) reduce each partial norm
    to its total first."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if hasattr(grads[0], "full_tensor"):
        norms = [torch.linalg.vector_norm(g.float()).full_tensor() for g in grads]
    else:
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for g in grads:
            groups.setdefault((g.device, g.dtype), []).append(g)
        device = grads[0].device
        norms = [n.to(device) for group in groups.values() for n in torch._foreach_norm(group, 2, dtype=torch.float32)]
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_divisor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What clipping divides gradients by: max(norm, max_norm) / max_norm (1 below the limit; optax's
    clip_by_global_norm, g * max_norm / max(norm, max_norm)). A NaN norm stays NaN."""
    return norm.float().clamp(min=max_norm) / max_norm


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Global-norm clipping as optax does it (g * max_norm / max(norm, max_norm)), in place; returns
    the norm. No host sync: the scale is applied on-device. A non-finite norm leaves grads
    non-finite, which the caller detects. (The trainer folds the clip into a fused optimizer
    instead: `step_clipped`.)"""
    params = list(params)
    norm = grad_norm(params)
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm is not None and max_norm > 0 and grads:
        torch._foreach_div_(grads, clip_divisor(norm, max_norm).to(grads[0].device))
    return norm


def step_clipped(optimizer: torch.optim.Optimizer, norm: torch.Tensor, max_norm: float | None) -> None:
    """optimizer.step() on gradients clipped to `max_norm` given their global `norm` (grad_norm).
    A fused optimizer takes the clip as its `grad_scale` (the attribute torch's GradScaler sets for
    it: the kernel divides each gradient by it as it reads it), which saves a pass over every
    gradient; otherwise (no fused kernel, FSDP2 shards, a GradScaler's own grad_scale) the gradients
    are divided in place first. Zero the gradients after: they are not left clipped."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if max_norm is None or max_norm <= 0 or not grads:
        optimizer.step()
        return
    divisor = clip_divisor(norm, max_norm).to(grads[0].device)
    fused = all(group.get("fused") for group in optimizer.param_groups)
    if not fused or hasattr(optimizer, "grad_scale") or hasattr(grads[0], "full_tensor"):
        torch._foreach_div_(grads, divisor)
        optimizer.step()
        return
    optimizer.grad_scale = divisor  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale  # type: ignore[attr-defined]
