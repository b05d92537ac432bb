"""Dynamic micro-batching: concurrent mentions are grouped and encoded together.

Requests put :class:`~service.primitives.LinkJob` s on a bounded queue (full ->
:class:`QueueFull`, answered 429). A collector takes up to ``max_batch_size`` jobs once a
model worker is free: what is queued then (by default; under load, whatever arrived while the
workers were busy), or what arrives within ``max_wait_ms`` when that is set (the encoders
cost about as much per mention alone as in a batch here, so waiting for company costs
latency and, at 2-8 requests in flight, throughput: bench/results/service-ab-wait.md).
While another worker is busy it takes only its share of the queue (:meth:`_share`).
The batch looks up cached mention encodings and runs the model work (encode the misses,
retrieve, rerank) on one of ``workers`` model threads, never on the event loop. With several
workers the collector forms the next batch while the others run, and a batch that arrives
while more than one worker is idle (a ``/v1/link/batch`` call) is split between them. Each
job's future gets its typed result. :meth:`MicroBatcher.call` runs a function on a model
thread with no batch running (live KB updates). ``stop()`` lets queued and in-flight jobs
finish (graceful shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from service.cache import Cache
from service.metrics import Metrics
from service.primitives import (
    BatchTimes,
    EncodedMentions,
    LinkedMention,
    LinkJob,
    LinkParams,
    LinkResult,
    LinkTimes,
    MentionBatch,
    MentionInput,
)

logger = logging.getLogger(__name__)
T = TypeVar("T")

# A batch is split between idle workers only into parts of at least this many mentions: below
# that, a part's fixed costs (a tower call, a search) outweigh the parallelism.
MIN_PART = 4


class QueueFull(Exception):
    """The request queue is full: the client should retry later (HTTP 429)."""


class ShuttingDown(Exception):
    """The server is draining: no new work is accepted (HTTP 503)."""


class ModelWork(Protocol):
    """What the batcher needs of the linker (a protocol, so tests can hand it a fake)."""

    def encode(self, items: list[MentionInput], beside: bool = True) -> EncodedMentions: ...

    def pack(self, feats: EncodedMentions) -> list[bytes]: ...

    def unpack(self, blobs: list[bytes]) -> EncodedMentions: ...

    def link(
        self, batch: MentionBatch, params: list[LinkParams]
    ) -> tuple[list[LinkResult], LinkTimes]: ...


class MicroBatcher:
    def __init__(
        self,
        linker: ModelWork,
        cache: Cache | None,
        metrics: Metrics,
        max_batch_size: int,
        max_wait_ms: float,
        queue_size: int,
        cache_prefix: str,
        workers: int = 1,
    ) -> None:
        self.linker, self.cache, self.metrics = linker, cache, metrics
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000.0
        self.queue: asyncio.Queue[LinkJob] = asyncio.Queue(maxsize=queue_size)
        self.prefix = cache_prefix
        # model threads: each runs whole batches with the linker's intra-op threads (one per
        # free core and one thread each by default: models/threads.py plan_workers)
        self.workers = max(1, workers)
        self.executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="mel-model")
        self.accepting = False
        self.in_flight = 0  # jobs taken off the queue and not answered yet
        self._running = 0  # batches (or one call) on the model threads
        self._exclusive = 0  # calls waiting for the model threads to themselves
        self._cond: asyncio.Condition | None = None
        self._task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self._filling: list[LinkJob] = []  # taken off the queue, not handed to a worker yet

    async def start(self) -> None:
        self.accepting = True
        self._cond = asyncio.Condition()
        self._task = asyncio.create_task(self._run(), name="mel-batcher")

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop accepting; finish queued and in-flight jobs; then stop the worker."""
        self.accepting = False
        deadline = time.monotonic() + timeout_s
        while (not self.queue.empty() or self.in_flight) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._batches:  # past the deadline: let the running ones answer their jobs
            await asyncio.gather(*self._batches, return_exceptions=True)
        for job in self._filling:  # collected but never started: failed, not left waiting
            job.fail(ShuttingDown("the server is shutting down"))
        self._filling = []
        # what the deadline left queued is failed, never left waiting (a hot swap re-runs
        # it on the new generation; a stopping server answers 503)
        while not self.queue.empty():
            self.queue.get_nowait().fail(ShuttingDown("the server is shutting down"))
        self.executor.shutdown(wait=True)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on a model thread while no batch runs (live KB updates: they
        must not interleave with a batch reading the index). Batches not started yet wait."""
        if not self.accepting:
            raise ShuttingDown("the server is shutting down")
        cond = self._condition()
        async with cond:
            self._exclusive += 1
            try:
                await cond.wait_for(lambda: self._running == 0)
            except BaseException:
                self._exclusive -= 1
                cond.notify_all()
                raise
            self._running += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            async with cond:
                self._running -= 1
                self._exclusive -= 1
                cond.notify_all()

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            raise ShuttingDown("the batcher is not started")
        return self._cond

    async def submit(self, item: MentionInput, params: LinkParams) -> LinkedMention:
        if not self.accepting:
            raise ShuttingDown("the server is shutting down")
        job = LinkJob(item, params, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull as exc:
            raise QueueFull(f"{self.queue.maxsize} mentions already queued") from exc
        self.metrics.queue_depth.set(self.queue.qsize())
        # shield: a caller that times out must not cancel a job its batch-mates depend on
        return await asyncio.shield(job.future)

    async def _collect(self) -> list[LinkJob]:
        batch = self._filling = [await self.queue.get()]
        # counted as in flight from the moment they leave the queue: stop() must not take a
        # batch still filling up for an idle worker (its jobs would never be answered)
        self.in_flight += 1
        limit = self._share(1 + self.queue.qsize())
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < limit:
            try:
                batch.append(self.queue.get_nowait())
                self.in_flight += 1
                continue
            except asyncio.QueueEmpty:
                pass
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
                self.in_flight += 1
            except TimeoutError:
                break
        return batch

    def _share(self, available: int) -> int:
        """How many of the ``available`` queued jobs the batch being formed takes. Every
        worker idle: up to ``max_batch_size`` (split between them, :meth:`_split`). Others
        busy: this worker's share, ``available / workers`` (at least :data:`MIN_PART`); the
        rest stays queued for the next worker to come free instead of waiting behind this
        batch, since a CPU encoder costs about as much per mention in a batch of 16 as in
        two of 8 (bench/results/service-ab-share.md)."""
        if self._running == 0:
            return self.max_batch_size
        return min(self.max_batch_size, max(MIN_PART, -(-available // self.workers)))

    def _split(self, batch: list[LinkJob], idle: int) -> list[list[LinkJob]]:
        """``batch`` in near-equal parts, one per idle worker, none under :data:`MIN_PART`."""
        n = max(1, min(idle, len(batch) // MIN_PART))
        size = -(-len(batch) // n)
        return [batch[i : i + size] for i in range(0, len(batch), size)]

    async def _run(self) -> None:
        cond = self._condition()
        while True:
            async with cond:  # a batch is formed when a worker can take it
                await cond.wait_for(lambda: self._running < self.workers and not self._exclusive)
            batch = await self._collect()
            async with cond:
                await cond.wait_for(lambda: self._running < self.workers and not self._exclusive)
                parts = self._split(batch, self.workers - self._running)
                self._running += len(parts)
                # a worker left idle lends its core to these parts' image towers
                # (models/towers.py); parts that take every worker encode theirs in turn
                spare = self._running < self.workers
                self._filling = []
            self.metrics.queue_depth.set(self.queue.qsize())
            for part in parts:
                self.metrics.batch_size.observe(len(part))
                task = asyncio.create_task(self._batch(part, spare), name="mel-batch")
                self._batches.add(task)
                task.add_done_callback(self._batches.discard)

    async def _batch(self, batch: list[LinkJob], spare: bool = False) -> None:
        """One batch on a model thread: cached encodings, model work, answers, cache fill."""
        loop = asyncio.get_running_loop()
        try:
            keys = [f"{self.prefix}:enc:{j.item.encoding_key()}" for j in batch]
            blobs: list[bytes | None] = (
                await self.cache.get_many(keys) if self.cache else [None] * len(batch)
            )
            for b in blobs:
                self.metrics.cache.labels(kind="encoding", outcome="hit" if b else "miss").inc()
            results, new_blobs, times = await loop.run_in_executor(
                self.executor, self._work, batch, blobs, spare
            )
            for job, res in zip(batch, results, strict=True):
                job.complete(res, times)
            if self.cache and new_blobs:
                await self.cache.set_many([(keys[i], b) for i, b in new_blobs])
        except Exception as exc:
            logger.exception("model batch of %d failed", len(batch))
            self.metrics.errors.labels(type="model").inc(len(batch))
            for job in batch:
                job.fail(exc)
        finally:
            self.in_flight -= len(batch)
            cond = self._condition()
            async with cond:
                self._running -= 1
                cond.notify_all()

    def _work(
        self, batch: list[LinkJob], blobs: list[bytes | None], spare: bool = False
    ) -> tuple[list[LinkResult], list[tuple[int, bytes]], BatchTimes]:
        """A model thread: encode cache misses, merge with hits, retrieve, rerank. ``spare``:
        a worker was idle when this batch started (its core may encode the images)."""
        t0 = time.perf_counter()
        miss = [i for i, b in enumerate(blobs) if b is None]
        hits = [(i, b) for i, b in enumerate(blobs) if b is not None]
        groups: list[EncodedMentions] = []
        order: list[int] = []
        new_blobs: list[tuple[int, bytes]] = []
        if miss:
            f = self.linker.encode([batch[i].item for i in miss], beside=spare)
            new_blobs = list(zip(miss, self.linker.pack(f), strict=True))
            groups.append(f)
            order += miss
        if hits:
            groups.append(self.linker.unpack([b for _, b in hits]))
            order += [i for i, _ in hits]
        merged = EncodedMentions.cat(groups) if len(groups) > 1 else groups[0]
        feats = merged.select(sorted(range(len(order)), key=order.__getitem__))
        t_enc = time.perf_counter() - t0
        mentions = MentionBatch(tuple(j.item for j in batch), feats)
        results, st = self.linker.link(mentions, [j.params for j in batch])
        m = self.metrics.stage_seconds
        m.labels(stage="encode").observe(t_enc)
        m.labels(stage="retrieve").observe(st.retrieve)
        m.labels(stage="rerank").observe(st.rerank)
        for reranker, secs in st.per_reranker.items():
            self.metrics.rerank_seconds.labels(reranker=reranker).observe(secs)
        for j in batch:
            self.metrics.mentions.labels(reranker=j.params.reranker).inc()
        times = BatchTimes(
            encode_ms=1000 * t_enc,
            retrieve_ms=1000 * st.retrieve,
            rerank_ms=1000 * st.rerank,
            batch_size=len(batch),
            finished=time.perf_counter(),
        )
        return results, new_blobs, times


__all__ = ["MicroBatcher", "ModelWork", "QueueFull", "ShuttingDown"]
