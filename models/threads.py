"""How many intra-op threads model work gets: one rule for the server, the index job, mel-link
and the benchmarks.

torch (OpenMP) and onnxruntime split every large op over their intra-op threads and wait for
the slowest one. When another process holds a core, the thread scheduled there stalls the whole
op (measured in tests/conftest.py: a small LayerNorm 13 us -> 7.8 ms with 2 threads on 2 cores
while the other core was busy). A fixed "cores minus one" avoids that stall but leaves a core
idle on a dedicated machine (the server at concurrency 16 on 2 cores: 33.8 req/s with 1 thread,
42.1 with 2, alternating A/B in bench/results/service-ab.md). So the default is the cores that
are actually free when the process starts:

- the cores it may run on: its CPU affinity set (``os.sched_getaffinity``, what ``taskset`` or a
  cpuset gives it), capped by a cgroup CPU quota (``cpu.max``, what ``docker --cpus`` sets);
- minus the cores other processes kept busy over a short sample of ``/proc/stat`` (this
  process's own CPU time subtracted), rounded: a neighbour training on one core takes that core
  out of the count, an idle Redis or shell does not;
- minus ``reserve`` (default 0), at least 1.

The sample is taken once per ``configure_threads`` call (0.25 s) and is a snapshot: a neighbour
that starts later is not seen, so a shared box with bursty neighbours should set the count (or
a reserve) explicitly. Setting the count explicitly overrides all of it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Cores left to everything else on top of those measured busy (the event loop and Redis of a
# dedicated box fit beside the model's threads: measured faster, see the module docstring).
THREAD_RESERVE = 0
SAMPLE_S = 0.25
CGROUP = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def affinity_cores() -> set[int]:
    """The CPU ids this process may run on (all of the machine's where the platform has no
    affinity call)."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return set(range(os.cpu_count() or 1))


def _cgroup_dirs(root: Path, cgroup_file: Path) -> list[Path]:
    """Folders whose CPU limits apply to this process: its own cgroup and each ancestor, for
    cgroup v2 (``0::/path``) and v1's cpu controller (``N:cpu,cpuacct:/path``)."""
    dirs: list[Path] = []
    try:
        lines = cgroup_file.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        names = controllers.split(",")
        if controllers == "":
            base = root
        elif "cpu" in names:
            base = root / controllers
            if not base.exists():
                base = root / "cpu"
        else:
            continue
        here = Path(path.strip() or "/")
        for part in [here, *here.parents]:
            dirs.append(base / str(part).lstrip("/"))
    return dirs or [root, root / "cpu"]


def cgroup_quota(root: Path = CGROUP, cgroup_file: Path = PROC_CGROUP) -> float | None:
    """The tightest cgroup CPU quota on this process in cores (v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us / cpu.cfs_period_us``); None when unlimited or unreadable."""
    quotas: list[float] = []
    for d in _cgroup_dirs(root, cgroup_file):
        try:
            quota, period = (d / "cpu.max").read_text().split()[:2]
            if quota != "max":
                quotas.append(int(quota) / int(period))
            continue
        except (OSError, ValueError):
            pass
        try:
            q = int((d / "cpu.cfs_quota_us").read_text())
            p = int((d / "cpu.cfs_period_us").read_text())
            if q > 0 and p > 0:
                quotas.append(q / p)
        except (OSError, ValueError):
            pass
    return min(quotas) if quotas else None


def available_cores() -> int:
    """Cores this process may use: its affinity set, capped by its cgroup quota (rounded down,
    at least 1: a 1.5-core quota runs 1 thread without being throttled mid-op)."""
    n = len(affinity_cores())
    quota = cgroup_quota()
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    return max(1, n)


def _cpu_times(cpus: set[int]) -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies per CPU of ``cpus`` from /proc/stat."""
    out: dict[int, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        cpu = int(name[3:])
        if cpu not in cpus:
            continue
        v = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
        idle = v[3] + v[4]
        out[cpu] = (sum(v) - idle, sum(v))
    return out


def busy_cores(window_s: float = SAMPLE_S) -> float:
    """Cores of this process's affinity set that *other* processes kept busy during a
    ``window_s`` sample (0.0 where /proc/stat is unreadable)."""
    cpus = affinity_cores()
    try:
        before, own0, t0 = _cpu_times(cpus), time.process_time(), time.monotonic()
        time.sleep(window_s)
        after, own1, t1 = _cpu_times(cpus), time.process_time(), time.monotonic()
    except (OSError, ValueError):
        return 0.0
    busy = 0.0
    for cpu, (b1, n1) in after.items():
        b0, n0 = before.get(cpu, (b1, n1))
        if n1 > n0:
            busy += (b1 - b0) / (n1 - n0)
    own = (own1 - own0) / max(t1 - t0, 1e-9)
    return max(0.0, busy - own)


def free_cores() -> int:
    """Available cores minus the rounded busy ones, at least 1."""
    return max(1, available_cores() - round(busy_cores()))


def default_threads(reserve: int = THREAD_RESERVE) -> int:
    """``free_cores() - reserve``, at least 1."""
    return max(1, free_cores() - max(0, reserve))


def resolve_threads(threads: int | None, reserve: int = THREAD_RESERVE) -> int:
    """The thread count to use: ``threads`` when given (>= 1), else :func:`default_threads`."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        return threads
    return default_threads(reserve)


def plan_workers(
    workers: int | None, threads: int | None, cuda: bool = False, reserve: int = THREAD_RESERVE
) -> tuple[int, int | None]:
    """(model workers, intra-op threads per worker) for a process that can run several
    batches at once (the server's batcher, ``mel-link``).

    On CPU, independent single-threaded workers beat one worker with every core: an op split
    over 2 threads waits for the slower one and leaves the Python between ops on one core
    (2 cores: ``mel-link`` 2 x 1 linked 86-92 mentions/s against 66-74 for 1 x 2, the server
    at concurrency 16 in bench/results/service-ab.md). So by default every free core gets a
    worker of one thread; a given ``threads`` divides the free cores into workers, a given
    ``workers`` gets them divided. On a GPU the device does the parallel work: 1 worker, the
    threads as given (None: the default)."""
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if cuda:
        return workers or 1, threads
    if workers is None and threads is None:
        return default_threads(reserve), 1
    if workers is None:
        assert threads is not None
        return max(1, default_threads(reserve) // threads), threads
    return workers, threads or max(1, default_threads(reserve) // workers)


_LIMITS: list[object] = []  # threadpoolctl limiters set by configure_threads (kept alive)


def configure_threads(threads: int | None, reserve: int = THREAD_RESERVE) -> int:
    """Set torch's intra-op threads (see :func:`resolve_threads`) and numpy's BLAS threads,
    and return the count, which onnxruntime sessions are given too
    (models/onnx_encoders.py)."""
    n = resolve_threads(threads, reserve)
    torch.set_num_threads(n)
    # numpy's own BLAS (index.ann's one-query flat search is a numpy product) gets the same
    # count: its pool defaults to every core, beside torch's and onnxruntime's threads
    from threadpoolctl import threadpool_limits

    _LIMITS.append(threadpool_limits(n, user_api="blas"))
    logger.info(
        "intra-op threads: %d (%s; %d cores available)",
        n,
        "set" if threads is not None else f"default: free cores - {reserve}",
        available_cores(),
    )
    return n


def pin_numpy_blas(threads: int = 1) -> int:
    """Give numpy's own BLAS ``threads`` threads, leaving every other BLAS (FAISS's bundled
    one) as it is; returns how many libraries it set (0: numpy's BLAS not found).

    For serving: numpy's only BLAS work on the request path is the one-query flat search
    (index.ann.one_query_flat), a memory-bound matrix-vector product. With a pool of 2, that
    pool's threads spin after each call and take a core from the torch op that follows: a
    WikiMEL link at one mention took 9.90 ms with numpy's pool at 2 and 3.27 ms at 1
    (bench/blas_threads.py). FAISS's BLAS keeps the intra-op count: its batched search is
    where a second thread pays."""
    import numpy as np
    from threadpoolctl import ThreadpoolController

    root = Path(np.__file__).resolve().parent.parent
    mine = [
        lc
        for lc in ThreadpoolController().lib_controllers
        if lc.user_api == "blas"
        and Path(lc.filepath).resolve().is_relative_to(root)
        and Path(lc.filepath).resolve().parent.name in ("numpy.libs", "numpy.dylibs", "numpy")
    ]
    for lc in mine:
        lc.set_num_threads(threads)
    return len(mine)


__all__ = [
    "THREAD_RESERVE",
    "available_cores",
    "busy_cores",
    "cgroup_quota",
    "configure_threads",
    "default_threads",
    "free_cores",
    "pin_numpy_blas",
    "plan_workers",
    "resolve_threads",
]
