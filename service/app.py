"""The FastAPI application: ``create_app(settings)`` -> app (no module-level state).

The app is wiring only: a :class:`~service.pipeline.LinkService` in ``app.state`` (started
and drained by the lifespan), the per-resource routers, the error handlers and two pure ASGI
middlewares. ``/healthz`` answers at once; ``/readyz`` says 503 until the linker is loaded
and warm (what orchestrators expect).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.errors import install_handlers
from service.linker import Linker
from service.metrics import Metrics
from service.middleware import BodyLimit, RequestMetrics
from service.pipeline import LinkService
from service.routes import entities, link, ops
from service.settings import ServiceSettings


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
        yield
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
    for router in (link.router, entities.router, ops.router):
        app.include_router(router)
    install_handlers(app, metrics)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: sees every status sent
    return app


__all__ = ["create_app"]
