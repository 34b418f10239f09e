"""Masked reconstructions of images and captions, and a figure that shows them."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..data.normalization import denormalize
from ..masking import Masks, masks_for
from ..model import M3AE
from ..patches import patchify, unpatchify

HIDDEN_GREY = 0.82  # how hidden patches are painted in the "masked input" panel


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
    patch_size: int = 0


def patch_statistics(patches: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std (B, N), as `normalize_patches` computes them for norm_pix targets."""
    return patches.mean(dim=-1), (patches.var(dim=-1) + eps).sqrt()


def restore_patch_stats(pred: torch.Tensor, patches: torch.Tensor, hidden: torch.Tensor, grid: int,
                        mode: str = "local", sigma: float = 1.5, eps: float = 1e-6) -> torch.Tensor:
    """Undo per-patch standardisation of norm_pix_loss predictions using VISIBLE patches only.

    pred, patches (B, N, P); hidden (B, N) bool. The true statistics of a hidden patch are part of
    the answer, so each hidden patch borrows them from visible patches: "local" weighs visible
    patches by a Gaussian of their grid distance (sigma in patches), "global" pools all of them.
    "true" is the display oracle: each patch's own mean and std (two numbers per hidden patch
    leak), which shows the predicted pattern without borrowed-contrast artefacts.
    """
    mean, std = patch_statistics(patches.float(), eps)
    if mode == "true":
        return pred.float() * std[..., None] + mean[..., None]
    visible = (~hidden).float()
    if mode == "global":
        weights = visible[:, None, :].expand(-1, hidden.shape[1], -1)
    elif mode == "local":
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        coords = torch.stack([rows.reshape(-1), cols.reshape(-1)], -1).float().to(pred.device)
        dist2 = torch.cdist(coords, coords).square()
        weights = torch.exp(-dist2 / (2 * sigma**2))[None] * visible[:, None, :]
    else:
        raise ValueError(f"unknown restore mode {mode!r} (local, global or true)")
    total = weights.sum(-1)
    # No visible patch at all (mask ratio ~1): nothing to borrow from, fall back to unit scale.
    safe = total.clamp_min(1e-12)
    est_mean = torch.where(total > 0, (weights * mean[:, None, :]).sum(-1) / safe, torch.zeros_like(total))
    est_var = torch.where(total > 0, (weights * std[:, None, :].square()).sum(-1) / safe, torch.ones_like(total))
    return pred.float() * est_var.sqrt()[..., None] + est_mean[..., None]


def draw_masks(model: M3AE, image: torch.Tensor | None, text_padding_mask: torch.Tensor | None,
               text_length: int | None = None, image_ratio: float | None = None,
               text_ratio: float | None = None, seed: int = 0) -> Masks:
    """Masks at chosen ratios (the model's own when None), seeded, independent per sample."""
    first = image if image is not None else text_padding_mask
    if first is None:
        raise ValueError("draw_masks needs an image, a text padding mask, or both")
    batch = first.shape[0]
    generator = torch.Generator().manual_seed(seed)
    return masks_for(model.config, batch, has_image=image is not None, text_padding=text_padding_mask,
                     text_length=text_length, generator=generator, mode="per_sample",
                     image_ratio=image_ratio, text_ratio=text_ratio)


@torch.no_grad()
def reconstruct(model: M3AE, image: torch.Tensor, text: torch.Tensor | None = None,
                text_padding_mask: torch.Tensor | None = None, masks: Masks | None = None,
                generator: torch.Generator | None = None, restore: str = "local") -> Reconstruction:
    """One masked forward pass; returns CPU tensors. `restore` only matters for norm_pix models."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    try:
        out = model(move(image), move(text), move(text_padding_mask),
                    masks=None if masks is None else masks.to(device), generator=generator,
                    full_outputs=True)
    finally:
        model.train(was_training)
    c = model.config
    image = image.cpu()
    patches = patchify(image, c.patch_size).float()
    pred = out.image_output.float().cpu()
    hidden_ids = out.image_mask.cpu()
    if c.norm_pix_loss:
        pred = restore_patch_stats(pred, patches, hidden_ids, c.grid_size, restore)
    hidden = hidden_ids.unsqueeze(-1)
    g = c.grid_size
    return Reconstruction(
        original=image,
        masked=unpatchify(torch.where(hidden, torch.zeros_like(patches), patches), c.patch_size, g,
                          channels=c.in_chans),
        reconstruction=unpatchify(torch.where(hidden, pred, patches), c.patch_size, g, channels=c.in_chans),
        image_mask=hidden_ids, text=None if text is None else text.cpu(),
        text_padding_mask=None if text_padding_mask is None else text_padding_mask.cpu(),
        text_mask=None if out.text_mask is None else out.text_mask.cpu(),
        text_prediction=None if out.text_output is None else out.text_output.argmax(-1).cpu(),
        patch_size=c.patch_size,
    )


def reconstruction_columns(model: M3AE, image: torch.Tensor, text: torch.Tensor | None = None,
                           text_padding_mask: torch.Tensor | None = None, *,
                           caption: tuple[str, torch.Tensor, torch.Tensor] | None = None,
                           image_ratio: float | None = None, text_ratio: float | None = None, seed: int = 0,
                           restore: str = "local") -> list[tuple[str, Reconstruction]]:
    """The figure's columns: the samples with their own captions; with `caption` (label, ids,
    padding, one row per sample) also the same image mask with no caption and with that caption.

    Every column hides the same image patches, so the columns differ only in the text the model
    is given. Ratios default to the model's; with `caption` the text ratio defaults to 0 (the
    caption is the condition, not a target)."""
    if caption is not None and not model.config.has_text:
        raise ValueError("a caption needs a model with text; this one is image-only (vocab_size=0)")
    if text_ratio is None and caption is not None:
        text_ratio = 0.0
    masks = draw_masks(model, image, text_padding_mask, image_ratio=image_ratio, text_ratio=text_ratio, seed=seed)
    columns = []
    if text is not None:
        columns.append(("with caption" if caption else "reconstruction",
                        reconstruct(model, image, text, text_padding_mask, masks, restore=restore)))
    if caption is not None or text is None:
        image_only = Masks(masks.image_ids, masks.image_keep)  # same image mask, no text
        columns.append(("no caption" if model.config.has_text else "reconstruction",
                        reconstruct(model, image, masks=image_only, restore=restore)))
    if caption is not None:
        label, ids, padding = caption
        own = draw_masks(model, image, padding, image_ratio=image_ratio, text_ratio=text_ratio, seed=seed)
        own.image_ids, own.image_keep = masks.image_ids, masks.image_keep
        short = label if len(label) <= 24 else label[:22] + "…"
        columns.append((f"“{short}”", reconstruct(model, image, ids, padding, own, restore=restore)))
    return columns


def caption_lines(rec: Reconstruction, index: int, decode) -> tuple[str, str]:
    """("a small [red] circle ...", "predicted: red -> red, ...") for one sample."""
    if rec.text is None:
        return "", ""
    words, guesses = [], []
    for pos in range(rec.text.shape[1]):
        if rec.text_padding_mask is not None and bool(rec.text_padding_mask[index, pos]):
            continue
        word = decode(int(rec.text[index, pos]))
        if rec.text_mask is not None and rec.text_prediction is not None and bool(rec.text_mask[index, pos]):
            guess = decode(int(rec.text_prediction[index, pos]))
            words.append(f"[{word}]")
            guesses.append(f"{word}{'=' if guess == word else '→'}{guess}")
        else:
            words.append(word)
    return " ".join(words), "predicted: " + (", ".join(guesses) if guesses else "(nothing masked)")


def to_rgb(image: torch.Tensor, stats) -> np.ndarray:
    """Normalised (C, H, W) -> (H, W, C) in [0, 1] for imshow."""
    return denormalize(image.float().cpu(), stats).clamp(0, 1).permute(1, 2, 0).numpy()


def _masked_rgb(rec: Reconstruction, index: int, stats) -> np.ndarray:
    """The masked input with hidden patches painted flat grey (not the dataset mean colour, which
    would look like content)."""
    rgb = to_rgb(rec.original[index], stats).copy()
    if rec.patch_size:
        g = rgb.shape[0] // rec.patch_size
        hidden = rec.image_mask[index].reshape(g, g).numpy()
        pixel_hidden = np.kron(hidden, np.ones((rec.patch_size, rec.patch_size), dtype=bool))
        rgb[pixel_hidden] = HIDDEN_GREY
        return rgb
    return to_rgb(rec.masked[index], stats)


def _text_block(columns: Sequence[tuple[str, Reconstruction]], index: int, decode, width: int) -> str:
    texts = [(title, rec, *caption_lines(rec, index, decode)) for title, rec in columns]
    shared = len({caption for _, _, caption, _ in texts}) == 1  # e.g. one caption, two checkpoints
    lines, shown = [], set()
    for title, rec, caption, predicted in texts:
        if not caption:
            lines.append(f"{title}: (no text)")
            continue
        if caption not in shown:  # the same masked caption under several columns: once
            lines.append(caption if shared or len(columns) == 1 else f"{title}: {caption}")
            shown.add(caption)
        if rec.text_mask is not None and bool((rec.text_mask[index] & ~_padding(rec)[index]).any()):
            lines.append(f"  {title}: {predicted}" if len(columns) > 1 else predicted)
    wrapped = []
    for line in lines:
        wrapped += textwrap.wrap(line, width=width, subsequent_indent="    ") or [""]
    return "\n".join(wrapped)


def _padding(rec: Reconstruction) -> torch.Tensor:
    assert rec.text is not None  # only asked for reconstructions with text
    if rec.text_padding_mask is not None:
        return rec.text_padding_mask.bool()
    return torch.zeros_like(rec.text, dtype=torch.bool)


def reconstruction_figure(columns: Sequence[tuple[str, Reconstruction]], out: str | Path,
                          decode: Callable[[int], str] | None = None, stats="cc12m", n: int | None = None,
                          title: str | None = None, dpi: int = 100) -> Path:
    """One row per sample: original, masked input, then one reconstruction per column; beneath it
    the caption (hidden words in [brackets]) and each column's predicted words."""
    from matplotlib.figure import Figure

    first = columns[0][1]
    n = min(n or first.original.shape[0], first.original.shape[0])
    ncols = 2 + len(columns)
    col_w = 2.0
    width_chars = int(ncols * col_w * 14)  # ~14 monospace characters per inch at 7 pt
    texts = [_text_block(columns, i, decode, width_chars) if decode is not None else "" for i in range(n)]
    text_h = [0.13 * (t.count("\n") + 1) + 0.1 if t else 0.05 for t in texts]
    heights = []
    for th in text_h:
        heights += [col_w, th]
    head = 0.3 + (0.3 if title else 0.0)  # inches above the grid: column titles (+ figure title)
    fig = Figure(figsize=(col_w * ncols, sum(heights) + head + 0.1), dpi=dpi)
    grid = fig.add_gridspec(2 * n, ncols, height_ratios=heights, hspace=0.08, wspace=0.04,
                            left=0.01, right=0.99, bottom=0.01, top=1 - head / fig.get_figheight())
    for i in range(n):
        panels = [("original", to_rgb(first.original[i], stats)), ("masked input", _masked_rgb(first, i, stats))]
        panels += [(name, to_rgb(rec.reconstruction[i], stats)) for name, rec in columns]
        for j, (name, rgb) in enumerate(panels):
            ax = fig.add_subplot(grid[2 * i, j])
            ax.imshow(rgb, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
        tax = fig.add_subplot(grid[2 * i + 1, :])
        tax.axis("off")
        if texts[i]:
            tax.text(0, 1, texts[i], transform=tax.transAxes, fontsize=7, va="top", ha="left",
                     family="monospace")
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.06 / fig.get_figheight(), va="top")
    from . import save_figure

    return save_figure(fig, out)
