"""Experiment trackers beside metrics.jsonl: TensorBoard (`tensorboard=true`: scalars, the
`viz_every` reconstruction grids as images, the settings as hparams) and Weights & Biases
(`wandb=true`: the same rows, grids and settings; offline with wandb_mode=offline). Rank 0 only.

A resumed run continues the same W&B run (its id is kept in OUT/wandb_run_id). A tracker that
fails to log must not stop training: errors are logged once and that tracker is dropped.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import secrets
from pathlib import Path
from typing import Any

from ..optional import require

WANDB_ID_FILE = "wandb_run_id"

log = logging.getLogger(__name__)


def flat_settings(config) -> dict[str, Any]:
    """The run config as {"model.depth": 12, ...}; values are numbers, bools or strings."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value) -> None:
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                walk(f"{prefix}{f.name}.", getattr(value, f.name))
        else:
            out[prefix[:-1]] = value if isinstance(value, (bool, int, float, str)) else str(value)

    walk("", config)
    return out


class Trackers:
    def __init__(self, config, out_dir: Path, enabled: bool = True, start_step: int = 0):
        self.tensorboard = None
        self.wandb = None
        self.settings = flat_settings(config)
        if not enabled:
            return
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                # A resumed run drops the events logged after its checkpoint by the run it continues
                # (killed past it), as metrics.jsonl is cut back: no step appears twice.
                self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"),
                                                 purge_step=start_step + 1 if start_step else None)
            except ImportError:
                log.warning("tensorboard is not installed; pip install 'm3ae[tensorboard]'")
        if config.wandb:
            self.wandb = self._start_wandb(config, out_dir)

    def _start_wandb(self, config, out_dir: Path):
        wandb = require("wandb", "wandb=true")
        id_file = out_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        tags = [t.strip() for t in (config.wandb_tags or "").split(",") if t.strip()]
        run = wandb.init(project=config.wandb_project, name=config.wandb_name or out_dir.resolve().name,
                         tags=tags or None, config=self.settings, dir=str(out_dir), id=run_id, resume="allow",
                         mode=config.wandb_mode)
        id_file.write_text(run_id)
        return run

    def _guard(self, name: str, fn) -> None:
        try:
            fn()
        except Exception as err:  # a tracker must never stop a training run
            log.warning("%s logging failed (%s); no more %s logging in this run", name, err, name)
            setattr(self, name, None)

    def scalars(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        values = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and k != "step" and math.isfinite(v)}
        if (writer := self.tensorboard) is not None:
            def add_scalars() -> None:
                for k, v in values.items():
                    writer.add_scalar(k, v, step)
            self._guard("tensorboard", add_scalars)
        if self.wandb is not None:
            self._guard("wandb", lambda: self.wandb.log(values, step=step))

    def image(self, tag: str, path: Path | None, step: int) -> None:
        """A picture the run wrote (a PNG), e.g. the reconstruction grid of `viz_every`."""
        if path is None or (self.tensorboard is None and self.wandb is None):
            return
        if (writer := self.tensorboard) is not None:
            def add():
                import numpy as np
                from PIL import Image

                with Image.open(path) as im:
                    pixels = np.asarray(im.convert("RGB"))
                writer.add_image(tag, pixels, step, dataformats="HWC")
            self._guard("tensorboard", add)
        if self.wandb is not None:
            import wandb

            self._guard("wandb", lambda: self.wandb.log({tag: wandb.Image(str(path))}, step=step))

    def close(self, last: dict[str, Any] | None = None) -> None:
        """At the end of the run (or of this part of it): hparams with the final loss, then close."""
        if self.tensorboard is not None:
            final = {f"hparam/final_{k}": float(v) for k, v in (last or {}).items()
                     if k in ("loss", "image_loss", "text_loss", "text_accuracy") and isinstance(v, (int, float))
                     and math.isfinite(v)}
            self._guard("tensorboard", lambda: self.tensorboard.add_hparams(
                self.settings, final or {"hparam/final_loss": float("nan")}, run_name="."))
            if self.tensorboard is not None:
                self.tensorboard.close()
        if self.wandb is not None:
            self._guard("wandb", self.wandb.finish)
