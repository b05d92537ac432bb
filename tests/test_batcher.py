"""The micro-batcher and the caches, without HTTP or a model: a fake linker records calls."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from models.mimic import MimicFeatures
from service.batcher import MicroBatcher, QueueFull, ShuttingDown
from service.cache import LruCache, RedisCache
from service.metrics import Metrics
from service.primitives import (
    CandidateResult,
    EncodedMentions,
    LinkParams,
    LinkResult,
    LinkTimes,
    MentionBatch,
    MentionInput,
)


def _feats(values: list[float]) -> EncodedMentions:
    t = torch.tensor(values).reshape(-1, 1)
    return EncodedMentions(MimicFeatures(t, t.unsqueeze(1), t, t.unsqueeze(1)))


class FakeLinker:
    """Encodes a mention as float(len(mention)); links it to an entity named after that."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.delay_s, self.fail = delay_s, fail
        self.encoded: list[list[str]] = []
        self.beside: list[bool] = []
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def encode(self, items: list[MentionInput], beside: bool = True) -> EncodedMentions:
        self.encoded.append([it.mention for it in items])
        self.beside.append(beside)
        return _feats([float(len(it.mention)) for it in items])

    def pack(self, feats: EncodedMentions) -> list[bytes]:
        return [str(float(v)).encode() for v in feats.mimic.text_cls[:, 0]]

    def unpack(self, blobs: list[bytes]) -> EncodedMentions:
        return _feats([float(b.decode()) for b in blobs])

    def link(
        self, batch: MentionBatch, params: list[LinkParams]
    ) -> tuple[list[LinkResult], LinkTimes]:
        self.gate.wait(10)
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("model exploded")
        self.batches.append(len(params))
        out = []
        # the words travel with their encodings, in the same order
        lengths = [len(it.mention) for it in batch.inputs]
        assert lengths == [int(v) for v in batch.encoded.mimic.text_cls[:, 0]]
        for v, p in zip(batch.encoded.mimic.text_cls[:, 0].tolist(), params, strict=True):
            c = CandidateResult(f"E{int(v)}", f"len {int(v)}", v, v, 1)
            out.append(LinkResult((c,), nil=False, reranker=p.reranker))
        return out, LinkTimes(0.001, 0.002, {"mimic": 0.002})


def _batcher(linker: FakeLinker, **kw: object) -> MicroBatcher:
    args: dict[str, object] = {
        "cache": None,
        "max_batch_size": 4,
        "max_wait_ms": 50.0,
        "queue_size": 64,
        "cache_prefix": "t",
    }
    args.update(kw)
    return MicroBatcher(linker, metrics=Metrics(), **args)  # type: ignore[arg-type]


def test_concurrent_mentions_are_batched_and_answered_in_order() -> None:
    async def run() -> None:
        linker = FakeLinker()
        b = _batcher(linker)
        await b.start()
        words = ["a" * n for n in range(1, 11)]
        out = await asyncio.gather(*(b.submit(MentionInput(w, "s"), LinkParams()) for w in words))
        await b.stop()
        assert [o.result.candidates[0].entity_id for o in out] == [f"E{n}" for n in range(1, 11)]
        assert all(1 <= n <= 4 for n in linker.batches) and sum(linker.batches) == 10
        assert len(linker.batches) == 3  # 10 mentions in batches of at most 4
        assert out[0].times.batch_size == 4 and out[-1].times.batch_size == 2
        assert all(o.queue_ms >= 0 for o in out)
        assert out[0].times.retrieve_ms == pytest.approx(1.0)

    asyncio.run(run())


def test_encoding_cache_hits_skip_the_encoder() -> None:
    async def run() -> None:
        linker = FakeLinker()
        cache = LruCache(100, 60)
        b = _batcher(linker, cache=cache)
        await b.start()
        first = await b.submit(MentionInput("abc", "s"), LinkParams())
        again = await asyncio.gather(
            b.submit(MentionInput("abc", "s"), LinkParams()),  # hit
            b.submit(MentionInput("abcdefg", "s"), LinkParams()),  # miss
        )
        await b.stop()
        assert linker.encoded == [["abc"], ["abcdefg"]]  # the hit was never re-encoded
        assert again[0].result == first.result
        assert again[1].result.candidates[0].entity_id == "E7"

    asyncio.run(run())


def test_full_queue_and_shutdown_are_typed_errors() -> None:
    async def run() -> None:
        linker = FakeLinker()
        linker.gate.clear()  # the model thread blocks until released
        b = _batcher(linker, queue_size=1, max_batch_size=1, max_wait_ms=0.0)
        await b.start()
        first = asyncio.ensure_future(b.submit(MentionInput("a", "s"), LinkParams()))
        await asyncio.sleep(0.05)  # taken by the worker, blocked in link()
        second = asyncio.ensure_future(b.submit(MentionInput("bb", "s"), LinkParams()))
        await asyncio.sleep(0.01)  # queued: the queue holds one
        with pytest.raises(QueueFull):
            await b.submit(MentionInput("ccc", "s"), LinkParams())
        linker.gate.set()
        done = await asyncio.gather(first, second)
        assert [d.result.candidates[0].entity_id for d in done] == ["E1", "E2"]
        await b.stop()
        with pytest.raises(ShuttingDown):
            await b.submit(MentionInput("d", "s"), LinkParams())

    asyncio.run(run())


def test_a_failed_batch_fails_each_of_its_jobs_and_the_worker_goes_on() -> None:
    async def run() -> None:
        linker = FakeLinker(fail=True)
        b = _batcher(linker)
        await b.start()
        res = await asyncio.gather(
            *(b.submit(MentionInput(w, "s"), LinkParams()) for w in ("a", "bb")),
            return_exceptions=True,
        )
        assert all(isinstance(r, RuntimeError) for r in res)
        linker.fail = False
        ok = await b.submit(MentionInput("abc", "s"), LinkParams())
        assert ok.result.candidates[0].entity_id == "E3"
        await b.stop()

    asyncio.run(run())


def test_stop_lets_queued_jobs_finish() -> None:
    async def run() -> None:
        linker = FakeLinker(delay_s=0.05)
        b = _batcher(linker, max_batch_size=1)
        await b.start()
        jobs = [
            asyncio.ensure_future(b.submit(MentionInput("a" * n, "s"), LinkParams()))
            for n in (1, 2, 3)
        ]
        await asyncio.sleep(0.01)
        await b.stop(timeout_s=10)
        assert [j.result().result.candidates[0].entity_id for j in jobs] == ["E1", "E2", "E3"]

    asyncio.run(run())


def test_stop_answers_a_batch_that_is_still_filling() -> None:
    """A job taken off the queue while its batch waits to fill is in flight: stop() must
    let it finish (a hot swap retires a batcher under load), not cancel it unanswered."""

    async def run() -> None:
        b = _batcher(FakeLinker(), max_batch_size=8, max_wait_ms=300.0)
        await b.start()
        job = asyncio.ensure_future(b.submit(MentionInput("a", "s"), LinkParams()))
        await asyncio.sleep(0.05)  # collected; the batch waits for more
        assert b.queue.empty()
        await b.stop(timeout_s=10)
        assert job.done() and job.result().result.candidates[0].entity_id == "E1"

    asyncio.run(run())


def test_without_a_wait_a_lone_mention_starts_at_once_and_a_batch_call_stays_whole() -> None:
    """MEL_MAX_WAIT_MS=0 (the default): a batch takes what is queued when a worker is free.
    A lone mention is not held back, yet mentions submitted in one loop tick (a batch call's
    items) still reach the model as one batch, and mentions that queue while the worker is
    busy make the next batch."""

    async def run() -> None:
        from service.settings import ServiceSettings

        assert ServiceSettings.model_fields["max_wait_ms"].default == 0.0
        with pytest.raises(ValueError, match="greater than or equal to 0"):
            ServiceSettings(max_wait_ms=-1)
        linker = FakeLinker()
        b = _batcher(linker, max_batch_size=16, max_wait_ms=0.0)
        await b.start()
        lone = await b.submit(MentionInput("a", "s"), LinkParams())
        assert lone.times.batch_size == 1
        words = ["b" * n for n in range(1, 11)]
        await asyncio.gather(*(b.submit(MentionInput(w, "s"), LinkParams()) for w in words))
        linker.gate.clear()  # the next batch holds the worker while three more queue
        busy = asyncio.ensure_future(b.submit(MentionInput("c", "s"), LinkParams()))
        await asyncio.sleep(0.02)
        late = []
        for k in (3, 4, 5):  # one by one, while the worker is busy
            late.append(asyncio.ensure_future(b.submit(MentionInput("d" * k, "s"), LinkParams())))
            await asyncio.sleep(0.01)
        linker.gate.set()
        await asyncio.gather(busy, *late)
        await b.stop()
        assert linker.batches == [1, 10, 1, 3]

    asyncio.run(run())


class OverlapLinker(FakeLinker):
    """Records how many batches (and calls) are on the model threads at once."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(delay_s=delay_s)
        self.lock = threading.Lock()
        self.now = self.peak = self.calls = 0
        self.call_overlapped = False

    def link(
        self, batch: MentionBatch, params: list[LinkParams]
    ) -> tuple[list[LinkResult], LinkTimes]:
        with self.lock:
            self.call_overlapped |= self.calls > 0
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            return super().link(batch, params)
        finally:
            with self.lock:
                self.now -= 1

    def exclusive(self) -> str:
        with self.lock:  # a batch, or another call, on the model threads meanwhile?
            self.call_overlapped |= self.now > 0 or self.calls > 0
            self.calls += 1
        time.sleep(0.05)
        with self.lock:
            self.calls -= 1
            self.call_overlapped |= self.now > 0
        return "done"


def test_two_workers_split_a_batch_and_run_side_by_side() -> None:
    """A batch call's 16 mentions arrive at once with 2 idle workers: two parts of 8 run at
    the same time; every answer still reaches its own job."""

    async def run() -> None:
        linker = OverlapLinker(delay_s=0.1)
        b = _batcher(linker, max_batch_size=16, max_wait_ms=20.0, workers=2)
        await b.start()
        words = ["a" * n for n in range(1, 17)]
        out = await asyncio.gather(*(b.submit(MentionInput(w, "s"), LinkParams()) for w in words))
        await b.stop()
        assert [o.result.candidates[0].entity_id for o in out] == [f"E{n}" for n in range(1, 17)]
        assert sorted(linker.batches) == [8, 8] and linker.peak == 2
        # every worker took a part: no core to lend to an image tower
        assert linker.beside == [False, False]

    asyncio.run(run())


def test_one_worker_never_splits_and_small_batches_stay_whole() -> None:
    async def run() -> None:
        for workers, n, parts in ((1, 16, [16]), (2, 6, [6]), (3, 12, [4, 4, 4])):
            linker = FakeLinker()
            b = _batcher(linker, max_batch_size=16, max_wait_ms=20.0, workers=workers)
            await b.start()
            await asyncio.gather(
                *(b.submit(MentionInput("a" * k, "s"), LinkParams()) for k in range(1, n + 1))
            )
            await b.stop()
            assert sorted(linker.batches) == parts, (workers, n)
            # a worker left idle lends its core (models/towers.py); all busy: none to lend
            assert linker.beside == [len(parts) < workers] * len(parts), (workers, n)

    asyncio.run(run())


def test_a_worker_takes_its_share_of_the_queue_while_another_is_busy() -> None:
    """With one worker busy, a free worker takes ceil(queued / workers) of the queued
    mentions (at least MIN_PART), not all of them: the rest goes to the next worker to come
    free instead of waiting behind one long batch (concurrency 16's tail latency)."""

    async def run() -> None:
        linker = OverlapLinker(delay_s=0.0)
        linker.gate.clear()  # batches hold their workers until released
        b = _batcher(linker, max_batch_size=32, max_wait_ms=0.0, workers=2)
        await b.start()
        first = asyncio.ensure_future(b.submit(MentionInput("a", "s"), LinkParams()))
        await asyncio.sleep(0.02)  # on one worker, blocked
        queued = [
            asyncio.ensure_future(b.submit(MentionInput("b" * k, "s"), LinkParams()))
            for k in range(1, 13)
        ]
        await asyncio.sleep(0.05)  # the other worker took its share; the rest waits
        assert b.queue.qsize() == 6 and linker.peak == 2
        linker.gate.set()
        out = await asyncio.gather(first, *queued)
        await b.stop()
        assert [o.result.candidates[0].entity_id for o in out[1:]] == [
            f"E{k}" for k in range(1, 13)
        ]
        assert sorted(linker.batches[:2]) == [1, 6] and sum(linker.batches[2:]) == 6

    asyncio.run(run())


def test_a_call_waits_for_running_batches_and_holds_new_ones_back() -> None:
    """Live KB updates run alone on the model threads, however many workers there are."""

    async def run() -> None:
        linker = OverlapLinker(delay_s=0.05)
        b = _batcher(linker, max_batch_size=2, max_wait_ms=0.0, workers=2)
        await b.start()
        jobs = [
            asyncio.ensure_future(b.submit(MentionInput("a" * k, "s"), LinkParams()))
            for k in range(1, 13)
        ]
        await asyncio.sleep(0.02)  # batches running on both workers
        calls = [asyncio.ensure_future(b.call(linker.exclusive)) for _ in range(3)]
        more = [
            asyncio.ensure_future(b.submit(MentionInput("b" * k, "s"), LinkParams()))
            for k in range(1, 5)
        ]
        assert await asyncio.gather(*calls) == ["done"] * 3
        await asyncio.gather(*jobs, *more)
        await b.stop()
        assert not linker.call_overlapped and linker.peak == 2

    asyncio.run(run())


def test_stop_past_its_deadline_fails_collected_jobs_instead_of_dropping_them() -> None:
    """A job collected while a live KB call holds the model threads, and a stop() whose
    deadline passes first: the job is answered ShuttingDown (a hot swap re-runs it on the new
    generation), never left waiting forever."""

    async def run() -> None:
        linker = OverlapLinker(delay_s=0.0)
        b = _batcher(linker, max_batch_size=4, max_wait_ms=0.0, workers=2)
        await b.start()
        slow = asyncio.ensure_future(b.call(time.sleep, 0.3))
        await asyncio.sleep(0.02)  # the call holds the model threads
        job = asyncio.ensure_future(b.submit(MentionInput("a", "s"), LinkParams()))
        await asyncio.sleep(0.02)  # collected; waits for the call to finish
        await b.stop(timeout_s=0.05)
        await slow
        with pytest.raises(ShuttingDown):
            await asyncio.wait_for(job, 1.0)

    asyncio.run(run())


def test_lru_cache_evicts_and_expires() -> None:
    now = [0.0]
    c = LruCache(2, ttl_s=10, clock=lambda: now[0])

    async def run() -> None:
        await c.set_many([("a", b"1"), ("b", b"2")])
        assert await c.get_many(["a"]) == [b"1"]  # a is now the most recent
        await c.set_many([("c", b"3")])
        assert await c.get_many(["a", "b", "c"]) == [b"1", None, b"3"]
        now[0] = 11.0
        assert await c.get_many(["a", "c"]) == [None, None]

    asyncio.run(run())


def test_redis_cache_reports_its_state_and_never_raises() -> None:
    states: list[bool] = []
    errors: list[str] = []

    async def run() -> None:
        # nothing listens on port 9 of loopback: every call fails fast and is a miss
        c = RedisCache(
            "redis://127.0.0.1:9/0", 60, 0.2, 5.0, on_error=errors.append, on_state=states.append
        )
        assert await c.get_many(["k"]) == [None]
        assert not c.available  # the breaker is open: no second connection attempt
        assert await c.get_many(["k"]) == [None]
        await c.set_many([("k", b"v")])
        assert await c.ping() is False
        await c.close()

    asyncio.run(run())
    assert states == [False, False] and len(errors) == 2
