"""Reconstruction losses: masked-patch MSE and masked-token cross-entropy, as in the reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's norm_pix_loss targets: each patch standardised by its own mean and variance."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def patch_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-patch MSE averaged over the weighted patches of each sample, then over the batch.

    `pred`/`target` are (B, M, P) at the positions that carry a loss; `weight` (B, M) is 1 where
    a position counts (all of them, when None).
    """
    per_patch = (pred.float() - target.float()).square().mean(dim=-1)
    if weight is None:  # no patch hidden (mask ratio 0): no loss, as the weighted form gives, not NaN
        return per_patch.mean() if per_patch.numel() else per_patch.sum()
    weight = weight.to(per_patch.dtype)
    per_sample = (per_patch * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1e-5)
    return per_sample.mean()


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                        average_over: str = "samples_with_targets") -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and accuracy over valid tokens, per sample (count floored), then over the batch.

    `average_over="batch"` divides by the batch size, counting samples with no valid token as 0
    (the reference); the default divides by the samples that have at least one valid token, so
    image-only rows in a mixed batch do not dilute the text loss.
    """
    valid = valid.to(torch.float32)
    logp = F.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    count = valid.sum(dim=1)
    denom = count.clamp_min(1e-5)
    loss_per = -(logp * valid).sum(dim=1) / denom
    correct = (logits.argmax(dim=-1) == targets).to(torch.float32) * valid
    acc_per = correct.sum(dim=1) / denom
    if average_over == "batch":
        n: float | torch.Tensor = float(valid.shape[0])  # a Python number: no host->device copy
    else:
        n = (count > 0).sum().to(torch.float32).clamp_min(1.0)
    return loss_per.sum() / n, acc_per.sum() / n


def packed_token_weights(rows: torch.Tensor, batch: int, average_over: str = "samples_with_targets"
                         ) -> torch.Tensor:
    """Per-token weights (M,) that turn a sum over packed tokens into `token_cross_entropy`'s average:
    each sample's tokens averaged (count floored at 1e-5), then the samples averaged."""
    count = torch.zeros(batch, dtype=torch.float32, device=rows.device).index_add(
        0, rows, torch.ones(rows.shape, dtype=torch.float32, device=rows.device))
    if average_over == "batch":
        n: float | torch.Tensor = float(batch)  # a Python number: no host->device copy
    else:
        n = (count > 0).sum().to(torch.float32).clamp_min(1.0)
    return 1.0 / (count.clamp_min(1e-5)[rows] * n)
