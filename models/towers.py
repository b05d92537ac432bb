"""A batch's image tower beside its text tower, on a core no other batch is using.

Encoding a mention batch runs two independent encoders, MiniLM over the texts and
EfficientNet-Lite0 over the images, each single-threaded by default (one model worker per free
core, models/threads.py). One after the other, a one-mention request waits for both (text
~10 ms + image ~10 ms here) while, at low load, the other worker's core sits idle. Run side by
side on two threads, the same batch encodes 1.6-1.8x faster on 2 cores
(bench/results/towers.md), with bit-identical features: each tower is the same computation on
the same inputs, only on another thread.

:class:`TowerRunner` lends the image tower a core only when one is free: every encode claims
its ``threads`` (the intra-op threads of each tower) from a budget of ``cores`` (model workers x
threads, what the process planned to use), and the image tower goes to a helper thread only
when the claims leave room for ``threads`` more. So under load, with every worker encoding, each
encode runs its towers in turn as before and no core is oversubscribed by design; a batch that
starts while another holds the spare core briefly shares it (never waits for it).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

A = TypeVar("A")
B = TypeVar("B")


def _in_inference_mode(fn: Callable[[], B]) -> B:
    # inference mode is thread-local: the helper thread sets it as the caller has it
    with torch.inference_mode():
        return fn()


class TowerRunner:
    """Runs ``text()`` and ``image()`` of one batch, side by side when a core is free."""

    def __init__(self, cores: int, threads: int) -> None:
        if threads < 1 or cores < 1:
            raise ValueError(f"cores and threads must be >= 1, got {cores} and {threads}")
        self.cores, self.threads = cores, threads
        self._lock = threading.Lock()
        self._claimed = 0  # cores the encodes in flight use now
        self.beside = 0  # encodes that ran their towers side by side (for tests and logs)
        self.in_turn = 0
        # one helper per pair of tower slots the budget can hold beside a text tower
        helpers = cores // (2 * threads)
        self._pool = (
            ThreadPoolExecutor(max_workers=helpers, thread_name_prefix="mel-tower")
            if helpers
            else None
        )

    @property
    def enabled(self) -> bool:
        """Whether the budget ever leaves room for a second tower."""
        return self._pool is not None

    @contextlib.contextmanager
    def _claim(self, want_beside: bool) -> Iterator[bool]:
        with self._lock:
            beside = (
                want_beside
                and self._pool is not None
                and self._claimed + 2 * self.threads <= self.cores
            )
            n = self.threads * (2 if beside else 1)
            self._claimed += n
            if beside:
                self.beside += 1
            else:
                self.in_turn += 1
        try:
            yield beside
        finally:
            with self._lock:
                self._claimed -= n

    def run(
        self, text: Callable[[], A], image: Callable[[], B], beside: bool = True
    ) -> tuple[A, B]:
        """(text(), image()); ``image`` on a helper thread while ``text`` runs on this one when
        ``beside`` and a core is free (the caller says False when the batch has no image
        to encode: the no-image rule is no tower pass)."""
        with self._claim(beside) as parallel:
            if not parallel:
                return text(), image()
            assert self._pool is not None
            future = self._pool.submit(_in_inference_mode, image)
            try:
                t = text()
            except BaseException:
                wait([future])  # the helper holds the claimed core: never leave it running
                raise
            return t, future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


__all__ = ["TowerRunner"]
