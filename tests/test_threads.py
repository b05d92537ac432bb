"""Intra-op thread counts (models/threads.py): the setting wins, else the free cores."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import models.threads as threads


def _machine(monkeypatch: pytest.MonkeyPatch, cpus: set[int], busy: float, quota=None) -> None:
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: cpus)
    monkeypatch.setattr(threads, "busy_cores", lambda window_s=0.25: busy)
    monkeypatch.setattr(threads, "cgroup_quota", lambda *a: quota)


def test_default_is_the_free_cores_of_the_affinity_set(monkeypatch: pytest.MonkeyPatch) -> None:
    _machine(monkeypatch, {0, 1, 2, 3, 4, 5}, busy=0.2)
    assert threads.available_cores() == 6
    assert threads.default_threads() == 6  # an idle neighbour takes no core
    assert threads.default_threads(reserve=2) == 4
    _machine(monkeypatch, {0, 1, 2, 3, 4, 5}, busy=1.7)  # a neighbour training on 2 threads
    assert threads.default_threads() == 4
    _machine(monkeypatch, {0, 1}, busy=1.0)  # make demo: the server starts beside training
    assert threads.default_threads() == 1
    _machine(monkeypatch, {3}, busy=1.0)
    assert threads.default_threads() == 1  # never below one
    assert threads.resolve_threads(None, reserve=3) == 1


def test_a_cgroup_quota_caps_the_affinity_set(monkeypatch: pytest.MonkeyPatch) -> None:
    _machine(monkeypatch, set(range(64)), busy=0.0, quota=2.5)  # docker --cpus 2.5 on 64 cores
    assert threads.available_cores() == 2 and threads.default_threads() == 2
    _machine(monkeypatch, set(range(64)), busy=0.0, quota=0.5)
    assert threads.available_cores() == 1


def test_cgroup_quota_reads_v2_and_v1_files_and_takes_the_tightest(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    (root / "app" / "job").mkdir(parents=True)
    (root / "app" / "cpu.max").write_text("300000 100000\n")  # a parent's limit applies too
    (root / "app" / "job" / "cpu.max").write_text("max 100000\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/app/job\n")
    assert threads.cgroup_quota(root, proc) == 3.0
    (root / "app" / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_quota(root, proc) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "docker").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "docker" / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu,cpuacct" / "docker" / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")  # unlimited at the root
    (v1 / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    proc.write_text("4:memory:/docker\n2:cpu,cpuacct:/docker\n0::/\n")
    assert threads.cgroup_quota(v1, proc) == 1.5
    proc.write_text("garbage\n")  # unreadable: no quota, no crash
    assert threads.cgroup_quota(v1, proc) is None


def test_busy_cores_sees_a_spinning_neighbour_and_not_this_process() -> None:
    if not Path("/proc/stat").exists():
        pytest.skip("no /proc/stat")
    spin = "import time\nt = time.time() + 30\nwhile time.time() < t: pass\n"
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.3)
        with_child = threads.busy_cores(0.5)
    finally:
        child.kill()
        child.wait()
    assert with_child >= 0.6  # the child holds a core
    # this process spinning during the sample is not counted as a neighbour
    stop = time.monotonic() + 0.6

    def spin_here() -> None:
        while time.monotonic() < stop:
            pass

    worker = threading.Thread(target=spin_here)
    worker.start()
    own = threads.busy_cores(0.5)
    worker.join()
    assert own < with_child - 0.4


def test_a_set_count_wins_and_is_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    _machine(monkeypatch, {0, 1}, busy=0.0)
    assert threads.resolve_threads(3) == 3
    with pytest.raises(ValueError, match=">= 1"):
        threads.resolve_threads(0)
    before = torch.get_num_threads()
    try:
        assert threads.configure_threads(None) == 2
        assert torch.get_num_threads() == 2
        assert threads.configure_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_numpy_blas_pinned_and_faiss_blas_left(monkeypatch: pytest.MonkeyPatch) -> None:
    import faiss  # noqa: F401  (its bundled BLAS, when it has one, must keep the count)
    from threadpoolctl import threadpool_info, threadpool_limits

    _machine(monkeypatch, {0, 1}, busy=0.0)
    before = torch.get_num_threads()
    with threadpool_limits(None):  # restores every pool on exit
        try:
            threads.configure_threads(2)
            assert threads.pin_numpy_blas(1) == 1
            blas = {
                i["filepath"]: i["num_threads"]
                for i in threadpool_info()
                if i["user_api"] == "blas"
            }
            numpy_libs = [p for p in blas if "numpy" in p]
            assert numpy_libs and all(blas[p] == 1 for p in numpy_libs)
            assert all(n == 2 for p, n in blas.items() if p not in numpy_libs)
        finally:
            torch.set_num_threads(before)
