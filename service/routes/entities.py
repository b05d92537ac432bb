"""``/v1/entities``: what the index knows about an entity."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from service.deps import ServiceDep, require_key
from service.errors import responses
from service.schemas import Entity

router = APIRouter(prefix="/v1/entities", tags=["entities"], dependencies=[Depends(require_key)])


@router.get(
    "/{entity_id}",
    response_model=Entity,
    summary="Entity metadata by id",
    responses=responses(401, 404, 503),
)
async def entity(entity_id: str, service: ServiceDep) -> dict[str, Any]:
    return service.entity(entity_id)
