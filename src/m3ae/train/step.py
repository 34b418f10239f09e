"""One optimiser step, shared by the trainer (`m3ae.train.loop`) and `m3ae bench train`, so the
benchmark times the step users run.

A step is: for every part of every micro-batch, forward and a backward of the loss weighted by the
part's share of the step's samples (gradients all-reduced in the last backward only; under DDP a
zero-weighted touch of every parameter for parts that skip a modality); then gradient clipping
(`grad_norm`), then - by the caller, after its one host sync on that norm - the optimizer update
(the clipping folded into it: `m3ae.optim.step_clipped`) or a skipped update, and zeroed gradients.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .. import distributed as dist_utils
from ..data.collate import Batch
from ..model import M3AE
from ..optim import grad_norm, step_clipped

METRICS = ("loss", "image_loss", "text_loss", "text_accuracy")


class TrainStep:
    def __init__(self, model: M3AE, run_model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 device: torch.device, autocast, clip_grad: float | None, grad_accum: int = 1,
                 world_size: int = 1, fsdp: bool = False, full_outputs: bool = False):
        self.model, self.run_model, self.optimizer, self.device = model, run_model, optimizer, device
        self.autocast, self.clip_grad, self.grad_accum = autocast, clip_grad, grad_accum
        self.ddp = world_size > 1 and not fsdp
        self.full_outputs = full_outputs  # heads over every slot (the reference-equivalent step)

    def backward(self, micro_batches: Iterable[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward + backward over `grad_accum` micro-batches, then the gradients' global norm (before
        clipping; `update` clips with it). Returns (metrics, grad_norm):
        metrics = sample-weighted means of loss, image_loss, text_loss, text_accuracy over the parts
        that have them (nan where none did), on the device; no host sync."""
        sums = torch.zeros(len(METRICS), device=self.device)
        counts = torch.zeros(len(METRICS), device=self.device)  # on device: no host->device copy per step
        for micro, batch in enumerate(micro_batches):
            with self.autocast:
                for i, part in enumerate(batch.parts):
                    last = micro == self.grad_accum - 1 and i == len(batch.parts) - 1
                    with dist_utils.gradient_sync(self.run_model, last):
                        # The loader's ids and masks are valid by construction: no value checks a step.
                        out = self.run_model(**part.model_inputs(), full_outputs=self.full_outputs,
                                             check_values=False)
                        share = part.size / batch.size / self.grad_accum
                        guard = dist_utils.unused_parameter_guard(self.model, part) if self.ddp else 0.0
                        (out.loss * share + guard).backward()
                    for k, value in enumerate((out.loss, out.image_loss, out.text_loss, out.text_accuracy)):
                        if value is not None:
                            sums[k] += value.detach().float() * part.size
                            counts[k] += part.size
        return sums / counts, grad_norm(self.model.parameters())  # 0/0 = nan: modality absent this step

    def update(self, finite: bool, norm: torch.Tensor) -> None:
        """The optimizer update with the gradients clipped by their norm from `backward` (skipped for a
        non-finite step: weights and Adam moments untouched), then zeroed gradients."""
        if finite:
            step_clipped(self.optimizer, norm, self.clip_grad)
        self.optimizer.zero_grad(set_to_none=True)
