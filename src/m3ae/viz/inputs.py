"""What the visualisation commands read: a checkpoint, its tokenizer, images and captions.

Images and captions are read with the data pipeline (m3ae.data sources, SPEC parsing), images through
the checkpoint's own evaluation transform (m3ae.preprocessing).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Iterator
from pathlib import Path

import torch

from ..data.bad import BadSample
from ..data.normalization import resolve_stats
from ..data.sources import IndexedSource, Record, RunContext, build_source
from ..data.sources.base import require_path
from ..data.sources.wds import iter_tar
from ..data.spec import parse_item
from ..preprocessing import Preprocessing

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass
class Sample:
    image: torch.Tensor  # (C, H, W), normalised
    caption: str | None
    key: str


# -- checkpoint -----------------------------------------------------------------------------------
def load_checkpoint(checkpoint: str | os.PathLike, tokenizer: str | None = None):
    """Model (eval mode), preprocessing and tokenizer of a checkpoint folder or hub id (m3ae.load)."""
    from ..pretrained import load

    return load(checkpoint, tokenizer=tokenizer)


def require_tokenizer(loaded):
    if loaded.tokenizer is None:
        raise ValueError(f"{loaded.source} has no tokenizer.json and its run names none; pass --tokenizer")
    return loaded.tokenizer


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
def preprocessing_for(loaded, stats: str | None = None) -> Preprocessing:
    """The checkpoint's own image rule (size, crop, square padding, normalisation), with `stats`
    (a --stats option) replacing only its normalisation."""
    if stats is None:
        return loaded.preprocessing
    mean, std = resolve_stats(stats)
    return dataclasses.replace(loaded.preprocessing, mean=mean, std=std)


def load_image(path: str | os.PathLike, preprocessing: Preprocessing) -> torch.Tensor:
    """One image file as the checkpoint's evaluation transform sees it: normalised (C, H, W)."""
    try:
        return preprocessing.transform()(require_path(str(path), "image"), key=str(path))
    except BadSample as err:  # one image a user asked for: an error, not a skip
        raise ValueError(f"cannot use image {path}: {err}") from None


def _records_from(source, offset: int) -> Iterator[Record]:
    """Records from `offset` on, each image once (a manifest may list several captions per image)."""
    if isinstance(source, IndexedSource):
        stream = (source.record(i) for i in range(len(source)))
    else:
        stream = (record for shard in source.shards for record in iter_tar(shard))
    seen = set()
    for record in stream:
        if record.image is None or record.key in seen:
            continue
        seen.add(record.key)
        if len(seen) > offset:
            yield record


def _caption(record: Record) -> str | None:
    text = record.caption
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return (text or "").strip() or None


def load_samples(spec: str, preprocessing: Preprocessing, n: int = 4, offset: int = 0) -> list[Sample]:
    """One image file, or a data SPEC item (m3ae.data.spec): `demo` (the synthetic shapes), a CSV
    manifest (image[,caption]; paths relative to the CSV or its images/), an image folder (captions
    from .txt files beside the images), HDF5 or tar shards. Images go through `preprocessing`'s
    evaluation transform (the checkpoint's: `preprocessing_for`)."""
    if n <= 0:
        raise ValueError("need at least one sample (--n)")
    path = Path(spec)
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        if offset:
            raise ValueError(f"--data {spec}: one image, nothing at offset {offset}")
        return [Sample(load_image(path, preprocessing), None, path.name)]
    try:  # anything the data SPEC syntax reads: manifests, folders, HDF5, shards
        source = build_source(parse_item(spec), default_role="labelled",
                              context=RunContext(image_size=preprocessing.image_size))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--data {spec}: {err} (use 'demo', a CSV, images or another data spec)") from None
    if "image" not in source.provides:
        raise ValueError(f"--data {spec}: {source.describe()} has no images")
    samples, skipped = [], 0
    transform = preprocessing.transform()
    for r in _records_from(source, offset):
        try:  # the bad-data policy: an unusable image is skipped and counted, the next one taken
            image = transform(r.image, key=r.key)
        except BadSample as err:
            skipped += 1
            log.warning("--data %s: skipping %s (%s); %d skipped", spec, r.key, err, skipped)
            if skipped > max(20, n):
                raise ValueError(f"--data {spec}: {skipped} unusable images before {n} usable ones") from None
            continue
        samples.append(Sample(image, _caption(r), os.path.basename(r.key)))
        if len(samples) == n:
            break
    if not samples:
        raise ValueError(f"--data {spec}: no usable images found (offset {offset})")
    return samples


def stack_images(samples: list[Sample]) -> torch.Tensor:
    return torch.stack([s.image for s in samples])
