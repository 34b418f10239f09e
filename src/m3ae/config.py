"""Model configuration: one typed dataclass, size presets, validation."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

# Encoder sizes from the paper (width / depth / heads); decoder 512/8/16 for the paper sizes.
# `nano` is the reference-fixture size (tests); `tiny` is ViT-Ti with a light decoder (demo, benches).
PRESETS: dict[str, dict[str, Any]] = {
    "nano": dict(emb_dim=64, depth=2, num_heads=4, dec_emb_dim=32, dec_depth=1, dec_num_heads=4),
    "tiny": dict(emb_dim=192, depth=12, num_heads=3, dec_emb_dim=128, dec_depth=2, dec_num_heads=4),
    "small": dict(emb_dim=384, depth=12, num_heads=6, dec_emb_dim=512, dec_depth=8, dec_num_heads=16),
    "base": dict(emb_dim=768, depth=12, num_heads=12, dec_emb_dim=512, dec_depth=8, dec_num_heads=16),
    "large": dict(emb_dim=1024, depth=24, num_heads=16, dec_emb_dim=512, dec_depth=8, dec_num_heads=16),
    "huge": dict(emb_dim=1280, depth=32, num_heads=16, dec_emb_dim=512, dec_depth=8, dec_num_heads=16),
}

MASKING_MODES = ("per_sample", "reference")
# How the model runs, not what it is: left out of config.json and free to change on resume.
RUNTIME_FIELDS = ("attention", "grad_checkpointing")
FORMAT_VERSION = 1  # of config.json; raise it when a change would make older code misread a file
# Of a fine-tuned classifier's config.json (its own layout around the encoder's config), likewise.
CLASSIFIER_FORMAT_VERSION = 1


class ConfigError(ValueError):
    """A configuration that cannot describe a working model or run."""


@dataclass
class M3AEConfig:
    """Everything needed to rebuild an M3AE; saved as config.json beside the weights.

    `vocab_size=0` gives an image-only model (the MAE baseline): no text parameters at all.
    """

    image_size: int = 256  # input image side, pixels
    patch_size: int = 16  # patch side, pixels (image_size must be a multiple)
    in_chans: int = 3  # image channels
    emb_dim: int = 768  # encoder width
    depth: int = 12  # encoder blocks
    num_heads: int = 12  # encoder attention heads
    dec_emb_dim: int = 512  # decoder width
    dec_depth: int = 8  # decoder blocks
    dec_num_heads: int = 16  # decoder attention heads
    mlp_ratio: float = 4.0  # MLP hidden width / block width
    vocab_size: int = 30522  # text vocabulary (0: image-only MAE, no text parameters)
    text_length: int = 64  # caption tokens kept (longer captions are truncated)
    use_type_embedding: bool = True  # add a learned image / text type embedding to each token
    output_head_depth: int = 0  # hidden layers of the output heads (0: one linear layer)
    drop: float = 0.0  # dropout rate
    att_drop: float = 0.0  # attention dropout rate
    drop_path: float = 0.0  # stochastic depth rate
    image_mask_ratio: float = 0.75  # share of image patches hidden
    text_mask_ratio: float = 0.75  # share of caption tokens hidden
    image_loss_weight: float = 1.0  # weight of the pixel reconstruction loss
    text_loss_weight: float = 0.5  # weight of the masked-word loss
    norm_pix_loss: bool = False  # targets are per-patch normalised pixels (MAE's option)
    # "per_sample": independent mask per sample, text ratio over real tokens only (our default).
    # "reference": one permutation for the batch over all text positions (the authors' code).
    masking: str = "per_sample"
    # "sdpa": fused scaled_dot_product_attention (ours); "explicit": softmax(QK^T) with padded-key
    # scores replaced by -1e7, as the authors compute it (reference-equivalent benchmarking).
    # Runtime switch, not architecture (not saved in config.json, may change on resume; also
    # M3AE.set_attention).
    attention: str = field(default="sdpa", compare=False)
    layer_norm_eps: float = 1e-6  # LayerNorm epsilon
    # Runtime switch: recompute block activations in backward (less memory, slower); not saved in
    # config.json, may change on resume; also M3AE.set_grad_checkpointing.
    grad_checkpointing: bool = field(default=False, compare=False)
    preset: str | None = field(default=None, compare=False)  # size preset applied first (nano ... huge)

    def __post_init__(self) -> None:
        self.validate()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "M3AEConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], "preset": name, **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "M3AEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - {"model_type", "format_version"})
        if unknown:
            raise ConfigError(f"unknown model config keys: {unknown}")
        check_format_version(data, FORMAT_VERSION)
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """Architecture and objective: what a checkpoint's config.json holds (no runtime switches)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RUNTIME_FIELDS}

    def to_json(self) -> str:
        return json.dumps({"model_type": "m3ae", "format_version": FORMAT_VERSION, **self.to_dict()}, indent=2)

    # -- derived sizes ------------------------------------------------------------------------
    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_chans

    @property
    def has_text(self) -> bool:
        return self.vocab_size > 0

    def num_parameters(self) -> int:
        """The model's parameter count, from the sizes alone (nothing is allocated)."""
        def transformer(d: int, depth: int) -> int:
            h = int(d * self.mlp_ratio)
            block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)
            return depth * block + 2 * d

        def head(d: int, out: int) -> int:
            k = self.output_head_depth
            return (2 * d if k else 0) + k * (d * d + 3 * d) + d * out + out

        d, dd, text = self.emb_dim, self.dec_emb_dim, self.has_text
        n = d + self.patch_dim * d + d + dd  # cls, image embedding, image mask token
        n += (self.vocab_size * d + dd) if text else 0
        n += (d + dd) * (2 if text else 1) if self.use_type_embedding else 0
        n += transformer(d, self.depth) + d * dd + dd + transformer(dd, self.dec_depth)
        n += head(dd, self.patch_dim) + (head(dd, self.vocab_size) if text else 0)
        return n

    def check_types(self) -> None:
        """Each field holds a value of its declared type (config.json may hold anything)."""
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            if kind == "bool":
                ok = isinstance(value, bool)
            elif kind == "int":
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif kind == "float":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            else:  # str, str | None
                ok = isinstance(value, str) or (value is None and "None" in kind)
            if not ok:
                raise ConfigError(f"{f.name} must be {'a finite float' if kind == 'float' else kind}, "
                                  f"got {_short(value)}")

    def validate(self) -> None:
        self.check_types()
        for name in ("image_size", "patch_size", "in_chans", "emb_dim", "depth", "num_heads", "dec_emb_dim",
                     "dec_depth", "dec_num_heads", "text_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("vocab_size", "output_head_depth", "image_loss_weight", "text_loss_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("mlp_ratio", "layer_norm_eps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.patch_size <= 0 or self.image_size <= 0:
            raise ConfigError("image_size and patch_size must be positive")
        if self.image_size % self.patch_size != 0:
            raise ConfigError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        for name in ("image_mask_ratio", "text_mask_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        for dim, heads, what in ((self.emb_dim, self.num_heads, "emb_dim"),
                                 (self.dec_emb_dim, self.dec_num_heads, "dec_emb_dim")):
            if heads <= 0 or dim % heads != 0:
                raise ConfigError(f"{what} {dim} is not divisible by its number of heads {heads}")
            if dim % 4 != 0:
                raise ConfigError(f"{what} {dim} must be divisible by 4 (2-D sin-cos positions)")
        if self.attention not in ("sdpa", "explicit"):
            raise ConfigError(f"attention must be 'sdpa' or 'explicit', got {self.attention!r}")
        if self.masking not in MASKING_MODES:
            raise ConfigError(f"masking must be one of {MASKING_MODES}, got {self.masking!r}")
        if self.vocab_size < 0 or self.text_length <= 0:
            raise ConfigError("vocab_size must be >= 0 and text_length > 0")
        for name in ("drop", "att_drop", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1)")


def check_format_version(data: dict[str, Any], newest: int) -> None:
    """A file of a later layout is refused, not misread. A file without format_version predates the
    field: layout 1."""
    version = data.get("format_version", 1)
    if type(version) is not int or not 1 <= version <= newest:
        raise ConfigError(f"format_version {_short(version)}: this m3ae reads format_version 1 to {newest} "
                          "(a newer m3ae wrote it? upgrade)")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# The seeds a run, an evaluation or a command takes: numpy's legacy seeding range, which every
# generator seeded from them (torch, numpy, seed + rank, seed + 1000 x source) accepts.
MAX_SEED = 2**32 - 1
# The largest batch a run, an evaluation or a command takes: 2**20 is far past any published batch
# (CLIP's 32768, SigLIP's largest 10**6), so a larger value is a typo, refused here with its name
# instead of failing deep inside an allocation.
MAX_BATCH_SIZE = 2**20


def physical_memory() -> int | None:
    """This machine's memory in bytes; None where the OS does not say (not POSIX)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_memory(config: M3AEConfig, memory_bytes: int | None = None) -> None:
    """Refuse, before allocating anything, a model whose fp32 parameters alone exceed the machine's
    memory (a hostile or mistyped config.json: depth 1000000 would otherwise allocate for minutes)."""
    # Parameters plus the sin-cos position tables (buffers: image_size or text_length alone can be huge).
    n = config.num_parameters() + (config.num_patches + config.text_length) * (config.emb_dim + config.dec_emb_dim)
    if memory_bytes is None:
        memory_bytes = physical_memory()
        if memory_bytes is None:  # not POSIX: no check
            return
    if 4 * n > memory_bytes:
        raise ConfigError(f"the model would have {n:,} parameters and position entries "
                          f"({4 * n / 2**30:.1f} GiB in fp32), more "
                          f"than this machine's memory ({memory_bytes / 2**30:.1f} GiB)")
