"""Masked reconstructions of images and captions, and a figure that shows them."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..data.normalization import denormalize
from ..masking import Masks
from ..model import M3AE
from ..patches import patchify, unpatchify


@dataclass
class Reconstruction:
    original: torch.Tensor  # (B, C, H, W) normalised
    masked: torch.Tensor  # input with hidden patches blanked (normalised; hidden = 0)
    reconstruction: torch.Tensor  # visible patches from the input, hidden ones predicted
    image_mask: torch.Tensor  # (B, N) bool
    text: torch.Tensor | None = None  # (B, L) ids
    text_padding_mask: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None  # (B, L) bool, hidden
    text_prediction: torch.Tensor | None = None  # (B, L) argmax ids


@torch.no_grad()
def reconstruct(model: M3AE, image: torch.Tensor, text: torch.Tensor | None = None,
                text_padding_mask: torch.Tensor | None = None, masks: Masks | None = None,
                generator: torch.Generator | None = None) -> Reconstruction:
    was_training = model.training
    model.eval()
    out = model(image, text, text_padding_mask, masks=masks, generator=generator, full_outputs=True)
    model.train(was_training)
    c = model.config
    patches = patchify(image, c.patch_size)
    pred = out.image_output.float()
    hidden = out.image_mask.unsqueeze(-1)
    if c.norm_pix_loss:
        # Predictions are per-patch standardised; restore scale from the VISIBLE patches only
        # (the hidden patch statistics are the answer, never an input).
        visible = (~hidden).float()
        count = visible.sum(dim=1, keepdim=True).clamp_min(1) * patches.shape[-1]
        mean = (patches * visible).sum(dim=(1, 2), keepdim=True) / count
        var = (((patches - mean) ** 2) * visible).sum(dim=(1, 2), keepdim=True) / count
        pred = pred * (var + 1e-6).sqrt() + mean
    g = c.grid_size
    return Reconstruction(
        original=image,
        masked=unpatchify(torch.where(hidden, torch.zeros_like(patches), patches), c.patch_size, g,
                          channels=c.in_chans),
        reconstruction=unpatchify(torch.where(hidden, pred, patches), c.patch_size, g, channels=c.in_chans),
        image_mask=out.image_mask, text=text, text_padding_mask=text_padding_mask,
        text_mask=out.text_mask, text_prediction=None if out.text_output is None else out.text_output.argmax(-1),
    )


def caption_lines(rec: Reconstruction, index: int, decode) -> tuple[str, str]:
    """("a small [red] circle ...", "predicted: red -> red, ...") for one sample."""
    if rec.text is None:
        return "", ""
    words, guesses = [], []
    for pos in range(rec.text.shape[1]):
        if rec.text_padding_mask is not None and bool(rec.text_padding_mask[index, pos]):
            continue
        word = decode(int(rec.text[index, pos]))
        if bool(rec.text_mask[index, pos]):
            guess = decode(int(rec.text_prediction[index, pos]))
            words.append(f"[{word}]")
            guesses.append(f"{word}{'=' if guess == word else '→'}{guess}")
        else:
            words.append(word)
    return " ".join(words), "predicted: " + (", ".join(guesses) if guesses else "(nothing masked)")


def _to_rgb(image: torch.Tensor, stats) -> "numpy.ndarray":
    return denormalize(image.float().cpu(), stats).clamp(0, 1).permute(1, 2, 0).numpy()


def reconstruction_figure(columns: Sequence[tuple[str, Reconstruction]], out: str | Path, decode=None,
                          stats="cc12m", n: int | None = None) -> Path:
    """One row per sample: original, masked input, then one reconstruction per column, with the
    caption (hidden words in [brackets]) and each column's predicted words beneath."""
    from matplotlib.figure import Figure

    first = columns[0][1]
    n = min(n or first.original.shape[0], first.original.shape[0])
    ncols = 2 + len(columns)
    fig = Figure(figsize=(2.3 * ncols, 2.9 * n), dpi=100)
    axes = fig.subplots(n, ncols, squeeze=False)
    for i in range(n):
        panels = [("original", first.original[i]), ("masked input", first.masked[i])]
        panels += [(title, rec.reconstruction[i]) for title, rec in columns]
        for ax, (title, img) in zip(axes[i], panels):
            ax.imshow(_to_rgb(img, stats), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
        if decode is not None and first.text is not None:
            caption, _ = caption_lines(first, i, decode)
            lines = [caption] + [f"{title}: {caption_lines(rec, i, decode)[1]}" for title, rec in columns]
            axes[i][0].text(0, -0.08, "\n".join(lines), transform=axes[i][0].transAxes, fontsize=7.5,
                            va="top", ha="left", family="monospace")
    fig.tight_layout(h_pad=4.5)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
