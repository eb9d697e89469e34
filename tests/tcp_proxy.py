"""A loopback TCP proxy that counts connections and can cut them, for tests.

It forwards bytes both ways between a client and an upstream server. Set
``cut_responses = n`` and the next ``n`` responses coming back from upstream
are swallowed and their client connection reset: the upstream has received
and handled the request, but the client never hears about it. That is the
fault that makes a naive retry run something twice.

``cut_match`` narrows which responses count (for example ``b" 202 "`` for
the answer to a submission); the test is made on the response's first chunk.

``inject`` holds canned answers (for example a gateway's ``502``): while it
is not empty, each request is answered with the next one instead of being
forwarded, and that connection is closed; upstream never sees the request.

``hold_match`` holds back each response whose first chunk contains it
(``held`` counts them) until ``release`` is set: the upstream has handled the
request, and the client is still waiting for the answer.

``reset_fraction`` makes faults at random (drawn from ``seed``): each request
that starts on a connection has that chance of getting the connection reset,
at a stage drawn from ``reset_stages``:

- ``"before"``: the request is dropped; upstream never sees it;
- ``"midway"``: the request reaches upstream, then the client is reset a few
  milliseconds later, whether or not upstream has answered yet;
- ``"response"``: upstream reads, handles and answers the request; the answer
  is swallowed and the client reset.

``resets`` counts them by stage. A chunk from the client that starts with a
method and a path (``POST /``) counts as the start of a request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import random
import re
from collections.abc import Iterator
from urllib.parse import urlsplit

from legacy_server import run_in_thread

__all__ = ["TcpProxy", "http_answer"]

_CHUNK = 65536
_REQUEST_START = re.compile(rb"[A-Z]+ /")
RESET_STAGES = ("before", "midway", "response")
_MIDWAY_DELAY = (0.002, 0.05)


@dataclasses.dataclass(eq=False)
class _Link:
    """One proxied connection: the client's end, and whether it is doomed."""

    client: asyncio.StreamWriter
    doomed: str | None = None  # the reset stage, once one is drawn
    cut: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def reset(self) -> None:
        """Reset the client's connection and stop both pumps."""
        if not self.cut.is_set():
            self.cut.set()
            self.client.transport.abort()


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to an upstream URL's host and port."""

    def __init__(self, upstream_url: str, *, seed: int | None = 0) -> None:
        parts = urlsplit(upstream_url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream URL needs a host and a port: {upstream_url}")
        self.upstream = (parts.hostname, parts.port)
        self.cut_responses = 0
        self.cut_match = b""
        self.inject: list[bytes] = []
        self.hold_match: bytes | None = None
        self.held = 0
        self.release = asyncio.Event()
        self.injected = 0
        self.connections = 0
        self.cuts = 0
        self.reset_fraction = 0.0
        self.reset_stages: tuple[str, ...] = RESET_STAGES
        self.resets: collections.Counter[str] = collections.Counter()
        self._rng = random.Random(seed)
        self.url = ""
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._client_writer: contextvars.ContextVar[asyncio.StreamWriter]
        self._client_writer = contextvars.ContextVar("client_writer")

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Listen on a free loopback port; set ``url``."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        """Stop listening and close every proxied connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    @contextlib.contextmanager
    def in_thread(self) -> Iterator[TcpProxy]:
        """Run the proxy on its own loop in a background thread."""
        with run_in_thread(self.start, self.close):
            yield self

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        try:
            await self._proxy(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _proxy(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        up_writer: asyncio.StreamWriter | None = None
        self._client_writer.set(writer)
        link = _Link(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            pumps = [
                asyncio.create_task(self._pump(reader, up_writer, link)),
                asyncio.create_task(self._pump_back(up_reader, writer, link)),
                asyncio.create_task(link.cut.wait()),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except OSError:
            pass
        finally:
            for stream in (writer, up_writer):
                if stream is not None:
                    stream.close()
                    with contextlib.suppress(OSError, asyncio.CancelledError):
                        await stream.wait_closed()

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, link: _Link
    ) -> None:
        """Copy client bytes upstream until either side closes."""
        while chunk := await source.read(_CHUNK):
            if self.inject:
                await self._answer(self.inject.pop(0))
                return
            if link.doomed is None and self._draw_reset(chunk, link) == "before":
                link.reset()
                return
            sink.write(chunk)
            await sink.drain()
            if link.doomed == "midway":
                delay = self._rng.uniform(*_MIDWAY_DELAY)
                asyncio.get_running_loop().call_later(delay, link.reset)

    def _draw_reset(self, chunk: bytes, link: _Link) -> str | None:
        """Decide whether the request starting in ``chunk`` gets a reset, and when."""
        if not self.reset_fraction or not _REQUEST_START.match(chunk):
            return None
        if self._rng.random() >= self.reset_fraction:
            return None
        link.doomed = self._rng.choice(self.reset_stages)
        self.resets[link.doomed] += 1
        return link.doomed

    async def _answer(self, canned: bytes) -> None:
        """Answer the current client with ``canned`` (set by _proxy per client)."""
        writer = self._client_writer.get()
        self.injected += 1
        writer.write(canned)
        await writer.drain()

    async def _pump_back(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, link: _Link
    ) -> None:
        """Copy upstream bytes to the client, cutting where told to."""
        while chunk := await source.read(_CHUNK):
            if link.doomed is not None:
                link.reset()  # the answer to a doomed request never arrives
                return
            if self.cut_responses > 0 and self.cut_match in chunk:
                self.cut_responses -= 1
                self.cuts += 1
                sink.transport.abort()  # a reset: the answer never arrives
                return
            if self.hold_match is not None and self.hold_match in chunk:
                self.held += 1
                await self.release.wait()
            sink.write(chunk)
            await sink.drain()


def http_answer(status: int, reason: str, body: bytes = b"") -> bytes:
    """Return a complete HTTP/1.1 answer that closes its connection."""
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n"
        "Content-Type: text/plain\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body
