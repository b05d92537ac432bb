"""How many intra-op threads model work gets: one rule for the server, the index job and the
benchmarks.

torch (OpenMP) and onnxruntime split every large op over their intra-op threads and wait for
the slowest one. When another process holds a core, the thread scheduled there stalls the whole
op (measured in tests/conftest.py: a small LayerNorm 13 us -> 7.8 ms with 2 threads on 2 cores
while the other core was busy). So the default is the cores this process may run on
(``os.sched_getaffinity``: the CPU set a container or ``taskset`` gives it, not the machine's
count) minus a reserve left to the neighbours (the Redis, the HTTP event loop, the other jobs of
a shared box), and never below 1. Setting the count explicitly overrides it.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

# Cores left to everything else on the machine by default (the event loop, Redis, neighbours).
THREAD_RESERVE = 1


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity set; the machine count where the
    platform has no affinity call)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads(reserve: int = THREAD_RESERVE) -> int:
    """``available_cores() - reserve``, at least 1."""
    return max(1, available_cores() - max(0, reserve))


def resolve_threads(threads: int | None, reserve: int = THREAD_RESERVE) -> int:
    """The thread count to use: ``threads`` when given (>= 1), else :func:`default_threads`."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        return threads
    return default_threads(reserve)


def configure_threads(threads: int | None, reserve: int = THREAD_RESERVE) -> int:
    """Set torch's intra-op threads (see :func:`resolve_threads`) and return the count, which
    onnxruntime sessions are given too (models/onnx_encoders.py)."""
    n = resolve_threads(threads, reserve)
    torch.set_num_threads(n)
    logger.info(
        "intra-op threads: %d (%s; %d cores available)",
        n,
        "set" if threads is not None else f"default: available - {reserve}",
        available_cores(),
    )
    return n


__all__ = [
    "THREAD_RESERVE",
    "available_cores",
    "configure_threads",
    "default_threads",
    "resolve_threads",
]
