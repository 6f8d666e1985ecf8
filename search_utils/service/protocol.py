"""uvicorn's HTTP/1.1 protocol (h11), plus the deadline it lacks: for a
request's line and headers. uvicorn closes a connection left idle after a
response (timeout_keep_alive), but waits forever for a client that connects
and sends nothing, or trickles its headers a byte at a time; each such
connection holds a socket. The body has its deadline in the app
(middleware.ReadDeadline, answered 408); before the headers are in there is
no request to answer: the connection is closed, as uvicorn closes idle ones.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadline(H11Protocol):
    """A request's line and headers must be in within `seconds` of the
    connection, or of the answer to the request before on the connection."""

    seconds = 30.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_deadline()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's line and headers are in
            self._stop_deadline()

    def on_response_complete(self) -> None:
        self._start_deadline()  # first: the next request may be in already (pipelined), which stops it
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        super().connection_lost(exc)

    def _start_deadline(self) -> None:
        self._stop_deadline()
        self._deadline = self.loop.call_later(self.seconds, self._too_slow)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def with_header_deadline(seconds: float) -> type[HeaderDeadline]:
    """The protocol class to give uvicorn (it makes one per connection)."""
    return type("HeaderDeadline", (HeaderDeadline,), {"seconds": seconds})
