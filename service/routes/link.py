"""``/v1/link``: link one mention (JSON or multipart) or a batch."""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, UploadFile
from pydantic import ValidationError

from service.deps import ServiceDep, SettingsDep, require_key
from service.errors import ApiError, describe, responses, validation_code
from service.schemas import BatchRequest, BatchResponse, LinkRequest, LinkResponse

router = APIRouter(prefix="/v1/link", tags=["link"], dependencies=[Depends(require_key)])


@router.post(
    "",
    response_model=LinkResponse,
    summary="Link one mention (JSON; image as base64 / data URI / URL)",
    responses=responses(400, 401, 403, 413, 415, 422, 429, 502, 503, 504),
)
async def link(req: LinkRequest, service: ServiceDep) -> LinkResponse:
    return await service.link_one(req)


@router.post(
    "/form",
    response_model=LinkResponse,
    summary="Link one mention (multipart form with an image file)",
    responses=responses(401, 413, 415, 422, 429, 503, 504),
)
async def link_form(
    service: ServiceDep,
    settings: SettingsDep,
    mention: str = Form(...),
    sentence: str = Form(...),
    image: UploadFile | None = File(None),
    top_k: int | None = Form(None),
    candidates_k: int | None = Form(None),
    reranker: str | None = Form(None),
    explain: bool = Form(False),
    span_start: int | None = Form(None),
    span_end: int | None = Form(None),
) -> LinkResponse:
    if (span_start is None) != (span_end is None):
        raise ApiError(422, "bad_span", "give both span_start and span_end, or neither")
    try:
        req = LinkRequest.model_validate(
            {
                "mention": mention,
                "sentence": sentence,
                "top_k": top_k,
                "candidates_k": candidates_k,
                "reranker": reranker,
                "explain": explain,
                "span": (span_start, span_end) if span_start is not None else None,
            }
        )
    except ValidationError as exc:
        raise ApiError(422, validation_code(exc.errors()), describe(exc.errors())) from exc
    raw = None
    if image is not None:
        raw = await image.read(settings.max_image_bytes + 1)
        if len(raw) > settings.max_image_bytes:
            raise ApiError(
                413, "image_too_large", f"image is larger than {settings.max_image_bytes} bytes"
            )
    return await service.link_one(req, raw or None)


@router.post(
    "/batch",
    response_model=BatchResponse,
    summary="Link up to max_batch_items mentions; a bad item fails alone",
    responses=responses(401, 413, 422, 503),
)
async def link_batch(body: BatchRequest, service: ServiceDep) -> BatchResponse:
    return await service.link_batch(body.items)
