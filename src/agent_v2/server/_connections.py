"""Open HTTP connections: a cap on how many, and which one goes when it is hit.

Silent or slow clients cost the server a socket and a file descriptor each;
enough of them would leave none for everyone else. :class:`ConnectionGuard`
keeps the count under ``max_connections``. When a connection arrives at the
cap, the one that has been idle longest is closed to make room. Idle means
no request in progress: a kept-alive client between two requests, or a
client that has not finished sending its request head (a slowloris). Only
when every connection is busy with a request is the newcomer turned away,
with ``503`` and ``Retry-After``. So idle sockets can never lock out clients
that are actually asking for something.

How long a connection may stay idle at all is the ``keepalive_timeout`` that
aiohttp applies from the moment a connection opens (see ``_serve``).

The event loop accepts every connection the kernel has queued in one pass and
creates their protocols before any of them is started. A connection evicted
in that window has no transport to close yet; it is marked, and closed the
moment it starts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from aiohttp.web_protocol import RequestHandler

from agent_v2.protocol import ErrorBody, ErrorCode

__all__ = ["ConnectionGuard"]

logger = logging.getLogger(__name__)

REFUSAL_DELAY = 1.0
"""Seconds a turned-away connection may take to send its request head before
it is answered anyway; reading the request first spares the client a reset."""

_REFUSAL_BODY = ErrorBody(
    error=ErrorCode.OVERLOADED.value,
    error_detail="the server has too many open connections and all are busy; "
    "retry after Retry-After seconds",
).model_dump_json()

REFUSAL = (
    "HTTP/1.1 503 Service Unavailable\r\n"
    "Content-Type: application/json\r\n"
    f"Content-Length: {len(_REFUSAL_BODY)}\r\n"
    "Retry-After: 1\r\n"
    "Connection: close\r\n\r\n"
    f"{_REFUSAL_BODY}"
).encode()


class ConnectionGuard:
    """Keeps one server's open connections at or under ``max_connections``."""

    def __init__(
        self,
        max_connections: int,
        *,
        on_shed: Callable[[str], None] | None = None,
    ) -> None:
        self.max_connections = max_connections
        self._on_shed = on_shed
        # Both keyed by aiohttp's protocol object, one per connection. ``_idle``
        # is ordered from the longest idle to the most recently idle.
        self._idle: dict[RequestHandler, None] = {}
        self._busy: dict[RequestHandler, int] = {}
        # Admitted but not started yet (no transport), and those of them evicted.
        self._starting: set[RequestHandler] = set()
        self._evicted: set[RequestHandler] = set()

    @property
    def open(self) -> int:
        """Return how many connections are open."""
        return len(self._idle) + len(self._busy)

    def protocol_factory(
        self, server: web.Server
    ) -> Callable[[], asyncio.BaseProtocol]:
        """Return the factory ``loop.create_server`` calls per connection."""

        def admit() -> asyncio.BaseProtocol:
            if self.open >= self.max_connections and not self._evict_one():
                self._shed("refused")
                return _Refusal()
            handler = server()
            self._idle[handler] = None
            self._starting.add(handler)
            return _Tracked(handler, self._started, self._forget)

        return admit

    def middleware(self) -> Middleware:
        """Return a middleware that marks a connection busy while it is served."""

        @web.middleware
        async def mark_busy(
            request: web.Request, handler: Handler
        ) -> web.StreamResponse:
            connection = request.protocol
            if connection not in self._idle and connection not in self._busy:
                return await handler(request)  # not ours (an in-process test)

            self._idle.pop(connection, None)
            self._busy[connection] = self._busy.get(connection, 0) + 1
            try:
                return await handler(request)
            finally:
                self._release(connection)

        return mark_busy

    def _release(self, connection: RequestHandler) -> None:
        """Mark a connection idle again, unless it is gone or still busy."""
        count = self._busy.pop(connection, 0) - 1
        if count > 0:
            self._busy[connection] = count
        elif connection.transport is not None:
            self._idle[connection] = None

    def _evict_one(self) -> bool:
        """Close the connection idle the longest; return False when none is idle."""
        while self._idle:
            connection = next(iter(self._idle))
            del self._idle[connection]
            if connection in self._starting:
                self._evicted.add(connection)  # closed by _started
            elif connection.transport is None:
                continue  # already closing
            else:
                connection.force_close()
            self._shed("evicted")
            logger.debug(
                "closed the longest-idle connection: %d connections open, "
                "max_connections=%d",
                self.open + 1,
                self.max_connections,
            )
            return True
        logger.warning(
            "turned a connection away: all %d connections are busy (max_connections)",
            self.max_connections,
        )
        return False

    def _shed(self, reason: str) -> None:
        """Report a connection closed because of the cap."""
        if self._on_shed is not None:
            self._on_shed(reason)

    def _started(self, connection: RequestHandler) -> None:
        """Close a connection that was evicted before it started."""
        self._starting.discard(connection)
        if connection in self._evicted:
            self._evicted.discard(connection)
            connection.force_close()

    def _forget(self, connection: RequestHandler) -> None:
        """Drop a closed connection from the books."""
        self._idle.pop(connection, None)
        self._busy.pop(connection, None)
        self._starting.discard(connection)
        self._evicted.discard(connection)


class _Tracked(asyncio.Protocol):
    """aiohttp's protocol for one connection; tells the guard it started or closed."""

    __slots__ = ("_handler", "_on_lost", "_on_made")

    def __init__(
        self,
        handler: RequestHandler,
        on_made: Callable[[RequestHandler], None],
        on_lost: Callable[[RequestHandler], None],
    ) -> None:
        self._handler = handler
        self._on_made = on_made
        self._on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._handler.connection_made(transport)
        self._on_made(self._handler)

    def data_received(self, data: bytes) -> None:
        self._handler.data_received(data)

    def eof_received(self) -> None:
        self._handler.eof_received()

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._handler.connection_lost(exc)
        finally:
            self._on_lost(self._handler)


class _Refusal(asyncio.Protocol):
    """Answer ``503`` to a connection over the cap, then close it."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(REFUSAL_DELAY, self._answer)

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" in data or len(data) > 8192:
            self._answer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None

    def _answer(self) -> None:
        """Send the refusal once and close the connection."""
        if self._transport is None or self._transport.is_closing():
            return
        self._transport.write(REFUSAL)
        self._transport.close()
