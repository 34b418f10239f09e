import io

import numpy as np
import pytest
import torch
from PIL import Image

from data_files import jpeg_bytes
from m3ae.data.bad import BadSample
from m3ae.data.images import EvalTransform, TrainTransform, open_image, sample_rng, to_rgb
from m3ae.data.normalization import denormalize


def test_train_transform_shape_range_and_determinism():
    t = TrainTransform(32)
    data = jpeg_bytes(120, 90, seed=1)
    a = t(data, sample_rng(0, 5))
    b = t(data, sample_rng(0, 5))
    c = t(data, sample_rng(0, 6))
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    pixels = denormalize(a)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_flip_is_a_mirror():
    data = jpeg_bytes(64, 64, seed=2, fmt="PNG")
    full = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), draft=False)
    seeds = range(20)
    no = [TrainTransform(32, flip=False, **full)(data, sample_rng(s)) for s in seeds]
    yes = [TrainTransform(32, flip=True, **full)(data, sample_rng(s)) for s in seeds]
    flipped = [torch.equal(y, n.flip(-1)) for y, n in zip(yes, no)]
    same = [torch.equal(y, n) for y, n in zip(yes, no)]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)


def test_draft_mode_decodes_smaller_and_stays_close():
    data = jpeg_bytes(800, 600, seed=3)
    kw = dict(scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), flip=False)
    fast = TrainTransform(64, draft=True, **kw)(data, sample_rng(0))
    full = TrainTransform(64, draft=False, **kw)(data, sample_rng(0))
    assert fast.shape == full.shape
    assert (denormalize(fast) - denormalize(full)).abs().mean() < 0.1


@pytest.mark.parametrize("mode", ["L", "1", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "PA"])
def test_every_mode_becomes_rgb(mode):
    base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray((np.arange(480).reshape(20, 24) * 100).astype(np.uint16))
    elif mode == "PA":
        image = base.convert("P").convert("PA")
    else:
        image = base.convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (24, 20)
    out = EvalTransform(16)(image)
    assert out.shape == (3, 16, 16) and torch.isfinite(out).all()


def test_png_with_alpha_and_16bit_through_bytes():
    buf = io.BytesIO()
    Image.fromarray((np.arange(600).reshape(20, 30) * 90).astype(np.uint16)).save(buf, "PNG")
    assert TrainTransform(16)(buf.getvalue(), sample_rng(1)).shape == (3, 16, 16)


def test_eval_transform_is_resize_then_centre_crop():
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 255, 255), (50, 0, 150, 100))  # white centre square
    out = denormalize(EvalTransform(32, resize=32)(image))
    assert out.shape == (3, 32, 32) and out.min() > 0.9  # the centre crop is all white


def test_bad_images_raise_with_reasons():
    good = jpeg_bytes(64, 64)
    cases = {"empty": b"", "undecodable": b"not an image at all", "truncated": good[: len(good) // 2]}
    for reason, data in cases.items():
        with pytest.raises(BadSample) as err:
            TrainTransform(16)(data, sample_rng(0))
        assert err.value.reason == reason
    with pytest.raises(BadSample) as err:
        open_image(good, max_pixels=100)
    assert err.value.reason == "too_large"
    with pytest.raises(BadSample) as err:
        open_image("/nonexistent/x.jpg")
    assert err.value.reason == "missing_image"
