"""Thread policy (m3ae.threads) and the precision rule (m3ae.precision)."""
import pytest
import torch

from m3ae.threads import (OPENMP_SPIN_COUNT, LoaderProbe, cgroup_cpu_quota, choose_threads, limit_openmp_spin,
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


def test_loader_probe_measures_its_window_only():
    probe = LoaderProbe.for_run(start_step=40, skip=2, measure=3)
    assert (probe.first, probe.last) == (42, 45)
    probe.cpu_s = 99.0  # batches before the window: dropped at its start
    assert probe.after_step(41) is None and probe.after_step(42) is None
    probe.cpu_s += 0.02
    assert probe.after_step(43) is None and probe.after_step(44) is None
    cores = probe.after_step(45)
    assert cores is not None and 0 < cores < 0.02 / 1e-6
    late = LoaderProbe.for_run(0, skip=2, measure=3)  # never saw its first step (a resume inside it)
    assert late.after_step(5) is None


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
