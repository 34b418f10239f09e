"""Transformer blocks: computing only some output rows gives exactly those rows of the full output."""
import pytest
import torch

from m3ae.layers import Transformer, gather_rows


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_output_rows_equal_rows_of_full_output(explicit, checkpointing):
    torch.manual_seed(0)
    net = Transformer(16, depth=2, num_heads=4, grad_checkpointing=checkpointing,
                      explicit_attention=explicit).double()
    x = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True)
    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[0, 7:] = True
    padding[2, 4:] = True
    rows = torch.stack([torch.randperm(9)[:5] for _ in range(3)])
    full, _ = net(x, padding)
    part, _ = net(x, padding, output_rows=rows)
    torch.testing.assert_close(part, gather_rows(full, rows))
    weight = torch.randn_like(part)
    g_part = torch.autograd.grad((part * weight).sum(), [x, *net.parameters()])
    g_full = torch.autograd.grad((gather_rows(full, rows) * weight).sum(), [x, *net.parameters()])
    for a, b in zip(g_part, g_full):
        torch.testing.assert_close(a, b)


def test_output_rows_without_blocks_is_a_gather():
    net = Transformer(8, depth=0, num_heads=2)
    x = torch.randn(2, 5, 8)
    rows = torch.tensor([[4, 0], [1, 1]])
    out, _ = net(x, output_rows=rows)
    torch.testing.assert_close(out, net.norm(gather_rows(x, rows)))
