import io
import warnings

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
    cases = [("empty", b""), ("undecodable", b"not an image at all"), ("truncated", good[: len(good) // 2]),
             # cut inside the headers, PIL says "Truncated File Read" (was counted as undecodable)
             ("truncated", jpeg_bytes(40, 60)[:300])]
    for reason, data in cases:
        with pytest.raises(BadSample) as err:
            TrainTransform(16)(data, sample_rng(0))
        assert err.value.reason == reason, err.value
    with pytest.raises(BadSample) as err:
        open_image(good, max_pixels=100)
    assert err.value.reason == "too_large"
    with pytest.raises(BadSample) as err:
        open_image("/nonexistent/x.jpg")
    assert err.value.reason == "missing_image"


def _portrait_product() -> Image.Image:
    """60x80 (like fashion-44k): a black product touching the top and bottom edges, 40 px wide."""
    image = Image.new("RGB", (60, 80), (255, 255, 255))
    image.paste((0, 0, 0), (10, 0, 50, 80))
    return image


def test_pad_mode_keeps_the_whole_product_in_eval():
    image = _portrait_product()
    cropped = denormalize(EvalTransform(40, resize=40)(image))  # crop mode: top and bottom cut off
    padded = denormalize(EvalTransform(40, resize=40, square="pad")(image))
    assert padded.shape == (3, 40, 40)
    # Pad mode: 80x80 canvas -> 40 px; the product spans all rows, columns 5..25 (white side bars).
    assert padded[:, :, 12:18].max() < 0.1 and padded[:, :, :3].min() > 0.9 and padded[:, :, -3:].min() > 0.9
    dark_rows = (padded.mean(0)[:, 20] < 0.5).sum().item()
    assert dark_rows == 40
    # Crop mode shows only the middle 60x60: the product fills more of the width (nothing white left
    # of column 40 * 10/60).
    assert cropped[:, :, 8:30].max() < 0.1


def test_pad_mode_train_crops_come_from_the_padded_square():
    image = _portrait_product()
    t = TrainTransform(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, square="pad", pad_value=255)
    out = denormalize(t(image, sample_rng(0)))
    # The whole padded square: white bars left and right, black product in the middle, all rows.
    assert out[:, :, :3].min() > 0.9 and out[:, :, -3:].min() > 0.9 and out[:, :, 14:18].max() < 0.1
    grey = denormalize(TrainTransform(32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, square="pad",
                                      pad_value=0)(image, sample_rng(0)))
    assert grey[:, :, :3].max() < 0.1  # the pad value is used


def test_pad_mode_leaves_square_images_alone_and_rejects_bad_settings():
    square = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    a = EvalTransform(32, resize=32)(square)
    b = EvalTransform(32, resize=32, square="pad")(square)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="square"):
        EvalTransform(32, square="letterbox")
    with pytest.raises(ValueError, match="pad_value"):
        TrainTransform(32, square="pad", pad_value=300)


@pytest.mark.parametrize("box, size", [((20, 30, 220, 250), 256), ((0, 0, 300, 200), 64), ((5, 7, 45, 47), 40)])
def test_resize_box_matches_pils_bicubic(box, size):
    """The torch uint8 resize stands in for PIL's bicubic resize: the same filter, within rounding."""
    from PIL import Image

    from m3ae.data.images import resize_box

    rng = np.random.default_rng(0)
    smooth = np.cumsum(np.cumsum(rng.normal(0, 3, (260, 320, 3)), 0), 1)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min()) * 255
    image = Image.fromarray(smooth.astype(np.uint8))
    ours = resize_box(image, box, size)
    assert ours.dtype == torch.uint8 and ours.shape == (3, size, size)
    pil = torch.from_numpy(np.array(image.resize((size, size), Image.BICUBIC, box=box))).permute(2, 0, 1)
    diff = (ours.int() - pil.int()).abs()
    assert diff.float().mean() < 0.1 and diff.max() <= 3


@pytest.mark.parametrize("width, height", [(400, 100), (401, 99), (399, 98), (397, 101), (99, 401), (512, 97)])
def test_extreme_aspect_photos_decode_with_every_crop_setting(width, height):
    # Was: "box offset can't be negative" (Caltech-101-like 4:1 photos, ~100 px shorter side): a crop
    # as tall as the photo came out a hair outside it after float rounding or a draft scale.
    import itertools

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, "JPEG")
    data = buffer.getvalue()
    # Output sizes from no draft to 1/2, 1/4 and 1/8 DCT scales.
    for size, keep_side, square, draft in itertools.product([12, 16, 24, 32, 48, 224], [False, True],
                                                           ["crop", "pad"], [True, False]):
        ev = EvalTransform(size=size, resize=size if keep_side else None, square=square, draft=draft)
        assert ev(data).shape == (3, size, size)
        tr = TrainTransform(size=size, square=square, draft=draft, scale=(0.05, 1.0))
        for seed in range(3):
            assert tr(data, np.random.default_rng(seed)).shape == (3, size, size)


def test_exif_orientation_is_applied():
    # Was: phone photos came out lying on their side (the EXIF orientation was ignored).
    rng = np.random.default_rng(0)
    upright = Image.fromarray(rng.integers(0, 255, (60, 30, 3), dtype=np.uint8))  # 30 wide, 60 tall
    stored = upright.transpose(Image.ROTATE_90)  # as the camera wrote it: 60 wide, 30 tall
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    tagged, plain = io.BytesIO(), io.BytesIO()
    stored.save(tagged, "PNG", exif=exif.tobytes())
    upright.save(plain, "PNG")
    t = EvalTransform(16, resize=16, draft=False)
    assert torch.equal(t(tagged.getvalue()), t(plain.getvalue()))
    assert not torch.equal(t(tagged.getvalue()), EvalTransform(16, resize=16)(_png(stored)))


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_16bit_images_are_rescaled_without_a_float_copy_of_the_whole_image():
    # Was: one float64 copy (and temporaries) of the whole image: 8+ bytes a pixel, 3.5 GB for a
    # 300 kB 16-bit PNG of 144 Mpx. Now a few million pixels at a time.
    import tracemalloc

    pixels = (np.arange(2000 * 2000, dtype=np.uint32) % 65536).astype(np.uint16).reshape(2000, 2000)
    image = Image.fromarray(pixels)
    assert image.mode.startswith("I;16")
    tracemalloc.start()
    try:
        rgb = to_rgb(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * pixels.size, peak  # was 24 bytes a pixel (float64 and its temporaries)
    expected = np.clip(pixels / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(rgb)[..., 0], expected)
    floats = Image.fromarray(np.where(pixels % 7 == 0, np.nan, pixels).astype(np.float32), "F")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was: "invalid value encountered in cast" for NaN pixels
        assert np.asarray(to_rgb(floats))[0, 0, 0] == 0


def _photo_jpeg(w: int, h: int, seed: int = 0, mode: str = "RGB", **save) -> bytes:
    """A smooth photo-like JPEG (random noise would hide decoder differences in the resize)."""
    rng = np.random.default_rng(seed)
    smooth = np.cumsum(np.cumsum(rng.normal(0, 3, (h, w, 3)), 0), 1)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min()) * 255
    buffer = io.BytesIO()
    Image.fromarray(smooth.astype(np.uint8)).convert(mode).save(buffer, "JPEG", **save)
    return buffer.getvalue()


@pytest.fixture
def simplejpeg_calls(monkeypatch):
    """Counts the JPEGs simplejpeg decoded (so a test sees that the fast path ran at all)."""
    simplejpeg = pytest.importorskip("simplejpeg")
    from m3ae.data import images

    calls = []

    class Counting:
        @staticmethod
        def decode_jpeg(*args, **kwargs):
            calls.append(kwargs.get("min_factor"))
            return simplejpeg.decode_jpeg(*args, **kwargs)

    monkeypatch.setattr(images, "_simplejpeg", lambda: Counting)
    return calls


@pytest.mark.parametrize("mode, save", [("RGB", {}), ("RGB", {"progressive": True}), ("RGB", {"subsampling": 0}),
                                        ("RGB", {"subsampling": 1, "quality": 60}), ("L", {})])
def test_simplejpeg_gives_pils_pixels_bit_for_bit(mode, save, simplejpeg_calls):
    """The fast decoder is a drop-in: every crop, draft scale (1, 2, 4, 8) and square mode yields
    the very tensor the PIL decoder yields."""
    data = _photo_jpeg(420, 300, seed=1, mode=mode, **save)
    for square in ("crop", "pad"):
        for size in (24, 48, 96, 200):
            kw = dict(square=square, scale=(0.2, 1.0), uint8=True)
            fast = TrainTransform(size, jpeg_decoder="simplejpeg", **kw)
            pil = TrainTransform(size, jpeg_decoder="pil", **kw)
            for seed in range(6):
                assert torch.equal(fast(data, sample_rng(seed)), pil(data, sample_rng(seed)))
            ev = dict(square=square, resize=size)
            assert torch.equal(EvalTransform(size, jpeg_decoder="auto", **ev)(data),
                               EvalTransform(size, jpeg_decoder="pil", **ev)(data))
    assert {1, 2, 4, 8} <= set(simplejpeg_calls)  # every DCT scale went through simplejpeg


def test_jpegs_simplejpeg_does_not_take_go_to_pil(simplejpeg_calls, tmp_path):
    """CMYK and EXIF-rotated JPEGs are PIL's (colour conversion, rotation), and a JPEG simplejpeg
    refuses gets PIL's verdict: the same pixels or the same BadSample."""
    cmyk = _photo_jpeg(64, 48, mode="CMYK")
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = io.BytesIO()
    Image.open(io.BytesIO(_photo_jpeg(64, 48))).save(rotated, "JPEG", exif=exif.tobytes())
    full = _photo_jpeg(120, 90, seed=2)
    truncated = full[: len(full) * 2 // 3]
    corrupt = bytearray(full)
    corrupt[len(full) // 2: len(full) // 2 + 40] = bytes(40)  # zeros inside the entropy-coded data
    for data in (cmyk, rotated.getvalue(), truncated, bytes(corrupt)):
        outcomes = []
        for decoder in ("auto", "pil"):
            try:
                outcomes.append(EvalTransform(32, jpeg_decoder=decoder, uint8=True)(data))
            except BadSample as err:
                outcomes.append(err.reason)
        if isinstance(outcomes[0], torch.Tensor):
            assert torch.equal(outcomes[0], outcomes[1])
        else:
            assert outcomes[0] == outcomes[1]
    assert EvalTransform(32, uint8=True)(rotated.getvalue()).shape == (3, 32, 32)
    path = tmp_path / "photo.jpg"  # a path is read once and its bytes go to simplejpeg
    path.write_bytes(full)
    before = len(simplejpeg_calls)
    assert torch.equal(EvalTransform(32)(str(path)), EvalTransform(32)(full)) and len(simplejpeg_calls) == before + 2


def test_jpeg_decoder_setting(monkeypatch):
    from m3ae.data import images

    with pytest.raises(ValueError, match="jpeg_decoder"):
        TrainTransform(32, jpeg_decoder="turbo")
    data = _photo_jpeg(64, 48)
    want = EvalTransform(32, jpeg_decoder="pil")(data)
    monkeypatch.setattr(images, "_simplejpeg", lambda: None)  # a platform without simplejpeg's wheels
    with pytest.raises(ModuleNotFoundError, match="pip install simplejpeg"):
        EvalTransform(32, jpeg_decoder="simplejpeg")
    assert torch.equal(EvalTransform(32)(data), want)  # auto falls back to PIL
