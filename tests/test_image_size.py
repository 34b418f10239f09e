"""Any image size divisible by the patch size: position tables follow the input's patch grid, as in
the authors' code, so a model encodes sizes other than its configured one."""
from __future__ import annotations

import argparse

import pytest
import torch

from _jax_reference import CHECKPOINT, inputs
from m3ae import M3AE, M3AEConfig
from m3ae.cli import convert_jax
from m3ae.posembed import image_position_table


def _pair(size_a: int, size_b: int) -> tuple[M3AE, M3AE]:
    """Two models with the same weights, configured for different image sizes."""
    torch.manual_seed(0)
    a = M3AE(M3AEConfig.from_preset("nano", image_size=size_a, patch_size=8, vocab_size=50, text_length=8)).eval()
    b = M3AE(M3AEConfig.from_preset("nano", image_size=size_b, patch_size=8, vocab_size=50, text_length=8)).eval()
    b.load_state_dict(a.state_dict())
    return a, b


@torch.no_grad()
def test_a_model_encodes_other_sizes_like_a_model_built_for_them():
    big, small = _pair(64, 32)
    image = torch.randn(2, 3, 32, 32)
    text = torch.randint(0, 50, (2, 8))
    torch.testing.assert_close(big.encode(image), small.encode(image))
    torch.testing.assert_close(big.encode(image, text), small.encode(image, text))
    wide = torch.randn(1, 3, 16, 40)  # not square: a 2 x 5 grid
    out = big.encode(wide)
    assert out.shape == (1, 1 + 10, 64)
    torch.testing.assert_close(big.image_positions("enc", (2, 5)), image_position_table(64, 2, 5))
    assert big.image_positions("enc", (2, 5)) is big.image_positions("enc", (2, 5))  # cached


def test_masked_forward_at_another_size_matches():
    big, small = _pair(64, 32)
    image = torch.randn(2, 3, 32, 32)
    text = torch.randint(0, 50, (2, 8))
    out_big = big(image, text, generator=torch.Generator().manual_seed(3), full_outputs=True)
    out_small = small(image, text, generator=torch.Generator().manual_seed(3), full_outputs=True)
    torch.testing.assert_close(out_big.loss, out_small.loss)
    torch.testing.assert_close(out_big.image_output, out_small.image_output)
    fast = big(image, text, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(fast.loss, out_small.loss)


def test_sizes_not_divisible_by_the_patch_are_refused():
    model, _ = _pair(32, 32)
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        model.encode(torch.randn(1, 3, 30, 32))


@torch.no_grad()
def test_convert_jax_needs_no_image_size(tmp_path):
    """The fixture was made at 32 px; converted with no --image-size (the config says 256), the
    model encodes 32-px images exactly as the one converted with --image-size 32 (whose outputs the
    parity tests check against the authors' code)."""
    parser = argparse.ArgumentParser()
    convert_jax.register(parser.add_subparsers())
    for name, extra in (("default", []), ("sized", ["--image-size", "32"])):
        args = parser.parse_args(["convert-jax", str(CHECKPOINT), str(tmp_path / name), *extra])
        assert args.func(args) == 0
    default = M3AE.from_pretrained(tmp_path / "default").eval()
    sized = M3AE.from_pretrained(tmp_path / "sized").eval()
    assert default.config.image_size == 256
    image, text, padding = inputs()
    torch.testing.assert_close(default.encode(image, text, padding), sized.encode(image, text, padding))
