"""Run the server: as an async context manager (tests, demo) or until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from agent_v2.server._app import create_app
from agent_v2.server._scheduler import GradeFunction
from agent_v2.server._settings import ServerSettings

__all__ = ["run_server", "serve"]

logger = logging.getLogger(__name__)

HANDLER_SHUTDOWN_TIMEOUT = 5.0
"""Seconds open requests get to finish once the server stops listening."""

LISTEN_BACKLOG = 2048
"""Connections the kernel queues before accept; thousands of clients may
connect at once, and a full queue costs them seconds of SYN retries."""


@contextlib.asynccontextmanager
async def serve(
    settings: ServerSettings, *, grade: GradeFunction | None = None
) -> AsyncIterator[str]:
    """Serve on ``settings.host``/``settings.port`` (0: a free port); yield the URL.

    Leaving the block stops listening, lets open requests finish, then
    closes the scheduler, backend and store.
    """
    app = create_app(settings, grade=grade)
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=HANDLER_SHUTDOWN_TIMEOUT,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port, backlog=LISTEN_BACKLOG)
        await site.start()
        yield _base_url(runner, settings.host)
    finally:
        await runner.cleanup()


# TODO(10k open long polls): with ~10,000 requests held open, a full garbage
# collection walks over a million objects and pauses the event loop for up to
# ~0.5 s on a 2-core machine; clients that wait for many evaluations with one
# POST /v1/evaluations/wait keep the count of open requests, and the pause, low.
def run_server(
    settings: ServerSettings,
    *,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM; call ``on_ready`` with the URL once listening."""
    asyncio.run(_serve_until_signal(settings, on_ready))


async def _serve_until_signal(
    settings: ServerSettings, on_ready: Callable[[str], None] | None
) -> None:
    """Serve until a stop signal arrives, then shut down gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with serve(settings) as url:
            if on_ready is not None:
                on_ready(url)
            await stop.wait()
            logger.info("stopping: no new requests; finishing what runs")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def _base_url(runner: web.AppRunner, host: str) -> str:
    """Return ``http://host:port`` of the first address the runner listens on."""
    port = runner.addresses[0][1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"
