"""The recipes of the trained evaluation heads, as typed settings: the epoch schedule they share
(`HeadTraining`), the linear probe's (`ProbeConfig`) and fine-tuning's (`FinetuneConfig`). Where and
on what they run is m3ae.eval.settings.Runtime. Importing this module does not import torch."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sized

from ..config import MAX_BATCH_SIZE

log = logging.getLogger(__name__)


@dataclass
class HeadTraining:
    """The epoch schedule of a trained head or encoder: linear warmup, then cosine, lr scaled by batch."""
    epochs: int = 90  # training epochs
    warmup_epochs: int = 10  # epochs of linear lr warmup
    batch_size: int = 1024  # training batch (lr scales with it)
    base_lr: float = 0.1  # lr = base x batch / 256
    weight_decay: float = 0.0  # decoupled weight decay (not on biases and norms)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range of the training images
    min_lr: float = 0.0  # lr at the end of the cosine

    def __post_init__(self) -> None:
        # Every setting in its range, before the features or a model are loaded: 0 epochs used to
        # write a result of an untrained head, a nan lr trained one to nan.
        lo, hi = self.crop_scale
        _check([("epochs", self.epochs >= 1, ">= 1"), ("warmup_epochs", self.warmup_epochs >= 0, ">= 0"),
                ("batch_size", 1 <= self.batch_size <= MAX_BATCH_SIZE, f"in 1..{MAX_BATCH_SIZE}"),
                ("base_lr", math.isfinite(self.base_lr) and self.base_lr > 0, "a finite number > 0"),
                ("weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0, ">= 0"),
                ("crop_scale", 0 < lo <= hi <= 1, "two numbers 0 < min <= max <= 1"),
                ("min_lr", math.isfinite(self.min_lr) and self.min_lr >= 0, ">= 0")], self)

    def peak_lr(self) -> float:
        from ..optim import scaled_lr

        return scaled_lr(self.base_lr, self.batch_size)

    def lr(self, step: int, steps_per_epoch: int) -> float:
        """The schedule after `step` updates: warmup over warmup_epochs, cosine to min_lr at the end."""
        from ..optim import lr_at

        return lr_at(step, self.peak_lr(), self.warmup_epochs * steps_per_epoch, self.epochs * steps_per_epoch,
                     self.min_lr)

    def run_epochs(self, name: str, loader: Iterable, train_step: Callable[[Any, Any, float], Any],
                   evaluate: Callable[[], dict], start_epoch: Callable[[], object] = lambda: None,
                   progress: bool = False, on_epoch: Callable[[dict], None] | None = None) -> list[dict]:
        """The epoch loop the heads share: per batch `train_step(image, label, lr)` returns the
        loss tensor (read once per batch for the epoch's mean), per epoch `evaluate()` gives
        {top1, top5, ...}; returns the epochs' rows {epoch, loss, lr, top1, top5, seconds}."""
        steps_per_epoch = len(loader) if isinstance(loader, Sized) else 0
        samples = len(getattr(loader, "dataset", ())) if isinstance(getattr(loader, "dataset", None), Sized) else 0
        if 0 < samples < self.batch_size:  # the paper's batches (1024-16384) on a small labelled set
            log.warning("%s: the batch (%d) is larger than the training set (%d samples): one step an epoch, at "
                        "a learning rate scaled for %d; a batch below the set's size trains more steps",
                        name, self.batch_size, samples, self.batch_size)
        history: list[dict] = []
        step, lr = 0, self.lr(0, steps_per_epoch)
        for epoch in range(self.epochs):
            start_epoch()
            t0, loss_sum, seen = time.perf_counter(), 0.0, 0
            for image, label in loader:
                lr = self.lr(step, steps_per_epoch)
                loss = train_step(image, label, lr)
                step += 1
                loss_sum += loss.item() * len(label)
                seen += len(label)
            row = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "lr": lr, **evaluate(),
                   "seconds": time.perf_counter() - t0}
            self.record_epoch(name, row, history, progress, on_epoch)
        return history

    def record_epoch(self, name: str, row: dict, history: list[dict], progress: bool = False,
                     on_epoch: Callable[[dict], None] | None = None) -> None:
        """Keep an epoch's row {epoch, loss, top1, top5, seconds, ...}, say it, hand it on."""
        history.append(row)
        if progress:
            log.info("%s epoch %d/%d: loss %.4f top1 %.2f top5 %.2f (%.1f s)", name, row["epoch"], self.epochs,
                     row["loss"], row["top1"], row["top5"], row["seconds"])
        if on_epoch is not None:
            on_epoch(row)


@dataclass
class ProbeConfig(HeadTraining):
    """The probe's recipe (MAE's: 90 epochs, 10 of warmup, base lr 0.1, no weight decay)."""
    batch_size: int = 2048
    momentum: float = 0.9  # LARS / SGD momentum
    optimizer: str = "lars"  # lars | sgd

    def __post_init__(self) -> None:
        super().__post_init__()
        _check([("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
                ("optimizer", self.optimizer in ("lars", "sgd"), "lars or sgd")], self)


@dataclass
class FinetuneConfig(HeadTraining):
    """The fine-tuning recipe (MAE's ViT-B: 100 epochs, 5 of warmup, base lr 1e-3, layer decay 0.75)."""
    epochs: int = 100
    warmup_epochs: int = 5
    base_lr: float = 1e-3
    weight_decay: float = 0.05
    crop_scale: tuple[float, float] = (0.08, 1.0)
    min_lr: float = 1e-6
    layer_decay: float = 0.75  # lr x layer_decay ** (depth + 1 - layer): lower blocks learn slower
    drop_path: float = 0.1  # stochastic depth rate of the encoder blocks
    mixup: float = 0.8  # mixup alpha (0: off)
    cutmix: float = 1.0  # cutmix alpha (0: off)
    smoothing: float = 0.1  # label smoothing
    clip_grad: float | None = None  # clip the gradient norm to this (None: no clipping)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check([("layer_decay", 0 < self.layer_decay <= 1, "in (0, 1]"),
                ("drop_path", 0 <= self.drop_path < 1, "in [0, 1)"),
                ("mixup", math.isfinite(self.mixup) and self.mixup >= 0, ">= 0 (0: off)"),
                ("cutmix", math.isfinite(self.cutmix) and self.cutmix >= 0, ">= 0 (0: off)"),
                ("smoothing", 0 <= self.smoothing < 1, "in [0, 1)"),
                ("clip_grad", self.clip_grad is None or (math.isfinite(self.clip_grad) and self.clip_grad > 0),
                 "> 0 (or None: no clipping)")], self)


def _check(rules: list[tuple[str, bool, str]], config: object) -> None:
    """Raise ValueError for the first (name, ok, allowed) rule that fails (a nan fails every
    comparison, so each rule is written to be False for it)."""
    for name, ok, allowed in rules:
        if not ok:
            raise ValueError(f"{name} must be {allowed}, got {getattr(config, name)!r}")
