"""Cross-modal attention: a text token -> image patches, and an image patch -> words (paper figs 7-8).

The encoder sees the whole, unmasked [CLS] + N patches + L tokens sequence. Weights come from the
model's opt-in explicit attention path (`encode(..., return_attention=True)`); the normal forward
keeps using fused SDPA and is not slowed down.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..model import M3AE

STOP_WORDS = {"a", "an", "the", "of", "in", "on", "at", "to", "and", "is", "are", "with", "its", "his",
              "her", "their", "while", "for", "by", "from", "above", "below", "left", "right", "."}


@dataclass
class CaptionTokens:
    """A tokenised caption: ids as the model sees them and, per token, the caption word it is from."""

    ids: list[int]
    tokens: list[str]
    words: list[str]  # words[i]: the caption word (original spelling) token i belongs to
    word_index: list[int]  # token i belongs to caption word word_index[i]


def tokenize_caption(tokenizer, caption: str, text_length: int) -> CaptionTokens:
    """No special tokens, truncated to text_length; sub-words (straw ##berries) keep their word."""
    enc = tokenizer.encode(caption, add_special_tokens=False)
    n = min(len(enc.ids), text_length)
    if n == 0:
        raise ValueError(f"the caption {caption!r} gives no tokens")
    word_ids = enc.word_ids[:n]
    words, index = [], []
    for i in range(n):
        w = word_ids[i] if word_ids[i] is not None else -1 - i
        start, end = enc.offsets[i]
        if w >= 0:  # the whole word's span: union of the offsets of its tokens
            spans = [enc.offsets[j] for j in range(len(enc.ids)) if enc.word_ids[j] == w]
            start, end = min(s for s, _ in spans), max(e for _, e in spans)
        words.append(caption[start:end])
        index.append(w)
    return CaptionTokens(list(enc.ids[:n]), list(enc.tokens[:n]), words, index)


def find_token(caption: CaptionTokens, word: str) -> list[int]:
    """Positions of `word` in the caption: all sub-word tokens of the first caption word that matches
    (case-insensitive), or a token matched exactly (e.g. '##berries')."""
    target = word.strip().lower()
    for i, w in enumerate(caption.words):
        if w.lower() == target:
            return [j for j, k in enumerate(caption.word_index) if k == caption.word_index[i]]
    exact = [j for j, t in enumerate(caption.tokens) if t.lower() == target]
    if exact:
        return exact[:1]
    seen = list(dict.fromkeys(caption.words))
    raise ValueError(f"{word!r} is not in the caption (as seen by the model, {len(caption.ids)} tokens); "
                     f"its words are: {', '.join(seen)}")


def default_token(caption: CaptionTokens) -> list[int]:
    """The first content word (not a stop word), else the first word."""
    for w in caption.words:
        if w.lower() not in STOP_WORDS:
            return find_token(caption, w)
    return find_token(caption, caption.words[0])


@torch.no_grad()
def encoder_attention(model: M3AE, image: torch.Tensor, text: torch.Tensor,
                      text_padding_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per encoder block, the (B, heads, T, T) attention weights over [CLS] + patches + tokens."""
    if not model.config.has_text:
        raise ValueError("cross-modal attention needs a model with text (this one has vocab_size=0)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        _, weights = model.encode(image.to(device), text.to(device),
                                  None if text_padding_mask is None else text_padding_mask.to(device),
                                  return_attention=True)
    finally:
        model.train(was_training)
    return [w.float().cpu() for w in weights]


def select_layer(weights: Sequence[torch.Tensor], layer: int | str = -1) -> torch.Tensor:
    """One block's weights (negative indices count from the last), or 'mean' over blocks."""
    if layer == "mean":
        return torch.stack(list(weights)).mean(0)
    layer = int(layer)
    if not -len(weights) <= layer < len(weights):
        raise ValueError(f"--layer {layer} out of range: the encoder has {len(weights)} blocks")
    return weights[layer]


def text_to_image(weights: torch.Tensor, token_positions: Sequence[int], num_patches: int,
                  renormalize: bool = True) -> torch.Tensor:
    """(B, H, T, T) -> (B, H, N): attention from text token(s) (averaged) to the image patches.

    With `renormalize`, each row is rescaled to sum to 1 over the patches (a distribution over the
    image); `image_share` tells how much of the row went to the image at all.
    """
    queries = [1 + num_patches + p for p in token_positions]
    rows = weights[:, :, queries, :].mean(2)
    patch = rows[..., 1: 1 + num_patches]
    return patch / patch.sum(-1, keepdim=True).clamp_min(1e-12) if renormalize else patch


def image_share(weights: torch.Tensor, token_positions: Sequence[int], num_patches: int) -> torch.Tensor:
    """(B, H): the fraction of the token's attention that lands on image patches."""
    return text_to_image(weights, token_positions, num_patches, renormalize=False).sum(-1)


def image_to_text(weights: torch.Tensor, patch: int, num_patches: int,
                  text_padding_mask: torch.Tensor | None = None, renormalize: bool = True) -> torch.Tensor:
    """(B, H, T, T) -> (B, H, L): attention from one image patch to the text tokens."""
    row = weights[:, :, 1 + patch, 1 + num_patches:]
    if text_padding_mask is not None:
        row = row.masked_fill(text_padding_mask[:, None, :].bool(), 0.0)
    return row / row.sum(-1, keepdim=True).clamp_min(1e-12) if renormalize else row


def parse_region(text: str, grid: int) -> int:
    """'ROW,COL' (patch coordinates, 0-based; negative ones count from the last row / column, as
    --layer does) -> patch index."""
    try:
        row, col = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--region must be ROW,COL (patch coordinates), got {text!r}") from None
    if not (-grid <= row < grid and -grid <= col < grid):
        raise ValueError(f"--region {row},{col} is outside the {grid}x{grid} patch grid (0..{grid - 1}, "
                         f"or -{grid}..-1 from the last)")
    return (row % grid) * grid + col % grid


@dataclass
class AttentionResult:
    image: torch.Tensor  # (C, H, W) normalised
    caption: CaptionTokens
    token_positions: list[int]
    patch: int  # the image region (patch index) whose attention to the words is shown
    grid: int
    text_to_image: torch.Tensor  # (heads, N), sums to 1 over patches per head
    image_share: torch.Tensor  # (heads,)
    image_to_text: torch.Tensor  # (heads, L), sums to 1 over tokens per head
    layer: str


def attention_analysis(model: M3AE, image: torch.Tensor, caption: CaptionTokens,
                       token_positions: Sequence[int], layer: int | str = -1,
                       region: int | None = None) -> AttentionResult:
    """Everything the attention figure shows, for one image (C, H, W) and its tokenised caption."""
    c = model.config
    if max(caption.ids) >= c.vocab_size:
        raise ValueError(f"token id {max(caption.ids)} >= the model's vocab_size {c.vocab_size}: "
                         "wrong tokenizer for this checkpoint?")
    text = torch.tensor([caption.ids], dtype=torch.long)
    weights_all = encoder_attention(model, image[None], text)
    weights = select_layer(weights_all, layer)
    n = c.num_patches
    t2i = text_to_image(weights, token_positions, n)[0]
    share = image_share(weights, token_positions, n)[0]
    if region is None:  # the patch the chosen word attends to most (head average)
        region = int(t2i.mean(0).argmax())
    i2t = image_to_text(weights, region, n)[0]
    name = ("mean over blocks" if layer == "mean"
            else f"layer {int(layer) % len(weights_all)} of {len(weights_all)} (0-based)")
    return AttentionResult(image, caption, list(token_positions), region, c.grid_size, t2i, share, i2t, name)


def _overlay(ax, rgb: np.ndarray, heat: np.ndarray, grid: int, cmap: str = "inferno"):
    """The image, with a patch-level heatmap over it (nearest: one cell per patch, as the model sees)."""
    size = rgb.shape[0]
    ax.imshow(rgb, extent=(0, size, size, 0))
    im = ax.imshow(heat.reshape(grid, grid), cmap=cmap, alpha=0.55, extent=(0, size, size, 0),
                   interpolation="nearest", vmin=0, vmax=max(float(heat.max()), 1e-12))
    ax.set_xticks([])
    ax.set_yticks([])
    return im


def _mark_patch(ax, patch: int, grid: int, size: int, color: str = "cyan") -> None:
    from matplotlib.patches import Rectangle

    p = size / grid
    row, col = divmod(patch, grid)
    ax.add_patch(Rectangle((col * p, row * p), p, p, fill=False, edgecolor=color, linewidth=2))


def attention_figure(result: AttentionResult, out: str | Path, stats="cc12m", per_head: bool = False,
                     dpi: int = 110) -> Path:
    """Top: the image, and the chosen word's attention over it. Bottom: the region's attention to
    each word. With `per_head`, one heatmap per head and a heads x words matrix."""
    from matplotlib.figure import Figure

    from .reconstruction import to_rgb

    rgb = to_rgb(result.image, stats)
    size, grid = rgb.shape[0], result.grid
    pieces = " ".join(result.caption.tokens[p] for p in result.token_positions)
    word = result.caption.words[result.token_positions[0]]
    word = word if pieces.lower() == word.lower() else f"{word} ({pieces})"  # show sub-words / [UNK]
    tokens = result.caption.tokens
    heads = result.text_to_image.shape[0]
    ncols = 2 + (heads if per_head else 0)
    width = max(2.4 * ncols, 0.45 * len(tokens) + 1.5)
    top_h = width / ncols + 0.8
    bottom_h = 0.3 * (heads + 1) + 1.7 if per_head else 2.8
    fig = Figure(figsize=(width, top_h + bottom_h), dpi=dpi, layout="constrained")
    top, bottom = fig.subfigures(2, 1, squeeze=False, height_ratios=[top_h, bottom_h])[:, 0]
    axes = top.subplots(1, ncols, squeeze=False)[0]
    axes[0].imshow(rgb)
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    axes[0].set_title("image (□ = region)", fontsize=9)
    _mark_patch(axes[0], result.patch, grid, size)
    mean_map = result.text_to_image.mean(0).numpy()
    im = _overlay(axes[1], rgb, mean_map, grid)
    top.colorbar(im, ax=axes[1], fraction=0.046, pad=0.02)
    _mark_patch(axes[1], result.patch, grid, size)
    share = float(result.image_share.mean())
    axes[1].set_title(f"'{word}' → image\n(heads averaged; {share:.0%} to image)", fontsize=9)
    if per_head:
        for h in range(heads):
            _overlay(axes[2 + h], rgb, result.text_to_image[h].numpy(), grid)
            axes[2 + h].set_title(f"head {h} ({float(result.image_share[h]):.0%})", fontsize=9)
    row, col = divmod(result.patch, grid)
    ax = bottom.subplots(1, 1)
    if per_head:
        matrix = np.concatenate([result.image_to_text.numpy(), result.image_to_text.mean(0, keepdim=True).numpy()])
        im = ax.imshow(matrix, cmap="viridis", aspect="auto", vmin=0)
        ax.set_yticks(range(heads + 1), [f"head {h}" for h in range(heads)] + ["mean"], fontsize=8)
        bottom.colorbar(im, ax=ax, fraction=0.03)
    else:
        values = result.image_to_text.mean(0).numpy()
        colors = ["tab:orange" if i in result.token_positions else "tab:blue" for i in range(len(values))]
        ax.bar(range(len(values)), values, color=colors)
        ax.set_ylabel("attention (heads averaged)", fontsize=8)
        ax.set_xlim(-0.6, len(values) - 0.4)
    ax.set_xticks(range(len(tokens)), tokens, rotation=60, ha="right", fontsize=8)
    ax.set_title(f"region (row {row}, col {col}) → words", fontsize=9)
    fig.suptitle(f"encoder attention, {result.layer}", fontsize=10)
    from . import save_figure

    return save_figure(fig, out, bbox_inches="tight")
