"""Resuming a run from a checkpoint folder (m3ae.checkpoint), into the run's own model and optimizer.

`restore` finds the checkpoint (`"auto"`: the newest intact one in the run folder), refuses one of
another architecture, reports (or refuses) settings changed since it was written, and loads its
weights into the model the run already built (no second model: on a large model that is the
memory and the init time of a whole copy), then the RNG. The optimizer state is loaded by
`Resumed.load_optimizer` once the optimizer exists (after DDP/FSDP wrapping). The learning-rate
schedule is a function of the step (m3ae.optim.lr_at), so the step is its whole state; the data
stream's position goes to the loader as `Resumed.data_state`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import distributed as dist_utils
from ..checkpoint import RUN_CONFIG_NAME, list_checkpoints, load_train_state, newest_intact
from ..config import M3AEConfig
from ..model import CONFIG_NAME, WEIGHTS_NAME, M3AE
from ..validate import check_safetensors, read_model_config
from .config import TrainConfig, check_resume_changes
from .rng import set_rng_state

log = logging.getLogger(__name__)


@dataclass
class Resumed:
    """What a run continues from, once the weights and RNG are loaded."""
    path: Path  # the checkpoint folder
    step: int  # optimiser steps done
    skipped: int  # of those, non-finite steps whose update was skipped
    optimizer_state: dict[str, Any]
    data_state: dict[str, Any] | None  # the stream position, for the loader
    pending_metrics: torch.Tensor | None  # the unlogged steps of a partial log window
    threads: int | None = None  # the torch CPU threads it ran with (None: an older checkpoint)
    precision: str | None = None  # the mode its precision setting resolved to (None: an older checkpoint)
    threads_settled: bool = False  # auto threads: measured beside the loader workers, fixed for the run

    def load_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> None:
        dist_utils.load_optimizer_state(model, optimizer, self.optimizer_state, fsdp)


@dataclass
class _Read:
    """A checkpoint folder read and checked, not yet loaded. `weights` is None when the folder
    holds another architecture (refused by the caller, not skipped as unreadable)."""
    config: M3AEConfig
    weights: dict[str, torch.Tensor] | None
    state: dict[str, Any] | None


def restore(resume: str | None, out_dir: Path, model: M3AE, config: TrainConfig, *, rank: int = 0,
            world_size: int = 1, allow_changes: bool = False, root: str | Path | None = None) -> Resumed | None:
    """Load the checkpoint `resume` names into `model` and the RNG: None (a fresh run), "auto" (the
    newest intact checkpoint in `out_dir`, None if there is none) or a checkpoint folder. Raises
    ValueError for a checkpoint of another architecture, ConfigError (m3ae.config) for changed
    settings that break exactness unless `allow_changes`; runtime switches (threads,
    grad_checkpointing, logging, ...) may change. `root`: the run's movable folder (see pretrain)."""
    if resume is None:
        earlier = list_checkpoints(out_dir)
        if earlier:  # a fresh run here would prune by step number among the earlier run's checkpoints
            raise ValueError(f"{out_dir} holds checkpoints of an earlier run (newest {earlier[-1][1].name}): "
                             "continue it with --resume auto, or start a new run in another --out")
        return None
    if resume == "auto":
        found = newest_intact(out_dir, lambda p: _read(p, model))
        if found is None:
            return None
        path, read = found
    else:
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint to resume from not found: {path}")
        read = _read(path, model)
    if read.weights is None or read.state is None:
        mine = config.model.to_dict()
        diff = {k: (v, mine.get(k)) for k, v in read.config.to_dict().items() if mine.get(k) != v}
        raise ValueError(f"{path} holds a model with another configuration {diff}")
    model.load_weights(read.weights, source=str(path / WEIGHTS_NAME))
    saved_yaml = path / RUN_CONFIG_NAME
    if saved_yaml.is_file():
        for line in check_resume_changes(saved_yaml.read_text(), config, allow_changes, str(path), root,
                                         stream_parts=_stream_parts(read.state), world_size=world_size,
                                         run_dir=out_dir):
            if rank == 0:
                log.warning("changed since the checkpoint: %s", line)
    if rank == 0 and resume != "auto":  # only once the checkpoint is accepted: a refusal moves nothing
        _set_aside_later_checkpoints(path, out_dir)
    state = read.state
    saved_world = state.get("world_size")
    if rank == 0 and saved_world is not None and int(saved_world) != world_size:
        log.warning("changed since the checkpoint: processes %d -> %d (not exact: masks and augmentation are "
                    "drawn per process, so the run continues differently from an uninterrupted one)",
                    int(saved_world), world_size)
    set_rng_state(state["rng"])
    if rank > 0:  # the saved RNG is rank 0's; keep the other ranks' streams distinct
        torch.manual_seed(config.seed + rank + 1_000_003 * int(state["step"]))
    resumed = Resumed(path, int(state["step"]), int(state.get("skipped_steps", 0)), state["optimizer"],
                      state.get("data"), state.get("pending_metrics"),
                      _int_or_none(state.get("threads")),
                      state.get("precision") if isinstance(state.get("precision"), str) else None,
                      threads_settled=state.get("threads_settled") is True)
    if rank == 0:
        log.info("resuming from %s at step %d", path, resumed.step)
    return resumed


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _stream_parts(state: dict[str, Any]) -> int | None:
    """The number of shares a checkpoint's stream position was saved with; None where its data has
    no stream source (or no position). An unreadable position is the loader's error to name."""
    data = state.get("data")
    stream = data.get("stream") if isinstance(data, dict) else None
    parts = stream.get("parts") if isinstance(stream, dict) else None
    return parts if isinstance(parts, int) else None


def _set_aside_later_checkpoints(path: Path, out_dir: Path) -> None:
    """Resuming this folder's run from an older checkpoint abandons the steps after it: their
    checkpoints would be taken up again by `--resume auto` (two timelines in one run). They are
    moved, not deleted, to OUT/checkpoints-abandoned/."""
    from ..checkpoint import checkpoint_root

    root = checkpoint_root(out_dir)
    if path.resolve().parent != root.resolve():
        return
    step = next((s for s, p in list_checkpoints(out_dir) if p.name == path.name), None)
    later = [p for s, p in list_checkpoints(out_dir) if step is not None and s > step]
    if not later:
        return
    aside = Path(out_dir) / "checkpoints-abandoned"
    aside.mkdir(exist_ok=True)
    for p in later:
        target = aside / p.name
        if target.exists():  # abandoned twice at the same step: keep both
            target = aside / f"{p.name}.{len(list(aside.iterdir()))}"
        p.rename(target)
    log.warning("resuming from %s: moved the %d later checkpoint(s) of the steps it abandons to %s",
                path.name, len(later), aside)


def _read(path: Path, model: M3AE) -> _Read:
    """config.json, the weights (header checked against `model` before any tensor is read) and the
    train state, onto the CPU; `model` is not touched, so an unreadable checkpoint (tried by
    newest_intact before the previous one) leaves it as it was."""
    from safetensors.torch import load_file

    saved = read_model_config(path / CONFIG_NAME)
    if saved.to_dict() != model.config.to_dict():  # architecture + objective; runtime switches excluded
        return _Read(saved, None, None)
    check_safetensors(path / WEIGHTS_NAME, model.state_dict())
    weights = load_file(str(path / WEIGHTS_NAME), device="cpu")
    return _Read(saved, weights, load_train_state(path))
