import math

import torch

from m3ae.posembed import image_position_table, sincos_1d, text_position_table


def test_1d_layout_sin_then_cos():
    table = text_position_table(8, 5)
    assert table.shape == (1, 5, 8)
    pos, i = 3, 1
    w = 10000 ** (-i / 4)
    assert math.isclose(table[0, pos, i].item(), math.sin(pos * w), abs_tol=1e-6)
    assert math.isclose(table[0, pos, 4 + i].item(), math.cos(pos * w), abs_tol=1e-6)


def test_2d_first_half_encodes_column_second_half_row():
    dim, grid = 16, 4
    table = image_position_table(dim, grid)[0]
    assert table.shape == (grid * grid, dim)
    for row in range(grid):
        for col in range(grid):
            index = row * grid + col
            assert torch.allclose(table[index, : dim // 2], sincos_1d(dim // 2, torch.tensor([col]))[0])
            assert torch.allclose(table[index, dim // 2:], sincos_1d(dim // 2, torch.tensor([row]))[0])
    # w_i = 10000^(-i / (D/4)) inside each half
    assert math.isclose(table[1, 1].item(), math.sin(1 * 10000 ** (-1 / (dim / 4))), abs_tol=1e-6)


def test_rectangular_grid():
    assert image_position_table(8, 2, 3).shape == (1, 6, 8)
