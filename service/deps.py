"""FastAPI dependencies (fastapi/full-stack-fastapi-template's ``api/deps.py`` habit)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.errors import ApiError
from service.pipeline import LinkService
from service.settings import ServiceSettings


def get_service(request: Request) -> LinkService:
    service: LinkService = request.app.state.service
    return service


def get_settings(request: Request) -> ServiceSettings:
    settings: ServiceSettings = request.app.state.settings
    return settings


ServiceDep = Annotated[LinkService, Depends(get_service)]
SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]


async def require_key(request: Request, settings: SettingsDep) -> None:
    """``X-API-Key: <key>`` or ``Authorization: Bearer <key>`` when keys are configured."""
    if not settings.api_keys:
        return
    key = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if not key and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    if key not in settings.api_keys:
        raise ApiError(
            401,
            "unauthorized",
            "a valid X-API-Key (or Bearer token) is required",
            headers={"WWW-Authenticate": "Bearer"},
        )


__all__ = ["ServiceDep", "SettingsDep", "get_service", "get_settings", "require_key"]
