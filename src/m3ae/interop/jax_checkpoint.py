"""Read the authors' JAX checkpoints into plain numpy: parameters, Adam moments, step, variant.

Accepted files (detected by content, not by name):
- cloudpickle of {step, epoch, variant, state} as the authors' training scripts write it, read
  with `SafeUnpickler` (nothing in the file is imported or run);
- a Flax msgpack file (`flax.serialization.to_bytes` of params or of a TrainState);
- an .npz of arrays keyed by Flax path ('params/encoder/...' or 'encoder/...').
Parameters are found at state.params["params"], state.params, params["params"], params or the top
level, whichever holds the model's tree.
"""
from __future__ import annotations

import os
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..numpy_files import check_numpy_file
from .msgpack_reader import load_flax_msgpack
from .safe_pickle import Opaque, field, find_opaque, safe_load, unwrap


class CheckpointFormatError(ValueError):
    """The file is not a checkpoint this reader understands, or holds no M3AE/MAE parameters."""


@dataclass
class JaxCheckpoint:
    params: dict[str, np.ndarray]  # flat Flax paths without the 'params/' collection prefix
    format: str  # "pickle" | "msgpack" | "npz"
    location: str  # where the parameters were found
    step: int | None = None  # the training loop's step, as saved beside the state
    state_step: int | None = None  # optimizer updates done (TrainState.step)
    epoch: int | None = None
    variant: dict[str, Any] = dc_field(default_factory=dict)
    adam_mu: dict[str, np.ndarray] | None = None
    adam_nu: dict[str, np.ndarray] | None = None
    adam_count: int | None = None

    @property
    def num_parameters(self) -> int:
        return int(sum(v.size for v in self.params.values()))


_MARKERS = ("image_embedding", "cls_token")


def _looks_like_params(tree: Any) -> bool:
    return isinstance(tree, dict) and any(m in tree for m in _MARKERS)


def flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts of arrays -> {'a/b/c': array}. Anything else at a leaf is an error."""
    tree = unwrap(tree)
    out: dict[str, np.ndarray] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}/{key}" if prefix else str(key)))
        return out
    if isinstance(tree, (np.ndarray, np.generic, int, float)) and not isinstance(tree, bool):
        return {prefix: np.asarray(tree)}
    what = tree.name if isinstance(tree, Opaque) else type(tree).__name__
    raise CheckpointFormatError(f"unexpected {what} at parameter path {prefix!r} (expected arrays)")


_PLACES = [(("state", "params", "params"), 'state.params["params"]'),
           (("state", "params"), "state.params"),
           (("params", "params"), 'params["params"]'),
           (("params",), "params"),
           ((), "top level")]


def _locate(root: Any) -> tuple[Any, str]:
    for path, where in _PLACES:
        obj = root
        try:
            for key in path:
                obj = field(obj, key)
        except (KeyError, TypeError):
            continue
        obj = unwrap(obj)
        if _looks_like_params(obj):
            return obj, where
    raise CheckpointFormatError(
        "no M3AE/MAE parameters found (looked for a tree with 'image_embedding' and 'cls_token' at "
        + ", ".join(w for _, w in _PLACES) + ")")


def _as_int(value: Any) -> int | None:
    try:
        return int(np.asarray(value))
    except (TypeError, ValueError):
        return None


def _adam_from_pickle(state: Any) -> tuple[Any, Any, Any] | None:
    for adam in find_opaque(state, "ScaleByAdamState"):
        attrs = adam.attributes()
        if len(adam.args) == 3:
            return adam.args
        if {"count", "mu", "nu"} <= set(attrs):
            return attrs["count"], attrs["mu"], attrs["nu"]
    return None


def _adam_from_tree(tree: Any) -> tuple[Any, Any, Any] | None:
    # msgpack TrainState: optax namedtuples become dicts with their field names.
    if isinstance(tree, dict):
        if {"count", "mu", "nu"} <= set(tree):
            return tree["count"], tree["mu"], tree["nu"]
        for value in tree.values():
            found = _adam_from_tree(value)
            if found is not None:
                return found
    return None


def _moments(tree: Any) -> dict[str, np.ndarray]:
    located, _ = _locate(tree) if not _looks_like_params(unwrap(tree)) else (unwrap(tree), "")
    return flatten(located)


def _from_tree(root: Any, fmt: str) -> JaxCheckpoint:
    params, where = _locate(root)
    ckpt = JaxCheckpoint(params=flatten(params), format=fmt, location=where)
    if isinstance(root, dict):
        ckpt.step = _as_int(root.get("step")) if not isinstance(root.get("step"), dict) else None
        ckpt.epoch = _as_int(root.get("epoch"))
        if isinstance(root.get("variant"), dict):
            ckpt.variant = dict(root["variant"])
    state = None
    try:
        state = field(root, "state")
    except (KeyError, TypeError):
        state = root if fmt == "msgpack" else None
    if state is not None:
        try:
            ckpt.state_step = _as_int(field(state, "step"))
        except (KeyError, TypeError):
            pass
        adam = _adam_from_pickle(state) if fmt == "pickle" else _adam_from_tree(
            unwrap(state).get("opt_state") if isinstance(unwrap(state), dict) else None)
        if adam is not None:
            count, mu, nu = adam
            try:
                ckpt.adam_mu, ckpt.adam_nu = _moments(mu), _moments(nu)
                ckpt.adam_count = _as_int(count)
            except CheckpointFormatError:
                pass  # moments are a bonus; the parameters are what matter
    return ckpt


def _from_npz(path: Path) -> JaxCheckpoint:
    try:
        check_numpy_file(path)
    except ValueError as err:
        raise CheckpointFormatError(str(err)) from None
    with np.load(path, allow_pickle=False) as data:  # allow_pickle=False: arrays only
        arrays = {k: data[k] for k in data.files}
    # A 'params/' group beside others (inputs, gradients, optimizer state) holds the parameters.
    params = {k[len("params/"):]: v for k, v in arrays.items() if k.startswith("params/")}
    location = "params/" if params else "top level"
    arrays = params or arrays
    if not any(k.split("/")[0] in _MARKERS for k in arrays):
        groups = sorted({k.split("/")[0] for k in arrays})[:10]
        raise CheckpointFormatError(f"{path} holds no M3AE/MAE parameters (no 'image_embedding/...' at the "
                                    f"top level or under 'params/'; groups: {groups})")
    return JaxCheckpoint(params=arrays, format="npz", location=location)


# What a corrupt or hostile file can make the readers raise: numpy on a bad dtype or shape
# (TypeError, ValueError), pickle's builders on wrong arguments (TypeError, AttributeError),
# a self-containing tree (RecursionError), a length field of terabytes (MemoryError: the pickle
# module allocates what a header declares before reading it), a broken zip member (BadZipFile, zlib).
_CORRUPT = (pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError, AttributeError, EOFError,
            RecursionError, MemoryError, OverflowError, struct.error, zipfile.BadZipFile, zlib.error)


def load_jax_checkpoint(path: str | os.PathLike) -> JaxCheckpoint:
    """Read a checkpoint of the authors' code (pickle, Flax msgpack or npz) without running it.
    Whatever is wrong with the file is a CheckpointFormatError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(2)
    try:
        if zipfile.is_zipfile(path):
            return _from_npz(path)
        if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO opcode
            return _from_tree(safe_load(path), "pickle")
        if head and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):  # msgpack map
            return _from_tree(load_flax_msgpack(path.read_bytes()), "msgpack")
    except _CORRUPT as err:
        detail = "a length in it is larger than memory" if isinstance(err, MemoryError) else str(err)
        message = detail if detail.startswith(str(path)) else f"{path}: {detail}"
        if isinstance(err, pickle.UnpicklingError):  # refused by the safe reader: the caller may want to know
            raise type(err)(message) from err
        raise CheckpointFormatError(f"{message} ({type(err).__name__})" if not isinstance(
            err, CheckpointFormatError) else message) from err
    raise CheckpointFormatError(
        f"{path}: unrecognised checkpoint format (expected the authors' pickle, a Flax msgpack "
        "file or an .npz of arrays)")


def params_from_mapping(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flat {flax path: array}, with or without the 'params/' prefix -> without it."""
    return {(k[len("params/"):] if k.startswith("params/") else k): np.asarray(v)
            for k, v in arrays.items()}
