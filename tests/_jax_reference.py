"""Shared access to the authors' JAX reference fixtures (tests/fixtures/jax_reference)."""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import torch

from m3ae import M3AE, Masks
from m3ae.interop.convert import model_from_params

FIXTURES = Path(__file__).parent / "fixtures" / "jax_reference"
NPZ = FIXTURES / "tiny.npz"
CHECKPOINT = FIXTURES / "tiny_checkpoint.pkl"


@functools.lru_cache(maxsize=1)
def arrays() -> dict[str, np.ndarray]:
    with np.load(NPZ, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@functools.lru_cache(maxsize=1)
def info() -> dict:
    return json.loads((FIXTURES / "tiny.json").read_text())


def group(prefix: str) -> dict[str, np.ndarray]:
    """{name without prefix: array} for every key under `prefix`."""
    return {k[len(prefix):]: v for k, v in arrays().items() if k.startswith(prefix)}


def t(key: str) -> torch.Tensor:
    return torch.from_numpy(arrays()[key].copy())


def reference_model(params: dict[str, np.ndarray] | None = None) -> M3AE:
    """Our model from the fixture's initial parameters, in reference mode (shared masks, batch
    averaging), as the authors' code runs."""
    converted = model_from_params(group("params/") if params is None else params, image_size=32,
                                  text_length=16)
    config = dataclasses.replace(converted.model.config, masking="reference")
    model = M3AE(config)
    model.load_state_dict(converted.model.state_dict())
    return model


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image = t("inputs/image").permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    return image, t("inputs/text").long(), t("inputs/text_padding_mask") > 0


def shared_ids(key: str, batch: int = 3) -> torch.Tensor:
    return t(key).long()[None].expand(batch, -1).contiguous()


def call_masks() -> Masks:
    a = arrays()
    return Masks(shared_ids("masking/image_ids_shuffle"), int(a["masking/image_keep_len"]),
                 shared_ids("masking/text_ids_shuffle"), int(a["masking/text_keep_len"]))


def to_flax_layout(name: str, tensor: torch.Tensor) -> np.ndarray:
    """Our tensor back in the Flax layout of parameter `name` (kernels transposed)."""
    value = tensor.detach().cpu().numpy()
    return value.T if name.endswith("kernel") else value
