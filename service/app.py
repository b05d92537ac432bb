"""The FastAPI application: ``create_app(settings)`` -> app (no module-level state).

The app is wiring only: a :class:`~service.pipeline.LinkService` in ``app.state`` (started
and drained by the lifespan), the per-resource routers, the error handlers and two pure ASGI
middlewares. ``/healthz`` answers at once; ``/readyz`` says 503 until the linker is loaded
and warm (what orchestrators expect).
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.errors import install_handlers
from service.linker import Linker
from service.metrics import Metrics
from service.middleware import BodyLimit, RequestMetrics
from service.pipeline import LinkService
from service.routes import admin, entities, link, ops, playground
from service.settings import ServiceSettings

logger = logging.getLogger(__name__)


def _on_sighup(service: LinkService) -> bool:
    """SIGHUP = hot swap to the configured folders, re-read (point a symlink such as
    ``MEL_INDEX_PATH=artifacts/index-current`` at a new build, then ``kill -HUP``). Only
    where the loop runs in the main thread (a server, not a test's thread)."""
    loop = asyncio.get_running_loop()

    def reload() -> None:
        async def run() -> None:
            try:
                await service.swap({})
            except Exception:
                logger.exception("SIGHUP reload failed; the old index keeps serving")

        service.spawn(run(), "mel-sighup")

    try:
        loop.add_signal_handler(signal.SIGHUP, reload)
    except (ValueError, RuntimeError, NotImplementedError):
        return False
    return True


def create_app(
    settings: ServiceSettings | None = None,
    linker_factory: Callable[[ServiceSettings], Linker] = Linker,
) -> FastAPI:
    settings = settings or ServiceSettings()
    metrics = Metrics()
    service = LinkService(settings, metrics, linker_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        hup = _on_sighup(service)
        yield
        if hup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await service.stop()  # in-flight requests finish first

    app = FastAPI(
        title="mel-service",
        version="0.1.0",
        lifespan=lifespan,
        description="Multimodal entity linking: FAISS retrieval + MIMIC / DRIN reranking.",
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = service
    for router in (link.router, entities.router, admin.router, ops.router):
        app.include_router(router)
    app.include_router(playground.router)
    install_handlers(app, metrics)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: sees every status sent
    return app


__all__ = ["create_app"]
