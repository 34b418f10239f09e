"""How many CPU threads torch uses, and how they wait.

Torch runs one OpenMP thread per core by default and those threads spin at every barrier. On a
machine with one other busy process (a browser, a second run, our own data-loader workers) a
spinning thread whose partner was descheduled burns its whole time slice, and a step becomes up to
~10x slower (BENCHMARKS.md, "busy machine"). Two rules make that collapse mild:

- `threads` (auto by default): the cores this process may use (CPU affinity and the cgroup quota)
  minus the data-loader workers that share them, at least 1. An explicit setting wins, then
  OMP_NUM_THREADS. A CPU run with loader workers then measures what the workers really use over
  its first steps (`LoaderProbe`) and gives the step back the cores they leave idle, once: light
  loaders (small JPEGs, pre-resized shards) would otherwise cost the step a core they do not need.
- OpenMP threads spin only briefly before sleeping (GOMP_SPINCOUNT, see `limit_openmp_spin`), so
  a thread waiting for a descheduled partner yields its core instead of burning it.
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
    # Set by the auto rule only: the usable cores and the loader workers it counted (the probe's inputs).
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


@dataclass
class LoaderProbe:
    """Measures the loader workers' CPU use over steps (first, last] of a run that started its auto
    thread count at cores - workers, for `threads_beside_loader` to settle the count once (every
    change of the count changes the float rounding of what follows)."""

    first: int  # the step after which measuring starts (past the workers' start-up and first fills)
    last: int  # the step at which the count is settled
    cpu_s: float = 0.0  # the workers' CPU seconds for the batches taken while measuring
    started: float | None = None  # wall clock at step `first`

    @classmethod
    def for_run(cls, start_step: int, skip: int = 10, measure: int = 20) -> "LoaderProbe":
        """Measuring steps skip+1 .. skip+measure of this process (fresh or resumed: the workers
        start, and their shuffle buffers fill, again after a resume)."""
        return cls(start_step + skip, start_step + skip + measure)

    def after_step(self, step: int) -> float | None:
        """Call after each step; returns the workers' mean use in cores when `step` is the last."""
        if step == self.first:
            self.started, self.cpu_s = time.perf_counter(), 0.0
        elif step == self.last and self.started is not None:
            return self.cpu_s / max(time.perf_counter() - self.started, 1e-9)
        return None


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
