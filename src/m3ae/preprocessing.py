"""The image preprocessing a checkpoint expects, saved beside its weights (preprocessor_config.json).

One rule for evaluation everywhere (Python, every command): resize the shorter side to
`image_size / crop_pct`, centre-crop `image_size`, normalise with `mean` / `std`. `crop_pct` is 1.0
by default (the whole shorter side; ImageNet-style evaluation uses 0.875).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .files import atomic_write

PREPROCESSOR_NAME = "preprocessor_config.json"
DEFAULT_CROP_PCT = 1.0
# Images are resized to image_size (the crop is taken in input pixels first): 10^9 from a downloaded
# preprocessor_config.json would ask for exabytes. The paper's models use 256.
MAX_IMAGE_SIZE = 8192


@dataclass
class Preprocessing:
    image_size: int = 256
    mean: tuple[float, ...] = (0.5762, 0.5503, 0.5213)  # CC12M, as the paper
    std: tuple[float, ...] = (0.3207, 0.3169, 0.3307)
    crop_pct: float = DEFAULT_CROP_PCT
    square: str = "crop"  # "pad": non-square photos padded to a square of grey `pad_value` first
    pad_value: int = 255
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        self.mean, self.std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0 \
                or not all(math.isfinite(v) for v in self.mean + self.std):  # NaN: NaN features, silently
            raise ValueError(f"preprocessing needs 3 means and 3 positive stds, all finite, got {self.mean} / "
                             f"{self.std}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if type(self.image_size) is not int or not 0 < self.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be an integer in 1..{MAX_IMAGE_SIZE}, got {self.image_size!r}")
        if self.interpolation != "bicubic":  # recorded for other libraries; our transforms are bicubic
            raise ValueError(f"only bicubic resizing is implemented, got interpolation={self.interpolation!r}")
        if self.square not in ("crop", "pad") or type(self.pad_value) is not int or not 0 <= self.pad_value <= 255:
            raise ValueError(f"square must be 'crop' or 'pad' and pad_value a grey level 0..255, got "
                             f"{self.square!r} / {self.pad_value}")

    @classmethod
    def from_stats(cls, image_size: int, stats: str | tuple = "cc12m", **kwargs: Any) -> "Preprocessing":
        """From a normalisation name ('cc12m', 'imagenet', 'm1,m2,m3/s1,s2,s3') or a (mean, std) pair."""
        from .data.normalization import resolve_stats

        mean, std = resolve_stats(stats)
        return cls(image_size=image_size, mean=mean, std=std, **kwargs)

    @property
    def stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return self.mean, self.std

    def transform(self, image_size: int | None = None):
        """The evaluation transform (bytes / path / PIL image -> normalised (3, S, S) tensor)."""
        from .data.images import EvalTransform

        size = image_size or self.image_size
        return EvalTransform(size, int(round(size / self.crop_pct)), stats=self.stats,
                             square=self.square, pad_value=self.pad_value)

    # -- files ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"processor": "m3ae", **{k: list(v) if isinstance(v, tuple) else v
                                        for k, v in dataclasses.asdict(self).items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "preprocessing") -> "Preprocessing":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"processor"})
        if unknown:
            raise ValueError(f"{source}: unknown preprocessing keys {unknown}")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from None

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / PREPROCESSOR_NAME
        atomic_write(path, lambda p: Path(p).write_text(json.dumps(self.to_dict(), indent=2)))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Preprocessing":
        from .validate import read_config_json

        path = Path(directory) / PREPROCESSOR_NAME
        # Bounded size, nesting and encoding, an object: was a RecursionError or UnicodeDecodeError unnamed.
        return cls.from_dict(read_config_json(path), str(path))
