"""A small server that behaves like the legacy evaluation server, for tests.

It offers only ``POST /evaluate_v3``: it blocks for ``latency`` seconds and
answers with one flat JSON outcome. Everything else gets aiohttp's plain-text
404/405, as the old server did. What it answers is configurable per server
(``status``, ``body``, ``outcome``, ``headers``) or per request (``script``:
a list of answers consumed in order, then the defaults). It records every
payload, the connections it saw and the peak number of concurrent requests.

Run it on the test's own loop (``async with LegacyServer() as server``) or,
for tests whose client calls ``asyncio.run`` in other threads, on a loop of
its own (``with LegacyServer().in_thread() as server``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web

__all__ = ["DEFAULT_OUTCOME", "Answer", "LegacyServer", "run_in_thread"]

DEFAULT_OUTCOME: dict[str, Any] = {
    "success": True,
    "error": None,
    "error_detail": None,
    "build_output": "built",
    "reward": 0.75,
    "speedup": 1.5,
    "exit_code": 0,
    "timed_out": False,
    "gpu_id": 3,
    "stdout": "benchmark output " + "x" * 300,
    "stderr": "",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Answer:
    """One scripted answer: status, body (text or JSON-able), extra headers."""

    status: int = 200
    body: Any = None  # None: the server's outcome; str: sent as is
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    latency: float | None = None


class LegacyServer:
    """An aiohttp server with only the legacy blocking endpoint."""

    def __init__(
        self,
        *,
        latency: float = 0.0,
        status: int = 200,
        body: Any = None,
        outcome: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.latency = latency
        self.status = status
        self.body = body
        self.outcome = dict(DEFAULT_OUTCOME if outcome is None else outcome)
        self.headers = dict(headers or {})
        self.script: list[Answer] = []

        self.payloads: list[dict[str, Any]] = []
        self.request_times: list[float] = []
        self.other_requests: list[str] = []
        self.peers: set[tuple[str, int]] = set()
        self.concurrent = 0
        self.peak_concurrent = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    @property
    def requests(self) -> int:
        """Return how many ``/evaluate_v3`` requests arrived."""
        return len(self.payloads)

    @property
    def connections(self) -> int:
        """Return how many distinct client connections were seen."""
        return len(self.peers)

    async def __aenter__(self) -> LegacyServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Listen on a free loopback port; set ``url``."""
        app = web.Application()
        app.router.add_post("/evaluate_v3", self._evaluate)
        app.middlewares.append(self._note_peer)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        """Stop listening and drop open connections."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @contextlib.contextmanager
    def in_thread(self) -> Iterator[LegacyServer]:
        """Run the server on its own loop in a background thread."""
        with run_in_thread(self.start, self.close):
            yield self

    @web.middleware
    async def _note_peer(
        self, request: web.Request, handler: Any
    ) -> web.StreamResponse:
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport else None
        if peer is not None:
            self.peers.add((peer[0], peer[1]))
        if request.path != "/evaluate_v3":
            self.other_requests.append(f"{request.method} {request.path}")
        return await handler(request)

    async def _evaluate(self, request: web.Request) -> web.Response:
        self.payloads.append(await request.json())
        self.request_times.append(time.monotonic())
        answer = self.script.pop(0) if self.script else None

        self.concurrent += 1
        self.peak_concurrent = max(self.peak_concurrent, self.concurrent)
        try:
            latency = self.latency
            if answer is not None and answer.latency is not None:
                latency = answer.latency
            await asyncio.sleep(latency)
        finally:
            self.concurrent -= 1
        return self._response(answer)

    def _response(self, answer: Answer | None) -> web.Response:
        status = self.status if answer is None else answer.status
        body = self.body if answer is None else answer.body
        headers = dict(self.headers)
        if answer is not None:
            headers.update(answer.headers)

        if body is None:
            body = self.outcome
        if isinstance(body, str):
            return web.Response(status=status, text=body, headers=headers)
        return web.Response(
            status=status,
            text=json.dumps(body),
            content_type="application/json",
            headers=headers,
        )


@contextlib.contextmanager
def run_in_thread(
    start: Callable[[], Awaitable[None]], close: Callable[[], Awaitable[None]]
) -> Iterator[None]:
    """Run ``start()`` on a new loop in a thread; ``close()`` it on exit."""
    ready = threading.Event()
    started: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
    failure: list[BaseException] = []

    async def main() -> None:
        stop = asyncio.Event()
        started.append((asyncio.get_running_loop(), stop))
        try:
            await start()
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            raise
        ready.set()
        try:
            await stop.wait()
        finally:
            await close()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    try:
        if not ready.wait(30) or failure:
            raise RuntimeError(f"the server thread did not start: {failure}")
        yield
    finally:
        if started:
            loop, stop = started[0]
            loop.call_soon_threadsafe(stop.set)
        thread.join(30)
