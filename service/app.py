"""The FastAPI application: ``create_app(settings)`` -> app (no module-level state).

Routes stay thin: they validate and decode input, consult the result cache, and hand mentions
to the micro-batcher, which runs model work on its own thread. Model and index load in the
background after start-up, so ``/healthz`` answers at once and ``/readyz`` says 503 until the
linker is loaded and warmed up (what orchestrators expect).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.batcher import MicroBatcher, QueueFull, ShuttingDown
from service.cache import Cache, LruCache, RedisCache
from service.images import (
    ImageInputError,
    ImageLimits,
    decode_base64,
    fetch_image_url,
    open_image,
)
from service.linker import Linker, LinkParams, MentionInput
from service.metrics import Metrics
from service.schemas import (
    BatchRequest,
    BatchResponse,
    Entity,
    ErrorResponse,
    LinkRequest,
    LinkResponse,
)
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


class BodyLimit:
    """Pure ASGI middleware: 413 for bodies over the limit (declared or streamed)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _error(413, "body_too_large", f"request body over {self.max_bytes} bytes")(
                scope, receive, send
            )
            return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(
                        413, "body_too_large", f"request body over {self.max_bytes} bytes"
                    )
            return msg

        await self.app(scope, limited, send)


def create_app(
    settings: ServiceSettings | None = None,
    linker_factory: Callable[[ServiceSettings], Linker] = Linker,
) -> FastAPI:
    settings = settings or ServiceSettings()
    metrics = Metrics()
    limits = ImageLimits(
        settings.max_image_bytes, settings.max_image_pixels, tuple(settings.image_formats)
    )

    class State:
        ready = False
        load_error: str | None = None
        linker: Linker | None = None
        cache: Cache | None = None
        batcher: MicroBatcher | None = None
        prefix = ""

    state = State()

    async def load() -> None:
        try:
            linker = await asyncio.to_thread(linker_factory, settings)
            if settings.warmup:
                await asyncio.to_thread(linker.warmup)
            cache: Cache
            if settings.redis_url:
                cache = RedisCache(
                    settings.redis_url,
                    settings.cache_ttl_s,
                    settings.redis_timeout_s,
                    settings.redis_retry_s,
                    on_error=lambda e: metrics.cache_errors.labels(error=e).inc(),
                )
                metrics.redis_up.set(1 if await cache.ping() else 0)
            else:
                cache = LruCache(settings.lru_size, settings.cache_ttl_s)
            state.prefix = f"mel:{linker.cache_version}"
            batcher = MicroBatcher(
                linker,
                cache,
                metrics,
                settings.max_batch_size,
                settings.max_wait_ms,
                settings.queue_size,
                state.prefix,
            )
            await batcher.start()
            state.linker, state.cache, state.batcher = linker, cache, batcher
            state.ready = True
            metrics.ready.set(1)
            logger.info("ready: model %s, index %s", linker.fingerprint, linker.index_version)
        except Exception as exc:
            state.load_error = f"{type(exc).__name__}: {exc}"
            logger.exception("failed to load the linker")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        loader = asyncio.create_task(load())
        yield
        state.ready = False
        metrics.ready.set(0)
        if not loader.done():
            loader.cancel()
        if state.batcher is not None:
            await state.batcher.stop(settings.request_timeout_s)  # in-flight requests finish
        if state.cache is not None:
            await state.cache.close()
        if state.linker is not None:
            state.linker.close()

    app = FastAPI(
        title="mel-service",
        version="0.1.0",
        lifespan=lifespan,
        description="Multimodal entity linking: FAISS retrieval + MIMIC reranking.",
        responses={
            400: {"model": ErrorResponse},
            401: {"model": ErrorResponse},
            413: {"model": ErrorResponse},
            422: {"model": ErrorResponse},
            429: {"model": ErrorResponse},
            503: {"model": ErrorResponse},
        },
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.mel = state
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    @app.middleware("http")
    async def count(
        request: Request,
        call_next: Callable[[Request], Awaitable[Response]],
    ) -> Response:
        t0 = time.perf_counter()
        try:
            response = await call_next(request)
        except ApiError as exc:  # raised below the routes (body limit while streaming)
            response = _error(exc.status, exc.code, exc.message)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(route=path, status=str(response.status_code)).inc()
        if path.startswith("/v1/link"):
            metrics.stage_seconds.labels(stage="total").observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        metrics.errors.labels(type=exc.code).inc()
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.errors.labels(type="invalid_request").inc()
        return _error(422, "invalid_request", _describe(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, "http_error", str(exc.detail))

    # ------------------------------------------------------------------ dependencies
    async def require_key(request: Request) -> None:
        if not settings.api_keys:
            return
        key = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if not key and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        if key not in settings.api_keys:
            raise ApiError(401, "unauthorized", "a valid X-API-Key (or Bearer token) is required")

    def ready_state() -> State:
        if not state.ready:
            msg = state.load_error or "model and index are loading"
            raise ApiError(503, "not_ready", msg)
        return state

    # ------------------------------------------------------------------ link pipeline
    def params_of(req: LinkRequest) -> LinkParams:
        if len(req.mention) > settings.max_mention_chars:
            raise ApiError(
                422, "mention_too_long", f"mention over {settings.max_mention_chars} characters"
            )
        if len(req.sentence) > settings.max_sentence_chars:
            raise ApiError(
                422, "sentence_too_long", f"sentence over {settings.max_sentence_chars} characters"
            )
        if not req.mention.strip():
            raise ApiError(422, "empty_mention", "mention is blank")
        top_k = req.top_k or settings.top_k_default
        ck = req.candidates_k or settings.candidates_k_default
        if top_k > settings.top_k_max:
            raise ApiError(422, "top_k_out_of_range", f"top_k must be <= {settings.top_k_max}")
        if ck > settings.candidates_k_max:
            raise ApiError(
                422,
                "candidates_k_out_of_range",
                f"candidates_k must be <= {settings.candidates_k_max}",
            )
        available = state.linker.rerankers if state.linker is not None else ()
        if req.reranker not in available:
            raise ApiError(
                422,
                "reranker_unavailable",
                f"reranker {req.reranker!r} is not available here "
                f"(available: {', '.join(available)})",
            )
        if req.span is not None:
            a, b = req.span
            if not 0 <= a < b <= len(req.sentence):
                raise ApiError(
                    422,
                    "bad_span",
                    f"span must be [start, end) char offsets with 0 <= start < end <= "
                    f"len(sentence) = {len(req.sentence)}",
                )
        if req.image is not None and req.image_url is not None:
            raise ApiError(422, "two_images", "give image or image_url, not both")
        return LinkParams(
            top_k=top_k, candidates_k=max(ck, top_k), reranker=req.reranker, explain=req.explain
        )

    async def image_bytes(req: LinkRequest) -> bytes | None:
        if req.image is not None:
            return decode_base64(req.image, settings.max_image_bytes)
        if req.image_url is not None:
            if not settings.allow_image_urls:
                raise ApiError(
                    403,
                    "image_url_disabled",
                    "image_url is disabled on this server; send the image as base64",
                )
            return await fetch_image_url(
                req.image_url,
                settings.max_image_bytes,
                settings.url_timeout_s,
                settings.url_max_redirects,
                settings.url_allow_private,
            )
        return None

    def result_key(req: LinkRequest, p: LinkParams, image_sha: str | None) -> str:
        # everything the answer depends on; the NIL threshold is a setting that may change
        norm = json.dumps(
            [
                req.mention,
                req.sentence,
                req.span,
                image_sha,
                p.top_k,
                p.candidates_k,
                p.reranker,
                p.explain,
                settings.nil_threshold,
            ],
            ensure_ascii=False,
        )
        return f"{state.prefix}:res:{hashlib.sha256(norm.encode()).hexdigest()}"

    async def link_one(req: LinkRequest, raw_image: bytes | None) -> dict[str, Any]:
        st = ready_state()
        assert st.batcher is not None and st.cache is not None and st.linker is not None
        t0 = time.perf_counter()
        p = params_of(req)
        if raw_image is None:
            raw_image = await image_bytes(req)
        sha = hashlib.sha256(raw_image).hexdigest() if raw_image is not None else None
        key = result_key(req, p, sha)
        cached = (await st.cache.get_many([key]))[0]
        metrics.cache.labels(kind="result", outcome="hit" if cached else "miss").inc()
        if cached:
            out = json.loads(cached)
            out["timings"] = {"total_ms": 1000 * (time.perf_counter() - t0), "cached": True}
            return out
        img = None
        t_dec = 0.0
        if raw_image is not None:
            td = time.perf_counter()
            img, _ = await asyncio.to_thread(open_image, raw_image, limits)
            t_dec = time.perf_counter() - td
            metrics.stage_seconds.labels(stage="decode").observe(t_dec)
        try:
            res = await asyncio.wait_for(
                st.batcher.submit(
                    MentionInput(
                        req.mention,
                        req.sentence,
                        img,
                        sha,
                        tuple(req.span) if req.span else None,  # type: ignore[arg-type]
                    ),
                    p,
                ),
                settings.request_timeout_s,
            )
        except QueueFull as exc:
            raise ApiError(429, "overloaded", f"{exc}; retry later") from exc
        except ShuttingDown as exc:
            raise ApiError(503, "shutting_down", str(exc)) from exc
        except TimeoutError as exc:
            raise ApiError(
                504, "timeout", f"no result within {settings.request_timeout_s}s"
            ) from exc
        t = res.pop("timings")
        out = {
            **res,
            "reranker": p.reranker,
            "model_version": st.linker.fingerprint,
            "index_version": st.linker.index_version,
        }
        await st.cache.set_many([(key, json.dumps(out).encode())])
        out["timings"] = {
            "decode_ms": 1000 * t_dec,
            "queue_ms": t["queue"],
            "encode_ms": t["encode_ms"],
            "retrieve_ms": t["retrieve_ms"],
            "rerank_ms": t["rerank_ms"],
            "batch_size": int(t["batch_size"]),
            "total_ms": 1000 * (time.perf_counter() - t0),
            "cached": False,
        }
        return out

    async def guarded(req: LinkRequest, raw_image: bytes | None = None) -> dict[str, Any]:
        try:
            return await link_one(req, raw_image)
        except ImageInputError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from exc

    # ------------------------------------------------------------------ routes
    v1 = [Depends(require_key)]

    @app.post(
        "/v1/link",
        response_model=LinkResponse,
        dependencies=v1,
        tags=["link"],
        summary="Link one mention (JSON; image as base64 / data URI / URL)",
    )
    async def link(req: LinkRequest) -> dict[str, Any]:
        return await guarded(req)

    @app.post(
        "/v1/link/form",
        response_model=LinkResponse,
        dependencies=v1,
        tags=["link"],
        summary="Link one mention (multipart form with an image file)",
    )
    async def link_form(
        mention: str = Form(...),
        sentence: str = Form(...),
        image: UploadFile | None = File(None),
        top_k: int | None = Form(None),
        candidates_k: int | None = Form(None),
        reranker: str = Form("mimic"),
        explain: bool = Form(False),
        span_start: int | None = Form(None),
        span_end: int | None = Form(None),
    ) -> dict[str, Any]:
        try:
            if (span_start is None) != (span_end is None):
                raise ApiError(422, "bad_span", "give both span_start and span_end, or neither")
            req = LinkRequest(
                mention=mention,
                sentence=sentence,
                top_k=top_k,
                candidates_k=candidates_k,
                reranker=reranker,
                explain=explain,
                span=(span_start, span_end) if span_start is not None else None,
            )
        except ValidationError as exc:
            raise ApiError(422, "invalid_request", _describe(exc.errors())) from exc
        raw = None
        if image is not None:
            raw = await image.read(settings.max_image_bytes + 1)
            if len(raw) > settings.max_image_bytes:
                raise ApiError(
                    413, "image_too_large", f"image is larger than {settings.max_image_bytes} bytes"
                )
            if not raw:
                raw = None
        return await guarded(req, raw)

    @app.post(
        "/v1/link/batch",
        response_model=BatchResponse,
        dependencies=v1,
        tags=["link"],
        summary="Link up to max_batch_items mentions; a bad item fails alone",
    )
    async def link_batch(body: BatchRequest) -> dict[str, Any]:
        if len(body.items) > settings.max_batch_items:
            raise ApiError(
                413,
                "batch_too_large",
                f"{len(body.items)} items; at most {settings.max_batch_items}",
            )
        ready_state()

        async def one(raw: dict[str, object]) -> dict[str, Any]:
            try:
                req = LinkRequest.model_validate(raw)
                return {"result": await guarded(req)}
            except ValidationError as exc:
                return {"error": {"code": "invalid_request", "message": _describe(exc.errors())}}
            except ApiError as exc:
                metrics.errors.labels(type=exc.code).inc()
                return {"error": {"code": exc.code, "message": exc.message}}

        return {"results": await asyncio.gather(*(one(it) for it in body.items))}

    @app.get(
        "/v1/entities/{entity_id}",
        response_model=Entity,
        dependencies=v1,
        tags=["entities"],
        summary="Entity metadata by id",
    )
    async def entity(entity_id: str) -> dict[str, Any]:
        st = ready_state()
        assert st.linker is not None
        ent = st.linker.entity(entity_id)
        if ent is None:
            raise ApiError(404, "entity_not_found", f"no entity {entity_id!r} in the index")
        return ent

    @app.get("/healthz", tags=["ops"], summary="Process alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="Model + index loaded and warm (503 until then)")
    async def readyz() -> JSONResponse:
        redis: dict[str, Any] = {"configured": bool(settings.redis_url)}
        if state.ready and isinstance(state.cache, RedisCache):
            up = await state.cache.ping()
            metrics.redis_up.set(1 if up else 0)
            redis["up"] = up
        body: dict[str, Any] = {"ready": state.ready, "redis": redis}
        if state.linker is not None:
            body.update(
                model_version=state.linker.fingerprint,
                index_version=state.linker.index_version,
                entities=len(state.linker.searcher),
                rerankers=list(state.linker.rerankers),
                drin_version=state.linker.drin_fingerprint,
            )
        if state.load_error:
            body["error"] = state.load_error
        return JSONResponse(body, status_code=200 if state.ready else 503)

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _describe(errors: Any) -> str:
    parts = []
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return "; ".join(parts)[:1000]


__all__ = ["ApiError", "create_app"]
