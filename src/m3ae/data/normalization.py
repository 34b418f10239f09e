"""Pixel normalisation statistics and the (un)normalise pair."""
from __future__ import annotations

import torch

# The paper normalises with CC12M statistics.
CC12M_MEAN = (0.5762, 0.5503, 0.5213)
CC12M_STD = (0.3207, 0.3169, 0.3307)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATS = {"cc12m": (CC12M_MEAN, CC12M_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


def resolve_stats(name_or_values: str | tuple) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """'cc12m', 'imagenet', "m1,m2,m3/s1,s2,s3", or an explicit (mean, std) pair."""
    if isinstance(name_or_values, str) and "/" in name_or_values:
        mean, std = (tuple(float(v) for v in part.split(",")) for part in name_or_values.split("/"))
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"custom normalisation needs 3 means / 3 positive stds: {name_or_values!r}")
        return mean, std
    if isinstance(name_or_values, str):
        if name_or_values not in STATS:
            raise ValueError(f"unknown normalisation {name_or_values!r}; choose {sorted(STATS)} or give mean/std")
        return STATS[name_or_values]
    mean, std = name_or_values
    return tuple(mean), tuple(std)


def normalize(image: torch.Tensor, stats: str | tuple = "cc12m") -> torch.Tensor:
    """[0, 1] image (..., C, H, W) -> normalised."""
    mean, std = resolve_stats(stats)
    shape = (-1, 1, 1)
    return (image - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


def normalize_uint8(image: torch.Tensor, stats: str | tuple = "cc12m") -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) -> normalised float32, in one pass on the image's device: how
    training images travel (4x fewer bytes from loader workers and to the GPU than float32).

    Per-channel Python scalars, not (3, 1, 1) tensors: building those on a GPU is a host-to-device
    copy, and a pageable one synchronises the stream, inside the step."""
    mean, std = resolve_stats(stats)
    out = image.float()
    for c, (m, s) in enumerate(zip(mean, std)):
        out[..., c, :, :].mul_(1.0 / (255.0 * s)).sub_(m / s)
    return out


def denormalize(image: torch.Tensor, stats: str | tuple = "cc12m") -> torch.Tensor:
    """Normalised (..., C, H, W) -> [0, 1] (not clamped)."""
    mean, std = resolve_stats(stats)
    shape = (-1, 1, 1)
    return image * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
