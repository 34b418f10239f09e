"""Turn the authors' Flax parameters into an `M3AE`: infer the config, map names, check coverage.

Shapes give every size except the numbers of attention heads (and the image size, which only
sets the fixed position tables). Heads come from, in order: the caller, the checkpoint's saved
variant, the authors' presets by width. Every Flax tensor must land on exactly one of our
parameters and every parameter must be filled; otherwise `ConversionError` names the culprits.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from ..config import M3AEConfig
from ..model import M3AE
from .flax_names import flax_name, flax_to_state_dict, torch_name
from .jax_checkpoint import JaxCheckpoint, load_jax_checkpoint, params_from_mapping

# Heads by width in the authors' presets (small/base/large/huge, decoder 512) and ours (nano/tiny).
ENCODER_HEADS = {64: 4, 192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
DECODER_HEADS = {32: 4, 128: 4, 512: 16}
# The authors' `model_type` presets: (emb_dim, num_heads, dec_emb_dim, dec_num_heads). A saved
# variant's plain num_heads is the flag default when model_type is set, so model_type wins.
AUTHOR_PRESETS = {"small": (384, 6, 512, 16), "base": (768, 12, 512, 16), "large": (1024, 16, 512, 16),
                  "huge": (1280, 16, 512, 16), "debug": (1024, 16, 512, 16)}
DEFAULT_IMAGE_SIZE = 256
DEFAULT_TEXT_LENGTH = 64


class ConversionError(ValueError):
    """The parameters do not describe an M3AE/MAE this package can rebuild exactly."""


@dataclass
class Converted:
    model: M3AE
    kind: str  # "M3AE" (image + text) or "MAE" (image only)
    notes: list[str] = field(default_factory=list)  # guesses and their sources


def _variant_value(variant: Mapping[str, Any], name: str) -> Any:
    """A model setting from the authors' flattened variant ('m3ae.num_heads', 'mae.num_heads')."""
    for key in (name, f"m3ae.{name}", f"mae.{name}", f"model.{name}"):
        if key in variant and variant[key] is not None:
            return variant[key]
    return None


def _variant_heads(variant: Mapping[str, Any], emb_dim: int, dec_emb_dim: int,
                   notes: list[str]) -> tuple[Any, Any]:
    model_type = _variant_value(variant, "model_type")
    if model_type in AUTHOR_PRESETS:
        width, heads, dec_width, dec_heads = AUTHOR_PRESETS[model_type]
        if (width, dec_width) == (emb_dim, dec_emb_dim):
            return heads, dec_heads
        notes.append(f"ignored model_type {model_type!r} in the variant: its widths do not match")
    return _variant_value(variant, "num_heads"), _variant_value(variant, "dec_num_heads")


def _block_count(params: Mapping[str, np.ndarray], tower: str) -> int:
    indices = {int(m.group(1)) for k in params if (m := re.match(rf"{tower}/Block_(\d+)/", k))}
    if indices != set(range(len(indices))):
        raise ConversionError(f"{tower} blocks are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def _require(params: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in params:
        raise ConversionError(f"missing Flax parameter {name!r}; is this an M3AE/MAE checkpoint?")
    return params[name]


def _heads(width: int, given: int | None, variant_value: Any, table: dict[int, int],
           what: str, notes: list[str]) -> int:
    if given:
        return int(given)
    if variant_value:
        notes.append(f"{what} = {variant_value} (from the checkpoint's variant)")
        return int(variant_value)
    if width in table:
        notes.append(f"{what} = {table[width]} (preset for width {width}; override if different)")
        return table[width]
    if width % 64 == 0:
        notes.append(f"{what} = {width // 64} (GUESSED: head size 64; pass the real value)")
        return width // 64
    raise ConversionError(f"cannot tell {what} for width {width}: pass it explicitly")


def infer_config(params: Mapping[str, np.ndarray], variant: Mapping[str, Any] | None = None, *,
                 patch_size: int | None = None, num_heads: int | None = None,
                 dec_num_heads: int | None = None, image_size: int | None = None,
                 text_length: int | None = None, notes: list[str] | None = None) -> M3AEConfig:
    """The M3AEConfig that the Flax parameter shapes (and the saved variant) describe."""
    variant = variant or {}
    notes = notes if notes is not None else []
    kernel = _require(params, "image_embedding/kernel")
    patch_dim, emb_dim = (int(s) for s in kernel.shape)
    dec_emb_dim = int(_require(params, "decoder_input_projection/kernel").shape[1])

    patch_size = patch_size or _variant_value(variant, "patch_size")
    if patch_size:
        patch_size = int(patch_size)
        in_chans, rest = divmod(patch_dim, patch_size * patch_size)
        if rest or in_chans <= 0:
            raise ConversionError(f"patch size {patch_size} does not fit image_embedding input "
                                  f"{patch_dim} (= patch_size^2 x channels)")
    else:
        in_chans = 3
        patch_size = math.isqrt(patch_dim // 3)
        if patch_size * patch_size * 3 != patch_dim:
            raise ConversionError(f"image_embedding input {patch_dim} is not p*p*3: pass --patch-size")
        notes.append(f"patch_size = {patch_size} (from image_embedding, assuming 3 channels)")
    if in_chans != 3:
        notes.append(f"in_chans = {in_chans} (image_embedding input {patch_dim} / patch {patch_size}^2)")
    if text_length is not None and int(text_length) < 1:
        raise ConversionError(f"text_length must be >= 1, got {text_length}")

    depth = _block_count(params, "encoder")
    dec_depth = _block_count(params, "decoder")
    mlp_hidden = int(_require(params, "encoder/Block_0/TransformerMLP_0/fc1/kernel").shape[1]) \
        if depth else 4 * emb_dim
    mlp_ratio = mlp_hidden / emb_dim
    if dec_depth:
        dec_hidden = int(_require(params, "decoder/Block_0/TransformerMLP_0/fc1/kernel").shape[1])
        if dec_hidden != int(dec_emb_dim * mlp_ratio):
            raise ConversionError(f"encoder and decoder MLP ratios differ ({mlp_ratio} vs "
                                  f"{dec_hidden / dec_emb_dim}); not supported")
    vocab = int(params["text_embedding/embedding"].shape[0]) if "text_embedding/embedding" in params else 0
    heads = [int(m.group(1)) for k in params if (m := re.match(r"decoder_image_output/Dense_(\d+)/", k))]
    if not heads:
        raise ConversionError("missing Flax parameters decoder_image_output/Dense_*")
    image_size = image_size or _variant_value(variant, "image_size") or next(
        (v for k, v in variant.items() if k.endswith("data.image_size") and v), None)
    if not image_size:
        image_size = DEFAULT_IMAGE_SIZE
        notes.append(f"image_size = {image_size} (default; the model takes any size divisible by the patch)")

    extra: dict[str, Any] = {}
    for name in ("image_mask_ratio", "text_mask_ratio", "drop", "att_drop", "drop_path"):
        value = _variant_value(variant, name)
        if value is not None:
            extra[name] = float(value)
    for name in ("image_loss_weight", "text_loss_weight"):
        if variant.get(name) is not None:
            extra[name] = float(variant[name])
    if vocab and text_length is None:  # a longest caption the weights cannot tell (sinusoidal positions)
        notes.append(f"text_length = {DEFAULT_TEXT_LENGTH} (default: the longest caption, in tokens; longer "
                     "needs --text-length)")
    variant_heads, variant_dec_heads = _variant_heads(variant, emb_dim, dec_emb_dim, notes)
    return M3AEConfig(
        image_size=int(image_size), patch_size=patch_size, in_chans=in_chans, emb_dim=emb_dim,
        depth=depth, dec_emb_dim=dec_emb_dim, dec_depth=dec_depth, mlp_ratio=mlp_ratio,
        num_heads=_heads(emb_dim, num_heads, variant_heads, ENCODER_HEADS,
                         "num_heads", notes),
        dec_num_heads=_heads(dec_emb_dim, dec_num_heads, variant_dec_heads,
                             DECODER_HEADS, "dec_num_heads", notes),
        vocab_size=vocab, text_length=DEFAULT_TEXT_LENGTH if text_length is None else int(text_length),
        use_type_embedding="encoder_image_type_embedding" in params,
        output_head_depth=max(heads), **extra)


def convert_params(params: Mapping[str, np.ndarray], config: M3AEConfig) -> dict[str, torch.Tensor]:
    """Flax params -> our state dict for `config`; every tensor used exactly once, shapes checked."""
    params = params_from_mapping(params)
    unknown = []
    for name in params:
        try:
            torch_name(name, config.output_head_depth)
        except KeyError:
            unknown.append(name)
    if unknown:
        raise ConversionError(f"{len(unknown)} Flax tensor(s) have no place in an M3AE: {sorted(unknown)[:10]}")
    state = flax_to_state_dict(params, config.output_head_depth)
    with torch.device("meta"):  # shapes only: no memory for the reference model
        expected = {k: v.shape for k, v in M3AE(config).state_dict().items()}
    # Named as the checkpoint spells them (Flax paths), with shapes in Flax's layout (kernels (in, out)).
    depth = config.output_head_depth

    def flax_shape(key: str, shape) -> tuple[int, ...]:
        return tuple(shape)[::-1] if flax_name(key, depth).endswith("kernel") else tuple(shape)

    unused = sorted(flax_name(k, depth) for k in set(state) - set(expected))
    missing = sorted(flax_name(k, depth) for k in set(expected) - set(state))
    wrong = sorted(f"{flax_name(k, depth)}: {flax_shape(k, state[k].shape)} vs {flax_shape(k, expected[k])}"
                   for k in set(state) & set(expected) if state[k].shape != expected[k])
    if unused or missing or wrong:
        parts = [f"unused {unused[:10]}" if unused else "", f"missing {missing[:10]}" if missing else "",
                 f"shape mismatch {wrong[:10]}" if wrong else ""]
        raise ConversionError("the Flax parameters do not match the inferred model: "
                              + "; ".join(p for p in parts if p))
    return state


def model_from_params(params: Mapping[str, np.ndarray], variant: Mapping[str, Any] | None = None,
                      **overrides: Any) -> Converted:
    """Build our model from a flat {flax path: array}; `overrides` go to `infer_config`."""
    params = params_from_mapping(params)
    notes: list[str] = []
    config = infer_config(params, variant, notes=notes, **overrides)
    state = convert_params(params, config)
    model = M3AE(config)
    model.load_weights(state, source="converted JAX parameters")
    return Converted(model=model, kind="M3AE" if config.has_text else "MAE", notes=notes)


def load_jax_model(path: str, **overrides: Any) -> tuple[Converted, JaxCheckpoint]:
    """Read a checkpoint of the authors' code (safely) and build the equivalent `M3AE`."""
    ckpt = load_jax_checkpoint(path)
    return model_from_params(ckpt.params, ckpt.variant, **overrides), ckpt
