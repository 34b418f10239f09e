"""The image encoder in other libraries' formats: Hugging Face transformers (ViTModel, ViTMAEModel)
and timm (VisionTransformer). Only the tensors are rewritten; no other library is imported.

What changes on the way out:
- the patch embedding: our Linear over (py, px, c)-flattened patches becomes the equivalent
  Conv2d kernel (D, C, p, p);
- positions: our fixed sin-cos table plus the image type embedding becomes one position table
  (1, 1 + N, D) for the exported image size, with a zero row for [CLS] (ours has no position);
- attention: our fused qkv (rows q | k | v) stays fused for timm, is split for transformers.
The MLP uses the tanh GELU (transformers: "gelu_pytorch_tanh", timm: act_layer="gelu_tanh").
transformers key names are written in the 4.x layout (encoder.layer.N.attention.attention.query,
...), which 4.x reads as is and 5.x maps to its own names when loading.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write, require_new_folder

FORMATS = ("hf-vit", "hf-vitmae", "timm")
# A registered timm architecture per width (timm looks the name up; `model_args` then set every size).
TIMM_ARCHS = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224",
              1024: "vit_large_patch16_224", 1280: "vit_huge_patch14_224"}


def check_image_size(image_size: int | None) -> None:
    """None means the checkpoint's size; 0 must not (it did, through `image_size or ...`)."""
    if image_size is not None and (type(image_size) is not int or image_size < 1):
        raise ValueError(f"image size must be a positive integer, got {image_size!r}")


def encoder_tensors(model, image_size: int | None = None) -> dict[str, torch.Tensor]:
    """The encoder in neutral names: patch kernel, [CLS], position table with [CLS] row, blocks, norm."""
    c = model.config
    check_image_size(image_size)
    size = image_size or c.image_size
    if size % c.patch_size:
        raise ValueError(f"image size {size} is not divisible by the patch size {c.patch_size}")
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    d, p = c.emb_dim, c.patch_size
    grid = (size // p, size // p)
    pos = model.image_positions("enc", grid).detach().float().cpu()
    if c.use_type_embedding:
        pos = pos + sd["encoder_image_type"]
    out = {
        "patch.weight": sd["image_embedding.weight"].reshape(d, p, p, c.in_chans).permute(0, 3, 1, 2),
        "patch.bias": sd["image_embedding.bias"],
        "cls": sd["cls_token"],
        "pos": torch.cat([torch.zeros(1, 1, d), pos], dim=1),
        "norm.weight": sd["encoder.norm.weight"], "norm.bias": sd["encoder.norm.bias"],
    }
    for i in range(c.depth):
        b = f"encoder.blocks.{i}."
        for name in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            for kind in ("weight", "bias"):
                out[f"{i}.{name}.{kind}"] = sd[b + f"{name}.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


def hf_state_dict(model, image_size: int | None = None) -> dict[str, torch.Tensor]:
    """transformers ViTModel / ViTMAEModel keys (4.x layout; both models share the encoder names)."""
    t = encoder_tensors(model, image_size)
    d = model.config.emb_dim
    out = {"embeddings.cls_token": t["cls"], "embeddings.position_embeddings": t["pos"],
           "embeddings.patch_embeddings.projection.weight": t["patch.weight"],
           "embeddings.patch_embeddings.projection.bias": t["patch.bias"],
           "layernorm.weight": t["norm.weight"], "layernorm.bias": t["norm.bias"]}
    for i in range(model.config.depth):
        h = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            qkv = t[f"{i}.attn.qkv.{kind}"]
            for j, name in enumerate(("query", "key", "value")):
                out[h + f"attention.attention.{name}.{kind}"] = qkv[j * d:(j + 1) * d].clone()
            out[h + f"attention.output.dense.{kind}"] = t[f"{i}.attn.proj.{kind}"]
            out[h + f"layernorm_before.{kind}"] = t[f"{i}.norm1.{kind}"]
            out[h + f"layernorm_after.{kind}"] = t[f"{i}.norm2.{kind}"]
            out[h + f"intermediate.dense.{kind}"] = t[f"{i}.mlp.fc1.{kind}"]
            out[h + f"output.dense.{kind}"] = t[f"{i}.mlp.fc2.{kind}"]
    return out


def hf_config(model, fmt: str, image_size: int | None = None) -> dict[str, Any]:
    c = model.config
    common = {"hidden_size": c.emb_dim, "num_hidden_layers": c.depth, "num_attention_heads": c.num_heads,
              "intermediate_size": int(c.emb_dim * c.mlp_ratio), "hidden_act": "gelu_pytorch_tanh",
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "layer_norm_eps": c.layer_norm_eps,
              "image_size": image_size or c.image_size, "patch_size": c.patch_size, "num_channels": c.in_chans,
              "qkv_bias": True}
    if fmt == "hf-vit":
        return {"architectures": ["ViTModel"], "model_type": "vit", **common}
    # ViTMAE: mask_ratio 0 so a plain forward sees every patch (it still permutes them unless given
    # `noise`; [CLS] does not depend on the order). Decoder sizes are recorded for completeness.
    return {"architectures": ["ViTMAEModel"], "model_type": "vit_mae", **common, "mask_ratio": 0.0,
            "decoder_hidden_size": c.dec_emb_dim, "decoder_num_hidden_layers": c.dec_depth,
            "decoder_num_attention_heads": c.dec_num_heads,
            "decoder_intermediate_size": int(c.dec_emb_dim * c.mlp_ratio), "norm_pix_loss": c.norm_pix_loss}


def hf_image_processor(preprocessing, image_size: int) -> dict[str, Any]:
    """transformers' BitImageProcessor, which has our rule: resize the shorter side to
    image_size / crop_pct, centre-crop image_size (ViTImageProcessor squashes every photo to a
    square, so a non-square photo or crop_pct < 1 gave other pixels). Same keys in 4.x and 5.x."""
    return {"image_processor_type": "BitImageProcessor", "do_convert_rgb": True, "do_resize": True,
            "size": {"shortest_edge": int(round(image_size / preprocessing.crop_pct))}, "resample": 3,
            "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(preprocessing.mean), "image_std": list(preprocessing.std)}


def timm_state_dict(model, image_size: int | None = None) -> dict[str, torch.Tensor]:
    """timm VisionTransformer keys (class token, no pooling head: num_classes=0)."""
    t = encoder_tensors(model, image_size)
    out = {"cls_token": t["cls"], "pos_embed": t["pos"], "patch_embed.proj.weight": t["patch.weight"],
           "patch_embed.proj.bias": t["patch.bias"], "norm.weight": t["norm.weight"], "norm.bias": t["norm.bias"]}
    for i in range(model.config.depth):
        for name in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.{name}.{kind}"] = t[f"{i}.{name}.{kind}"]
    return out


def timm_config(model, preprocessing, image_size: int | None = None) -> dict[str, Any]:
    """timm's hub config.json: `architecture`, `model_args` for create_model, `pretrained_cfg`."""
    c = model.config
    size = image_size or c.image_size
    if abs(c.layer_norm_eps - 1e-6) > 1e-12:
        raise ValueError(f"timm's ViT uses LayerNorm eps 1e-6; this model uses {c.layer_norm_eps}")
    name = TIMM_ARCHS.get(c.emb_dim, "vit_base_patch16_224")
    model_args = {"img_size": size, "patch_size": c.patch_size, "in_chans": c.in_chans, "embed_dim": c.emb_dim,
                  "depth": c.depth, "num_heads": c.num_heads, "mlp_ratio": c.mlp_ratio, "qkv_bias": True,
                  "class_token": True, "global_pool": "token", "act_layer": "gelu_tanh", "num_classes": 0}
    return {"architecture": name, "num_classes": 0, "num_features": c.emb_dim, "global_pool": "token",
            "model_args": model_args,
            "pretrained_cfg": {"input_size": [c.in_chans, size, size], "interpolation": preprocessing.interpolation,
                               "crop_pct": preprocessing.crop_pct, "crop_mode": "center",
                               "mean": list(preprocessing.mean), "std": list(preprocessing.std),
                               "num_classes": 0, "first_conv": "patch_embed.proj", "classifier": "head",
                               "license": "apache-2.0"}}


def export(model, preprocessing, fmt: str, out_dir: str | os.PathLike, image_size: int | None = None) -> Path:
    """Write `model`'s image encoder to `out_dir` as `fmt` (one of FORMATS): model.safetensors +
    config.json (+ preprocessor_config.json for transformers)."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
    check_image_size(image_size)  # before anything is written
    size = image_size or model.config.image_size
    out = Path(out_dir)
    # e.g. the checkpoint's own folder: its config.json and weights would be replaced by the encoder's.
    require_new_folder(out, ("model.safetensors", "config.json", "preprocessor_config.json"), "export")
    out.mkdir(parents=True, exist_ok=True)

    def write_json(name: str, data: dict) -> None:
        atomic_write(out / name, lambda p: Path(p).write_text(json.dumps(data, indent=2)))

    if preprocessing.square == "pad":  # neither transformers' processors nor timm's transforms pad
        warnings.warn(f"the checkpoint pads non-square photos to a square (square: pad, grey "
                      f"{preprocessing.pad_value}); the exported {fmt} preprocessing cannot: pad photos "
                      "yourself before it", stacklevel=2)
    if fmt == "timm":
        state, config = timm_state_dict(model, size), timm_config(model, preprocessing, size)
    else:
        state, config = hf_state_dict(model, size), hf_config(model, fmt, size)
        write_json("preprocessor_config.json", hf_image_processor(preprocessing, size))
    atomic_write(out / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    write_json("config.json", config)
    return out
