"""The paper's linear probe: frozen encoder, [CLS] (or pooled) features of the unmasked image,
BatchNorm without affine parameters + one Linear layer, LARS (or SGD), lr = base x batch / 256,
linear warmup + cosine, no weight decay, RandomResizedCrop + flip on the training images."""
from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import pick_device
from ..files import atomic_write
from ..optim import set_lr
from .features import encode_pooled
from .knn import topk_accuracy
from .lars import LARS, lars_param_groups
from .results import EvalResult
from .recipes import ProbeConfig
from .settings import EvalSettings, Runtime


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
                       runtime: Runtime | None = None, on_epoch: Callable[[dict], None] | None = None,
                       progress: bool = False) -> dict:
    """Train the probe head on frozen features; returns {'top1', 'top5', 'best_top1', 'history'}."""
    runtime = runtime or Runtime()
    device = pick_device(runtime.device)
    torch.manual_seed(runtime.seed)
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    head = ProbeHead(model.config.emb_dim, num_classes).to(device)
    optimizer = build_probe_optimizer(head, config)
    loader, val_loader = runtime.loaders(train_set, val_set, config.batch_size)

    def train_step(image: torch.Tensor, label: torch.Tensor, lr: float) -> torch.Tensor:
        set_lr(optimizer, lr)
        with torch.no_grad():
            feats = encode_pooled(model, image.to(device), runtime.pool)
        loss = F.cross_entropy(head(feats), label.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    history = config.run_epochs("probe", loader, train_step,
                                lambda: evaluate_probe(model, head, val_loader, runtime.pool, device),
                                start_epoch=head.train, progress=progress, on_epoch=on_epoch)
    last = history[-1] if history else {"top1": math.nan, "top5": math.nan}
    return {"top1": last["top1"], "top5": last["top5"],
            "best_top1": max((h["top1"] for h in history), default=math.nan),
            "history": history, "config": asdict(config), "head": head}


def run_linear_probe(settings: EvalSettings, train: str, val: str, config: ProbeConfig | None = None, *,
                     limit_train: int | None = None, limit_val: int | None = None,
                     out: str | Path | None = None) -> EvalResult:
    """The paper's probe of a checkpoint on two labelled data specs, in one call (`m3ae probe`);
    with `out`, the trained head is kept as OUT/probe_head.safetensors."""
    t0 = time.perf_counter()
    config = config or ProbeConfig()
    with settings.applied():
        model = settings.load_encoder()
        train_set, val_set, classes = settings.train_val_sets(train, val, model.config.image_size, config.crop_scale,
                                                              limit_train, limit_val)
        res = train_linear_probe(model, train_set, val_set, classes, config, settings, progress=not settings.quiet)
    metrics = {"top1": res["top1"], "top5": res["top5"], "best_top1": res["best_top1"],
               "n_train": len(train_set) - train_set.skipped, "n_val": len(val_set) - val_set.skipped}
    if out is not None:
        from safetensors.torch import save_file

        Path(out).mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous().cpu() for k, v in res["head"].state_dict().items()}
        atomic_write(Path(out) / "probe_head.safetensors", lambda p: save_file(state, p))
    return EvalResult("probe", metrics, {"history": res["history"]}, time.perf_counter() - t0)
