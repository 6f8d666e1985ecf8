"""ASGI middleware around the app, outermost first as added by app.py:
security headers on every answer, errors as JSON (also those libraries
answer in plain text), CORS (only when asked), a deadline for request
bodies, a bound on requests in progress and on uploads arriving, a cap on
request bodies, HEAD answered as GET, and a backstop that turns a bug into
a JSON 500 without closing the client's connection."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from http import HTTPStatus
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


async def send_json_error(send, status: int, message: str, headers: list | None = None) -> None:
    """Answer with the service's JSON error, from middleware (no route ran)."""
    response = JSONResponse({"error": message, "status": status}, status_code=status)
    await send({"type": "http.response.start", "status": status, "headers": [*response.raw_headers, *(headers or [])]})
    await send({"type": "http.response.body", "body": response.body})


def _has_body(scope) -> bool:
    headers = dict(scope["headers"])
    return headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers


def _body_in(message) -> bool:
    """Whether `message` (from receive) ends the request's body (or the client left)."""
    return not (message["type"] == "http.request" and message.get("more_body", False))


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


class JsonErrors:
    """Every error is the service's JSON line, also the few that libraries
    answer in plain text by themselves (a static file's bad Range: 400,
    416); their status and other headers (Content-Range) are kept."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held, text = None, b""

        async def json_send(message):
            nonlocal held, text
            if message["type"] == "http.response.start" and message["status"] >= 400 and not _is_json(message):
                held = message
            elif held is None:
                await send(message)
            else:
                text = (text + message.get("body", b""))[:1000]
                if not message.get("more_body", False):
                    status = held["status"]
                    line = " ".join(text.decode("utf-8", "replace").split()) or HTTPStatus(status).phrase.lower()
                    kept = [(name, value) for name, value in held.get("headers", [])
                            if name.lower() not in (b"content-type", b"content-length")]
                    await send_json_error(send, status, line, kept)

        await self.app(scope, receive, json_send)


def _is_json(start) -> bool:
    return any(name.lower() == b"content-type" and value.startswith(b"application/json")
               for name, value in start.get("headers", []))


class ReadDeadline:
    """A request's body must be in within `seconds` of its headers, else 408
    and the connection closes: a client that stalls or trickles an upload
    holds nothing for longer. (Its line and headers have a deadline of their
    own: protocol.py.)"""

    def __init__(self, app, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = asyncio.get_running_loop().time() + self.seconds
        arrived = False

        async def timed_receive():
            nonlocal arrived
            if arrived:  # later calls only wait for a disconnect (a streamed response listens)
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(408, f"the request took longer than {self.seconds:g} s to arrive; "
                                         "send it again", headers={"Connection": "close"}) from None
            arrived = _body_in(message)
            return message

        await self.app(scope, timed_receive, send)


@dataclass
class Load:
    """What InFlightLimit counts (shown by /api/stats)."""

    in_progress: int = 0  # requests being answered, their bodies in
    arriving: int = 0  # requests whose bodies are still arriving (uploads)


class InFlightLimit:
    """At most `limit` requests in progress; the next gets 503 at once. A
    request with a body counts once its body is in: until then it counts
    among at most `limit` bodies arriving (an upload is spooled while it is
    parsed), so clients that send slowly or stall (cut off by ReadDeadline)
    can make other uploads wait, never the cheap routes."""

    def __init__(self, app, limit: int, load: Load):
        self.app, self.limit, self.load = app, limit, load

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not _has_body(scope):
            if self.load.in_progress >= self.limit:
                return await send_json_error(send, 503, self._busy())
            self.load.in_progress += 1  # one event loop: no lock needed
            try:
                return await self.app(scope, receive, send)
            finally:
                self.load.in_progress -= 1
        if self.load.arriving >= self.limit:
            return await send_json_error(send, 503, f"busy: {self.load.arriving} uploads are arriving; "
                                                    "try again shortly")
        self.load.arriving += 1
        state = "arriving"

        async def counting_receive():
            nonlocal state
            message = await receive()
            if state == "arriving" and _body_in(message):
                self.load.arriving -= 1
                if self.load.in_progress >= self.limit:
                    state = "refused"
                    raise HTTPException(503, self._busy())  # FastAPI lets it through its body parsing
                state = "in progress"
                self.load.in_progress += 1
            return message

        try:
            await self.app(scope, counting_receive, send)
        finally:
            if state == "arriving":
                self.load.arriving -= 1
            elif state == "in progress":
                self.load.in_progress -= 1

    def _busy(self) -> str:
        return f"busy: {self.load.in_progress} requests in progress; try again shortly"


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


class HeadAsGet:
    """HEAD is answered wherever GET is: the GET's status and headers, no body."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


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
