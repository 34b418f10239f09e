"""Auto threads that follow the machine's load for the rest of a CPU run.

`m3ae.threads` picks the count once, in a run's first steps. A load that comes later (a second run,
a browser, a build) then meets the step's threads on shared cores, where they wait for each other
at every barrier: on 2 cores one busy process halves a 2-thread step, while 1 thread loses nothing
(BENCHMARKS.md, "busy machine"). And a run that settled at fewer threads beside a load keeps them
after the load is gone.

`LoadWatch` reads, over windows of about 20 seconds, what the other processes used of this
process's cores (Linux `/proc/stat`, less this process's and its loader workers' CPU time) and what
was left idle. When others used half a core or more it tries fewer threads for a window (one per
core they used, half a core and up counting as one); when 0.6 of a core or more was idle, more (one
per idle core, from 0.6 up). A tried count is kept only if the step ran at
least 3 % faster with it (`m3ae.threads.trial_pays`), else the run goes back and waits before trying
that way again (3 windows, doubling to 48). A checkpoint saves the count in use, so a resume starts
from it; an uninterrupted run and a resumed one take the same steps only while the load is steady,
since the count changes the float rounding. Set `threads=N` for a fixed count.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .threads import ThreadChoice, cgroup_cpu_quota, trial_pays

WINDOW_S = 20.0  # seconds of steps per window (and at least MIN_STEPS steps)
MIN_STEPS = 5
OTHERS_BUSY_SHARE = 0.5  # cores the other processes use that make one fewer thread worth a try
IDLE_SHARE = 0.6  # idle cores that make one more thread worth a try
FIRST_WAIT, LONGEST_WAIT = 3, 48  # windows before trying the same way again after a trial lost


@dataclass(frozen=True)
class CpuTimes:
    """Seconds summed over a set of cores since boot: idle (idle + iowait) and busy (everything
    else, steal included: time the hypervisor gave to other machines is not ours either)."""
    idle: float
    busy: float


def read_cpu_times(cpus: frozenset[int], path: Path = Path("/proc/stat")) -> CpuTimes | None:
    """The idle and busy seconds of `cpus` from /proc/stat; None where it cannot be read, or lacks one
    of them."""
    try:
        lines = path.read_text().splitlines()
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):  # no procfs (macOS, Windows) or no sysconf
        return None
    idle = busy = 0.0
    seen = set()
    for line in lines:
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        try:
            # user nice system idle iowait irq softirq steal (guest time is inside user: not added)
            ticks = [int(x) for x in rest.split()[:8]]
        except ValueError:
            return None
        if len(ticks) < 5:
            return None
        idle += ticks[3] + ticks[4]
        busy += sum(ticks) - ticks[3] - ticks[4]
        seen.add(int(name[3:]))
    if seen != set(cpus):
        return None
    return CpuTimes(idle / tick, busy / tick)


def own_cpu_seconds() -> float:
    """CPU seconds of this process, all its threads (not its loader workers: they report theirs)."""
    t = os.times()
    return t.user + t.system


def _affinity() -> frozenset[int] | None:
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:
        return None


@dataclass
class LoadWatch:
    """Decides, at the end of each window, whether to try or keep another torch thread count (see
    the module docstring). Call `add_batch` for each batch the step takes, `exclude` with the
    seconds spent outside steps (checkpoints, evaluations, pictures), and `after_step` after every
    step; it returns the count to run with from the next step on when that changes."""

    cores: int
    count: int
    read: Callable[[], CpuTimes | None]
    own: Callable[[], float] = own_cpu_seconds
    clock: Callable[[], float] = time.perf_counter
    window_s: float = WINDOW_S
    note: str = ""  # what the last decision was, for the log
    trial_from: int | None = None  # the count a trial started from
    base_rate: float | None = None  # samples/s at trial_from, the window before the trial
    wait: dict[int, int] = field(default_factory=lambda: {-1: 0, 1: 0})  # windows before trying that way
    backoff: dict[int, int] = field(default_factory=lambda: {-1: FIRST_WAIT, 1: FIRST_WAIT})
    _start: tuple[float, float, CpuTimes] | None = None
    _steps: int = 0
    _samples: int = 0
    _loader_s: float = 0.0
    _excluded: float = 0.0

    @classmethod
    def for_run(cls, choice: ThreadChoice, device_type: str, world_size: int) -> "LoadWatch | None":
        """A watch for a run with auto threads on this process's CPU cores; None where the count is
        fixed (a setting, OMP_NUM_THREADS), the run is not one CPU process, there is one core, or the
        load cannot be read (no /proc/stat, or a cgroup quota: then the cores in /proc/stat are
        not the ones this process gets)."""
        cpus = _affinity()
        if not (choice.auto and device_type == "cpu" and world_size == 1 and choice.cores is not None
                and choice.cores >= 2 and cpus is not None and len(cpus) == choice.cores
                and cgroup_cpu_quota() is None):
            return None
        read = lambda: read_cpu_times(cpus)  # noqa: E731
        if read() is None:
            return None
        return cls(choice.cores, choice.threads, read, window_s=WINDOW_S)

    def add_batch(self, samples: int, loader_cpu_s: float | None) -> None:
        self._samples += samples
        if loader_cpu_s is not None:
            self._loader_s += loader_cpu_s

    def exclude(self, seconds: float) -> None:
        """Time of the window spent outside the steps: left out of its samples/s."""
        self._excluded += seconds

    def after_step(self) -> int | None:
        now = self.clock()
        self._steps += 1
        if self._start is None:
            self._restart(now)
            return None
        t0, own0, cpu0 = self._start
        elapsed = now - t0
        if elapsed < self.window_s or self._steps < MIN_STEPS:
            return None
        cpu = self.read()
        if cpu is None:  # procfs went away: keep the count
            self._start = None
            return None
        own = self.own()
        rate = self._samples / max(elapsed - self._excluded, 1e-9)
        others = max(0.0, (cpu.busy - cpu0.busy) - (own - own0) - self._loader_s) / elapsed
        idle = max(0.0, cpu.idle - cpu0.idle) / elapsed
        where = f"{others:.2f} cores used by other processes, {idle:.2f} idle over {elapsed:.0f} s"
        new = self._decide(rate, others, idle, where)
        self._restart(now, cpu, own)
        return new

    def _decide(self, rate: float, others: float, idle: float, where: str) -> int | None:
        if self.trial_from is not None:  # the trial's window
            assert self.base_rate is not None
            way = 1 if self.count > self.trial_from else -1
            tried, before = self.count, self.trial_from
            self.trial_from = None
            if trial_pays(self.base_rate, rate):
                self.backoff[way] = FIRST_WAIT
                self.note = (f"{rate:.1f} samples/s at {tried} threads, {self.base_rate:.1f} at {before} "
                             f"({where}): keeping {tried}")
                return None
            self.wait[way] = self.backoff[way]
            self.backoff[way] = min(2 * self.backoff[way], LONGEST_WAIT)
            self.count = before
            self.note = (f"{rate:.1f} samples/s at {tried} threads, {self.base_rate:.1f} at {before} "
                         f"({where}): back to {before}, not tried that way for {self.wait[way]} windows")
            return before
        way = 0
        if others >= OTHERS_BUSY_SHARE and self.count > 1 and self.wait[-1] == 0:
            way = -1
        elif idle >= IDLE_SHARE and self.count < self.cores and self.wait[1] == 0:
            way = 1
        for w in (-1, 1):
            self.wait[w] = max(0, self.wait[w] - 1)
        if way == 0:
            return None
        # As many threads as the cores others took (half a core and up counts as one) or as lie idle
        # (0.6 and up): on a large machine one thread at a time would gain too little to measure.
        step = int(others + 1 - OTHERS_BUSY_SHARE) if way < 0 else int(idle + 1 - IDLE_SHARE)
        self.trial_from, self.base_rate = self.count, rate
        self.count = min(self.cores, max(1, self.count + way * max(1, step)))
        self.note = f"{where}, {rate:.1f} samples/s at {self.trial_from}: trying {self.count} for a window"
        return self.count

    def _restart(self, now: float, cpu: CpuTimes | None = None, own: float | None = None) -> None:
        cpu = cpu if cpu is not None else self.read()
        own = own if own is not None else self.own()
        self._start = (now, own, cpu) if cpu is not None else None
        self._steps, self._samples, self._loader_s, self._excluded = 0, 0, 0.0, 0.0
