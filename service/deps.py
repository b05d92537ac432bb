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


async def require_admin(request: Request, settings: SettingsDep) -> None:
    """An admin key (``X-Admin-Key: <key>`` or ``Authorization: Bearer <key>``): none given
    is 401; a key that is not an admin key (an API key, say) is 403; no admin key configured
    (``MEL_ADMIN_KEYS``) refuses every admin call with 403."""
    key = request.headers.get("x-admin-key")
    auth = request.headers.get("authorization", "")
    if not key and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    if not settings.admin_keys:
        raise ApiError(403, "admin_disabled", "admin routes are off: set MEL_ADMIN_KEYS")
    if not key:
        raise ApiError(
            401,
            "unauthorized",
            "an admin key is required (X-Admin-Key or Bearer)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if key not in settings.admin_keys:
        raise ApiError(403, "forbidden", "this key may not use the admin routes")


__all__ = [
    "ServiceDep",
    "SettingsDep",
    "get_service",
    "get_settings",
    "require_admin",
    "require_key",
]
