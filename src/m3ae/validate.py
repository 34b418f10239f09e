"""Checking a checkpoint folder's files before using them: every error names the file and what is
wrong, and nothing is allocated from a file's claims before they are checked.

`read_model_config` reads config.json (size, JSON, types, ranges, a parameter count that fits in
memory); `check_safetensors` reads a weights file's header only and compares every tensor's name,
dtype, shape and byte range with what the model expects.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Mapping, TypeGuard

import torch

from .config import (CLASSIFIER_FORMAT_VERSION, ConfigError, M3AEConfig, _short, check_fits_memory,
                     check_format_version)

MAX_CONFIG_BYTES = 1 << 20  # a model config is a few hundred bytes
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1}
_TORCH_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def read_model_config(path: str | os.PathLike, **overrides) -> M3AEConfig:
    """config.json -> a validated M3AEConfig that fits in this machine's memory."""
    path = Path(path)
    data = read_config_json(path)
    kind = folder_kind(data)
    if kind == "classifier":
        raise ConfigError(f"{path.parent} is a fine-tuned classifier (m3ae finetune), not an M3AE checkpoint: "
                          "load it with m3ae.eval.finetune.Classifier.from_pretrained")
    if kind in ("transformers", "timm"):
        raise ConfigError(f"{path.parent} is an encoder exported for transformers or timm (m3ae export): load "
                          "it with that library, or use the M3AE checkpoint it came from")
    try:
        config = M3AEConfig.from_dict({**data, **overrides})
        check_fits_memory(config)
    except (ConfigError, TypeError) as err:
        raise ConfigError(f"{path}: {err}") from None
    return config


def folder_kind(config: dict) -> str:
    """What a folder's config.json describes: "m3ae" (a checkpoint), "classifier" (m3ae finetune),
    "transformers" or "timm" (m3ae export; timm's own hub configs, without model_args, too)."""
    if config.get("kind") == "m3ae-classifier":
        return "classifier"
    if config.get("model_type") in ("vit", "vit_mae") or config.get("architectures"):
        return "transformers"
    if config.get("architecture"):
        return "timm"
    return "m3ae"


def read_config_json(path: str | os.PathLike) -> dict:
    """A folder's config.json as a dict: present, small, valid JSON, an object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes is too large for a model config")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:  # RecursionError: deeply nested JSON; bad UTF-8
        raise ConfigError(f"{path} is not valid JSON: {str(err)[:200]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_classifier_config(path: str | os.PathLike) -> tuple[M3AEConfig, int, str]:
    """A fine-tuned classifier's config.json -> (encoder config, num_classes, pool), checked as
    read_model_config checks a checkpoint's."""
    path = Path(path)
    data = read_config_json(path)
    if data.get("kind") != "m3ae-classifier":
        raise ConfigError(f"{path.parent} is not a fine-tuned classifier folder (m3ae finetune): its config.json "
                          "has no \"kind\": \"m3ae-classifier\"; an M3AE checkpoint loads with m3ae.load")
    try:  # before any other field: a later layout may mean them otherwise
        check_format_version(data, CLASSIFIER_FORMAT_VERSION)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    encoder, classes, pool = data.get("encoder"), data.get("num_classes"), data.get("pool", "cls")
    if not isinstance(encoder, dict):
        raise ConfigError(f"{path}: 'encoder' must be a JSON object (the encoder's M3AEConfig)")
    if type(classes) is not int or classes < 1:
        raise ConfigError(f"{path}: num_classes must be a positive integer, got {_short(classes)}")
    if pool not in ("cls", "mean"):
        raise ConfigError(f"{path}: pool must be 'cls' or 'mean', got {_short(pool)}")
    try:
        config = M3AEConfig.from_dict(encoder)
        check_fits_memory(config)
    except (ConfigError, TypeError) as err:
        raise ConfigError(f"{path}: encoder: {err}") from None
    return config, classes, pool


def check_safetensors(path: str | os.PathLike, expected: Mapping[str, torch.Tensor]) -> None:
    """The header of a safetensors file against the model's state (names, float dtypes, shapes,
    byte ranges inside the file), before any tensor is read."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConfigError(f"{path} is not a safetensors file (only {len(raw)} bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise ConfigError(f"{path}: header length {header_len} does not fit in the file ({size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, RecursionError):
            raise ConfigError(f"{path}: the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: the header is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - header_len
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"{path} does not match its config.json (missing {missing[:8]}, unexpected "
                          f"{unexpected[:8]}); it was saved from a model of another shape")
    for name, want in expected.items():
        info = header[name]
        shape, offsets = (info.get("shape"), info.get("data_offsets")) if isinstance(info, dict) else (None, None)
        if not (isinstance(info, dict) and info.get("dtype") in _DTYPE_BYTES and _int_list(shape)
                and _int_list(offsets) and len(offsets) == 2):
            raise ConfigError(f"{path}: tensor {name} has a malformed header entry")
        if info["dtype"] not in _TORCH_NAMES.values():
            raise ConfigError(f"{path}: tensor {name} is {info['dtype']}, not a float type")
        if tuple(shape) != tuple(want.shape):
            raise ConfigError(f"{path}: tensor {name} has shape {tuple(shape)}, config.json implies "
                              f"{tuple(want.shape)}; it was saved from a model of another shape")
        start, end = offsets
        if not 0 <= start <= end <= data_bytes or end - start != math.prod(shape) * _DTYPE_BYTES[info["dtype"]]:
            raise ConfigError(f"{path}: tensor {name}'s bytes {start}..{end} do not match its shape or the "
                              f"file ({data_bytes} data bytes)")


def _int_list(value: object) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                           for v in value)

