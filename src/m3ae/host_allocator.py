"""Whether the C allocator keeps large freed blocks for reuse (CPU training and evaluation).

glibc serves a block above its mmap threshold (128 KiB, adapting up to 32 MiB) with a fresh `mmap`
and unmaps it when freed. A training step frees and allocates the same large buffers every step: a
30522-row embedding gradient, the text head's bf16 weight copy and gradient, wide activations at
large batch. Each time the kernel zeroes and faults in their pages again (40-95k page faults per
step at base width): zero-filling a 94 MB gradient took 28-32 ms instead of 3-7, cloning a 62 MB
weight 20-22 ms instead of 4 (BENCHMARKS.md). Raising glibc's mmap threshold and turning its
trimming off makes freed memory stay in the heap and serve the next step, as CUDA's caching
allocator, jemalloc and tcmalloc do: the bf16 step at base width ran 1.03-1.24x faster. The cost:
the process keeps its peak heap until the block ends, instead of returning it between steps, and
kept blocks can fragment, which `KeptMemoryLimit` bounds.

Trimming is off entirely, not just raised: with a finite trim threshold, a step whose freed memory
at the top of the heap exceeds it hands all of that back to the kernel and faults it in again the
next step. At 1 GiB that happened to the base model at batch 32 (up to 390k page faults, ~1.6 GB,
per fp32 step; 17 vs 19.5 s per step; BENCHMARKS.md).

`keep_freed_memory` applies this around a block (the trainer, the evaluations and `m3ae bench
train` use it) and puts glibc back afterwards: the kept memory returned (`malloc_trim`) and the
thresholds where glibc's own adaptation ends up in a torch process (32 MiB mmap, 64 MiB trim; once
set, glibc cannot be returned to adapting them). It changes nothing when another allocator is preloaded (jemalloc,
tcmalloc, mimalloc), when the user set glibc's malloc tunables, or when the C library is not glibc
(macOS, musl, Windows).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

SETTINGS = ("auto", "keep", "system")
# mallopt parameters (malloc.h). glibc starts at a 128 KiB mmap threshold and raises it to the size
# of each mmapped block freed, up to 32 MiB, with the trim threshold at twice that: a torch process
# soon sits at the maximum, which is what is restored after the block.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_ADAPTED_MMAP_THRESHOLD = 32 << 20
_ADAPTED_TRIM_THRESHOLD = 64 << 20
# Far above any one tensor a CPU run allocates; glibc accepts it (it returns 1).
KEEP_THRESHOLD = 1 << 30
# mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely" (malloc_trim still works).
NO_TRIM = -1
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


@dataclass(frozen=True)
class AllocatorChoice:
    kept: bool
    reason: str  # for the run header

    def __str__(self) -> str:
        return f"{'freed memory kept' if self.kept else 'unchanged'} ({self.reason})"


def _glibc() -> Any | None:
    """The process's C library when it is glibc (it has gnu_get_libc_version), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        return libc
    except (OSError, AttributeError):
        return None


def choose(setting: str, device_type: str, environ: Mapping[str, str] | None = None,
           libc: Any | None = None) -> AllocatorChoice:
    """Whether to keep freed memory: "keep" / "system" as said, "auto" keeps it for CPU runs. Never
    over another allocator the user preloaded or malloc tunables the user set."""
    if setting not in SETTINGS:
        raise ValueError(f"host_allocator must be one of {', '.join(SETTINGS)}, got {setting!r}")
    env = os.environ if environ is None else environ
    if setting == "system":
        return AllocatorChoice(False, "host_allocator=system")
    if setting == "auto" and device_type != "cpu":
        return AllocatorChoice(False, f"auto: running on {device_type}")
    preload = env.get("LD_PRELOAD", "")
    other = next((name for name in _OTHER_ALLOCATORS if name in preload), None)
    if other:
        return AllocatorChoice(False, f"{other} preloaded")
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return AllocatorChoice(False, "GLIBC_TUNABLES sets malloc")
    if libc is None:
        return AllocatorChoice(False, "not glibc")
    return AllocatorChoice(True, "host_allocator=keep" if setting == "keep" else "auto: running on cpu")


@contextlib.contextmanager
def keep_freed_memory(setting: str, device_type: str) -> Iterator[AllocatorChoice]:
    """Run a block with glibc keeping freed memory when `choose` says so; then return what was kept
    to the system and set the thresholds glibc would have adapted to."""
    libc = _glibc()
    choice = choose(setting, device_type, libc=libc)
    if not choice.kept or libc is None:
        yield choice
        return

    def restore() -> None:
        libc.mallopt(_M_MMAP_THRESHOLD, _ADAPTED_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _ADAPTED_TRIM_THRESHOLD)
        libc.malloc_trim(0)

    if not (libc.mallopt(_M_MMAP_THRESHOLD, KEEP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, NO_TRIM)):
        restore()
        yield AllocatorChoice(False, "glibc refused the thresholds")
        return
    try:
        yield choice
    finally:
        restore()


def resident_bytes() -> int | None:
    """The process's resident memory now (Linux `/proc/self/statm`), so a run's log shows what it
    holds, kept blocks included; None where that file does not exist."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class KeptMemoryLimit:
    """Bounds how far kept memory may grow. Kept blocks can fragment: now and then a large block
    fits no free hole, the heap grows by its size, and the holes stay resident (in 2 of 4 long runs
    in BENCHMARKS.md, one or two jumps of ~90 MiB in 600-1500 steps). The first `check` (after the
    first log interval, when the step's buffers are all allocated) records the resident size; a
    later one that finds it grown by more than `slack` returns the heap's free pages to the system
    (`malloc_trim`), which costs about one step of page faults, and the next check records the size
    again. Holes go away that way, while memory the run really needs (an evaluation copy, longer
    batches) becomes the new reference after a single trim."""

    def __init__(self, choice: AllocatorChoice, slack: float = 0.1,
                 rss: Callable[[], int | None] = resident_bytes, trim: Callable[[], object] | None = None):
        if trim is None and choice.kept:
            libc = _glibc()
            if libc is not None:
                trim = lambda: libc.malloc_trim(0)  # noqa: E731
        self.trim = trim if choice.kept else None  # nothing to bound when nothing is kept
        self.rss, self.slack = rss, slack
        self.baseline: int | None = None
        self.trims = 0

    def check(self) -> tuple[int, int] | None:
        """Trim when the resident size outgrew the recorded one; (before, after) in bytes when it did."""
        if self.trim is None:
            return None
        now = self.rss()
        if now is None:
            return None
        if self.baseline is None:
            self.baseline = now
            return None
        if now <= self.baseline * (1 + self.slack):
            return None
        self.trim()
        self.trims += 1
        self.baseline = None  # re-recorded at the next check, once the steps have touched what they use
        return now, self.rss() or now
