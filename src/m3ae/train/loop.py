"""The pretraining loop: setup (model, resume, wrapping, optimizer, data), the steps (one step is
m3ae.train.step.TrainStep) with their log windows, viz / eval and checkpoints, and the end of the run.
One process, or one of a torchrun group (the caller's m3ae.distributed.DistInfo)."""
from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, cast

import torch

from .. import distributed as dist_utils
from ..checkpoint import RUN_CONFIG_NAME, checkpoint_root, clean_stale, save_checkpoint
from ..files import FolderLock
from ..model import M3AE
from ..optim import build_optimizer, lr_at, set_lr
from ..perf import batch_train_flops, device_name, table_peak
from ..precision import resolve_precision, slow_precision_warning, step_context
from ..preprocessing import Preprocessing
from ..data.loader import TrainData, build_train_data, loader_error, merge_data_states, next_batch, stop_workers
from ..host_allocator import KeptMemoryLimit, keep_freed_memory, resident_bytes
from ..load_watch import LoadWatch
from ..threads import ThreadChoice, ThreadTuner, torch_threads
from .config import TrainConfig, to_yaml
from .metrics import METRICS_NAME, MetricsLog, window_row
from .resume import Resumed, restore
from .rng import rng_state
from .signals import StopRequest, StopWhileWaiting
from .step import TrainStep
from .tracking import Trackers

log = logging.getLogger(__name__)

# Log rows kept in TrainResult.history. A row is ~2 KB (its step_losses included): kept without
# end, a long run's history alone grows by ~0.2 GB per million steps at log_every=10 (over 1 GB at
# log_every=1). metrics.jsonl has every row.
HISTORY_ROWS = 10_000


@dataclass
class TrainResult:
    out_dir: Path
    step: int  # optimiser steps done
    status: str  # "finished" | "stopped" (stop-at-step or a signal)
    checkpoint: Path | None
    last_loss: float | None = None
    skipped_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # the newest HISTORY_ROWS log rows
    history_dropped: int = 0  # older rows left out of `history` (all are in metrics.jsonl)
    precision: str | None = None  # the mode `config.precision` resolved to on this device (fp32, bf16, ...)

    def add_row(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if len(self.history) > HISTORY_ROWS:
            del self.history[0]
            self.history_dropped += 1


def pretrain(config: TrainConfig, out_dir: str | Path, *, resume: str | None = None,
             stop_at_step: int | None = None, dist: dist_utils.DistInfo | None = None,
             on_log: Callable[[dict[str, Any]], None] | None = None,
             model_hook: Callable[[M3AE], torch.nn.Module] | None = None,
             allow_changes: bool = False, root: str | Path | None = None) -> TrainResult:
    """Pretrain an M3AE. `resume`: None, "auto" (newest intact checkpoint in out_dir, if any) or a path;
    settings changed since that checkpoint are reported, and those that break exactness refused
    unless `allow_changes` (m3ae.train.resume). `dist`: the process group the caller joined
    (m3ae.distributed.init_distributed, as `m3ae pretrain` does under torchrun); default one process
    on `config.device`. Rank 0 holds out_dir's lock for the whole run: a second run on the same
    folder is refused. Runs with `config.threads` torch threads (m3ae.threads) and, on CPU, glibc
    keeping freed memory (`config.host_allocator`, m3ae.host_allocator); both restored after. `root`:
    a folder holding out_dir that may move (a study folder): files inside it that the settings name
    are recorded relative to it (m3ae.train.config.PATH_SETTINGS), so the run resumes after a move."""
    config.validate()
    if stop_at_step is not None and stop_at_step < 1:
        raise ValueError(f"stop_at_step must be >= 1, got {stop_at_step}")
    # Past the end it would not stop the run at all: it would train to the end, with neither the
    # stop nor the resume command asked for. Refused, before any work, rather than warned: a warning
    # goes by while a long run trains, and a run that went past the step meant cannot be taken back.
    if stop_at_step is not None and stop_at_step > config.steps:
        raise ValueError(f"stop_at_step (--stop-at-step) {stop_at_step} is past the run's end "
                         f"(steps={config.steps}): stop at a step up to it, or raise steps to train longer")
    dist = dist or dist_utils.DistInfo(device=dist_utils.pick_device(config.device))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with FolderLock(out_dir) if dist.is_main else contextlib.nullcontext():
        if dist.is_main:
            for name in clean_stale(out_dir):
                log.info("removed %s left in %s by an interrupted run", name, checkpoint_root(out_dir))
        with (torch_threads(config.threads, config.data.num_workers) as threads,
              keep_freed_memory(config.host_allocator, dist.device.type) as allocator):
            if dist.is_main:
                log.info("host allocator: %s", allocator)
            run = _setup(config, out_dir, dist, threads, KeptMemoryLimit(allocator), resume, allow_changes,
                         model_hook, on_log, root)
            end = config.steps if stop_at_step is None else stop_at_step
            if end <= run.start_step and dist.is_main and run.start_step < config.steps:
                log.warning("the run is already at step %d: stopping at step %d trains nothing", run.start_step,
                            end)
            return run.train(end)


# -- setup: model (+ resume), wrapping and optimizer, data ------------------------------------------
def _setup(config: TrainConfig, out_dir: Path, dist: dist_utils.DistInfo, threads: ThreadChoice,
           kept_memory: KeptMemoryLimit, resume: str | None, allow_changes: bool,
           model_hook: Callable[[M3AE], torch.nn.Module] | None,
           on_log: Callable[[dict[str, Any]], None] | None, root: str | Path | None = None) -> _Run:
    micro_batch, remainder = divmod(config.batch_size, dist.world_size * config.grad_accum)
    if remainder or micro_batch == 0:
        raise ValueError(f"batch_size {config.batch_size} must be a multiple of processes x grad_accum "
                         f"({dist.world_size} x {config.grad_accum})")
    torch.manual_seed(config.seed)  # the same initial weights on every rank (FSDP does not broadcast)
    model = M3AE(config.model).to(dist.device)
    if dist.rank > 0:
        torch.manual_seed(config.seed + dist.rank)  # then distinct dropout / drop-path streams per rank
    resumed = restore(resume, out_dir, model, config, rank=dist.rank, world_size=dist.world_size,
                      allow_changes=allow_changes, root=root)
    run_model, optimizer = _wrap(config, model, dist, model_hook, resumed)
    data = _train_data(config, dist, micro_batch, resumed)
    return _Run(config, out_dir, dist, threads, kept_memory, model, run_model, optimizer, data, resumed, on_log,
                root)


# Steps of a run (fresh or resumed) before the load watch starts: the first steps' allocations and
# the loader's start-up are not the step's speed.
WATCH_SKIP = 10


def _loader_threads(threads: ThreadChoice, resumed: Resumed | None, device: torch.device,
                    world_size: int) -> tuple[ThreadChoice, ThreadTuner | None]:
    """Auto threads beside loader workers (one CPU process; m3ae.threads): a run resumed after its
    count was settled keeps that count (bit for bit as an uninterrupted run), else the first steps
    settle it (the tuner returned)."""
    if not (threads.auto and threads.loader_workers > 0 and device.type == "cpu" and world_size == 1):
        return threads, None
    assert threads.cores is not None
    if threads.threads >= threads.cores:  # nothing to give back
        return threads, None
    if (resumed is not None and resumed.threads_settled and resumed.threads is not None
            and threads.threads <= resumed.threads <= threads.cores):
        torch.set_num_threads(resumed.threads)
        return ThreadChoice(resumed.threads, f"auto: {threads.cores} usable cores, as settled before the resume",
                            threads.cores, threads.loader_workers), None
    return threads, ThreadTuner.for_run(threads, resumed.step if resumed is not None else 0)


def _wrap(config: TrainConfig, model: M3AE, dist: dist_utils.DistInfo,
          model_hook: Callable[[M3AE], torch.nn.Module] | None, resumed: Resumed | None
          ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The module the steps run (DDP / FSDP2 under torchrun, a hook's, compiled) and the optimizer."""
    fsdp = config.distributed.fsdp
    if model_hook is None and dist.world_size > 1:
        model_hook = lambda m: dist_utils.wrap_model(m, dist, fsdp)  # noqa: E731
    run_model = model_hook(model) if model_hook else model
    # After wrapping: FSDP2 swaps in sharded parameters, and the optimizer must hold those.
    optimizer = build_optimizer(model, config.peak_lr(), config.optim.weight_decay,
                                (config.optim.beta1, config.optim.beta2), config.optim.eps,
                                config.optim.decay_mode)
    if resumed is not None:
        resumed.load_optimizer(model, optimizer, fsdp)
    if config.compile:
        # torch.compile of a module returns a module (OptimizedModule); its stub says only Callable.
        run_model = cast(torch.nn.Module, torch.compile(run_model))
    return run_model, optimizer


def _train_data(config: TrainConfig, dist: dist_utils.DistInfo, micro_batch: int, resumed: Resumed | None
                ) -> TrainData:
    start_micro = resumed.step * config.grad_accum if resumed is not None else 0
    data_state = resumed.data_state if resumed is not None else None
    if data_state is not None:
        start_micro = int(data_state.get("next_micro_batch", start_micro))
    return build_train_data(config.data, config.model, seed=config.seed, micro_batch=micro_batch,
                            start_micro_batch=start_micro, rank=dist.rank, world_size=dist.world_size,
                            resume_state=data_state, pin_memory=dist.device.type == "cuda",
                            static_shapes=config.uses_static_shapes())


class _Run:
    """A run once set up: the step loop, log windows, periodic viz / eval, checkpoints and the
    end of the run, sharing the state below."""

    def __init__(self, config: TrainConfig, out_dir: Path, dist: dist_utils.DistInfo, threads: ThreadChoice,
                 kept_memory: KeptMemoryLimit, model: M3AE, run_model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, data: TrainData,
                 resumed: Resumed | None, on_log: Callable[[dict[str, Any]], None] | None,
                 root: str | Path | None = None):
        self.config, self.out_dir, self.dist, self.threads = config, out_dir, dist, threads
        self.kept_memory = kept_memory
        self.model, self.run_model, self.optimizer, self.data = model, run_model, optimizer, data
        self.resumed, self.on_log = resumed, on_log
        self.fsdp = config.distributed.fsdp
        device, is_main = dist.device, dist.is_main
        mode = resolve_precision(config.precision, device)
        self.threads, self.tuner = _loader_threads(threads, resumed, device, dist.world_size)
        self.threads_settled = self.tuner is None and threads is not self.threads  # taken from the checkpoint
        # After the tuner has settled (or from the start when there is none), follow the machine's load.
        self.watch = LoadWatch.for_run(self.threads, device.type, dist.world_size)
        self.watch_after = (resumed.step if resumed is not None else 0) + WATCH_SKIP
        threads = self.threads
        if is_main:
            log.info("data: %s", data.description)
            log.info("device: %s, precision %s (%s), threads %s", device_name(device),
                     {"bf16": "bf16 autocast", "bf32": "fp32, bf16-input matmuls"}.get(mode, mode),
                     config.precision, threads)
            slow = slow_precision_warning(mode, device)
            if slow is not None:
                log.warning("%s", slow)
        if (is_main and resumed is not None and resumed.threads is not None and device.type == "cpu"
                and resumed.threads != threads.threads):
            # The resolved count, not the setting: unset, it follows the cores and the loader workers.
            # CPU kernels split their sums by thread, so the bits differ from an uninterrupted run's.
            log.warning("changed since the checkpoint: torch threads %d -> %d (not exact: changes the float "
                        "rounding; set threads=%d to continue bit for bit)", resumed.threads, threads.threads,
                        resumed.threads)
        if is_main and resumed is not None and resumed.precision is not None and resumed.precision != mode:
            # The resolved mode, not the setting: `auto` picks per device (bf16 on CUDA and on CPUs with
            # native bf16), so the same run_config resumed on another machine can change its arithmetic.
            log.warning("changed since the checkpoint: precision %s -> %s (precision=%s resolves per device; "
                        "not exact: the step's arithmetic changes; set precision=%s to continue as it began)",
                        resumed.precision, mode, config.precision, resumed.precision)
        self.mode = mode
        self.start_step = resumed.step if resumed is not None else 0
        self.step, self.skipped = self.start_step, resumed.skipped if resumed is not None else 0
        self.stop: StopRequest | None = None  # while train() runs
        self.trackers = Trackers(config, out_dir, is_main, start_step=self.start_step)
        self.metrics = MetricsLog(out_dir / METRICS_NAME, is_main, self.trackers)
        self.metrics.truncate_after(self.start_step)
        self.run_yaml = to_yaml(config, root)
        if is_main:
            (out_dir / RUN_CONFIG_NAME).write_text(self.run_yaml)
        # viz_every: fixed samples drawn once, a reconstruction grid every K steps (rank 0 only).
        self.viz = None
        if config.viz_every > 0 and is_main:
            from ..viz.training import TrainingViz
            self.viz = TrainingViz.for_run(config, out_dir, data.tokenizer)
        self.eval_copy: M3AE | None = None  # under FSDP: rank 0's unsharded copy, reused
        # Checkpoints carry the tokenizer and the image rule: the folder alone is enough to use the model.
        self.preprocessing = Preprocessing.from_stats(config.model.image_size, config.data.normalization,
                                                      square=config.data.square, pad_value=config.data.pad_value)
        self.saving = False  # a failure while saving is not followed by another save attempt
        self.result = TrainResult(out_dir, self.start_step, "finished", None, skipped_steps=self.skipped,
                                  precision=mode)
        carried = resumed.pending_metrics if resumed is not None else None
        # Per-step [loss, image, text, acc, grad_norm] kept on device; a resumed partial window is
        # carried, so the first row after a resume covers the same steps as a straight run's.
        self.pending: list[torch.Tensor] = list(carried.to(device)) if carried is not None else []
        self.nonfinite_run, self.last_ckpt_step = 0, self.start_step
        self.window_start, self.window_samples, self.data_wait = time.perf_counter(), 0, 0.0
        self.window_loader_cpu: float | None = None  # the loader workers' CPU seconds (None: no workers)
        # Achieved model FLOP/s (analytic, m3ae.perf) and MFU where the device's peak is known.
        self.window_flops = 0.0
        self.peak_tflops = config.peak_tflops or table_peak(device_name(device), "fp32" if mode == "fp32" else "bf16")
        self.train_step = TrainStep(model, run_model, optimizer, device=device,
                                    autocast=step_context(device, mode), clip_grad=config.optim.clip_grad,
                                    grad_accum=config.grad_accum, world_size=dist.world_size, fsdp=self.fsdp)
        self.progress = _progress(config, self.start_step, is_main)
        self.eval_sets = _eval_sets(config) if is_main else None
        self.step_rng: dict[str, Any] | None = None

    # -- the loop ---------------------------------------------------------------------------------
    def train(self, end: int) -> TrainResult:
        self.run_model.train()
        self.batches = iter(self.data.batches)  # a DataLoader starts its workers here: stopped below
        try:
            with StopRequest() as stop:
                self.stop = stop
                while self.step < end and not self._step(stop, end):
                    pass
        except StopWhileWaiting as err:  # between steps: the weights hold whole steps
            self.result.status = "stopped"
            if self.progress is not None:
                self.progress.clear()
            log.warning("%s: stopping after step %d", err, self.step)
        except Exception as err:
            self._save_before_stopping()
            named = loader_error(err)
            if named is not None and named is not err:
                raise named from err
            raise
        finally:
            stop_workers(self.batches)
        return self._finish()

    def _step(self, stop: StopRequest, end: int) -> bool:
        """One optimiser step and what follows it (log row, viz / eval, checkpoint); True: stop now."""
        config = self.config
        # The RNG as this step starts: what a checkpoint written after a failure mid-step needs.
        self.step_rng = rng_state() if self.dist.world_size == 1 else None
        lr = lr_at(self.step, config.peak_lr(), config.warmup(), config.steps, config.optim.min_lr)
        set_lr(self.optimizer, lr)
        step_metrics, grad_norm = self.train_step.backward(self._micro_batches())
        # The one per-step sync: a non-finite step must not touch the weights or Adam moments,
        # and (distributed) every rank must stop at the same step if any was signalled.
        finite, stop_now = _step_flags(grad_norm, stop, self.dist)
        self.train_step.update(finite, grad_norm)
        self._count_nonfinite(finite)
        self.step += 1
        step = self.step
        self.step_rng = None  # the step is whole: a checkpoint from here on takes the RNG as it is
        self.pending.append(torch.cat([step_metrics, grad_norm.float().reshape(1)]))
        if self.progress is not None:
            self.progress.update(1)
        # Rows at log steps and the run's end; a stop elsewhere saves its partial window
        # in the checkpoint instead (the resumed run logs it with the rest of the window).
        if step % config.log_every == 0 or step == config.steps:
            self._log_window(lr)
        if self.tuner is not None:  # after the row of the steps it measured, before a checkpoint
            self._tune_threads(step)
        elif self.watch is not None and step > self.watch_after:
            self._follow_load(step)
        t0 = time.perf_counter()
        self._viz_and_eval()
        if step % config.ckpt_every == 0 and step < end:
            self.result.checkpoint = self.checkpoint(step, step * config.grad_accum)
            self.last_ckpt_step = step
        if self.watch is not None:  # not the step's time: left out of the watch's samples/s
            self.watch.exclude(time.perf_counter() - t0)
        if stop_now:
            self.result.status = "stopped"
            if self.dist.is_main and stop.signal is not None:
                name = signal.Signals(stop.signal).name
                if self.progress is not None:
                    self.progress.clear()  # the message on a line of its own, not after the bar
                log.warning("received %s: stopping after step %d", name, step)
        return stop_now

    def _micro_batches(self):
        """The step's micro-batches from the loader; the data wait and the window's samples and
        FLOPs (host-side shapes: no sync) are counted on the way."""
        world_size = self.dist.world_size
        for i in range(self.config.grad_accum):
            t0 = time.perf_counter()
            # Before a step's first batch nothing of the step is done, so a signal may stop the run
            # right there; one process only (ranks must stop at the same step).
            stop = self.stop if i == 0 and world_size == 1 else None
            with stop.waiting_for_data() if stop is not None else contextlib.nullcontext():
                batch = next_batch(self.batches)
            batch = batch.to(self.dist.device, non_blocking=True)
            self.data_wait += time.perf_counter() - t0
            if batch.loader_cpu_s is not None:
                self.window_loader_cpu = (self.window_loader_cpu or 0.0) + batch.loader_cpu_s
            if self.tuner is not None:
                self.tuner.add_batch(batch.size, batch.loader_cpu_s)
            elif self.watch is not None:
                self.watch.add_batch(batch.size, batch.loader_cpu_s)
            self.window_samples += batch.size * world_size
            self.window_flops += batch_train_flops(batch, self.config.model) * world_size
            yield batch

    def _tune_threads(self, step: int) -> None:
        """At the end of a tuner window: the thread count from the next step on (m3ae.threads)."""
        assert self.tuner is not None
        tuner = self.tuner
        n = tuner.after_step(step)
        if n is None:
            return
        torch.set_num_threads(n)
        state = f"settled at step {step}" if tuner.done else f"trying {n} over steps {step + 1}-{step + tuner.measure}"
        self.threads = ThreadChoice(n, f"auto: {tuner.cores} usable cores, {state}", tuner.cores, tuner.workers)
        if tuner.done:
            self.tuner, self.threads_settled = None, True
            if self.watch is not None:
                self.watch.count = n
        if self.dist.is_main:
            if self.progress is not None:
                self.progress.clear()
            log.info("step %d: %s (auto threads)", step, tuner.note)

    def _follow_load(self, step: int) -> None:
        """At the end of a load-watch window: another thread count, tried or kept (m3ae.load_watch)."""
        watch = self.watch
        assert watch is not None
        n = watch.after_step()
        if n is not None:
            torch.set_num_threads(n)
            self.threads = ThreadChoice(n, f"auto: {watch.cores} usable cores, following the load", watch.cores,
                                        self.threads.loader_workers)
        if watch.note and self.dist.is_main:  # a trial begun, kept or given up: said once
            if self.progress is not None:
                self.progress.clear()
            log.info("step %d: %s (auto threads)", step, watch.note)
        watch.note = ""

    def _count_nonfinite(self, finite: bool) -> None:
        if finite:
            self.nonfinite_run = 0
            return
        self.skipped += 1
        self.nonfinite_run += 1
        step = self.step + 1
        log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", step, self.nonfinite_run)
        if self.nonfinite_run >= self.config.max_nonfinite:
            raise FloatingPointError(f"{self.nonfinite_run} non-finite steps in a row at step {step}; "
                                     "stopping (lower the learning rate or check the data)")

    def _log_window(self, lr: float) -> None:
        """The log row of the steps since the last one (the one host sync of a log interval)."""
        values = dist_utils.all_reduce_mean(torch.stack(self.pending), self.dist).cpu().tolist()
        self.pending.clear()
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        row = window_row(self.step, values, lr, self.window_samples / elapsed, self.data_wait / elapsed,
                         self.skipped)
        row["model_tflops"] = self.window_flops / elapsed / 1e12
        row["threads"] = self.threads.threads
        if self.window_loader_cpu is not None:  # cores the loader workers kept busy (1.0: one whole core)
            row["loader_cores"] = self.window_loader_cpu / elapsed
        trimmed = self.kept_memory.check()
        if trimmed is not None:
            log.info("step %d: resident memory grew to %.2f GiB, more than %.0f%% over its recorded size; "
                     "returned the kept free blocks to the system (%.2f GiB now)", self.step, trimmed[0] / 2**30,
                     100 * self.kept_memory.slack, trimmed[1] / 2**30)
        rss = resident_bytes()
        if rss is not None:
            row["host_rss_gib"] = rss / 2**30
        if self.dist.device.type == "cuda":  # the allocator's own count: no device sync
            row["gpu_peak_gib"] = torch.cuda.max_memory_allocated(self.dist.device) / 2**30
        if self.peak_tflops:
            row["mfu"] = row["model_tflops"] / (self.peak_tflops * self.dist.world_size)
        if self.data.counter.total_bad:
            row["bad_samples"] = self.data.counter.total_bad
        self.window_start, self.window_samples, self.data_wait, self.window_flops = time.perf_counter(), 0, 0.0, 0.0
        self.window_loader_cpu = None
        self.result.add_row(row)
        self.result.last_loss = row.get("loss", float("nan"))
        self.metrics.write(row)
        if self.on_log is not None:
            self.on_log(row)
        if self.progress is not None:
            extra = {"mfu": f"{100 * row['mfu']:.0f}%"} if "mfu" in row else {}
            self.progress.set_postfix(loss=f"{row['loss']:.4f}", sps=f"{row['samples_per_s']:.1f}", **extra)

    def _viz_and_eval(self) -> None:
        config, step = self.config, self.step
        do_viz = config.viz_every > 0 and step % config.viz_every == 0
        # At the run's end, not at a --stop-at-step stop: an eval row there is one an uninterrupted
        # run does not write, so a stopped and resumed run's metrics.jsonl would differ from it.
        do_eval = config.eval_every > 0 and (step % config.eval_every == 0 or step == config.steps)
        if not (do_viz or do_eval):
            return
        whole = self.whole_model()  # every rank calls it: a collective under FSDP
        if self.viz is not None and do_viz:
            self.trackers.image("reconstruction", self.viz(whole, step), step)
        if self.eval_sets is not None and do_eval:
            row = _eval_row(step, whole, self.eval_sets, self.dist.device, self.on_log)
            self.metrics.write(row)
            if self.progress is not None:
                self.progress.clear()  # the line of its own, not after the bar
            log.info("step %d: linear probe top-1 %.2f %%, kNN top-1 %.2f %%", step, row["probe_top1"],
                     row["knn_top1"])
        self.run_model.train()

    def whole_model(self) -> M3AE:
        """The model as one module for eval / viz on rank 0. FSDP shards the parameters, so the
        ranks gather the full state and rank 0 loads it into a plain copy (one extra model there)."""
        if not (self.fsdp and self.dist.world_size > 1):
            return self.model
        state = dist_utils.full_model_state(self.model, self.fsdp)
        if not self.dist.is_main:
            return self.model  # not run: viz and eval_sets exist on rank 0 only
        if self.eval_copy is None:
            self.eval_copy = M3AE(self.config.model).to(self.dist.device)
        self.eval_copy.load_state_dict(state)
        return self.eval_copy

    # -- checkpoints and the end of the run --------------------------------------------------------
    def checkpoint(self, step: int, micro: int, rng: dict[str, Any] | None = None) -> Path | None:
        # Full (unsharded) state on rank 0: it resumes with any number of processes.
        self.saving = True
        world_size = self.dist.world_size
        model_state, optim_full = dist_utils.full_state_dicts(self.model, self.optimizer, self.fsdp)
        data_state = _gather_data_state(self.data.state(micro), world_size)
        path = None
        if self.dist.is_main:
            pending = self.pending
            train_state = {"step": step, "optimizer": optim_full, "rng": rng or rng_state(),
                           "data": data_state, "skipped_steps": self.skipped, "world_size": world_size,
                           "threads": self.threads.threads, "threads_settled": self.threads_settled,
                           "precision": self.mode,
                           "pending_metrics": torch.stack(pending).cpu() if pending else None}
            weights = _Weights(self.model, model_state, self.data.tokenizer, self.preprocessing)
            path = save_checkpoint(self.out_dir, step, weights, train_state, self.run_yaml, self.config.keep_last)
        dist_utils.barrier(self.dist)
        self.saving = False
        return path

    def _save_before_stopping(self) -> None:
        """Stopping for any error (bad data, a diverged loss, a dead loader worker, a full disk, a bug)
        must not lose the steps done since the last checkpoint: the weights hold whole steps only
        (non-finite updates were skipped). One process only: a save on one rank while the others
        wait in a collective would hang."""
        stop_workers(self.batches)
        if self.progress is not None:
            self.progress.close()
        if self.dist.world_size > 1 or self.step <= self.last_ckpt_step or self.saving:
            return
        try:
            saved = self.checkpoint(self.step, self.step * self.config.grad_accum, self.step_rng)
            log.warning("saved %s before stopping", saved)
        except Exception as save_err:  # the first error is the one to report
            log.error("could not save a checkpoint before stopping: %s", save_err)

    def _finish(self) -> TrainResult:
        """The last checkpoint (unless one of this step exists) and the result."""
        step, result, resumed = self.step, self.result, self.resumed
        if self.progress is not None:
            self.progress.close()
        if step < self.config.steps:
            result.status = "stopped"
        if step == self.start_step and resumed is not None and resumed.path.parent == checkpoint_root(self.out_dir):
            result.checkpoint = resumed.path  # nothing done since it was written (a finished run re-run)
        elif step != self.last_ckpt_step or result.checkpoint is None:
            result.checkpoint = self.checkpoint(step, step * self.config.grad_accum)
        result.step = step
        result.skipped_steps = self.skipped
        self.metrics.close(result.history[-1] if result.history else None)
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
    assert config.eval_train and config.eval_val  # TrainConfig.validate requires both with eval_every
    return monitor_sets(config.eval_train, config.eval_val, config.model.image_size, config.data.normalization,
                        square=config.data.square, pad_value=config.data.pad_value)


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
