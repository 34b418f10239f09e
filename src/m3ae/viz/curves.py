"""Loss curves of one or more runs from their metrics.jsonl files, on shared axes."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

PANELS = (("loss", "total loss"), ("image_loss", "image loss (masked-patch MSE)"),
          ("text_loss", "text loss (masked-token CE)"), ("lr", "learning rate"))


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():  # a run folder: its metrics.jsonl
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n} is not valid JSON ({err})") from err
    if not rows:
        raise ValueError(f"{path} holds no metrics rows")
    # Rows of one step merge (the training row and the evaluation monitor's row share a step); a
    # resumed run may have re-logged a step, whose newer values win. In step order.
    by_step: dict = {}
    for i, r in enumerate(rows):
        by_step.setdefault(r.get("step", i), {}).update(r)
    return [by_step[s] for s in sorted(by_step)]


def run_labels(paths: Sequence[str | Path]) -> list[str]:
    """Short distinct names: the run folder, with more of the path only where names collide."""
    parts = [Path(p).resolve().parts for p in paths]
    parts = [ps[:-1] if ps and ps[-1].endswith(".jsonl") else ps for ps in parts]
    for depth in range(1, max(len(ps) for ps in parts) + 1):
        labels = ["/".join(ps[-depth:]) for ps in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average (TensorBoard-style, bias-corrected) for noisy curves."""
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg = weight * avg + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(avg / norm)
    return out


def plot_curves(paths: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None,
                smooth: float = 0.0, keys: Sequence[tuple[str, str]] = PANELS, dpi: int = 100) -> Path:
    """One panel per quantity, every run on the same axes. `smooth` in [0, 1): EMA weight (the raw
    curve stays visible, faint)."""
    from matplotlib.figure import Figure

    if not paths:
        raise ValueError("no metrics files given")
    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"smooth must be in [0, 1), got {smooth}")
    runs = [read_metrics(p) for p in paths]
    labels = list(labels) if labels else run_labels(paths)
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    ncols = 2
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(10, 3.5 * nrows), dpi=dpi)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (key, title) in zip(axes, keys):
        positive, drawn = True, False
        for rows, label, colour in zip(runs, labels, colours):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))
                   and math.isfinite(r[key])]
            if not pts:
                continue
            steps, values = zip(*pts)
            positive &= min(values) > 0
            drawn = True
            if smooth > 0 and key != "lr":
                ax.plot(steps, values, color=colour, alpha=0.25, linewidth=1)
                ax.plot(steps, ema(values, smooth), color=colour, label=label, linewidth=1.6)
            else:
                ax.plot(steps, values, color=colour, label=label, linewidth=1.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not drawn:  # e.g. text loss of an image-only (MAE) run
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
        elif key != "lr" and positive:
            ax.set_yscale("log")
    for ax in axes[len(keys):]:
        ax.axis("off")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    from . import save_figure

    return save_figure(fig, out)
