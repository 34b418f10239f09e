"""What the visualisation commands read: a checkpoint, its tokenizer, images and captions.

Image loading lives here alone (open, RGB, shorter side resized, centre crop, normalise) so that it
can later be swapped for the data pipeline's evaluation transform without touching the figures.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.normalization import normalize
from ..model import M3AE

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
TOKENIZER_NAME = "tokenizer.json"


@dataclass
class Sample:
    image: torch.Tensor  # (C, H, W), normalised
    caption: str | None
    key: str


# -- checkpoint -----------------------------------------------------------------------------------
def load_checkpoint(directory: str | os.PathLike) -> M3AE:
    model = M3AE.from_pretrained(directory)
    model.eval()
    return model


def checkpoint_stats(directory: str | os.PathLike, default: str = "cc12m") -> str:
    """The pixel normalisation the checkpoint was trained with (run_config.yaml), else `default`."""
    path = Path(directory) / "run_config.yaml"
    if path.is_file():
        from omegaconf import OmegaConf

        value = OmegaConf.select(OmegaConf.load(path), "data.normalization")
        if isinstance(value, str):
            return value
    return default


# -- tokenizer ------------------------------------------------------------------------------------
def find_tokenizer(checkpoint: str | os.PathLike, explicit: str | None = None, levels: int = 3) -> Path | None:
    """`explicit`, else tokenizer.json in the checkpoint folder or one of its parents."""
    if explicit:
        path = Path(explicit)
        if path.is_dir():
            path = path / TOKENIZER_NAME
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {explicit}")
        return path
    folder = Path(checkpoint).resolve()
    for _ in range(levels + 1):
        if (folder / TOKENIZER_NAME).is_file():
            return folder / TOKENIZER_NAME
        folder = folder.parent
    return None


def load_tokenizer(checkpoint: str | os.PathLike, explicit: str | None = None, vocab_size: int | None = None):
    """The run's tokenizer; the built-in demo tokenizer when none is found (and it fits the model)."""
    from tokenizers import Tokenizer

    path = find_tokenizer(checkpoint, explicit)
    if path is not None:
        tokenizer = Tokenizer.from_file(str(path))
    else:
        from ..data.synthetic import build_demo_tokenizer

        tokenizer = build_demo_tokenizer()
    if vocab_size and tokenizer.get_vocab_size() > vocab_size:
        where = path or "the built-in demo tokenizer"
        raise ValueError(f"{where} has {tokenizer.get_vocab_size()} tokens but the model's vocab_size is "
                         f"{vocab_size}; pass the run's tokenizer with --tokenizer")
    return tokenizer


def encode_caption(tokenizer, caption: str, text_length: int):
    """Token ids without special tokens, truncated to the model's text length (as in pretraining)."""
    encoding = tokenizer.encode(caption, add_special_tokens=False)
    return encoding, encoding.ids[:text_length]


def decoder_for(tokenizer):
    """id -> token string (a callable, so figures need not know the tokenizer type)."""
    def decode(index: int) -> str:
        token = tokenizer.id_to_token(int(index))
        return token if token is not None else f"<{index}>"
    return decode


def text_batch(tokenizer, captions: list[str | None], text_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, L) and padding mask (True = padding); a missing caption is all padding."""
    rows = [encode_caption(tokenizer, c, text_length)[1] if c else [] for c in captions]
    length = max(1, max(len(r) for r in rows))
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    padding = torch.ones(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        padding[i, : len(row)] = False
    return ids, padding


# -- images ---------------------------------------------------------------------------------------
def load_image(path: str | os.PathLike, image_size: int, stats: str | tuple = "cc12m") -> torch.Tensor:
    """PIL open -> RGB -> shorter side to image_size -> centre crop -> [0, 1] -> normalised (C, H, W)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = image_size / min(w, h)
        size = (max(image_size, round(w * scale)), max(image_size, round(h * scale)))
        im = im.resize(size, Image.BICUBIC)
        left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
        im = im.crop((left, top, left + image_size, top + image_size))
        pixels = np.asarray(im, dtype=np.float32) / 255.0
    return normalize(torch.from_numpy(pixels.copy()).permute(2, 0, 1), stats)


def _csv_rows(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "image" not in reader.fieldnames:
            raise ValueError(f"{path} needs an 'image' column (and 'caption'); found {reader.fieldnames}")
        rows, seen = [], set()
        for row in reader:
            if row["image"] in seen:  # several captions per image: show each image once, first caption
                continue
            seen.add(row["image"])
            rows.append((row["image"], (row.get("caption") or "").strip()))
    return rows


def _resolve(root: Path, name: str) -> Path:
    """Relative to the CSV; manifests that list bare file names next to an images/ folder work too."""
    for candidate in (root / name, root / "images" / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"image {name!r} of {root} not found (looked beside the CSV and in images/)")


def load_samples(spec: str, image_size: int, stats: str | tuple = "cc12m", n: int = 4, offset: int = 0,
                 text_length: int = 64) -> list[Sample]:
    """`demo` (held-out synthetic shapes), a CSV manifest (image,caption; paths relative to the CSV),
    an image folder (no captions) or one image file."""
    if n <= 0:
        raise ValueError("need at least one sample (--n)")
    if spec == "demo":
        from ..data.synthetic import SyntheticShapes

        shapes = SyntheticShapes(1, image_size, text_length, stats=stats)
        start = 1_000_000 + offset  # far past any demo training index: held-out samples
        out = []
        for i in range(start, start + n):
            item = shapes[i]
            out.append(Sample(item["image"], item["caption"], item["key"]))
        return out
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"--data {spec}: no such file or folder (use 'demo', a CSV, or images)")
    if path.is_dir():
        entries = [(p, None) for p in sorted(path.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    elif path.suffix.lower() == ".csv":
        entries = _csv_rows(path)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        entries = [(path, None)]
    else:
        raise ValueError(f"--data {spec}: expected 'demo', a .csv manifest, an image folder or an image")
    entries = entries[offset: offset + n]
    if not entries:
        raise ValueError(f"--data {spec}: no images found (offset {offset})")
    if path.suffix.lower() == ".csv":  # resolve only the rows shown
        entries = [(_resolve(path.parent, name), caption) for name, caption in entries]
    return [Sample(load_image(p, image_size, stats), c or None, p.name) for p, c in entries]


def stack_images(samples: list[Sample]) -> torch.Tensor:
    return torch.stack([s.image for s in samples])
