"""``/v1/entities``: what the index knows about an entity."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

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


@router.get(
    "/{entity_id}/image",
    summary="The entity's KB image (its first one)",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/*": {}}, "description": "the image file"},
        **responses(401, 404, 503),
    },
)
async def entity_image(entity_id: str, service: ServiceDep) -> FileResponse:
    # content-addressed uploads and KB images do not change under an id's row: cacheable
    return FileResponse(service.entity_image(entity_id), headers={"Cache-Control": "max-age=300"})
