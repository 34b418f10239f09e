"""The pretraining loop: one process now; rank/world hooks so DDP/FSDP drop in."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import distributed as dist_utils
from ..checkpoint import RUN_CONFIG_NAME, checkpoint_root, clean_stale, load_train_state, newest_intact, save_checkpoint
from ..files import FolderLock
from ..model import M3AE
from ..optim import build_optimizer, lr_at, set_lr
from ..perf import batch_train_flops, device_name, table_peak
from ..precision import autocast as precision_autocast, uses_bf16
from ..preprocessing import Preprocessing
from ..data.loader import build_train_data, loader_error, merge_data_states, next_batch, stop_workers
from ..threads import ThreadChoice, torch_threads
from .config import TrainConfig, check_resume_changes, to_yaml
from .metrics import METRICS_NAME, MetricsLog, window_row
from .rng import rng_state, set_rng_state
from .signals import StopRequest
from .step import TrainStep
from .tracking import Trackers

@dataclass
class TrainResult:
    out_dir: Path
    step: int  # optimiser steps done
    status: str  # "finished" | "stopped" (stop-at-step or a signal)
    checkpoint: Path | None
    last_loss: float | None = None
    skipped_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def pretrain(config: TrainConfig, out_dir: str | Path, *, resume: str | None = None,
             stop_at_step: int | None = None, rank: int = 0, world_size: int = 1,
             on_log: Callable[[dict[str, Any]], None] | None = None,
             model_hook: Callable[[M3AE], torch.nn.Module] | None = None,
             allow_changes: bool = False) -> TrainResult:
    """Pretrain an M3AE. `resume`: None, "auto" (newest intact checkpoint in out_dir, if any) or a path;
    settings changed since that checkpoint are reported, and those that break exactness refused
    unless `allow_changes`. Rank 0 holds out_dir's lock for the whole run: a second run on the same
    folder is refused. Runs with `config.threads` torch threads (m3ae.threads), restored after."""
    config.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with FolderLock(out_dir) if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            for name in clean_stale(out_dir):
                print(f"removed {name} left in {checkpoint_root(out_dir)} by an interrupted run", file=sys.stderr)
        with torch_threads(config.threads, config.data.num_workers) as threads:
            return _pretrain(config, out_dir, resume, stop_at_step, rank, world_size, on_log, model_hook,
                             allow_changes, threads)


def _pretrain(config: TrainConfig, out_dir: Path, resume: str | None, stop_at_step: int | None, rank: int,
              world_size: int, on_log: Callable[[dict[str, Any]], None] | None,
              model_hook: Callable[[M3AE], torch.nn.Module] | None, allow_changes: bool,
              threads: ThreadChoice) -> TrainResult:
    is_main = rank == 0
    # Under torchrun each process drives cuda:LOCAL_RANK (CPU: gloo, every process on the CPU).
    device = dist_utils.pick_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    info = dist_utils.DistInfo(rank, world_size, device.index or 0, device,
                               torch.distributed.get_backend() if world_size > 1 else None)
    fsdp = config.distributed.fsdp
    use_bf16 = uses_bf16(config.precision, device)
    micro_batch, remainder = divmod(config.batch_size, world_size * config.grad_accum)
    if remainder or micro_batch == 0:
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of processes x grad_accum "
                         f"({world_size} x {config.grad_accum})")

    torch.manual_seed(config.seed)  # the same initial weights on every rank (FSDP does not broadcast)
    model = M3AE(config.model).to(device)
    if rank > 0:
        torch.manual_seed(config.seed + rank)  # then distinct dropout / drop-path streams per rank
    start_step, skipped, data_state, optim_state, carried = 0, 0, None, None, None
    checkpoint_dir, loaded = None, None
    if resume == "auto":
        found = newest_intact(out_dir, lambda p: (M3AE.from_pretrained(p), load_train_state(p)))
        if found is not None:
            checkpoint_dir, (loaded, state) = found
    elif resume:
        checkpoint_dir = Path(resume)
        if not checkpoint_dir.is_dir():
            raise FileNotFoundError(f"checkpoint to resume from not found: {checkpoint_dir}")
        loaded, state = M3AE.from_pretrained(checkpoint_dir), load_train_state(checkpoint_dir)
    if checkpoint_dir is not None:
        if loaded.config.to_dict() != config.model.to_dict():
            diff = {k: (v, config.model.to_dict()[k]) for k, v in loaded.config.to_dict().items()
                    if config.model.to_dict().get(k) != v}
            raise ValueError(f"{checkpoint_dir} holds a model with another configuration {diff}")
        model.load_state_dict(loaded.state_dict())
        saved_yaml = checkpoint_dir / RUN_CONFIG_NAME
        if saved_yaml.is_file():
            for line in check_resume_changes(saved_yaml.read_text(), config, allow_changes, str(checkpoint_dir)):
                if is_main:
                    print(f"changed since the checkpoint: {line}", file=sys.stderr)
        optim_state = state["optimizer"]
        set_rng_state(state["rng"])
        if rank > 0:  # the saved RNG is rank 0's; keep the other ranks' streams distinct
            torch.manual_seed(config.seed + rank + 1_000_003 * int(state["step"]))
        start_step, skipped, data_state = int(state["step"]), int(state.get("skipped_steps", 0)), state.get("data")
        carried = state.get("pending_metrics")  # the unlogged steps of a partial log window
        if is_main:
            print(f"resuming from {checkpoint_dir} at step {start_step}", file=sys.stderr)
    if model_hook is None and world_size > 1:
        model_hook = lambda m: dist_utils.wrap_model(m, info, fsdp)  # noqa: E731
    run_model = model_hook(model) if model_hook else model
    # After wrapping: FSDP2 swaps in sharded parameters, and the optimizer must hold those.
    optimizer = build_optimizer(model, config.peak_lr(), config.optim.weight_decay,
                                (config.optim.beta1, config.optim.beta2), config.optim.eps,
                                config.optim.decay_mode)
    if optim_state is not None:
        dist_utils.load_optimizer_state(model, optimizer, optim_state, fsdp)
    if config.compile:
        run_model = torch.compile(run_model)

    start_micro = start_step * config.grad_accum
    if data_state is not None:
        start_micro = int(data_state.get("next_micro_batch", start_micro))
    data = build_train_data(config.data, config.model, seed=config.seed, micro_batch=micro_batch,
                            start_micro_batch=start_micro, rank=rank, world_size=world_size,
                            resume_state=data_state,
                            static_shapes=config.compile if config.static_shapes is None else config.static_shapes)
    if is_main:
        print(f"data: {data.description}", file=sys.stderr)
        print(f"device: {device_name(device)}, precision {'bf16 autocast' if use_bf16 else 'fp32'} "
              f"({config.precision}), threads {threads}", file=sys.stderr)
    trackers = Trackers(config, out_dir, is_main)
    metrics = MetricsLog(out_dir / METRICS_NAME, is_main, trackers)
    metrics.truncate_after(start_step)
    run_yaml = to_yaml(config)
    if is_main:
        (out_dir / "run_config.yaml").write_text(run_yaml)
    # viz_every: fixed samples drawn once, a reconstruction grid every K steps (rank 0 only).
    viz = None
    if config.viz_every > 0 and is_main:
        from ..viz.training import TrainingViz
        viz = TrainingViz.for_run(config, out_dir, data.tokenizer)

    eval_copy: M3AE | None = None  # under FSDP: rank 0's unsharded copy, reused

    def whole_model() -> M3AE:
        """The model as one module for eval / viz on rank 0. FSDP shards the parameters, so the
        ranks gather the full state and rank 0 loads it into a plain copy (one extra model there)."""
        nonlocal eval_copy
        if not (fsdp and world_size > 1):
            return model
        state = dist_utils.full_model_state(model, fsdp)
        if not is_main:
            return model  # not run: viz and eval_sets exist on rank 0 only
        if eval_copy is None:
            eval_copy = M3AE(config.model).to(device)
        eval_copy.load_state_dict(state)
        return eval_copy

    # Checkpoints carry the tokenizer and the image rule: the folder alone is enough to use the model.
    preprocessing = Preprocessing.from_stats(config.model.image_size, config.data.normalization,
                                             square=config.data.square, pad_value=config.data.pad_value)

    saving = False  # a failure while saving is not followed by another save attempt

    def checkpoint(step: int, micro: int, rng: dict[str, Any] | None = None) -> Path | None:
        # Full (unsharded) state on rank 0: it resumes with any number of processes.
        nonlocal saving
        saving = True
        model_state, optim_full = dist_utils.full_state_dicts(model, optimizer, fsdp)
        data_state = _gather_data_state(data.state(micro), world_size)
        path = None
        if is_main:
            train_state = {"step": step, "optimizer": optim_full, "rng": rng or rng_state(),
                           "data": data_state, "skipped_steps": skipped, "world_size": world_size,
                           "pending_metrics": torch.stack(pending).cpu() if pending else None}
            path = save_checkpoint(out_dir, step, _Weights(model, model_state, data.tokenizer, preprocessing),
                                   train_state, run_yaml, config.keep_last)
        dist_utils.barrier(info)
        saving = False
        return path

    end = config.steps if stop_at_step is None else min(stop_at_step, config.steps)
    result = TrainResult(out_dir, start_step, "finished", None, skipped_steps=skipped)
    pending: list[torch.Tensor] = []  # per-step [loss, image, text, acc, grad_norm] kept on device
    if carried is not None:  # so the first row after a resume covers the same steps as a straight run's
        pending = list(carried.to(device))
    nonfinite_run, last_ckpt_step = 0, start_step
    window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
    # Achieved model FLOP/s (analytic, m3ae.perf) and MFU where the device's peak is known.
    window_flops = 0.0
    peak_tflops = config.peak_tflops or table_peak(device_name(device), "bf16" if use_bf16 else "fp32")
    train_step = TrainStep(model, run_model, optimizer, device=device, autocast=precision_autocast(device, use_bf16),
                           clip_grad=config.optim.clip_grad, grad_accum=config.grad_accum,
                           world_size=world_size, fsdp=fsdp)

    def micro_batches():
        """The step's micro-batches from the loader; the data wait and the window's samples and
        FLOPs (host-side shapes: no sync) are counted on the way."""
        nonlocal data_wait, window_samples, window_flops
        for _ in range(config.grad_accum):
            t0 = time.perf_counter()
            batch = next_batch(batches).to(device, non_blocking=True)
            data_wait += time.perf_counter() - t0
            window_samples += batch.size * world_size
            window_flops += batch_train_flops(batch, config.model) * world_size
            yield batch

    progress = _progress(config, start_step, is_main)
    eval_sets = _eval_sets(config) if is_main else None
    run_model.train()
    step, step_rng = start_step, None
    batches = iter(data.batches)  # a DataLoader starts its workers here: stopped in the finally below
    try:
        with StopRequest() as stop:
            while step < end:
                # The RNG as this step starts: what a checkpoint written after a failure mid-step needs.
                step_rng = rng_state() if world_size == 1 else None
                lr = lr_at(step, config.peak_lr(), config.warmup(), config.steps, config.optim.min_lr)
                set_lr(optimizer, lr)
                step_metrics, grad_norm = train_step.backward(micro_batches())
                # The one per-step sync: a non-finite step must not touch the weights or Adam moments,
                # and (distributed) every rank must stop at the same step if any was signalled.
                finite, stop_now = _step_flags(grad_norm, stop, info)
                train_step.update(finite)
                if finite:
                    nonfinite_run = 0
                else:
                    skipped += 1
                    nonfinite_run += 1
                    print(f"step {step + 1}: non-finite loss or gradient, update skipped "
                          f"({nonfinite_run} in a row)", file=sys.stderr)
                    if nonfinite_run >= config.max_nonfinite:
                        raise FloatingPointError(f"{nonfinite_run} non-finite steps in a row at step {step + 1}; "
                                                 "stopping (lower the learning rate or check the data)")
                step += 1
                step_rng = None  # the step is whole: a checkpoint from here on takes the RNG as it is
                pending.append(torch.cat([step_metrics, grad_norm.float().reshape(1)]))
                if progress is not None:
                    progress.update(1)
                # Rows at log steps and the run's end; a stop elsewhere saves its partial window
                # in the checkpoint instead (the resumed run logs it with the rest of the window).
                if step % config.log_every == 0 or step == config.steps:
                    values = dist_utils.all_reduce_mean(torch.stack(pending), info).cpu().tolist()
                    pending.clear()
                    elapsed = time.perf_counter() - window_start
                    row = window_row(step, values, lr, window_samples / max(elapsed, 1e-9),
                               data_wait / max(elapsed, 1e-9), skipped)
                    row["model_tflops"] = window_flops / max(elapsed, 1e-9) / 1e12
                    row["threads"] = threads.threads
                    if peak_tflops:
                        row["mfu"] = row["model_tflops"] / (peak_tflops * world_size)
                    if data.counter.total_bad:
                        row["bad_samples"] = data.counter.total_bad
                    window_start, window_samples, data_wait, window_flops = time.perf_counter(), 0, 0.0, 0.0
                    result.history.append(row)
                    result.last_loss = row.get("loss", float("nan"))
                    metrics.write(row)
                    if on_log is not None:
                        on_log(row)
                    if progress is not None:
                        extra = {"mfu": f"{100 * row['mfu']:.0f}%"} if "mfu" in row else {}
                        progress.set_postfix(loss=f"{row['loss']:.4f}", sps=f"{row['samples_per_s']:.1f}", **extra)
                do_viz = config.viz_every > 0 and step % config.viz_every == 0
                do_eval = config.eval_every > 0 and (step % config.eval_every == 0 or step == end)
                if do_viz or do_eval:
                    whole = whole_model()  # every rank calls it: a collective under FSDP
                    if viz is not None and do_viz:
                        trackers.image("reconstruction", viz(whole, step), step)
                    if eval_sets is not None and do_eval:
                        metrics.write(_eval_row(step, whole, eval_sets, device, on_log))
                    run_model.train()
                if step % config.ckpt_every == 0 and step < end:
                    result.checkpoint = checkpoint(step, step * config.grad_accum)
                    last_ckpt_step = step
                if stop_now:
                    result.status = "stopped"
                    if is_main and stop.signal is not None:
                        name = signal.Signals(stop.signal).name
                        print(f"\nreceived {name}: stopping after step {step}", file=sys.stderr)
                    break
    except Exception as err:
        # Stopping for any error (bad data, a diverged loss, a dead loader worker, a full disk, a bug)
        # must not lose the steps done since the last checkpoint: the weights hold whole steps only
        # (non-finite updates were skipped). One process only: a save on one rank while the others
        # wait in a collective would hang.
        stop_workers(batches)
        if progress is not None:
            progress.close()
        if world_size == 1 and step > last_ckpt_step and not saving:
            try:
                saved = checkpoint(step, step * config.grad_accum, step_rng)
                print(f"saved {saved} before stopping", file=sys.stderr)
            except Exception as save_err:  # the first error is the one to report
                print(f"could not save a checkpoint before stopping: {save_err}", file=sys.stderr)
        named = loader_error(err)
        if named is not None and named is not err:
            raise named from err
        raise
    finally:
        stop_workers(batches)
    if progress is not None:
        progress.close()
    if step < config.steps:
        result.status = "stopped"
    if step == start_step and checkpoint_dir is not None and checkpoint_dir.parent == checkpoint_root(out_dir):
        result.checkpoint = checkpoint_dir  # nothing done since it was written (a finished run re-run)
    elif step != last_ckpt_step or result.checkpoint is None:
        result.checkpoint = checkpoint(step, step * config.grad_accum)
    result.step = step
    result.skipped_steps = skipped
    metrics.close(result.history[-1] if result.history else None)
    return result


def _gather_data_state(state: dict[str, Any], world_size: int) -> dict[str, Any]:
    """Stream positions live per (rank, worker) share: every rank's go into the state rank 0 saves."""
    if world_size <= 1 or not torch.distributed.is_initialized():
        return state
    states: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(states, state)
    return merge_data_states(state, states)


class _Weights:
    """What save_checkpoint needs from a model (save_pretrained), with an already gathered state."""

    def __init__(self, model: M3AE, state: dict[str, torch.Tensor], tokenizer=None,
                 preprocessing: Preprocessing | None = None):
        self.model, self.state, self.tokenizer, self.preprocessing = model, state, tokenizer, preprocessing

    def save_pretrained(self, directory: Path) -> Path:
        return self.model.save_pretrained(directory, state_dict=self.state, tokenizer=self.tokenizer,
                                          preprocessing=self.preprocessing)


def _step_flags(grad_norm: torch.Tensor, stop: StopRequest, info: dist_utils.DistInfo) -> tuple[bool, bool]:
    """(update is finite, stop now) in one host sync; one tiny MAX all-reduce when distributed."""
    flags = torch.stack([(~torch.isfinite(grad_norm)).float(),
                         grad_norm.new_tensor(float(stop.signal is not None), dtype=torch.float32)])
    if info.enabled:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    nonfinite, stop_now = flags.tolist()
    return nonfinite == 0.0, stop_now > 0.0


# -- periodic representation check (fast probe + kNN); see m3ae.eval.monitor ----------------------
def _eval_sets(config: TrainConfig):
    if config.eval_every <= 0:
        return None
    from ..eval.monitor import monitor_sets
    return monitor_sets(config.eval_train, config.eval_val, config.model.image_size, config.data.normalization)


def _eval_row(step: int, model: M3AE, sets, device, on_log) -> dict[str, Any]:
    from ..eval.monitor import probe_metrics
    row = {"step": step, **probe_metrics(model, *sets, device=device)}
    if on_log is not None:
        on_log(row)
    return row


def _progress(config: TrainConfig, start: int, is_main: bool):
    if not (config.progress and is_main):
        return None
    from tqdm import tqdm
    return tqdm(total=config.steps, initial=start, desc="pretrain", unit="step", dynamic_ncols=True,
                mininterval=1.0, file=sys.stderr)
