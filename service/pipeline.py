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
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from service.batcher import MicroBatcher, QueueFull, ShuttingDown
from service.cache import Cache, LruCache, RedisCache
from service.errors import ApiError, describe, validation_code
from service.images import ImageLimits, ImageProbe, decode_base64, fetch_image_url, open_image
from service.images import probe_image as probe
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
        reranker=r.reranker,
        model_version=linker.fingerprint,
        index_version=linker.index_version,
        timings=Timings(),
    )


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
        self.load_error: str | None = None
        self.linker: Linker | None = None
        self.cache: Cache | None = None
        self.batcher: MicroBatcher | None = None
        self.prefix = ""
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Begin loading in the background (the app answers /healthz meanwhile)."""
        self._tasks.append(asyncio.create_task(self._load(), name="mel-load"))

    async def _load(self) -> None:
        s = self.settings
        try:
            linker = await asyncio.to_thread(self.linker_factory, s)
            if s.warmup:
                await asyncio.to_thread(linker.warmup)
            cache: Cache
            if s.redis_url:
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
                cache = redis
            else:
                cache = LruCache(s.lru_size, s.cache_ttl_s)
            self.prefix = f"mel:{linker.cache_version}"
            batcher = MicroBatcher(
                linker,
                cache,
                self.metrics,
                s.max_batch_size,
                s.max_wait_ms,
                s.queue_size,
                self.prefix,
            )
            await batcher.start()
            self.linker, self.cache, self.batcher = linker, cache, batcher
            self.ready = True
            self.metrics.ready.set(1)
            logger.info("ready: model %s, index %s", linker.fingerprint, linker.index_version)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("failed to load the linker")

    async def _watch(self, redis: RedisCache) -> None:
        """Ping Redis on a timer: the gauge and the breaker follow it between requests."""
        while True:
            await asyncio.sleep(self.settings.redis_health_interval_s)
            await redis.ping()

    async def stop(self) -> None:
        """Drain: in-flight requests finish, then everything is closed."""
        self.ready = False
        self.metrics.ready.set(0)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.batcher is not None:
            await self.batcher.stop(self.settings.request_timeout_s)
        if self.cache is not None:
            await self.cache.close()
        if self.linker is not None:
            self.linker.close()

    def require_ready(self) -> Linker:
        if not self.ready or self.linker is None:
            raise ApiError(503, "not_ready", self.load_error or "model and index are loading")
        return self.linker

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        s = self.settings
        redis: dict[str, Any] = {"configured": bool(s.redis_url)}
        if self.ready and isinstance(self.cache, RedisCache):
            redis["up"] = await self.cache.ping()
        body: dict[str, Any] = {"ready": self.ready, "redis": redis}
        if self.linker is not None:
            body.update(
                model_version=self.linker.fingerprint,
                index_version=self.linker.index_version,
                entities=len(self.linker.searcher),
                rerankers=list(self.linker.rerankers),
                drin_version=self.linker.drin_fingerprint,
                fusion_version=self.linker.fusion_fingerprint,
                default_reranker=self.linker.default_reranker,
            )
        if self.load_error:
            body["error"] = self.load_error
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
    def _result_key(self, p: Prepared, image_sha: str | None) -> str:
        # everything the answer depends on; the NIL threshold is a setting that may change
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
            ],
            ensure_ascii=False,
        )
        return f"{self.prefix}:res:{hashlib.sha256(norm.encode()).hexdigest()}"

    async def run(self, p: Prepared) -> LinkResponse:
        """Link one prepared request: result cache, decode, batcher, cache the answer."""
        linker = self.require_ready()
        assert self.cache is not None and self.batcher is not None
        sha = hashlib.sha256(p.image).hexdigest() if p.image is not None else None
        key = self._result_key(p, sha)
        cached = (await self.cache.get_many([key]))[0]
        self.metrics.cache.labels(kind="result", outcome="hit" if cached else "miss").inc()
        if cached:
            hit = LinkResponse.model_validate_json(cached)
            total = 1000 * (time.perf_counter() - p.started)
            return hit.model_copy(update={"timings": Timings(total_ms=total, cached=True)})
        img, t_dec = None, 0.0
        if p.image is not None:
            td = time.perf_counter()
            img, _ = await asyncio.to_thread(open_image, p.image, self.limits)
            t_dec = time.perf_counter() - td
            self.metrics.stage_seconds.labels(stage="decode").observe(t_dec)
        span = (p.req.span[0], p.req.span[1]) if p.req.span else None
        item = MentionInput(p.req.mention, p.req.sentence, img, sha, span)
        timeout = self.settings.request_timeout_s
        try:
            linked = await asyncio.wait_for(self.batcher.submit(item, p.params), timeout)
        except QueueFull as exc:
            raise ApiError(
                429, "overloaded", f"{exc}; retry later", headers={"Retry-After": "1"}
            ) from exc
        except ShuttingDown as exc:
            raise ApiError(503, "shutting_down", str(exc)) from exc
        except TimeoutError as exc:
            raise ApiError(504, "timeout", f"no result within {timeout}s") from exc
        out = to_response(linker, linked)
        await self.cache.set_many([(key, out.model_dump_json(exclude={"timings"}).encode())])
        t = linked.times
        out.timings = Timings(
            decode_ms=1000 * t_dec,
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
        self.check_budget([p for p in ready if isinstance(p, Prepared)])

        async def run(p: Prepared | BatchItemResult) -> BatchItemResult:
            if isinstance(p, BatchItemResult):
                return p
            try:
                return BatchItemResult(result=await self.run(p))
            except ApiError as exc:
                return error(exc)

        return BatchResponse(results=list(await asyncio.gather(*(run(p) for p in ready))))

    def entity(self, entity_id: str) -> dict[str, Any]:
        ent = self.require_ready().entity(entity_id)
        if ent is None:
            raise ApiError(404, "entity_not_found", f"no entity {entity_id!r} in the index")
        return ent


__all__ = ["LinkService", "Prepared", "to_response"]
