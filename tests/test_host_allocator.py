"""m3ae.host_allocator: when glibc is told to keep freed memory, and that it then does, and gives it back."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from m3ae.host_allocator import AllocatorChoice, KeptMemoryLimit, _glibc, choose, resident_bytes
from m3ae.train.config import ConfigError, TrainConfig

GLIBC = object()  # stands for a loaded glibc in `choose`


@pytest.mark.parametrize("setting, device, env, kept, reason", [
    ("auto", "cpu", {}, True, "auto: running on cpu"),
    ("auto", "cuda", {}, False, "auto: running on cuda"),
    ("keep", "cuda", {}, True, "host_allocator=keep"),
    ("system", "cpu", {}, False, "host_allocator=system"),
    ("auto", "cpu", {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, False, "jemalloc preloaded"),
    ("keep", "cpu", {"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, False, "tcmalloc preloaded"),
    ("auto", "cpu", {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, False, "GLIBC_TUNABLES sets malloc"),
    ("auto", "cpu", {"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}, True, "auto: running on cpu"),
])
def test_choose(setting, device, env, kept, reason):
    assert choose(setting, device, environ=env, libc=GLIBC) == AllocatorChoice(kept, reason)


def test_choose_leaves_other_c_libraries_alone():
    assert choose("keep", "cpu", environ={}, libc=None) == AllocatorChoice(False, "not glibc")


def test_choose_rejects_unknown_settings():
    with pytest.raises(ValueError, match="host_allocator must be one of auto, keep, system"):
        choose("jemalloc", "cpu", environ={}, libc=GLIBC)
    config = TrainConfig(host_allocator="cached")
    with pytest.raises(ConfigError, match="host_allocator"):
        config.validate()


# Run in a child process so the parent's heap is not involved: allocate and touch 64 MiB with
# malloc, free it, and read the resident size after the free and after the block ends; then free
# a 160 MiB block after the block.
_PROBE = """
import ctypes, json, sys
from m3ae.host_allocator import keep_freed_memory, resident_bytes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss_mib():
    return resident_bytes() / 2**20
size = 64 << 20
with keep_freed_memory(sys.argv[1], "cpu") as choice:
    before = rss_mib()
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    touched = rss_mib()
    libc.free(block)
    after_free = rss_mib()
after_block = rss_mib()
# After the block, a block larger than the heap's free space is mmapped again and unmapped when freed.
block = libc.malloc(160 << 20)
ctypes.memset(block, 1, 160 << 20)
libc.free(block)
print(json.dumps(dict(kept=choice.kept, before=before, touched=touched, after_free=after_free,
                      after_block=after_block, later_free=rss_mib())))
"""


def _run(code: str, *args: str) -> dict:
    """Run `code` in a fresh interpreter and return the JSON it prints."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)})
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux") or _glibc() is None, reason="needs Linux with glibc")
def test_kept_memory_stays_resident_until_the_block_ends():
    kept = _run(_PROBE, "keep")
    assert kept["kept"]
    assert kept["touched"] - kept["before"] > 60
    assert kept["after_free"] - kept["before"] > 60  # freed, but kept for the next allocation
    assert kept["after_block"] - kept["before"] < 8  # given back when the block ends
    assert kept["later_free"] - kept["before"] < 8  # and large blocks are no longer kept

    system = _run(_PROBE, "system")
    assert not system["kept"]
    assert system["touched"] - system["before"] > 60
    assert system["after_free"] - system["before"] < 8  # glibc's default: unmapped at once


# More than 1 GiB freed at the top of the heap (malloc'ed, never touched, so it costs no memory):
# the break stays where it was while the block runs, and goes back when the block ends.
_TOP_PROBE = """
import ctypes, json
from m3ae.host_allocator import keep_freed_memory
libc = ctypes.CDLL(None)
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
libc.free.argtypes, libc.sbrk.argtypes = [ctypes.c_void_p], [ctypes.c_long]
mib = lambda: libc.sbrk(0) / 2**20
with keep_freed_memory("keep", "cpu"):
    start = mib()
    blocks = [libc.malloc(400 << 20) for _ in range(3)]
    grown = mib() - start
    for block in reversed(blocks):
        libc.free(block)
    kept = mib() - start
print(json.dumps(dict(grown=grown, kept=kept, after_block=mib() - start)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or _glibc() is None, reason="needs Linux with glibc")
def test_kept_memory_is_not_trimmed_however_much_is_freed_at_once():
    heap = _run(_TOP_PROBE)
    assert heap["grown"] > 1190  # the three blocks came from the heap's break, not from mmap
    assert heap["kept"] > 1190  # a 1 GiB trim threshold gave all of it back here (the old setting)
    assert heap["after_block"] < 8


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_resident_bytes_counts_touched_memory():
    import torch

    before = resident_bytes()
    block = torch.ones(64 << 18)  # 64 MiB of float32, written
    grown = resident_bytes()
    assert before is not None and grown is not None and grown - before > 60 * 2**20
    del block


def test_kept_memory_limit_trims_past_the_recorded_size_plus_slack_then_records_again():
    sizes = iter([1000, 1050, 1100, 1150, 900, 1400, 1500, 1600, 1200])
    trims = []
    limit = KeptMemoryLimit(AllocatorChoice(True, "test"), slack=0.1, rss=lambda: next(sizes),
                            trim=lambda: trims.append(1))
    assert limit.check() is None and limit.baseline == 1000  # the first size is the reference
    assert limit.check() is None and limit.check() is None  # 1050, 1100: within 10 %
    assert limit.check() == (1150, 900) and limit.trims == 1  # 1150: trimmed, 900 after
    assert limit.check() is None and limit.baseline == 1400  # recorded again after a trim
    assert limit.check() is None  # 1500: within 10 % of 1400, so real growth costs one trim
    assert limit.check() == (1600, 1200) and trims == [1, 1]


def test_kept_memory_limit_does_nothing_when_nothing_is_kept():
    trims = []
    limit = KeptMemoryLimit(AllocatorChoice(False, "host_allocator=system"), rss=lambda: 10**12,
                            trim=lambda: trims.append(1))
    assert [limit.check() for _ in range(3)] == [None] * 3 and not trims
