"""metrics.jsonl: one row per log interval, appended whole; the same rows go to the trackers."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..files import atomic_write
from .tracking import Trackers

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    """Append-only JSONL; rows at log intervals only (one host sync per interval). The same rows go
    to the trackers (TensorBoard, W&B) when the run has any."""

    def __init__(self, path: Path, enabled: bool, trackers: Trackers | None = None):
        self.path = path
        self.enabled = enabled
        self.trackers = trackers

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # One write() of the whole row in append mode: a kill leaves whole rows (or a cut last one,
        # which truncate_after drops), never rows interleaved.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(row) + "\n").encode())
        finally:
            os.close(fd)
        if self.trackers is not None:
            self.trackers.scalars(row)

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows the crashed/stopped run wrote after its last checkpoint."""
        if not (self.enabled and self.path.is_file()):
            return
        rows = [line for line in self.path.read_text(errors="replace").splitlines()
                if (row := _parse_row(line)) is not None and row.get("step", 0) <= step]
        atomic_write(self.path, lambda p: Path(p).write_text("".join(r + "\n" for r in rows)))

    def close(self, last: dict[str, Any] | None = None) -> None:
        if self.trackers is not None:
            self.trackers.close(last)


def _parse_row(line: str) -> dict[str, Any] | None:
    """A metrics row, or None for a blank line or one a kill cut short."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def window_row(step: int, values: list[list[float]], lr: float, samples_per_s: float, data_wait_share: float,
               skipped: int) -> dict[str, Any]:
    """The row of one log window: per-step [loss, image, text, accuracy, grad_norm] values averaged
    over the steps that had each (nan = a modality absent that step)."""
    def mean(i: int) -> float | None:
        vals = [v[i] for v in values if math.isfinite(v[i])]
        return sum(vals) / len(vals) if vals else None
    row = {"step": step, "loss": mean(0), "image_loss": mean(1), "text_loss": mean(2),
           "text_accuracy": mean(3), "grad_norm": mean(4), "lr": lr,
           "samples_per_s": samples_per_s, "data_wait_share": data_wait_share, "skipped_steps": skipped,
           "step_losses": [v[0] for v in values]}
    return {k: v for k, v in row.items() if v is not None}
