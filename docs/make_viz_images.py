"""Regenerate the pictures in docs/visualisation.md from a demo run (`m3ae demo --out RUN`).

    PYTHONPATH=src python docs/make_viz_images.py RUN [OUT_DIR]

The t-SNE example needs feature files; until `m3ae embed` exists this script writes them itself:
mean-pooled encoder features of held-out demo images (no caption), labelled by the colour of the
first shape, for the trained checkpoint and for the same architecture at initialisation.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from m3ae import M3AE
from m3ae.checkpoint import latest_checkpoint
from m3ae.cli import main
from m3ae.data.synthetic import COLORS, SyntheticShapes


def features(model: M3AE, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    shapes = SyntheticShapes(1, model.config.image_size, model.config.text_length)
    feats, labels = [], []
    with torch.no_grad():
        for start in range(0, n, 50):
            items = [shapes[2_000_000 + i] for i in range(start, start + 50)]
            x = model.encode(torch.stack([it["image"] for it in items]))
            feats.append(x[:, 1:].mean(1).numpy())
            labels += [list(COLORS).index(it["caption"].split()[2]) for it in items]
    return np.concatenate(feats), np.array(labels)


def run(run_dir: Path, out: Path) -> None:
    ckpt = latest_checkpoint(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="m3ae-features-"))
    trained = M3AE.from_pretrained(ckpt).eval()
    torch.manual_seed(0)
    initial = M3AE(trained.config).eval()
    for name, model in (("trained", trained), ("initial", initial)):
        f, y = features(model)
        np.savez(tmp / f"{name}.npz", features=f, labels=np.array(list(COLORS))[y])
    flickr = Path("/work/shared/data/flickr8k-1k")
    steps = [
        ["reconstruct", "--checkpoint", str(ckpt), "--data", "demo", "--n", "3", "--out", str(out / "reconstruct.png")],
        ["reconstruct", "--checkpoint", str(ckpt), "--data", "demo", "--n", "2", "--offset", "3",
         "--caption", "a large yellow circle above a small blue square", "--out", str(out / "reconstruct_conditioned.png")],
        ["attention", "--checkpoint", str(ckpt), "--image", "demo", "--token", "triangle", "--per-head",
         "--out", str(out / "attention.png")],
        ["tsne", "--features", str(tmp / "trained.npz"), "--features2", str(tmp / "initial.npz"),
         "--labels", "demo M3AE (trained)", "same model at init", "--out", str(out / "tsne.png")],
        ["plot", str(run_dir / "metrics.jsonl"), "--labels", "demo", "--smooth", "0.6", "--out", str(out / "curves.png")],
    ]
    if flickr.is_dir():
        steps.append(["reconstruct", "--checkpoint", str(ckpt), "--data", str(flickr / "captions.csv"), "--n", "2",
                      "--out", str(out / "reconstruct_flickr.png")])
    for argv in steps:
        if main(argv) != 0:
            raise SystemExit(f"failed: m3ae {' '.join(argv)}")


if __name__ == "__main__":
    run(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "docs/images"))
