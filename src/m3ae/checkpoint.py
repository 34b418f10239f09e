"""Training checkpoints: a folder per step, written atomically, newest-k kept.

    OUT/checkpoints/step_00001000/
        model.safetensors, config.json   # loadable alone with M3AE.from_pretrained
        train_state.pt                   # optimiser, step, RNG, data position: weights_only-loadable
        run_config.yaml                  # the full run configuration
A checkpoint is built in a hidden temp folder and renamed into place, so a crash mid-write never
leaves a folder that looks complete.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_NAME = "train_state.pt"
RUN_CONFIG_NAME = "run_config.yaml"
_STEP_DIR = re.compile(r"step_(\d{8,})$")


def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and (path / STATE_NAME).is_file() and (path / "model.safetensors").is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def save_checkpoint(out_dir: str | os.PathLike, step: int, model, train_state: dict[str, Any],
                    run_config_yaml: str, keep_last: int = 3) -> Path:
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    torch.save(train_state, tmp / STATE_NAME)
    (tmp / RUN_CONFIG_NAME).write_text(run_config_yaml)
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step: move the old one aside first, then swap
        trash = root / f".old-step_{step:08d}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    if keep_last > 0:
        for _, old in list_checkpoints(out_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_train_state(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The training state; never unpickles arbitrary objects (weights_only=True)."""
    path = Path(checkpoint_dir) / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {STATE_NAME} in {checkpoint_dir}")
    return torch.load(path, map_location="cpu", weights_only=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
