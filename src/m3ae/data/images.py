"""Image decoding and transforms (no torchvision).

Decoding is defensive: zero-byte, unidentifiable, truncated and over-limit images raise
`BadSample`; every mode (L, 1, P, RGBA, LA, CMYK, I;16, I, F) comes out as 8-bit RGB.
JPEGs are decoded in draft mode (DCT scaling, 2-8x cheaper) when the crop is much larger than
the output, which is the common case for RandomResizedCrop on photos. RGB and greyscale JPEGs are
decoded by simplejpeg when it is installed (libjpeg-turbo, as PIL uses, with the same accurate DCT
and upsampling: the same pixels, bit for bit, ~1.3x faster than PIL's load), anything else and any
JPEG simplejpeg refuses by PIL, which then decides what is wrong with it. The crop is resized by
torch's antialiased bicubic on uint8 (PIL's filter, within a grey level; ~6x faster than PIL's
resize) and normalised in one pass from uint8.
"""
from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import stat
import warnings
from dataclasses import dataclass, field
from struct import error as struct_error

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .bad import BadSample
from .sources.base import MissingBackend, is_url, open_file
from .normalization import normalize, normalize_uint8

# The default pixel limit: ~ 16k x 11k. Above it we refuse to decode (decompression bombs).
# We set PIL's own limit explicitly and turn its warning into an error, so either path is caught.
DEFAULT_MAX_PIXELS = 178_956_970
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS
DEFAULT_MAX_BYTES = 256 << 20  # an encoded image file larger than this is refused unread


def read_image_file(path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of an image file. Only regular files are read (a directory, /dev/zero or a FIFO
    named by a manifest would fail, exhaust memory or block forever), and at most `max_bytes`.
    Raises BadSample."""
    try:
        if not is_url(path):
            info = os.stat(path)
            if not stat.S_ISREG(info.st_mode):
                raise BadSample("not_a_file", f"{path} is not a regular file")
            if info.st_size > max_bytes:
                raise BadSample("too_large", f"{path}: {info.st_size} bytes > {max_bytes}")
        with open_file(path) as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise BadSample("missing_image", path) from None
    except MissingBackend:
        raise
    except (OSError, ValueError) as err:  # a symlink loop, a NUL byte in the path, no permission
        raise BadSample("missing_image", f"{path!r}: {err}") from None
    if len(data) > max_bytes:
        raise BadSample("too_large", f"{path}: more than {max_bytes} bytes")
    return data


def open_image(data: bytes | str | torch.Tensor, key: str = "", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open (header only) from bytes, a local path or a URL (fsspec); a source's rendered float
    [0, 1] (3, H, W) tensor as the 8-bit image it was drawn as. Raises BadSample."""
    if isinstance(data, torch.Tensor):
        return Image.fromarray(data.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
    if isinstance(data, str):
        data = read_image_file(data)
    if not data:
        raise BadSample("empty", key)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSample("too_large", str(err)) from None
    except Image.UnidentifiedImageError:
        raise BadSample("undecodable", key) from None
    except (OSError, ValueError, SyntaxError) as err:
        raise BadSample("truncated" if "truncat" in str(err).lower() else "undecodable", str(err)) from None
    w, h = image.size
    if w <= 0 or h <= 0:
        raise BadSample("undecodable", f"size {w}x{h}")
    if w * h > max_pixels:
        raise BadSample("too_large", f"{w}x{h} > {max_pixels} pixels")
    return image


def upright(image: Image.Image) -> Image.Image:
    """The photo as it is meant to be seen: an EXIF orientation (phone photos) is applied. Such
    images are decoded in full here (no draft mode); the rest pass through untouched."""
    try:
        orientation = image.getexif().get(0x0112, 1)  # 0x0112: Orientation
    except Exception:  # an unreadable EXIF block is no reason to drop the image
        return image
    if orientation in (1, None) or not isinstance(orientation, int) or not 2 <= orientation <= 8:
        return image
    return ImageOps.exif_transpose(_load(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (alpha composited on white, 16-bit/float rescaled)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_to_8bit(np.asarray(image), mode), "L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _to_8bit(a: np.ndarray, mode: str) -> np.ndarray:
    """16-bit, 32-bit integer or float pixels -> uint8, rescaled (16-bit: full range; the others:
    their min..max, or 0..255 for integers that fit). Done a few million pixels at a time: one
    float64 copy of a whole image was 8 bytes a pixel, 3.5 GB for a 300 kB 16-bit PNG of 144
    Mpx (within the pixel limit). NaN pixels become 0."""
    if mode.startswith("I;16"):
        lo, hi = 0.0, 65535.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN float image
            lo, hi = (float(np.nanmin(a)), float(np.nanmax(a))) if a.size else (0.0, 0.0)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            lo, hi = 0.0, 1.0
        if mode == "I" and hi <= 255:
            lo, hi = 0.0, 255.0
    out = np.empty(a.shape, np.uint8)
    rows = max(1, (1 << 20) // max(1, a.shape[-1]))
    for start in range(0, a.shape[0], rows):
        block = a[start:start + rows].astype(np.float64)  # in place from here: no temporaries
        block -= lo
        block /= max(hi - lo, 1e-12)
        block *= 255.0
        block += 0.5
        np.nan_to_num(block, copy=False, nan=0.0)
        out[start:start + rows] = np.clip(block, 0, 255, out=block)
    return out


def _load(image: Image.Image) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSample("too_large", str(err)) from None
    except (OSError, ValueError, SyntaxError, EOFError, struct_error) as err:
        raise BadSample("truncated" if "truncat" in str(err).lower() or isinstance(err, EOFError) else "undecodable",
                        str(err)) from None
    return image


def draft_scale(image: Image.Image, box: tuple[float, float, float, float], out_size: tuple[int, int]) -> int:
    """The JPEG DCT scale (1, 2, 4 or 8) that still gives the crop `box` >= out_size pixels: the
    rule of PIL's draft(), so both decoders pick the same one. 1 for other formats."""
    if image.format != "JPEG":
        return 1
    w, h = image.size
    fx, fy = (box[2] - box[0]) / out_size[0], (box[3] - box[1]) / out_size[1]
    if min(fx, fy) < 2:
        return 1
    want = (math.ceil(w / min(fx, fy)), math.ceil(h / min(fx, fy)))
    fits = min(w // want[0], h // want[1])
    return next(s for s in (8, 4, 2, 1) if fits >= s)


JPEG_DECODERS = ("auto", "simplejpeg", "pil")


@functools.cache
def _simplejpeg():
    """The simplejpeg module, or None where it is not installed (a platform without its wheels)."""
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


def decode_pixels(image: Image.Image, encoded: bytes | None = None, scale: int = 1, fast: bool = True) -> np.ndarray:
    """`image` as 8-bit RGB pixels (H, W, 3), at 1/`scale` of its size (a JPEG's DCT scaling). With
    `fast` and the encoded bytes of an RGB or greyscale JPEG, simplejpeg decodes them (strict: any
    libjpeg warning, e.g. a truncated file, sends the image to PIL instead). Raises BadSample."""
    w, h = image.size
    module = _simplejpeg() if fast and encoded is not None else None
    if module is not None and image.format == "JPEG" and image.mode in ("RGB", "L"):
        shape = (-(-h // scale), -(-w // scale), 3)
        try:
            pixels = module.decode_jpeg(encoded, "RGB", min_factor=scale, min_height=shape[0], min_width=shape[1])
        except ValueError:
            pixels = None
        if pixels is not None and pixels.shape == shape:
            return pixels
    if scale > 1:  # PIL's draft picks `scale` for this size (w // (w // s) is in [s, 2s))
        image.draft(image.mode if image.mode in ("RGB", "L") else None, (w // scale, h // scale))
    return np.array(to_rgb(_load(image)), dtype=np.uint8)


def clamp_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[float, float, float, float]:
    """`box` inside (0, 0, width, height): float rounding (a crop as wide as the image, a draft
    scale) can put an edge a hair outside the image."""
    left, top = min(max(box[0], 0.0), width), min(max(box[1], 0.0), height)
    return left, top, min(max(box[2], left), width), min(max(box[3], top), height)


def to_tensor(image: Image.Image | torch.Tensor, stats) -> torch.Tensor:
    """uint8 RGB (PIL, or a (3, H, W) tensor) -> normalised float (3, H, W)."""
    if isinstance(image, Image.Image):
        # Channels first while still uint8: the float pass then runs over contiguous memory.
        image = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return normalize_uint8(image, stats)


def resize_box(image: np.ndarray | Image.Image, box: tuple[float, float, float, float], size: int) -> torch.Tensor:
    """The `box` of RGB pixels (H, W, 3) (or a PIL image) resized to size x size, uint8 (3, size, size):
    antialiased bicubic (torch's uint8 kernel, the filter PIL uses). The box is rounded to whole
    pixels and kept inside the image (at least one pixel)."""
    if isinstance(image, Image.Image):
        image = np.array(to_rgb(image), dtype=np.uint8)
    h, w = image.shape[:2]
    left, top, right, bottom = clamp_box(box, w, h)
    x0, y0 = min(int(round(left)), w - 1), min(int(round(top)), h - 1)
    x1, y1 = max(x0 + 1, int(round(right))), max(y0 + 1, int(round(bottom)))
    # Contiguous rows: torch's fast uint8 resize wants channels-last memory.
    crop = np.ascontiguousarray(image[y0:y1, x0:x1])
    pixels = torch.from_numpy(crop).permute(2, 0, 1).unsqueeze(0)
    if pixels.shape[-2:] == (size, size):
        return pixels[0].contiguous()
    return F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True)[0]


def sample_rng(*parts: int) -> np.random.Generator:
    """The random stream of one sample: a pure function of e.g. (seed, position)."""
    return np.random.default_rng([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts])


def torch_seeded_rng() -> np.random.Generator:
    """A stream drawn from torch's global generator, for callers without a per-sample seed (map-style
    evaluation sets): torch.manual_seed and DataLoader's per-worker seeding then govern it."""
    return np.random.default_rng(int(torch.randint(0, 2**62, ())))


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, scale=(0.2, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a crop of area share in `scale` and aspect in `ratio`
    (log-uniform); after 10 failed tries, the centre crop clamped to `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
            return x, y, x + w, y + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    x, y = (width - w) // 2, (height - h) // 2
    return x, y, x + w, y + h


@contextlib.contextmanager
def as_bad_sample(key: str):
    """One bad-data policy for every reader: whatever goes wrong with one image (a decoder error
    PIL does not classify, an odd size) is that sample's `BadSample`, counted and skipped by the
    caller, never the end of a run or a command. The detail keeps the error for bug reports."""
    try:
        yield
    except (BadSample, MissingBackend):  # a missing URL backend is the run's setup, not this image
        raise
    except Exception as err:
        raise BadSample("undecodable", f"{key}: {type(err).__name__}: {err}") from None


@dataclass
class _Decoding:
    """What both transforms share: normalisation and decoding limits (keyword-only, so each transform's
    own fields keep their positions)."""

    stats: str | tuple = field(default="cc12m", kw_only=True)
    draft: bool = field(default=True, kw_only=True)
    max_pixels: int = field(default=DEFAULT_MAX_PIXELS, kw_only=True)
    # "crop": crops see the image as it is; "pad": non-square images are first padded to a centred
    # square of `pad_value` (grey level), so no crop rule can cut the object off (product photos).
    square: str = field(default="crop", kw_only=True)
    pad_value: int = field(default=255, kw_only=True)
    # JPEG decoding: "auto" (simplejpeg where installed, else PIL), "simplejpeg" (required), "pil".
    jpeg_decoder: str = field(default="auto", kw_only=True)
    # Hand out uint8 (3, H, W) pixels, normalised later where the batch lands (BatchPart.model_inputs):
    # what training loaders do. The synthetic sources' float renderings are normalised here either way.
    uint8: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        if self.square not in SQUARE_MODES:
            raise ValueError(f"square must be one of {SQUARE_MODES}, got {self.square!r}")
        if not 0 <= int(self.pad_value) <= 255:
            raise ValueError(f"pad_value must be a grey level in 0..255, got {self.pad_value}")
        if self.jpeg_decoder not in JPEG_DECODERS:
            raise ValueError(f"jpeg_decoder must be one of {JPEG_DECODERS}, got {self.jpeg_decoder!r}")
        if self.jpeg_decoder == "simplejpeg" and _simplejpeg() is None:
            raise ModuleNotFoundError("jpeg_decoder=simplejpeg needs simplejpeg: pip install simplejpeg",
                                      name="simplejpeg")

    def rendered(self, pixels: torch.Tensor, size: int) -> torch.Tensor:
        """A source's own rendering, float [0, 1] (3, H, W) (the synthetic shapes): normalised only,
        resized if it is not `size` square. No crop or flip: its caption says where things are."""
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(pixels[None], size=(size, size), mode="bicubic", antialias=True)[0].clamp_(0, 1)
        return normalize(pixels, self.stats)

    def finished(self, pixels: torch.Tensor) -> torch.Tensor:
        """The transform's uint8 (3, H, W) output: as it is (uint8 mode) or normalised."""
        return pixels if self.uint8 else to_tensor(pixels, self.stats)

    def open(self, data: bytes | str | Image.Image, key: str) -> tuple[Image.Image, bytes | None]:
        """The image, header only and upright, and its encoded bytes where there are any."""
        if isinstance(data, Image.Image):
            return upright(data), None
        if isinstance(data, str):
            data = read_image_file(data)
        return upright(open_image(data, key, self.max_pixels)), data

    def decoded(self, image: Image.Image, encoded: bytes | None, box: tuple[float, float, float, float], out: int
                ) -> tuple[np.ndarray, tuple[float, float, float, float]]:
        """Decode `image` (in JPEG draft mode when `box` is much larger than `out`) as RGB pixels
        (H, W, 3), padded to a square when asked; `box` is in the padded frame and is returned in
        the decoded one."""
        fast = self.jpeg_decoder != "pil"
        if self.square == "pad":
            # The padded frame is the original's: crop boxes were drawn on it, so draft is skipped
            # (it would change the scale under the padding); pad mode is for small photos anyway.
            return pad_to_square(decode_pixels(image, encoded, fast=fast), self.pad_value), box
        w, h = image.size
        scale = draft_scale(image, box, (out, out)) if self.draft else 1
        pixels = decode_pixels(image, encoded, scale, fast)
        nh, nw = pixels.shape[:2]
        if (nw, nh) != (w, h):
            sx, sy = nw / w, nh / h
            box = clamp_box((box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy), nw, nh)
        return pixels, box

    def frame_size(self, image: Image.Image) -> tuple[int, int]:
        """The (width, height) that crop boxes are drawn in: padded to a square in pad mode."""
        w, h = image.size
        return (max(w, h), max(w, h)) if self.square == "pad" else (w, h)


SQUARE_MODES = ("crop", "pad")


def pad_to_square(pixels: np.ndarray, value: int = 255) -> np.ndarray:
    """RGB pixels (H, W, 3) centred on a square canvas of grey `value` (its longer side); square
    images unchanged."""
    h, w = pixels.shape[:2]
    if w == h:
        return pixels
    side = max(w, h)
    canvas = np.full((side, side, 3), int(value), dtype=np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = pixels
    return canvas


@dataclass
class TrainTransform(_Decoding):
    """RandomResizedCrop (bicubic) + horizontal flip + normalise. Pretraining uses area `scale`
    (0.2, 1); fine-tuning passes its own (e.g. 0.08-1)."""

    size: int = 256
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def __call__(self, data: bytes | str | Image.Image | torch.Tensor, rng: np.random.Generator | None = None,
                 key: str = "") -> torch.Tensor:
        if isinstance(data, torch.Tensor):
            return self.rendered(data, self.size)
        with as_bad_sample(key):
            return self._apply(data, rng, key)

    def _apply(self, data, rng, key: str) -> torch.Tensor:
        image, encoded = self.open(data, key)
        rng = torch_seeded_rng() if rng is None else rng
        box: tuple[float, float, float, float] = random_resized_crop_box(*self.frame_size(image), rng, self.scale,
                                                                         self.ratio)
        flip = self.flip and rng.random() < 0.5
        pixels, box = self.decoded(image, encoded, box, self.size)
        out = resize_box(pixels, box, self.size)
        if flip:
            out = out.flip(-1)
        return self.finished(out)


@dataclass
class EvalTransform(_Decoding):
    """Evaluation: resize the shorter side to `resize` + centre crop. The default keeps the whole
    shorter side (resize = size, crop_pct 1.0), the rule of every command and of checkpoints'
    preprocessing (m3ae.preprocessing); ImageNet-style evaluation passes resize = size / 0.875."""

    size: int = 256
    resize: int | None = None

    def __call__(self, data: bytes | str | Image.Image | torch.Tensor, rng: np.random.Generator | None = None,
                 key: str = "") -> torch.Tensor:
        if isinstance(data, torch.Tensor):
            return self.rendered(data, self.size)
        with as_bad_sample(key):
            return self._apply(data, key)

    def _apply(self, data, key: str) -> torch.Tensor:
        image, encoded = self.open(data, key)
        resize = self.resize or self.size
        w, h = self.frame_size(image)
        s = resize / min(w, h)  # output pixels per input pixel
        cw, ch = self.size / s, self.size / s  # the centre crop in input pixels
        box = clamp_box(((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2), w, h)
        pixels, box = self.decoded(image, encoded, box, self.size)
        return self.finished(resize_box(pixels, box, self.size))
