"""How many CPU threads torch uses, and how they wait.

Torch runs one OpenMP thread per core by default and those threads spin at every barrier. On a
machine with one other busy process (a browser, a second run, our own data-loader workers) a
spinning thread whose partner was descheduled burns its whole time slice, and a step becomes up to
~10x slower (BENCHMARKS.md, "busy machine"). Two rules make that collapse mild:

- `threads` (auto by default): the cores this process may use (CPU affinity and the cgroup quota)
  minus the data-loader workers that share them, at least 1. An explicit setting wins, then
  OMP_NUM_THREADS. A CPU run with loader workers then measures what the workers really use over
  its first steps and tries the step with the cores they leave idle, keeping them if the step
  runs faster (`ThreadTuner`): light loaders (small JPEGs, pre-resized shards) would otherwise
  cost the step a core they do not need.
- OpenMP threads spin only briefly before sleeping (GOMP_SPINCOUNT, see `limit_openmp_spin`), so
  a thread waiting for a descheduled partner yields its core instead of burning it.

After its first steps a training run's auto count follows the machine's load (`m3ae.load_watch`).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

# libgomp's default spins ~300k iterations (about a millisecond) before sleeping; a few thousand keeps
# the wake-up fast on a quiet machine and stops burning a shared core. Measured in BENCHMARKS.md.
OPENMP_SPIN_COUNT = "3000"
_OPENMP_WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def limit_openmp_spin(environ: dict[str, str] | None = None) -> bool:
    """Set GOMP_SPINCOUNT unless the user chose a wait policy. OpenMP reads it when torch loads its
    runtime, so this acts only before torch's first import (True when it took effect)."""
    env = os.environ if environ is None else environ
    if any(name in env for name in _OPENMP_WAIT_VARS):
        return False
    if environ is None and "torch" in sys.modules:
        return False
    env["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT
    return True


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs granted by a cgroup quota (v2 cpu.max, or v1 cfs quota/period); None when unlimited."""
    try:
        fields = (root / "cpu.max").read_text().split()
        if fields and fields[0] != "max":
            return int(fields[0]) / int(fields[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str  # how it was chosen, for the run header
    # Set by the auto rule only: the usable cores and the loader workers it counted (ThreadTuner starts from them).
    cores: int | None = None
    loader_workers: int = 0

    def __str__(self) -> str:
        return f"{self.threads} ({self.reason})"

    @property
    def auto(self) -> bool:
        return self.cores is not None


# A loader worker's core goes back to the step when the workers use less than this share of it.
# Measured on 2 cores, 1 worker, 1 vs 2 threads (BENCHMARKS.md, twelfth session): workers using
# 0.05-0.12 cores -> 2 threads 1.55x faster; 0.42 -> a tie; 0.9 -> 1 thread 1.35x faster.
LOADER_IDLE_SHARE = 0.4


def threads_beside_loader(cores: int, loader_workers: int, loader_cores: float) -> int:
    """Torch threads for a run whose loader workers were measured using `loader_cores` cores (CPU
    seconds per second): a core kept for every core's worth they use beyond LOADER_IDLE_SHARE,
    at most one per worker, the rest for the step."""
    kept = min(max(0, loader_workers), max(0, math.ceil(loader_cores - LOADER_IDLE_SHARE)))
    return max(1, cores - kept)


# A tried thread count is kept only if the step runs at least this much faster with it than with
# the count it started at: cores the loader leaves idle may be taken by other processes (a second
# run, a browser), and then more threads only wait for each other.
TRIAL_MIN_GAIN = 1.03


def trial_pays(base_rate: float, trial_rate: float) -> bool:
    """Whether a tried count's samples/s beat the starting count's by TRIAL_MIN_GAIN."""
    return trial_rate >= base_rate * TRIAL_MIN_GAIN


@dataclass
class ThreadTuner:
    """Auto threads beside loader workers, settled once, in the first steps of a CPU run that
    started at cores - workers: steps first+1 .. first+n measure the workers' CPU use and the
    step's samples/s; if the workers leave a core idle (`threads_beside_loader`), steps
    first+n+1 .. first+2n try the step with it, and the faster of the two counts is kept for the
    rest of the run (a tried count must pay by TRIAL_MIN_GAIN). Each change of the count changes
    the float rounding of what follows, so there are at most two, at fixed steps. Batches that do
    not report their workers' CPU time (an evaluation's feature loader) leave the workers'
    use unknown: every core is tried, and kept only if it pays."""

    cores: int
    workers: int
    base: int  # the starting count (cores - workers)
    first: int  # measuring starts after this step (past the workers' start-up and first fills)
    measure: int = 20  # steps per window
    trial: int | None = None  # the count being tried
    done: bool = False
    note: str = ""  # what the last decision was, for the log
    loader_cores: float | None = None  # the workers' CPU seconds per second, first window
    base_rate: float | None = None  # samples/s at `base`, first window
    _started: float | None = None
    _cpu_s: float = 0.0
    _cpu_reported: bool = False
    _samples: int = 0

    @classmethod
    def for_run(cls, choice: ThreadChoice, start_step: int, skip: int = 10, measure: int = 20) -> "ThreadTuner":
        """From step start_step + skip of this process (fresh or resumed: the workers start, and
        their shuffle buffers fill, again after a resume)."""
        assert choice.cores is not None, "tunes the auto count only"
        return cls(choice.cores, choice.loader_workers, choice.threads, start_step + skip, measure)

    def add_batch(self, samples: int, loader_cpu_s: float | None) -> None:
        """Count a batch taken for a step (loader_cpu_s: its worker's CPU seconds, Batch.loader_cpu_s)."""
        self._samples += samples
        if loader_cpu_s is not None:
            self._cpu_s += loader_cpu_s
            self._cpu_reported = True

    def after_step(self, step: int) -> int | None:
        """Call after each step. Returns the count to run with from the next step on when a window
        ends (the trial's, or the settled one: then `done`); None otherwise."""
        base_end, trial_end = self.first + self.measure, self.first + 2 * self.measure
        if step == self.first:
            self._restart()
        elif step == base_end and self._started is not None:
            wall = self._wall()
            self.base_rate = self._samples / wall
            steps = f"steps {self.first + 1}-{base_end}"
            if self._cpu_reported:
                self.loader_cores = self._cpu_s / wall
                candidate = threads_beside_loader(self.cores, self.workers, self.loader_cores)
                where = f"the loader workers used {self.loader_cores:.2f} cores over {steps}"
            else:
                candidate, where = self.cores, f"the loader workers' use unknown over {steps}"
            if candidate == self.base:
                self.done, self.note = True, f"{where}: keeping {self.base} torch thread{_s(self.base)}"
                return self.base
            self.trial = candidate
            self.note = (f"{where} ({self.base_rate:.1f} samples/s at {self.base} thread{_s(self.base)}): "
                         f"trying {candidate} over steps {base_end + 1}-{trial_end}")
            self._restart()
            return candidate
        elif step == trial_end and self.trial is not None and self.base_rate is not None:
            rate = self._samples / self._wall()
            settled = self.trial if trial_pays(self.base_rate, rate) else self.base
            self.done = True
            self.note = (f"{rate:.1f} samples/s at {self.trial} threads over steps {base_end + 1}-{trial_end}, "
                         f"{self.base_rate:.1f} at {self.base}: {settled} torch thread{_s(settled)} from here")
            return settled
        return None

    def _restart(self) -> None:
        self._started, self._cpu_s, self._cpu_reported, self._samples = time.perf_counter(), 0.0, False, 0

    def _wall(self) -> float:
        assert self._started is not None
        return max(time.perf_counter() - self._started, 1e-9)


def _s(n: int) -> str:
    return "" if n == 1 else "s"


def choose_threads(setting: int | None, loader_workers: int = 0,
                   environ: Mapping[str, str] | None = None, cores: int | None = None) -> ThreadChoice:
    """The thread count for torch: the setting, else OMP_NUM_THREADS, else cores minus workers."""
    env = os.environ if environ is None else environ
    if setting is not None:
        if setting < 1:
            raise ValueError(f"threads must be at least 1 (or unset for auto), got {setting}")
        return ThreadChoice(setting, "threads setting")
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp:
        try:
            n = int(omp.split(",")[0])
            if n >= 1:
                return ThreadChoice(n, "OMP_NUM_THREADS")
        except ValueError:
            pass
    cores = usable_cores() if cores is None else cores
    workers = max(0, loader_workers)
    n = max(1, cores - workers)
    why = f"auto: {cores} usable core{'s' if cores != 1 else ''}"
    if workers > 0:
        why += f" - {workers} loader worker{'s' if workers != 1 else ''}"
    return ThreadChoice(n, why, cores, workers)


@contextlib.contextmanager
def torch_threads(setting: int | None, loader_workers: int = 0) -> Iterator[ThreadChoice]:
    """Run a block with torch's intra-op thread count chosen by `choose_threads`, then restore it
    (so a library call does not leave the process changed)."""
    import torch

    choice = choose_threads(setting, loader_workers)
    before = torch.get_num_threads()
    torch.set_num_threads(choice.threads)
    try:
        yield choice
    finally:
        torch.set_num_threads(before)
