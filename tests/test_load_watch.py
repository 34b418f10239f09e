"""Auto threads that follow the machine's load (m3ae.load_watch), on a simulated machine."""
import pytest

import m3ae.load_watch as lw
from m3ae.load_watch import FIRST_WAIT, CpuTimes, LoadWatch, read_cpu_times
from m3ae.threads import ThreadChoice, choose_threads


class Machine:
    """A clock, /proc/stat's idle and busy seconds of our cores, and this process's CPU seconds,
    advanced by hand: each `run` is a window's worth of steps under a given load."""

    def __init__(self, cores=2):
        self.cores, self.now, self.idle, self.busy, self.ours = cores, 0.0, 0.0, 0.0, 0.0

    def cpu(self):
        return CpuTimes(self.idle, self.busy)

    def watch(self, count):
        return LoadWatch(self.cores, count, self.cpu, own=lambda: self.ours, clock=lambda: self.now)

    def run(self, watch, seconds, samples_per_s, ours, others, loader=0.0, steps=10):
        """`seconds` of steps at `samples_per_s`, this process using `ours` cores, other processes
        `others` and the loader workers `loader`; returns what the watch said at the window's end."""
        said = None
        for _ in range(steps):
            dt = seconds / steps
            self.now += dt
            self.ours += ours * dt
            used = min(self.cores, ours + others + loader)
            self.busy += used * dt
            self.idle += (self.cores - used) * dt
            watch.add_batch(int(samples_per_s * dt), loader * dt if loader else None)
            out = watch.after_step()
            said = out if out is not None else said
        return said


def started(m, count):
    w = m.watch(count)
    w.after_step()  # the first call opens the first window
    return w


def test_a_quiet_machine_keeps_the_count():
    m = Machine()
    w = started(m, 2)
    for _ in range(20):
        assert m.run(w, 20, 100, ours=1.8, others=0.1) is None
    assert w.count == 2 and w.trial_from is None


def test_a_load_that_comes_later_is_met_with_fewer_threads_and_its_end_with_more_again():
    m = Machine()
    w = started(m, 2)
    assert m.run(w, 20, 100, ours=1.8, others=0.05) is None
    # A busy process arrives: the 2-thread step halves (BENCHMARKS.md) and others use ~1 core.
    assert m.run(w, 20, 50, ours=1.1, others=0.9) == 1
    assert "0.90 cores used by other processes" in w.note and "trying 1 for a window" in w.note
    assert m.run(w, 20, 62, ours=1.0, others=1.0) is None  # 1 thread: faster, kept
    assert w.count == 1 and w.trial_from is None and "keeping 1" in w.note
    for _ in range(3):
        assert m.run(w, 20, 62, ours=1.0, others=1.0) is None  # the load stays: no core idle
    # The load goes: a core idle, 2 threads tried and kept.
    assert m.run(w, 20, 62, ours=1.0, others=0.0) == 2
    assert m.run(w, 20, 100, ours=1.8, others=0.0) is None and w.count == 2


def test_on_a_large_machine_the_count_moves_by_the_cores_taken_or_left():
    m = Machine(cores=16)
    w = started(m, 16)
    assert m.run(w, 20, 400, ours=12.0, others=4.0) == 12  # a 4-core build arrives: 12 tried
    assert m.run(w, 20, 600, ours=12.0, others=4.0) is None and w.count == 12  # kept
    assert m.run(w, 20, 600, ours=11.0, others=1.4) == 11  # 1.4 cores more taken: one fewer
    assert m.run(w, 20, 500, ours=11.0, others=1.4) == 12  # slower: back
    assert m.run(w, 20, 600, ours=11.6, others=0.0) == 16  # 4.4 cores idle: 4 more tried
    assert m.run(w, 20, 900, ours=15.0, others=0.0) is None and w.count == 16


def test_a_trial_that_does_not_pay_goes_back_and_waits_longer_each_time():
    m = Machine()
    w = started(m, 1)  # 1 thread beside a loader worker that leaves its core idle
    waits, quiet = [], []
    for _ in range(6):
        windows = 0
        while m.run(w, 20, 100, ours=1.0, others=0.0, loader=0.2) is None:  # idle 0.8: try 2 ...
            windows += 1
        quiet.append(windows)
        assert w.count == 2
        assert m.run(w, 20, 99, ours=1.9, others=0.0, loader=0.2) == 1  # ... no faster: back
        assert "back to 1, not tried that way for" in w.note
        waits.append(w.wait[1])
    assert waits == [3, 6, 12, 24, 48, 48] and FIRST_WAIT == 3 and lw.LONGEST_WAIT == 48
    assert quiet == [0, 3, 6, 12, 24, 48]  # windows left alone before each trial


def test_a_loader_filling_its_core_is_not_counted_as_another_process():
    m = Machine()
    w = started(m, 1)
    for _ in range(5):  # the worker uses 0.95 of a core: nothing idle, nothing taken by others
        assert m.run(w, 20, 100, ours=1.0, others=0.0, loader=0.95) is None
    assert w.count == 1


def test_windows_need_their_time_and_steps_and_time_outside_steps_is_left_out():
    m = Machine()
    w = started(m, 2)
    assert m.run(w, 10, 50, ours=1.1, others=0.9) is None  # 10 s: the window is not over
    assert m.run(w, 10, 50, ours=1.1, others=0.9) == 1  # 20 s: it is, and the load is seen
    # The trial window holds 10 s of checkpointing: the steps' own speed decides.
    w.exclude(10.0)
    assert m.run(w, 20, 31, ours=1.0, others=1.0) is None and w.count == 1  # 31 * 20 / 10 = 62 > 50


def test_a_window_needs_its_steps_too():
    m = Machine()
    w = started(m, 2)
    assert m.run(w, 40, 50, ours=1.1, others=0.9, steps=lw.MIN_STEPS - 1) is None  # 40 s but 4 steps
    assert m.run(w, 1, 50, ours=1.1, others=0.9, steps=1) == 1


def test_procfs_gone_mid_run_keeps_the_count():
    m = Machine()
    w = started(m, 2)
    w.read = lambda: None
    assert m.run(w, 60, 50, ours=1.1, others=0.9) is None and w.count == 2


def test_read_cpu_times_sums_the_given_cores(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  10 0 10 100 0 0 0 0 0 0\n"
                    "cpu0 100 0 50 1000 20 5 5 10 30 0\n"
                    "cpu1 200 0 100 2000 0 0 0 0 0 0\n"
                    "cpu2 1 1 1 1 1 1 1 1 0 0\n"
                    "intr 12345\n")
    import os
    tick = os.sysconf("SC_CLK_TCK")
    t = read_cpu_times(frozenset({0, 1}), stat)
    assert t == CpuTimes((1000 + 20 + 2000) / tick, (100 + 50 + 5 + 5 + 10 + 200 + 100) / tick)
    assert read_cpu_times(frozenset({0, 3}), stat) is None  # a core it does not list
    stat.write_text("cpu0 1 2 x 4 5\n")
    assert read_cpu_times(frozenset({0}), stat) is None
    assert read_cpu_times(frozenset({0}), tmp_path / "missing") is None


@pytest.mark.parametrize("choice, device, world, watched", [
    (choose_threads(None, 0, environ={}, cores=2), "cpu", 1, True),
    (choose_threads(None, 1, environ={}, cores=2), "cpu", 1, True),
    (choose_threads(2, 0, environ={}, cores=2), "cpu", 1, False),  # a setting: fixed
    (choose_threads(None, 0, environ={"OMP_NUM_THREADS": "2"}, cores=2), "cpu", 1, False),
    (choose_threads(None, 0, environ={}, cores=2), "cuda", 1, False),
    (choose_threads(None, 0, environ={}, cores=2), "cpu", 2, False),
    (choose_threads(None, 0, environ={}, cores=1), "cpu", 1, False),  # nothing to move
    (ThreadChoice(2, "auto", 4, 0), "cpu", 1, False),  # /proc/stat's cores are not all ours (a quota)
])
def test_which_runs_are_watched(monkeypatch, choice, device, world, watched):
    monkeypatch.setattr(lw, "_affinity", lambda: frozenset({0, 1}) if choice.cores != 1 else frozenset({0}))
    monkeypatch.setattr(lw, "cgroup_cpu_quota", lambda: None)
    monkeypatch.setattr(lw, "read_cpu_times", lambda cpus: CpuTimes(1.0, 1.0))
    watch = LoadWatch.for_run(choice, device, world)
    assert (watch is not None) == watched
    if watch is not None:
        assert (watch.cores, watch.count) == (choice.cores, choice.threads)
    monkeypatch.setattr(lw, "cgroup_cpu_quota", lambda: 1.5)
    assert LoadWatch.for_run(choose_threads(None, 0, environ={}, cores=2), "cpu", 1) is None
    monkeypatch.setattr(lw, "cgroup_cpu_quota", lambda: None)
    monkeypatch.setattr(lw, "read_cpu_times", lambda cpus: None)
    assert LoadWatch.for_run(choose_threads(None, 0, environ={}, cores=2), "cpu", 1) is None
