"""Map the authors' Flax parameter names and layouts to this package's state-dict names.

Flax paths are joined with '/', without the leading 'params' collection, e.g.
`encoder/Block_0/Attention_0/Dense_0/kernel`. Dense kernels are (in, out): transposed here.
"""
from __future__ import annotations

import re
from typing import Mapping

import numpy as np
import torch

_TOP = {
    "cls_token": "cls_token",
    "image_mask_embedding": "image_mask_token",
    "text_mask_embedding": "text_mask_token",
    "encoder_image_type_embedding": "encoder_image_type",
    "encoder_text_type_embedding": "encoder_text_type",
    "decoder_image_type_embedding": "decoder_image_type",
    "decoder_text_type_embedding": "decoder_text_type",
    "text_embedding/embedding": "text_embedding.weight",
    "image_embedding/kernel": "image_embedding.weight",
    "image_embedding/bias": "image_embedding.bias",
    "decoder_input_projection/kernel": "decoder_input_projection.weight",
    "decoder_input_projection/bias": "decoder_input_projection.bias",
}
_BLOCK = {
    "LayerNorm_0/scale": "norm1.weight", "LayerNorm_0/bias": "norm1.bias",
    "LayerNorm_1/scale": "norm2.weight", "LayerNorm_1/bias": "norm2.bias",
    "Attention_0/Dense_0/kernel": "attn.qkv.weight", "Attention_0/Dense_0/bias": "attn.qkv.bias",
    "Attention_0/Dense_1/kernel": "attn.proj.weight", "Attention_0/Dense_1/bias": "attn.proj.bias",
    "TransformerMLP_0/fc1/kernel": "mlp.fc1.weight", "TransformerMLP_0/fc1/bias": "mlp.fc1.bias",
    "TransformerMLP_0/fc2/kernel": "mlp.fc2.weight", "TransformerMLP_0/fc2/bias": "mlp.fc2.bias",
}
_HEADS = {"decoder_image_output": "image_head", "decoder_text_output": "text_head"}


def torch_name(flax_name: str, output_head_depth: int = 0) -> str:
    """Our state-dict key for one Flax parameter path (without the 'params/' prefix)."""
    if flax_name in _TOP:
        return _TOP[flax_name]
    m = re.fullmatch(r"(encoder|decoder)/Block_(\d+)/(.+)", flax_name)
    if m and m.group(3) in _BLOCK:
        return f"{m.group(1)}.blocks.{m.group(2)}.{_BLOCK[m.group(3)]}"
    m = re.fullmatch(r"(encoder|decoder)/LayerNorm_0/(scale|bias)", flax_name)
    if m:
        return f"{m.group(1)}.norm.{'weight' if m.group(2) == 'scale' else 'bias'}"
    m = re.fullmatch(r"(decoder_image_output|decoder_text_output)/(Dense|LayerNorm)_(\d+)/(kernel|bias|scale)",
                     flax_name)
    if m:
        head, kind, index, leaf = _HEADS[m.group(1)], m.group(2), int(m.group(3)), m.group(4)
        suffix = "weight" if leaf in ("kernel", "scale") else "bias"
        if kind == "Dense":
            # Dense_0..Dense_{depth-1} are hidden layers; Dense_{depth} is the output layer.
            return f"{head}.{'out' if index == output_head_depth else f'hidden.{index}'}.{suffix}"
        # LayerNorm_0 is the input norm (depth > 0); LayerNorm_{i+1} follows hidden layer i.
        return f"{head}.{'input_norm' if index == 0 else f'hidden_norms.{index - 1}'}.{suffix}"
    raise KeyError(f"unknown Flax parameter {flax_name!r}")


def flax_name(torch_key: str, output_head_depth: int = 0) -> str:
    """The Flax parameter path that `torch_name` maps to `torch_key` (its inverse), so errors can
    name tensors as the checkpoint spells them."""
    top = {v: k for k, v in _TOP.items()}
    if torch_key in top:
        return top[torch_key]
    block = {v: k for k, v in _BLOCK.items()}
    m = re.fullmatch(r"(encoder|decoder)\.blocks\.(\d+)\.(.+)", torch_key)
    if m and m.group(3) in block:
        return f"{m.group(1)}/Block_{m.group(2)}/{block[m.group(3)]}"
    m = re.fullmatch(r"(encoder|decoder)\.norm\.(weight|bias)", torch_key)
    if m:
        return f"{m.group(1)}/LayerNorm_0/{'scale' if m.group(2) == 'weight' else 'bias'}"
    m = re.fullmatch(r"(image_head|text_head)\.(out|hidden\.\d+|input_norm|hidden_norms\.\d+)\.(weight|bias)",
                     torch_key)
    if m:
        head = {v: k for k, v in _HEADS.items()}[m.group(1)]
        part, leaf = m.group(2), m.group(3)
        if part == "out" or part.startswith("hidden."):
            index = output_head_depth if part == "out" else int(part.split(".")[1])
            return f"{head}/Dense_{index}/{'kernel' if leaf == 'weight' else 'bias'}"
        index = 0 if part == "input_norm" else int(part.split(".")[1]) + 1
        return f"{head}/LayerNorm_{index}/{'scale' if leaf == 'weight' else 'bias'}"
    raise KeyError(f"no Flax parameter maps to {torch_key!r}")


def flax_to_state_dict(params: Mapping[str, np.ndarray], output_head_depth: int = 0) -> dict[str, torch.Tensor]:
    """Flat {flax path: array} -> {our name: tensor}, transposing Dense kernels."""
    state: dict[str, torch.Tensor] = {}
    for name, value in params.items():
        name = name[len("params/"):] if name.startswith("params/") else name
        key = torch_name(name, output_head_depth)
        if key in state:
            raise ValueError(f"two Flax parameters map to {key!r}")
        tensor = torch.from_numpy(np.array(value, dtype=np.float32, copy=True))
        if name.endswith("kernel"):
            tensor = tensor.T.contiguous()
        state[key] = tensor
    return state
