"""Fixed sin-cos position tables, laid out exactly as the authors' code lays them out."""
from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): [sin(pos * w), cos(pos * w)], w_i = 10000^(-i / (dim/2))."""
    if dim % 2 != 0:
        raise ValueError(f"sin-cos dimension must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).float()


def text_position_table(dim: int, length: int) -> torch.Tensor:
    """(1, length, dim) table for text positions 0..length-1."""
    return sincos_1d(dim, torch.arange(length)).unsqueeze(0)


def image_position_table(dim: int, grid_h: int, grid_w: int | None = None) -> torch.Tensor:
    """(1, grid_h*grid_w, dim) table, patches row-major.

    The first dim/2 channels encode the column index and the last dim/2 the row index (the
    authors' meshgrid puts w first), each half a 1-D table with w_i = 10000^(-i / (dim/4)).
    """
    grid_w = grid_h if grid_w is None else grid_w
    if dim % 4 != 0:
        raise ValueError(f"2-D sin-cos dimension must be divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1)
    return table.unsqueeze(0)
