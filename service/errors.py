"""API errors: one exception type, one JSON shape, the handlers, and the OpenAPI entries.

Every error the server answers is ``{"error": {"code": ..., "message": ...}}`` with a stable
machine-readable ``code`` (the README lists them). Messages never echo object reprs or memory
addresses: they say what was wrong with the input.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.metrics import Metrics
from service.schemas import VALIDATION_CODES, ErrorResponse


class ApiError(Exception):
    """An error answer: HTTP ``status``, stable ``code``, human ``message``."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


# What each status means here (the OpenAPI descriptions; codes are in the README's table).
STATUS_MEANING = {
    400: "malformed input (e.g. invalid base64)",
    401: "missing or wrong API key (admin routes: no admin key given)",
    403: "refused (image_url disabled or pointing at a non-public address; a key that is not "
    "an admin key, or admin routes off)",
    404: "no such entity or route",
    405: "method not allowed on this route",
    413: "too large: body, image bytes, batch items or the request's pixel budget",
    415: "image format not accepted",
    422: "invalid request (field values, limits, undecodable body or image)",
    429: "queue full: retry later",
    502: "image_url fetch failed",
    503: "not ready yet, shutting down, or the index folder is locked by another writer",
    504: "no result within the request deadline, or image_url fetch timed out",
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for a route: each status with the error schema."""
    return {s: {"model": ErrorResponse, "description": STATUS_MEANING[s]} for s in statuses}


def describe(errors: Any) -> str:
    """pydantic errors -> one line: ``field: message; ...`` (inputs are not echoed)."""
    parts = []
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg')}")
    return "; ".join(parts)[:1000]


def validation_code(errors: Any) -> str:
    """A request-rule code raised by a schema validator (``bad_span``...), else the generic
    ``invalid_request``."""
    for e in errors:
        if e.get("type") in VALIDATION_CODES:
            return str(e["type"])
    return "invalid_request"


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


def install_handlers(app: FastAPI, metrics: Metrics) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        metrics.errors.labels(type=exc.code).inc()
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        code = validation_code(exc.errors())
        metrics.errors.labels(type=code).inc()
        return error_response(422, code, describe(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's only 400: a body it could not parse at all (invalid UTF-8, JSON
            # nested past the parser's depth, a broken multipart form). Like any other
            # malformed body, that is an invalid request.
            metrics.errors.labels(type="invalid_body").inc()
            return error_response(
                422,
                "invalid_body",
                "the body could not be parsed (invalid UTF-8, JSON nested too deeply, "
                "or a malformed multipart form)",
            )
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), exc.headers)


__all__ = [
    "STATUS_MEANING",
    "ApiError",
    "describe",
    "error_response",
    "install_handlers",
    "responses",
    "validation_code",
]
