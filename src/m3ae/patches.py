"""Images <-> patch sequences in the authors' (h, w, p, p, c) layout."""
from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, h*w, p*p*C): patches row-major, each flattened as (py, px, c)."""
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # b, gh, gw, py, px, c
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid_h: int, grid_w: int | None = None,
               channels: int = 3) -> torch.Tensor:
    """(B, h*w, p*p*C) -> (B, C, H, W); inverse of `patchify`."""
    grid_w = grid_h if grid_w is None else grid_w
    b = patches.shape[0]
    p = patch_size
    x = patches.reshape(b, grid_h, grid_w, p, p, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # b, c, gh, py, gw, px
    return x.reshape(b, channels, grid_h * p, grid_w * p)
