"""The recipes of the trained evaluation heads, as typed settings: the epoch schedule they share
(`HeadTraining`), the linear probe's (`ProbeConfig`) and fine-tuning's (`FinetuneConfig`). Where and
on what they run is m3ae.eval.settings.Runtime. Importing this module does not import torch."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sized

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
