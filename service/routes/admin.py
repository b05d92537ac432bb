"""``/v1/admin``: live KB updates (add / replace / delete entities) and hot swaps.

Every route needs an admin key (``MEL_ADMIN_KEYS``; 401 without one, 403 with another key).
An update is encoded by the serving model, committed durably to the index folder and applied
before the response: the next request sees it, a restart keeps it (:mod:`service.kb`).
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Depends, File, Form, UploadFile
from pydantic import ValidationError

from models.data.schema import Entity
from service.deps import ServiceDep, require_admin
from service.errors import ApiError, describe, responses, validation_code
from service.images import decode_base64
from service.kb import NewEntity, UpdateResult
from service.pipeline import LinkService
from service.schemas import (
    EntityBody,
    EntityIn,
    SwapRequest,
    SwapResponse,
    UpdateResponse,
    UpsertRequest,
)

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])

_UPDATE_ERRORS = responses(400, 401, 403, 413, 415, 422, 503)


def _answer(res: UpdateResult) -> UpdateResponse:
    return UpdateResponse(
        added=list(res.added),
        replaced=list(res.replaced),
        deleted=list(res.deleted),
        entities=res.entities,
        index_version=res.index_version,
    )


async def _new_entity(
    service: LinkService, eid: str, body: EntityBody, raw: bytes | None = None
) -> NewEntity:
    if raw is None and body.image is not None:
        raw = decode_base64(body.image, service.settings.max_image_bytes)
    ent = Entity(eid, body.name, body.attributes, (), tuple(body.aliases), body.popularity)
    if not raw:
        return NewEntity(ent)
    img, fmt = await service.decode_entity_image(raw)
    return NewEntity(ent, img, raw, fmt)


@router.put(
    "/entities/{entity_id}",
    response_model=UpdateResponse,
    summary="Add or replace one entity (JSON; image as base64)",
    responses=_UPDATE_ERRORS,
)
async def put_entity(entity_id: str, body: EntityBody, service: ServiceDep) -> UpdateResponse:
    return _answer(await service.upsert([await _new_entity(service, entity_id, body)]))


@router.post(
    "/entities",
    response_model=UpdateResponse,
    summary="Add or replace entities (JSON; one commit for all)",
    responses=_UPDATE_ERRORS,
)
async def post_entities(req: UpsertRequest, service: ServiceDep) -> UpdateResponse:
    ids = [e.id for e in req.entities]
    if len(set(ids)) != len(ids):
        raise ApiError(422, "duplicate_id", "each id may appear once per call")
    if len(ids) > service.settings.max_admin_entities:
        raise ApiError(
            413,
            "batch_too_large",
            f"{len(ids)} entities; at most {service.settings.max_admin_entities} per call",
        )
    items = [await _new_entity(service, e.id, e) for e in req.entities]
    return _answer(await service.upsert(items))


@router.post(
    "/entities/form",
    response_model=UpdateResponse,
    summary="Add or replace one entity (multipart: the entity as JSON, an image file)",
    responses=_UPDATE_ERRORS,
)
async def post_entity_form(
    service: ServiceDep,
    entity: str = Form(..., description='JSON: {"id", "name", "attributes", "aliases", ...}'),
    image: UploadFile | None = File(None),
) -> UpdateResponse:
    try:
        body = EntityIn.model_validate(json.loads(entity))
    except json.JSONDecodeError as exc:
        raise ApiError(422, "invalid_request", f"entity: not JSON ({exc.msg})") from exc
    except ValidationError as exc:
        raise ApiError(422, validation_code(exc.errors()), describe(exc.errors())) from exc
    raw = None
    if image is not None:
        raw = await image.read(service.settings.max_image_bytes + 1)
        if len(raw) > service.settings.max_image_bytes:
            raise ApiError(
                413, "image_too_large", f"image over {service.settings.max_image_bytes} bytes"
            )
    return _answer(await service.upsert([await _new_entity(service, body.id, body, raw or None)]))


@router.delete(
    "/entities/{entity_id}",
    response_model=UpdateResponse,
    summary="Delete one entity (never returned again)",
    responses=responses(401, 403, 404, 503),
)
async def delete_entity(entity_id: str, service: ServiceDep) -> UpdateResponse:
    return _answer(await service.delete([entity_id]))


@router.post(
    "/swap",
    response_model=SwapResponse,
    summary="Hot swap: load new folders beside the serving ones, then switch atomically",
    responses=responses(401, 403, 422, 503),
)
async def swap(req: SwapRequest, service: ServiceDep) -> SwapResponse:
    old = service.require_state()
    changes: dict[str, Any] = req.model_dump(exclude_none=True)
    t0 = time.perf_counter()
    try:
        new = await service.swap(changes)
    except ApiError:
        raise
    except Exception as exc:  # the old generation keeps serving
        raise ApiError(422, "swap_failed", f"{type(exc).__name__}: {exc}"[:1000]) from exc
    return SwapResponse(
        model_version=new.linker.fingerprint,
        index_version=new.linker.searcher.version,
        rerankers=list(new.linker.rerankers),
        previous_index_version=old.linker.searcher.version,
        seconds=round(time.perf_counter() - t0, 3),
    )
