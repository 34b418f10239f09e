"""Reconstruction grids during pretraining (`viz_every: K`): a fixed batch, drawn every K steps."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

import torch

from ..data.collate import BatchPart

VIZ_DIR = "viz"

log = logging.getLogger(__name__)


def fixed_viz_batch(config, n: int = 4) -> BatchPart | None:
    """Samples and masks fixed for the whole run, so successive grids are comparable: the first
    micro-batch of a fresh, worker-less loader (training samples; a validation source can replace
    this once the data pipeline has one). None when no batch can be had."""
    from ..data.loader import build_train_data

    try:  # a loader draws its base seed from torch's global generator: leave the run's stream as it was
        with torch.random.fork_rng(devices=[]):
            data = build_train_data(dataclasses.replace(config.data, num_workers=0), config.model,
                                    seed=config.seed, micro_batch=n)
            return next(iter(data.batches)).parts[0]
    except Exception as err:  # a picture must never stop a training run
        log.warning("viz_every: no fixed batch for data spec %r (%s); reconstruction grids disabled",
                    config.data.spec, err)
        return None


def write_viz(model, step: int, out_dir: str | Path, fixed_batch: BatchPart,
              decode: Callable[[int], str] | None = None, stats="cc12m") -> Path:
    """Write OUT/viz/step_XXXXXXXX.png: the fixed batch reconstructed by `model` as it is now.

    Uses the given masks (no RNG is drawn, so an exact-resume run stays exact) and restores the
    model's train/eval mode.
    """
    from .reconstruction import reconstruct, reconstruction_figure

    rec = reconstruct(model, **fixed_batch.model_inputs())
    path = Path(out_dir) / VIZ_DIR / f"step_{step:08d}.png"
    return reconstruction_figure([(f"step {step}", rec)], path, decode=decode, stats=stats,
                                 title=f"reconstructions at step {step}")


class TrainingViz:
    """What the trainer holds: the fixed batch and how to label it; call with (model, step)."""

    def __init__(self, out_dir: str | Path, fixed_batch: BatchPart, decode=None, stats="cc12m"):
        self.out_dir, self.fixed_batch, self.decode, self.stats = Path(out_dir), fixed_batch, decode, stats

    @classmethod
    def for_run(cls, config, out_dir: str | Path, tokenizer=None) -> "TrainingViz | None":
        batch = fixed_viz_batch(config)
        if batch is None:
            return None
        decode = None
        if tokenizer is not None and config.model.has_text:
            from .inputs import decoder_for

            decode = decoder_for(tokenizer)
        return cls(out_dir, batch, decode, config.data.normalization)

    def __call__(self, model, step: int) -> Path | None:
        try:
            with torch.no_grad():
                return write_viz(model, step, self.out_dir, self.fixed_batch, self.decode, self.stats)
        except Exception as err:  # a picture must never stop a training run
            log.warning("step %d: reconstruction grid failed (%s)", step, err)
            return None
