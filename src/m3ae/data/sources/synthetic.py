"""The built-in synthetic shapes (m3ae.data.synthetic) as a source: spec `demo`, or
`synthetic:shapes#samples=N#size=PX#seed=K` (defaults: the run's `data.demo_samples`, image size and
seed). Read by the same pipeline as every other indexed source.

Its records carry rendered pixels, not encoded images: the transforms only normalise them (no
crop or flip: a caption says where each shape is, and a flip would make "left of" false).
"""
from __future__ import annotations

import numpy as np

from .base import IndexedSource, Record
from .registry import RunContext, SourceKind

NAMES = ("demo", "shapes")  # the paths that mean this set


class SyntheticShapes(IndexedSource):
    kind = "synthetic"
    provides = frozenset({"image", "text"})

    def __init__(self, samples: int = 8192, size: int = 64, seed: int = 0):
        if samples < 1 or size < 8:
            raise ValueError(f"synthetic shapes need samples >= 1 and size >= 8 (got {samples}, {size})")
        self.samples, self.size, self.seed = samples, size, seed
        self.name = f"shapes ({samples} samples)"

    def __len__(self) -> int:
        return self.samples

    def record(self, index: int) -> Record:
        import torch

        from ..synthetic import render_sample

        image, caption = render_sample(self.seed, index, self.size)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return Record(key=f"demo-{index:07d}", image=pixels, caption=caption)

    def permutation(self, seed: int, epoch: int) -> np.ndarray:
        # The demo's order since its first release (torch's randperm), so its runs keep their losses.
        import torch

        g = torch.Generator().manual_seed(seed * 7_777_777 + epoch)
        return torch.randperm(len(self), generator=g).numpy()


def _build(item, role: str, context: RunContext) -> SyntheticShapes:
    if item.path not in NAMES:
        raise ValueError(f"synthetic:{item.path}: unknown synthetic set (known: {', '.join(NAMES)})")
    o = item.options
    try:
        return SyntheticShapes(int(o.get("samples", context.demo_samples)), int(o.get("size", context.image_size)),
                               int(o.get("seed", context.seed)))
    except ValueError as err:
        raise ValueError(f"synthetic:{item.path}: {err}") from None


def _tokenizer():
    from ..synthetic import build_demo_tokenizer

    return build_demo_tokenizer()


KINDS = (SourceKind("synthetic", _build, frozenset({"samples", "size", "seed"}),
                    claims_path=lambda path: path == "demo", tokenizer=_tokenizer),)
