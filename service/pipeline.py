"""The request pipeline: ``LinkService`` holds what a link request goes through.

route -> :class:`LinkService` (bounds, image bytes, pixel budget, result cache) ->
:class:`~service.batcher.MicroBatcher` -> :class:`~service.linker.Linker` (encode, retrieve,
rerank). Importable and testable without HTTP; the routes in ``service/routes/`` only parse
and call it. Loading happens in the background after start-up (``/readyz`` says 503 until
the linker is loaded and warm).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pydantic import ValidationError

from index.live import LiveUpdateError
from service.batcher import MicroBatcher, QueueFull, ShuttingDown
from service.cache import Cache, LruCache, RedisCache
from service.errors import ApiError, describe, validation_code
from service.images import ImageLimits, ImageProbe, decode_base64, fetch_image_url, open_image
from service.images import probe_image as probe
from service.kb import EntitiesNotFound, LiveKb, NewEntity, UpdateResult
from service.linker import Linker
from service.metrics import Metrics
from service.primitives import LinkedMention, LinkParams, MentionInput
from service.schemas import (
    BatchItemResult,
    BatchResponse,
    Candidate,
    ErrorBody,
    LinkRequest,
    LinkResponse,
    Timings,
)
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """A validated request with its image bytes read and their header checked."""

    req: LinkRequest
    params: LinkParams
    image: bytes | None
    probe: ImageProbe | None
    started: float

    @property
    def pixels(self) -> int:
        return self.probe.pixels if self.probe is not None else 0


@dataclass(frozen=True)
class Decoded:
    """A request's image decoded (None without one), its pixels through the serving encoder's
    transform (None: the image tower runs the transform itself), and the seconds both took on
    the worker thread."""

    image: Image.Image | None
    pixels: torch.Tensor | None
    seconds: float


def to_response(linker: Linker, linked: LinkedMention) -> LinkResponse:
    """The wire answer of one linked mention (timings are set by the caller)."""
    r = linked.result
    return LinkResponse(
        candidates=[
            Candidate(
                entity_id=c.entity_id,
                name=c.name,
                score=c.score,
                retrieval_score=c.retrieval_score,
                rank=c.rank,
                confidence=c.confidence,
                explain=c.explain,
            )
            for c in r.candidates
        ],
        nil=r.nil,
        answer_confidence=r.answer_confidence,
        in_kb_probability=r.in_kb_probability,
        reranker=r.reranker,
        model_version=linker.fingerprint,
        index_version=linker.searcher.version,
        timings=Timings(),
    )


@dataclass(frozen=True)
class Serving:
    """One loaded generation of what answers requests: a linker, its micro-batcher, the cache
    prefix of its versions and its live-KB writer. A hot swap replaces it whole."""

    linker: Linker
    batcher: MicroBatcher
    prefix: str
    kb: LiveKb
    settings: ServiceSettings
    pending: dict[str, str]  # reranker -> configured folder that is not complete yet


# reranker -> the setting that names its folder; a folder is complete once it has config.json
# (written last by save_pretrained, atomically)
OPTIONAL_MODELS = {"drin": "drin_model_path", "fusion": "fusion_model_path"}
STATUS_FILE = "status.json"  # what a job training a model into a folder says about it


def _complete(path: str) -> bool:
    return (Path(path) / "config.json").is_file()


def pending_status(path: str) -> dict[str, Any]:
    """What is known of a reranker folder that is not complete: the training job's
    ``status.json`` beside it (``<folder>/../status.json``) when it writes one."""
    out: dict[str, Any] = {"path": path, "state": "waiting"}
    for f in (Path(path) / STATUS_FILE, Path(path).parent / STATUS_FILE):
        if f.is_file():
            with contextlib.suppress(ValueError, OSError):
                out.update(json.loads(f.read_text(encoding="utf-8")))
            break
    return out


class LinkService:
    def __init__(
        self,
        settings: ServiceSettings,
        metrics: Metrics,
        linker_factory: Callable[[ServiceSettings], Linker] = Linker,
    ) -> None:
        self.settings, self.metrics, self.linker_factory = settings, metrics, linker_factory
        self.limits = ImageLimits(
            settings.max_image_bytes, settings.max_image_pixels, tuple(settings.image_formats)
        )
        self.ready = False
        self.stopping = False
        self.load_error: str | None = None
        self.swap_error: str | None = None
        self.state: Serving | None = None
        self.cache: Cache | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._swap_lock = asyncio.Lock()  # one swap or live update at a time
        self._replan = False  # whether each generation re-takes the default worker plan

    @property
    def linker(self) -> Linker | None:
        return self.state.linker if self.state is not None else None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Begin loading in the background (the app answers /healthz meanwhile)."""
        self._tasks.append(asyncio.create_task(self._load(), name="mel-load"))

    async def _cache(self) -> Cache:
        s = self.settings
        if not s.redis_url:
            return LruCache(s.lru_size, s.cache_ttl_s)
        redis = RedisCache(
            s.redis_url,
            s.cache_ttl_s,
            s.redis_timeout_s,
            s.redis_retry_s,
            on_error=lambda e: self.metrics.cache_errors.labels(error=e).inc(),
            on_state=lambda up: self.metrics.redis_up.set(1 if up else 0),
        )
        await redis.ping()
        self._tasks.append(asyncio.create_task(self._watch(redis), name="mel-redis"))
        return redis

    async def _build(self, s: ServiceSettings) -> Serving:
        """Load a generation beside the one serving (model, index, the rerankers whose
        folders are complete), warm it up and start its batcher."""
        pending = {
            name: str(getattr(s, key))
            for name, key in OPTIONAL_MODELS.items()
            if getattr(s, key) and not _complete(str(getattr(s, key)))
        }
        loadable = s.model_copy(update={OPTIONAL_MODELS[n]: None for n in pending})
        linker = await asyncio.to_thread(self.linker_factory, loadable)
        try:
            if s.warmup:
                await asyncio.to_thread(linker.warmup)
            prefix = f"mel:{linker.cache_version}"
            batcher = MicroBatcher(
                linker,
                self.cache,
                self.metrics,
                s.max_batch_size,
                s.max_wait_ms,
                s.queue_size,
                prefix,
                workers=s.model_workers or 1,
            )
            await batcher.start()
        except BaseException:
            linker.close()
            raise
        kb = LiveKb(linker.model, linker.searcher, s.lock_timeout_s)
        return Serving(linker, batcher, prefix, kb, s, pending)

    async def _load(self) -> None:
        try:
            # the default plan (neither count set) is taken from the cores free now, and again
            # at each hot swap (see swap); counts that were set are kept
            from models.device import resolve_device

            self._replan = (
                self.settings.model_workers is None
                and self.settings.intra_op_threads is None
                and resolve_device(self.settings.device).type == "cpu"
            )
            self.settings = await asyncio.to_thread(self.settings.with_worker_plan)
            s = self.settings
            logger.info(
                "model workers: %s x %s intra-op thread(s)",
                s.model_workers,
                s.intra_op_threads or "default",
            )
            self.cache = await self._cache()
            self.state = await self._build(self.settings)
            self.ready = True
            self.metrics.ready.set(1)
            linker = self.state.linker
            logger.info("ready: model %s, index %s", linker.fingerprint, linker.index_version)
            if self.state.pending:
                logger.info("still training: %s", ", ".join(self.state.pending))
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("failed to load the linker")
            return
        s = self.settings
        if s.reload_poll_s > 0:
            self._tasks.append(asyncio.create_task(self._watch_pending(), name="mel-pending"))
        if s.live_poll_s > 0:
            self._tasks.append(asyncio.create_task(self._watch_live(), name="mel-live"))

    async def _watch(self, redis: RedisCache) -> None:
        """Ping Redis on a timer: the gauge and the breaker follow it between requests."""
        while True:
            await asyncio.sleep(self.settings.redis_health_interval_s)
            await redis.ping()

    async def _watch_pending(self) -> None:
        """Load rerankers still being trained once their folders are complete (a hot swap:
        the running server picks them up without a restart)."""
        while True:
            await asyncio.sleep(self.settings.reload_poll_s)
            state = self.state
            if state is None or not any(_complete(p) for p in state.pending.values()):
                continue
            try:
                await self.swap({})
            except Exception:
                logger.exception("loading a newly trained reranker failed; still serving")

    async def _watch_live(self) -> None:
        """Apply index updates that another process (a replica) committed to the folder."""
        while True:
            await asyncio.sleep(self.settings.live_poll_s)
            state = self.state
            if state is None or self._swap_lock.locked():
                continue
            with contextlib.suppress(ShuttingDown):
                async with self._swap_lock:
                    n = await state.batcher.call(state.linker.searcher.refresh)
                if n:
                    logger.info("applied %d index update(s) written by another process", n)

    async def swap(self, changes: dict[str, Any]) -> Serving:
        """Hot swap: load the settings with ``changes`` (model / index / reranker folders)
        beside the serving generation, warm it up, switch atomically, then drain and free
        the old one. In-flight requests finish on the old one; new ones go to the new one.
        On failure the old one keeps serving and the error is raised."""
        async with self._swap_lock:
            old = self.require_state()
            new_settings = old.settings.model_copy(update=changes)
            if self._replan:
                # the default plan again, from the cores free now: a core that a neighbour
                # held at start (make demo's own background training) serves the generation
                # that its finished model brings (on a CPU only the worker count changes: every
                # worker keeps one thread)
                new_settings = await asyncio.to_thread(
                    new_settings.model_copy(
                        update={"model_workers": None, "intra_op_threads": None}
                    ).with_worker_plan
                )
                if new_settings.model_workers != old.settings.model_workers:
                    logger.info(
                        "model workers: %s -> %s (cores free now)",
                        old.settings.model_workers,
                        new_settings.model_workers,
                    )
            t0 = time.perf_counter()
            try:
                new = await self._build(new_settings)
            except Exception as exc:
                self.swap_error = f"{type(exc).__name__}: {exc}"
                raise
            self.swap_error = None
            self.state = new
            self.metrics.swaps.inc()
            logger.info(
                "swapped in %.1fs: model %s, index %s, rerankers %s (was index %s)",
                time.perf_counter() - t0,
                new.linker.fingerprint,
                new.linker.searcher.version,
                ",".join(new.linker.rerankers),
                old.linker.searcher.version,
            )
        self._tasks.append(asyncio.create_task(self._retire(old), name="mel-retire"))
        return new

    def spawn(self, coro: Any, name: str) -> None:
        """A background task the service owns (cancelled at stop)."""
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def _retire(self, old: Serving) -> None:
        await old.batcher.stop(self.settings.request_timeout_s)
        old.linker.close()

    async def stop(self) -> None:
        """Drain: in-flight requests finish, then everything is closed."""
        self.ready = False
        self.stopping = True
        self.metrics.ready.set(0)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.state is not None:
            await self.state.batcher.stop(self.settings.request_timeout_s)
        if self.cache is not None:
            await self.cache.close()
        if self.state is not None:
            self.state.linker.close()

    def require_state(self) -> Serving:
        if not self.ready or self.state is None:
            raise ApiError(503, "not_ready", self.load_error or "model and index are loading")
        return self.state

    def require_ready(self) -> Linker:
        return self.require_state().linker

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        s = self.settings
        redis: dict[str, Any] = {"configured": bool(s.redis_url)}
        if self.ready and isinstance(self.cache, RedisCache):
            redis["up"] = await self.cache.ping()
        body: dict[str, Any] = {"ready": self.ready, "redis": redis}
        if self.state is not None:
            linker = self.state.linker
            searcher = linker.searcher
            body.update(
                model_version=linker.fingerprint,
                index_version=searcher.version,
                entities=len(searcher),
                live={
                    "segments": searcher.generation,
                    "live_entities": searcher.live_entities,
                    "tombstones": searcher.tombstones,
                },
                rerankers=list(linker.rerankers),
                pending={n: pending_status(p) for n, p in self.state.pending.items()},
                drin_version=linker.drin_fingerprint,
                fusion_version=linker.fusion_fingerprint,
                default_reranker=linker.default_reranker,
                intra_op_threads=linker.threads,
                model_workers=self.state.batcher.workers,
                kernel_runtime=linker.kernel.runtime,
                drin_kernel_runtime=(
                    linker.drin_kernel.runtime if linker.drin_kernel is not None else None
                ),
                towers_beside=linker.towers is not None,
                fusion_trees=linker.fusion.tree_runtime if linker.fusion is not None else None,
                drin_table_rows=linker.drin_table_rows,
            )
        if self.load_error:
            body["error"] = self.load_error
        if self.swap_error:
            body["swap_error"] = self.swap_error
        return self.ready, body

    # ------------------------------------------------------------------ validation
    def params(self, req: LinkRequest) -> LinkParams:
        """The settings-dependent half of request validation (the schema holds the rest)."""
        s = self.settings
        if len(req.mention) > s.max_mention_chars:
            raise ApiError(
                422, "mention_too_long", f"mention over {s.max_mention_chars} characters"
            )
        if len(req.sentence) > s.max_sentence_chars:
            raise ApiError(
                422, "sentence_too_long", f"sentence over {s.max_sentence_chars} characters"
            )
        top_k = req.top_k or s.top_k_default
        ck = req.candidates_k or s.candidates_k_default
        if top_k > s.top_k_max:
            raise ApiError(422, "top_k_out_of_range", f"top_k must be <= {s.top_k_max}")
        if ck > s.candidates_k_max:
            raise ApiError(
                422, "candidates_k_out_of_range", f"candidates_k must be <= {s.candidates_k_max}"
            )
        linker = self.require_ready()
        reranker = req.reranker or linker.default_reranker
        if reranker not in linker.rerankers:
            raise ApiError(
                422,
                "reranker_unavailable",
                f"reranker {reranker!r} is not available here "
                f"(available: {', '.join(linker.rerankers)})",
            )
        return LinkParams(
            top_k=top_k, candidates_k=max(ck, top_k), reranker=reranker, explain=req.explain
        )

    async def _image_bytes(self, req: LinkRequest) -> bytes | None:
        s = self.settings
        if req.image is not None:
            return decode_base64(req.image, s.max_image_bytes)
        if req.image_url is not None:
            if not s.allow_image_urls:
                raise ApiError(
                    403,
                    "image_url_disabled",
                    "image_url is disabled on this server; send the image as base64",
                )
            return await fetch_image_url(
                req.image_url,
                s.max_image_bytes,
                s.url_timeout_s,
                s.url_max_redirects,
                s.url_allow_private,
            )
        return None

    async def prepare(self, req: LinkRequest, raw_image: bytes | None = None) -> Prepared:
        """Validate a request and read its image's bytes and header (nothing decoded yet)."""
        t0 = time.perf_counter()
        self.require_ready()
        params = self.params(req)
        raw = raw_image if raw_image is not None else await self._image_bytes(req)
        return Prepared(req, params, raw, probe(raw, self.limits) if raw else None, t0)

    def check_budget(self, items: list[Prepared]) -> None:
        """One request's images, a batch's items together, within the decoded-pixel budget."""
        total, budget = sum(p.pixels for p in items), self.settings.max_request_pixels
        if total > budget:
            raise ApiError(
                413,
                "pixel_budget_exceeded",
                f"the request's images have {total} pixels in all, more than {budget}; "
                "send smaller images or fewer per call",
            )

    # ------------------------------------------------------------------ linking
    def _result_key(self, state: Serving, p: Prepared, image_sha: str | None) -> str:
        # everything the answer depends on: the index's live version (updates change
        # answers), the request, and the NIL threshold (a setting that may change)
        q = p.params
        norm = json.dumps(
            [
                p.req.mention,
                p.req.sentence,
                p.req.span,
                image_sha,
                q.top_k,
                q.candidates_k,
                q.reranker,
                q.explain,
                self.settings.nil_threshold,
                state.linker.searcher.version,
            ],
            ensure_ascii=False,
        )
        return f"{state.prefix}:res:{hashlib.sha256(norm.encode()).hexdigest()}"

    async def run(self, p: Prepared) -> LinkResponse:
        """Link one prepared request: result cache, decode, batcher, cache the answer."""
        state = self.require_state()
        assert self.cache is not None
        sha, key = self._keyed(state, p)
        hit = self._cached(p, (await self.cache.get_many([key]))[0])
        if hit is not None:
            return hit
        dec = await self._decode(state, p)
        return await self._link_decoded(state, p, key, sha, dec)

    def _keyed(self, state: Serving, p: Prepared) -> tuple[str | None, str]:
        """``p``'s image hash (None without an image) and its result-cache key."""
        sha = hashlib.sha256(p.image).hexdigest() if p.image is not None else None
        return sha, self._result_key(state, p, sha)

    def _cached(self, p: Prepared, cached: bytes | None) -> LinkResponse | None:
        """The cached answer of ``p`` (``cached``: what the result cache held), or None."""
        self.metrics.cache.labels(kind="result", outcome="hit" if cached else "miss").inc()
        if not cached:
            return None
        hit = LinkResponse.model_validate_json(cached)
        total = 1000 * (time.perf_counter() - p.started)
        return hit.model_copy(update={"timings": Timings(total_ms=total, cached=True)})

    async def _decode(self, state: Serving, p: Prepared) -> Decoded:
        """``p``'s image decoded, on a worker thread, with the seconds it took; and through
        ``state``'s encoder transform there too, unless the image tower can run beside the
        text tower (models/towers.py): then the transform (the resize, most of this work)
        goes with the image tower, which on an idle server runs in the text tower's shadow
        instead of before it, and under load costs the model's thread what it cost here."""
        if p.image is None:
            return Decoded(None, None, 0.0)
        raw, encoder = p.image, state.linker.model.encoder
        transform = state.linker.towers is None

        def work() -> tuple[Image.Image, torch.Tensor | None]:
            img, _ = open_image(raw, self.limits)
            return img, encoder.pixels(img) if transform else None

        td = time.perf_counter()
        img, pixels = await asyncio.to_thread(work)
        t_dec = time.perf_counter() - td
        self.metrics.stage_seconds.labels(stage="decode").observe(t_dec)
        return Decoded(img, pixels, t_dec)

    async def _link_decoded(
        self,
        state: Serving,
        p: Prepared,
        key: str,
        sha: str | None,
        dec: Decoded,
    ) -> LinkResponse:
        """The batcher's answer for a decoded request, cached; ``key``: its result key."""
        assert self.cache is not None
        span = (p.req.span[0], p.req.span[1]) if p.req.span else None
        item = MentionInput(p.req.mention, p.req.sentence, dec.image, sha, span, dec.pixels)
        timeout = self.settings.request_timeout_s
        try:
            while True:
                try:
                    linked = await asyncio.wait_for(state.batcher.submit(item, p.params), timeout)
                    break
                except ShuttingDown:
                    # a hot swap retired this generation after the request chose it: the
                    # new one answers (unless the server itself is stopping)
                    if self.stopping or self.state is None or self.state is state:
                        raise
                    state = self.state
                    item = dataclasses.replace(item, pixels=None)  # the old encoder's transform
                    if p.params.reranker not in state.linker.rerankers:
                        raise ApiError(
                            503, "reranker_unavailable", "the reloaded server lacks this reranker"
                        ) from None
                    key = self._result_key(state, p, sha)
        except QueueFull as exc:
            raise ApiError(
                429, "overloaded", f"{exc}; retry later", headers={"Retry-After": "1"}
            ) from exc
        except ShuttingDown as exc:
            raise ApiError(503, "shutting_down", str(exc)) from exc
        except TimeoutError as exc:
            raise ApiError(504, "timeout", f"no result within {timeout}s") from exc
        linker = state.linker
        out = to_response(linker, linked)
        await self.cache.set_many([(key, out.model_dump_json(exclude={"timings"}).encode())])
        t = linked.times
        out.timings = Timings(
            decode_ms=1000 * dec.seconds,
            queue_ms=linked.queue_ms,
            encode_ms=t.encode_ms,
            retrieve_ms=t.retrieve_ms,
            rerank_ms=t.rerank_ms,
            batch_size=t.batch_size,
            total_ms=1000 * (time.perf_counter() - p.started),
            cached=False,
        )
        return out

    async def link_one(self, req: LinkRequest, raw_image: bytes | None = None) -> LinkResponse:
        p = await self.prepare(req, raw_image)
        self.check_budget([p])
        return await self.run(p)

    async def link_batch(self, items: list[dict[str, object]]) -> BatchResponse:
        """Each item is validated and linked on its own (a bad one fails alone); the batch's
        images share one pixel budget, checked before any is decoded."""
        s = self.settings
        if len(items) > s.max_batch_items:
            raise ApiError(
                413, "batch_too_large", f"{len(items)} items; at most {s.max_batch_items}"
            )
        self.require_ready()

        def error(exc: ApiError) -> BatchItemResult:
            self.metrics.errors.labels(type=exc.code).inc()
            return BatchItemResult(error=ErrorBody(code=exc.code, message=exc.message))

        async def prepare(raw: dict[str, object]) -> Prepared | BatchItemResult:
            try:
                req = LinkRequest.model_validate(raw)
                return await self.prepare(req)
            except ValidationError as exc:
                return error(ApiError(422, validation_code(exc.errors()), describe(exc.errors())))
            except ApiError as exc:
                return error(exc)

        ready = await asyncio.gather(*(prepare(it) for it in items))
        todo = [p for p in ready if isinstance(p, Prepared)]
        self.check_budget(todo)
        # the model gets the batch as one group: one result-cache lookup for every item, every
        # image decoded (on worker threads, at once), and only then every miss submitted, with
        # no await between the submits, so the batcher collects them together (up to
        # MEL_MAX_BATCH_SIZE) instead of item by item as their decodes finish
        state = self.require_state()
        assert self.cache is not None
        keyed = [self._keyed(state, p) for p in todo]
        shas, keys = [sha for sha, _ in keyed], [key for _, key in keyed]
        found = await self.cache.get_many(keys)
        done: dict[int, BatchItemResult] = {}
        misses = []
        for i, (p, blob) in enumerate(zip(todo, found, strict=True)):
            hit = self._cached(p, blob)
            if hit is not None:
                done[i] = BatchItemResult(result=hit)
            else:
                misses.append(i)

        async def decode(i: int) -> Decoded | BatchItemResult:
            try:
                return await self._decode(state, todo[i])
            except ApiError as exc:
                return error(exc)

        decoded = await asyncio.gather(*(decode(i) for i in misses))

        async def link(i: int, dec: Decoded) -> BatchItemResult:
            try:
                out = await self._link_decoded(state, todo[i], keys[i], shas[i], dec)
                return BatchItemResult(result=out)
            except ApiError as exc:
                return error(exc)

        jobs = []
        for i, dec in zip(misses, decoded, strict=True):
            if isinstance(dec, BatchItemResult):
                done[i] = dec
            else:
                jobs.append((i, link(i, dec)))
        for (i, _), res in zip(jobs, await asyncio.gather(*(c for _, c in jobs)), strict=True):
            done[i] = res
        answers = iter(done[i] for i in range(len(todo)))
        return BatchResponse(
            results=[p if isinstance(p, BatchItemResult) else next(answers) for p in ready]
        )

    def entity(self, entity_id: str) -> dict[str, Any]:
        ent = self.require_ready().entity(entity_id)
        if ent is None:
            raise ApiError(404, "entity_not_found", f"no entity {entity_id!r} in the index")
        return ent

    def entity_image(self, entity_id: str) -> Path:
        self.entity(entity_id)  # 404 for an unknown id
        path = self.require_ready().image_path(entity_id)
        if path is None:
            raise ApiError(404, "image_not_found", f"entity {entity_id!r} has no image here")
        return path

    # ------------------------------------------------------------------ live KB updates
    async def decode_entity_image(self, raw: bytes) -> tuple[Image.Image, str]:
        """An admin upload's image: checked and decoded like a link request's."""
        img_probe = probe(raw, self.limits)
        img, _ = await asyncio.to_thread(open_image, raw, self.limits)
        return img, img_probe.format

    async def upsert(self, items: list[NewEntity]) -> UpdateResult:
        """Add or replace entities: encoded, committed and visible before this returns."""
        if len(items) > self.settings.max_admin_entities:
            raise ApiError(
                413,
                "batch_too_large",
                f"{len(items)} entities; at most {self.settings.max_admin_entities} per call",
            )
        return await self._update(lambda kb: kb.upsert(items))

    async def delete(self, ids: list[str]) -> UpdateResult:
        try:
            return await self._update(lambda kb: kb.delete(ids))
        except EntitiesNotFound as exc:
            raise ApiError(
                404, "entity_not_found", f"not in the index: {', '.join(exc.ids)}"
            ) from exc

    async def _update(self, work: Callable[[LiveKb], UpdateResult]) -> UpdateResult:
        async with self._swap_lock:  # never during a swap: the new generation must see it
            state = self.require_state()
            try:
                res = await state.batcher.call(work, state.kb)
            except ShuttingDown as exc:
                raise ApiError(503, "shutting_down", str(exc)) from exc
            except LiveUpdateError as exc:
                raise ApiError(503, "index_locked", f"{exc}; retry later") from exc
        self.metrics.live_updates.labels(kind="delete" if res.deleted else "upsert").inc()
        return res


__all__ = ["LinkService", "Prepared", "to_response"]
