"""Result files: one JSON per command run, with enough context to tabulate runs later."""
from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write


@dataclass
class EvalResult:
    """What one evaluation found: scalar metrics, what else is worth keeping (histories, sweeps,
    written files) and how long it took. `m3ae` commands write it with `write_result`."""
    command: str
    metrics: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None

    def summary(self) -> str:
        return summary_line(self.command, self.metrics, self.seconds)


def _clean(value: Any) -> Any:
    """JSON-safe: tensors/numpy to Python, non-finite floats to None, paths to strings."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _clean(value.tolist())
    if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalar
        return _clean(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_result(path: str | Path, command: str, *, checkpoint: str | None, data: dict[str, Any],
                 settings: dict[str, Any], metrics: dict[str, Any], seconds: float | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write {command, checkpoint, data, settings, metrics, ...} as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "checkpoint": checkpoint, "data": data, "settings": settings,
              "metrics": metrics, "seconds": seconds,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__,
              "host": platform.node(), **(extra or {})}
    text = json.dumps(_clean(record), indent=2) + "\n"
    atomic_write(path, lambda p: Path(p).write_text(text))
    return path


def summary_line(command: str, metrics: dict[str, Any], seconds: float | None = None) -> str:
    """`probe: top1=71.20 top5=95.10 (12.3 s)` from the scalar metrics."""
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        elif isinstance(value, int) and not isinstance(value, bool):
            parts.append(f"{key}={value}")
    timing = f" ({seconds:.1f} s)" if seconds is not None else ""
    return f"{command}: {' '.join(parts)}{timing}"
