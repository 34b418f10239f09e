"""Multimodal Masked Autoencoders in PyTorch."""
from __future__ import annotations

# Before torch loads OpenMP: threads that wait sleep soon instead of spinning (m3ae.threads).
from .threads import limit_openmp_spin as _limit_openmp_spin

_limit_openmp_spin()

import importlib  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

__version__ = "0.1.0"

# Names resolve on first use, so `import m3ae.cli` (and `m3ae --help`) does not import torch.
_EXPORTS = {"M3AE": "model", "M3AEOutput": "model", "M3AEConfig": "config", "PRESETS": "config",
            "ConfigError": "config", "Masks": "masking", "make_masks": "masking", "patchify": "patches",
            "unpatchify": "patches", "Preprocessing": "preprocessing", "Pretrained": "pretrained",
            "load": "pretrained"}

__all__ = ["M3AE", "M3AEConfig", "M3AEOutput", "Masks", "make_masks", "patchify", "unpatchify",
           "PRESETS", "ConfigError", "Preprocessing", "Pretrained", "load"]

if TYPE_CHECKING:
    from .config import PRESETS, ConfigError, M3AEConfig
    from .masking import Masks, make_masks
    from .model import M3AE, M3AEOutput
    from .patches import patchify, unpatchify
    from .preprocessing import Preprocessing
    from .pretrained import Pretrained, load


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'm3ae' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
