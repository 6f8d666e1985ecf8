"""ASGI middleware around the app, outermost first as added by app.py:
CORS (only when asked), security headers on every answer, a bound on
requests in progress, a cap on request bodies, and a backstop that turns a
bug into a JSON 500 without closing the client's connection."""

from __future__ import annotations

from typing import Callable

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from .config import MULTIPART_OVERHEAD, size_text

CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}


async def send_json_error(send, status: int, message: str) -> None:
    """Answer with the service's JSON error, from middleware (no route ran)."""
    response = JSONResponse({"error": message, "status": status}, status_code=status)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class SecurityHeaders:
    """SECURITY_HEADERS on every response (those a route set itself are kept)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(name.lower().encode(), value.encode()) for name, value in SECURITY_HEADERS.items()
                         if name.lower().encode() not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class InFlightLimit:
    """At most `limit` requests in progress; the next gets 503 at once (an
    upload is spooled while it is parsed, before any route runs: this bounds
    what a burst can hold)."""

    def __init__(self, app, limit: int):
        self.app, self.limit, self.active = app, limit, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            return await send_json_error(send, 503, f"busy: {self.active} requests in progress; try again shortly")
        self.active += 1  # one event loop: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class UploadLimit:
    """A request body over `limit` bytes gets 413: from its Content-Length
    when it has one, else as it streams in, before it is parsed or spooled."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await send_json_error(send, 413, self._message())
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, self._message())  # FastAPI lets it through its body parsing
            return message

        await self.app(scope, limited_receive, send)

    def _message(self) -> str:
        return f"upload too large: the limit is {size_text(self.limit - MULTIPART_OVERHEAD)}"


class Backstop:
    """A bug in a route answers 500 with a JSON line and is logged in one
    line; the exception stops here, so the server keeps the client's
    connection (re-raised, it would close it, and print a trace)."""

    def __init__(self, app, log: Callable[[str], None]):
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:  # noqa: BLE001 - the point: nothing reaches the server
            self.log(f"error: {scope['method']} {scope['path']}: {type(error).__name__}: {error}")
            if not started:
                await send_json_error(send, 500, "internal error (logged by the service)")
