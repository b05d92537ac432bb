"""Probes and metrics for orchestrators and Prometheus (no API key: probes carry none)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import ServiceDep
from service.schemas import Readiness

router = APIRouter(tags=["ops"])


@router.get("/healthz", summary="Process alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Model + index loaded and warm (503 until then)",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "loading, failed to load, or draining"}},
)
async def readyz(service: ServiceDep) -> JSONResponse:
    ready, body = await service.readiness()
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}},
)
async def prometheus(request: Request) -> Response:
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
