"""Thread policy (m3ae.threads) and the precision rule (m3ae.precision)."""
import pytest
import torch

import m3ae.threads
from m3ae.threads import (OPENMP_SPIN_COUNT, ThreadTuner, cgroup_cpu_quota, choose_threads, limit_openmp_spin,
                          threads_beside_loader, torch_threads)


def test_auto_threads_are_cores_minus_loader_workers():
    assert choose_threads(None, 0, environ={}, cores=4).threads == 4
    assert choose_threads(None, 1, environ={}, cores=4).threads == 3
    assert choose_threads(None, 8, environ={}, cores=2).threads == 1  # at least one
    assert "1 loader worker" in choose_threads(None, 1, environ={}, cores=2).reason


def test_only_the_auto_rule_is_marked_for_the_loader_probe():
    auto = choose_threads(None, 1, environ={}, cores=4)
    assert auto.auto and (auto.cores, auto.loader_workers) == (4, 1)
    assert not choose_threads(2, 1, environ={}, cores=4).auto
    assert not choose_threads(None, 1, environ={"OMP_NUM_THREADS": "2"}, cores=4).auto


def test_threads_beside_loader_give_idle_worker_cores_back():
    # 2 cores, 1 worker, the three loads measured (BENCHMARKS.md): light -> both cores to the step
    assert threads_beside_loader(2, 1, 0.05) == 2
    assert threads_beside_loader(2, 1, 0.39) == 2
    assert threads_beside_loader(2, 1, 0.42) == 1
    assert threads_beside_loader(2, 1, 0.95) == 1
    # one core kept per started core of use beyond the idle share, never more than the workers
    assert threads_beside_loader(16, 4, 2.6) == 13
    assert threads_beside_loader(16, 4, 3.9) == 12
    assert threads_beside_loader(16, 4, 7.0) == 12
    assert threads_beside_loader(2, 3, 3.0) == 1  # at least one
    assert threads_beside_loader(8, 2, -1.0) == 8  # a nonsense reading keeps nothing back


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def tune(monkeypatch, loader_cpu_per_step, base_step_s, trial_step_s):
    """A simulated run of 2 cores and 1 worker under ThreadTuner (skip 2 steps, windows of 4):
    [(step, count returned)], the tuner."""
    clock = FakeClock()
    monkeypatch.setattr(m3ae.threads, "time", clock)
    tuner = ThreadTuner.for_run(choose_threads(None, 1, environ={}, cores=2), start_step=0, skip=2, measure=4)
    tuner.add_batch(8, 100.0)  # before the first window: dropped when it starts
    changes = []
    for step in range(1, 16):
        clock.now += trial_step_s if tuner.trial is not None and not tuner.done else base_step_s
        tuner.add_batch(8, loader_cpu_per_step)
        n = tuner.after_step(step)
        if n is not None:
            changes.append((step, n))
    return changes, tuner


def test_thread_tuner_tries_the_idle_core_and_keeps_it_when_it_pays(monkeypatch):
    changes, tuner = tune(monkeypatch, loader_cpu_per_step=0.01, base_step_s=0.1, trial_step_s=0.06)
    assert changes == [(6, 2), (10, 2)] and tuner.done
    assert tuner.loader_cores == pytest.approx(0.1) and tuner.base_rate == pytest.approx(80)
    assert tuner.note == "133.3 samples/s at 2 threads over steps 7-10, 80.0 at 1: 2 torch threads from here"


def test_thread_tuner_goes_back_when_the_tried_count_does_not_pay(monkeypatch):
    # e.g. a second run on the machine takes the idle core: 2 threads wait for each other
    changes, tuner = tune(monkeypatch, loader_cpu_per_step=0.01, base_step_s=0.1, trial_step_s=0.099)
    assert changes == [(6, 2), (10, 1)] and tuner.done  # 1 % faster is not enough
    assert tuner.note.endswith(": 1 torch thread from here")


def test_thread_tuner_tries_every_core_when_the_workers_do_not_report_their_cpu(monkeypatch):
    # an evaluation's feature loader: its batches carry no CPU time, so the trial alone decides
    changes, tuner = tune(monkeypatch, loader_cpu_per_step=None, base_step_s=0.1, trial_step_s=0.06)
    assert changes == [(6, 2), (10, 2)] and tuner.done and tuner.loader_cores is None
    assert tuner.note == "133.3 samples/s at 2 threads over steps 7-10, 80.0 at 1: 2 torch threads from here"
    changes, tuner = tune(monkeypatch, loader_cpu_per_step=None, base_step_s=0.1, trial_step_s=0.15)
    assert changes == [(6, 2), (10, 1)] and tuner.done  # the workers needed their core: back to 1


def test_thread_tuner_keeps_the_count_when_the_loader_fills_its_core(monkeypatch):
    changes, tuner = tune(monkeypatch, loader_cpu_per_step=0.09, base_step_s=0.1, trial_step_s=0.01)
    assert changes == [(6, 1)] and tuner.done and tuner.trial is None
    assert tuner.note == "the loader workers used 0.90 cores over steps 3-6: keeping 1 torch thread"


def test_explicit_setting_then_omp_num_threads_win_over_auto():
    assert choose_threads(3, 1, environ={"OMP_NUM_THREADS": "2"}, cores=8).threads == 3
    choice = choose_threads(None, 1, environ={"OMP_NUM_THREADS": "2"}, cores=8)
    assert (choice.threads, choice.reason) == (2, "OMP_NUM_THREADS")
    assert choose_threads(None, 0, environ={"OMP_NUM_THREADS": "junk"}, cores=5).threads == 5
    with pytest.raises(ValueError, match="threads must be at least 1"):
        choose_threads(0)


def test_cgroup_quota_v2_and_v1(tmp_path):
    assert cgroup_cpu_quota(tmp_path) is None  # no cgroup files: unlimited
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(v1) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(v1) is None


def test_openmp_spin_limit_respects_the_users_choice():
    env = {}
    assert limit_openmp_spin(env) and env["GOMP_SPINCOUNT"] == OPENMP_SPIN_COUNT
    for var in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        env = {var: "ACTIVE" if var == "OMP_WAIT_POLICY" else "100"}
        assert not limit_openmp_spin(env) and len(env) == 1


def test_torch_threads_applies_and_restores():
    before = torch.get_num_threads()
    with torch_threads(before + 1) as choice:
        assert torch.get_num_threads() == choice.threads == before + 1
    assert torch.get_num_threads() == before
