"""LARS (layer-wise adaptive rate scaling, You et al. 2017) as used for MAE-style linear probes.

Per tensor: g <- g + wd * w, then g <- g * trust * ||w|| / ||g|| (when both norms are > 0), then
SGD with momentum. Groups with `lars_adapt=False` (biases, norms) skip the weight decay and the
rescaling: plain momentum SGD.
"""
from __future__ import annotations

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be >= 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, lars_adapt=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if group["lars_adapt"]:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    ratio = torch.where((w_norm > 0) & (u_norm > 0),
                                        group["trust_coefficient"] * w_norm / u_norm, torch.ones_like(w_norm))
                    update = update * ratio
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(update).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def lars_param_groups(module: nn.Module, weight_decay: float = 0.0) -> list[dict]:
    """Matrices adapt (and decay); biases and other 1-D tensors (norm parameters) do not."""
    adapt: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (plain if p.ndim <= 1 or name.endswith(".bias") else adapt).append(p)
    return [{"params": adapt, "weight_decay": weight_decay, "lars_adapt": True},
            {"params": plain, "weight_decay": 0.0, "lars_adapt": False}]
