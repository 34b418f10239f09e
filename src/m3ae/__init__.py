"""Multimodal Masked Autoencoders in PyTorch."""
# Before torch loads OpenMP: threads that wait sleep soon instead of spinning (m3ae.threads).
from .threads import limit_openmp_spin as _limit_openmp_spin

_limit_openmp_spin()
from .config import PRESETS, ConfigError, M3AEConfig
from .masking import Masks, make_masks
from .model import M3AE, M3AEOutput
from .patches import patchify, unpatchify
from .preprocessing import Preprocessing
from .pretrained import Pretrained, load

__all__ = ["M3AE", "M3AEConfig", "M3AEOutput", "Masks", "make_masks", "patchify", "unpatchify",
           "PRESETS", "ConfigError", "Preprocessing", "Pretrained", "load"]
__version__ = "0.1.0"
