"""Loss curves of one or more runs from their metrics.jsonl files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

PANELS = (("loss", "total loss"), ("image_loss", "image loss (masked-patch MSE)"),
          ("text_loss", "text loss (masked-token CE)"), ("lr", "learning rate"))


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n} is not valid JSON ({err})") from err
    if not rows:
        raise ValueError(f"{path} holds no metrics rows")
    return rows


def plot_curves(paths: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None) -> Path:
    """One panel per quantity, every run on the same axes."""
    from matplotlib.figure import Figure

    runs = [read_metrics(p) for p in paths]
    labels = list(labels) if labels else [Path(p).parent.name or str(p) for p in paths]
    fig = Figure(figsize=(10, 7), dpi=100)
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, title) in zip(axes, PANELS):
        for rows, label in zip(runs, labels):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=label, linewidth=1.5)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key != "lr":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
