"""The paper's linear probe: frozen encoder, [CLS] (or pooled) features of the unmasked image,
BatchNorm without affine parameters + one Linear layer, LARS (or SGD), lr = base x batch / 256,
linear warmup + cosine, no weight decay, RandomResizedCrop + flip on the training images."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..optim import lr_at, scaled_lr, set_lr
from .features import encode_pooled
from .knn import topk_accuracy
from .lars import LARS, lars_param_groups


@dataclass
class ProbeConfig:
    epochs: int = 90
    warmup_epochs: int = 10
    batch_size: int = 2048
    base_lr: float = 0.1  # x batch / 256
    weight_decay: float = 0.0
    momentum: float = 0.9
    optimizer: str = "lars"  # lars | sgd
    pool: str = "cls"
    num_workers: int = 2
    device: str = "cpu"
    seed: int = 0

    def peak_lr(self) -> float:
        return scaled_lr(self.base_lr, self.batch_size)


class ProbeHead(nn.Module):
    """BatchNorm1d(affine=False) then Linear; weights N(0, 0.01), bias 0 (as the MAE probe)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


def build_probe_optimizer(head: nn.Module, config: ProbeConfig) -> torch.optim.Optimizer:
    groups = lars_param_groups(head, config.weight_decay)
    if config.optimizer == "lars":
        return LARS(groups, lr=config.peak_lr(), momentum=config.momentum)
    if config.optimizer == "sgd":
        for g in groups:
            g.pop("lars_adapt")
        return torch.optim.SGD(groups, lr=config.peak_lr(), momentum=config.momentum)
    raise ValueError(f"optimizer must be 'lars' or 'sgd', got {config.optimizer!r}")


@torch.no_grad()
def evaluate_probe(model, head: nn.Module, loader, pool: str, device) -> dict[str, float]:
    head.eval()
    scores, labels = [], []
    for image, label in loader:
        feats = encode_pooled(model, image.to(device), pool)
        scores.append(head(feats).float().cpu())
        labels.append(label)
    return topk_accuracy(torch.cat(scores), torch.cat(labels))


def train_linear_probe(model, train_set, val_set, num_classes: int, config: ProbeConfig,
                       on_epoch: Callable[[dict], None] | None = None, progress: bool = False) -> dict:
    """Train the probe head on frozen features; returns {'top1', 'top5', 'best_top1', 'history'}."""
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    head = ProbeHead(model.config.emb_dim, num_classes).to(device)
    optimizer = build_probe_optimizer(head, config)
    loader = torch.utils.data.DataLoader(train_set, batch_size=config.batch_size, shuffle=True,
                                         num_workers=config.num_workers, drop_last=False,
                                         persistent_workers=config.num_workers > 0)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=config.batch_size, shuffle=False,
                                             num_workers=config.num_workers)
    steps_per_epoch = len(loader)
    total, warmup = config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch
    history, step = [], 0
    for epoch in range(config.epochs):
        head.train()
        t0, loss_sum, seen = time.perf_counter(), 0.0, 0
        for image, label in loader:
            set_lr(optimizer, lr_at(step, config.peak_lr(), warmup, total))
            with torch.no_grad():
                feats = encode_pooled(model, image.to(device), config.pool)
            loss = F.cross_entropy(head(feats), label.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(label)
            seen += len(label)
        row = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1),
               **evaluate_probe(model, head, val_loader, config.pool, device),
               "seconds": time.perf_counter() - t0}
        history.append(row)
        if progress:
            print(f"probe epoch {row['epoch']}/{config.epochs}: loss {row['loss']:.4f} "
                  f"top1 {row['top1']:.2f} top5 {row['top5']:.2f} ({row['seconds']:.1f} s)", file=sys.stderr)
        if on_epoch is not None:
            on_epoch(row)
    last = history[-1] if history else {"top1": math.nan, "top5": math.nan}
    return {"top1": last["top1"], "top5": last["top5"],
            "best_top1": max((h["top1"] for h in history), default=math.nan),
            "history": history, "config": asdict(config), "head": head}
