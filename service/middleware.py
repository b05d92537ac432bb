"""Pure ASGI middleware: the body limit and per-request metrics.

Pure ASGI (not ``BaseHTTPMiddleware``) so a streamed body can be refused before the app reads
it, and so the metrics see the status actually sent, whoever sent it.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from service.errors import error_response
from service.metrics import Metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimit:
    """413 ``body_too_large`` for bodies over ``max_bytes``, declared or streamed.

    A declared ``Content-Length`` is checked up front (the HTTP server enforces that the body
    matches it). A chunked body has no length: it is read here, up to the limit, and either
    refused with 413 before the app sees a byte or replayed to the app unchanged.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        msg = f"request body over {self.max_bytes} bytes"
        await error_response(413, "body_too_large", msg)(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        if b"chunked" not in headers.get(b"transfer-encoding", b"").lower():
            await self.app(scope, receive, send)  # no body
            return
        buffered: list[Message] = []
        seen = 0
        while True:
            msg = await receive()
            buffered.append(msg)
            if msg["type"] != "http.request":
                break
            seen += len(msg.get("body", b""))
            if seen > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not msg.get("more_body", False):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)


class RequestMetrics:
    """``mel_requests_total{route,status}`` for every request, and the total latency of
    ``/v1/link*`` requests."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500  # an exception that escapes the app is answered 500 outside us

        async def send_and_note(msg: Message) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = int(msg["status"])
            await send(msg)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(route=path, status=str(status)).inc()
            if path.startswith("/v1/link"):
                self.metrics.stage_seconds.labels(stage="total").observe(time.perf_counter() - t0)


__all__ = ["BodyLimit", "RequestMetrics"]
