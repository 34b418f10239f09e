"""Training checkpoints: a folder per step, written atomically, newest-k kept.

    OUT/checkpoints/step_00001000/
        model.safetensors, config.json   # loadable alone with M3AE.from_pretrained
        train_state.pt                   # optimiser, step, RNG, data position: weights_only-loadable
        run_config.yaml                  # the full run configuration
A checkpoint is built in a hidden temp folder, fsynced, and renamed into place, so a crash mid-write
never leaves a folder that looks complete; what killed runs leave behind is removed by `clean_stale`.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from .files import fsync_dir, fsync_file

log = logging.getLogger(__name__)

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
    """Write the step's folder atomically. On any failure (a full disk) the temp folder is removed
    and every earlier checkpoint is left as it was."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = _aside_name(root, f".tmp-step_{step:08d}")
    trash = None
    try:
        model.save_pretrained(tmp)
        torch.save(train_state, tmp / STATE_NAME)
        (tmp / RUN_CONFIG_NAME).write_text(run_config_yaml)
        for path in tmp.iterdir():  # the data on disk before the rename makes the folder visible
            fsync_file(path)
        fsync_dir(tmp)
        if final.exists():  # re-saving a step: move the old one aside first, then swap
            trash = _aside_name(root, f".old-step_{step:08d}")
            os.replace(final, trash)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None and trash.exists() and not final.exists():
            os.replace(trash, final)  # the previous save of this step stays
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    fsync_dir(root)
    if keep_last > 0:
        for _, old in list_checkpoints(out_dir)[:-keep_last]:
            _remove(old)
    return final


def _remove(path: Path) -> None:
    """Rename aside, then delete: a kill mid-delete leaves a hidden folder (cleaned at the next
    start), never a half-deleted step folder."""
    trash = _aside_name(path.parent, f".old-{path.name}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _aside_name(root: Path, prefix: str) -> Path:
    """PREFIX-PID-RANDOM in `root`, a name nothing there has. By pid alone it was the name a killed
    process of the same pid (a restarted container's trainer) may have left a folder or file under
    (its deletion cut off, or failed on a network disk): renaming onto it raised 'Directory not
    empty' / 'Not a directory'. Such leftovers go at the next start (clean_stale)."""
    while True:
        path = root / f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        if not os.path.lexists(path):
            return path


def clean_stale(out_dir: str | os.PathLike) -> list[str]:
    """Remove what killed runs left in the checkpoint folder: temp folders (`.tmp-*`), folders set
    aside for deletion (`.old-*`) and step folders missing a file. Call only while holding the run
    folder's lock (no other run is writing there). Returns the names removed."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    complete = {path for _, path in list_checkpoints(out_dir)}
    removed = []
    for path in sorted(root.iterdir()):
        if path.name.startswith((".tmp-", ".old-")) or (_STEP_DIR.match(path.name) and path not in complete):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def newest_intact(out_dir: str | os.PathLike, load: Callable[[Path], Any]) -> tuple[Path, Any] | None:
    """The newest checkpoint that `load` reads without error, with what it returned; each one
    that fails is reported and the previous one tried (a corrupt newest checkpoint costs the
    steps since the one before, not the run)."""
    for _, path in reversed(list_checkpoints(out_dir)):
        try:
            return path, load(path)
        except Exception as err:  # any unreadable file: safetensors, torch.load, json, shapes
            log.warning("checkpoint %s is unreadable (%s: %s); falling back to the previous one", path,
                        type(err).__name__, err)
    return None


def load_train_state(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The training state; never unpickles arbitrary objects (weights_only=True)."""
    path = Path(checkpoint_dir) / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {STATE_NAME} in {checkpoint_dir}")
    return torch.load(path, map_location="cpu", weights_only=True)
