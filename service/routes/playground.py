"""``/``: the playground, a static page (HTML + plain JS, no build step) over the public API."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parents[1] / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/playground.js")
async def script() -> FileResponse:
    return FileResponse(STATIC / "playground.js", media_type="text/javascript")
