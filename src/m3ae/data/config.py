"""Data settings of a run (the `data:` section of a run config)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class DataConfig:
    # What to read: a SPEC (see m3ae.data.spec); "demo" is the built-in synthetic shapes source.
    spec: str = "demo"
    # Tokenizer: a hub name, a tokenizer.json / vocab.txt path; None = the source's own (demo: built
    # in), "bert-base-uncased" (the paper's) for real data.
    tokenizer: Optional[str] = None
    num_workers: int = 2  # loader worker processes per rank
    prefetch_factor: int = 2  # batches each worker prepares ahead
    normalization: str = "cc12m"  # "cc12m", "imagenet", or "mean1,mean2,mean3/std1,std2,std3"
    demo_samples: int = 8192  # size of the synthetic shapes set (spec demo) unless its #samples= says
    # Tar shards: records are read in a seeded random order within blocks of this many per shard
    # (memory: that many encoded samples per loader worker). Shards are often sorted (by id, by class).
    shuffle_buffer: int = 2000
    # Share of image-text pairs used as image-only samples (the paper's partly-captioned runs).
    caption_drop: float = 0.0
    # RandomResizedCrop area range, lower end (the paper: 0.2-1).
    crop_scale_min: float = 0.2
    crop_scale_max: float = 1.0  # upper end of the crop area range
    hflip: bool = True  # random horizontal flips
    # Non-square photos: "crop" takes crops of the photo as it is; "pad" first pads it to a centred
    # square of grey level `pad_value` (255: white, for studio product photos), so nothing is cut off.
    square: str = "crop"
    pad_value: int = 255  # grey level of the padding of square=pad
    jpeg_draft: bool = True  # decode JPEGs at reduced DCT scale when the crop is much larger than the output
    # "auto": RGB/greyscale JPEGs by simplejpeg where installed (the same pixels as PIL, ~1.3x faster
    # decoding), else PIL; "simplejpeg" (required) or "pil".
    jpeg_decoder: str = "auto"
    max_image_pixels: int = 178_956_970  # refuse larger images (decompression bombs)
    # Tar shards: a member larger than this is skipped unread (counted too_large); memory stays
    # bounded by it.
    max_member_bytes: int = 256 << 20
    # Tar shards: a shard stops being read after this many bytes of members (gzip bombs; too_large).
    max_shard_bytes: int = 64 << 30
    # Stop the run when more than this share of samples is unusable (after bad_min_samples seen).
    max_bad_fraction: float = 0.05
    bad_min_samples: int = 200  # samples seen before max_bad_fraction is enforced


def stream_shares(data: DataConfig, world_size: int) -> int:
    """The (process, worker) shares a stream source is read in, each with its own saved position
    (m3ae.data.stream_position): processes x loader workers, reading in-process being one share."""
    return world_size * max(int(data.num_workers), 1)
