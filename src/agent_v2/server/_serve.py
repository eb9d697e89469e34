"""Run the server: as an async context manager (tests, demo) or until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from agent_v2.errors import ConfigError
from agent_v2.server._app import create_app
from agent_v2.server._routes import STATE
from agent_v2.server._scheduler import GradeFunction
from agent_v2.server._settings import ServerSettings

__all__ = ["run_server", "serve"]

logger = logging.getLogger(__name__)


class _MalformedRequests(logging.Filter):
    """Make aiohttp's report of a request it could not parse one DEBUG line.

    aiohttp logs each such request at ERROR, with a traceback. They are the
    client's fault and are already answered 400, and any client could send
    enough of them to flood the log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        fault = record.exc_info[1] if record.exc_info else None
        if not isinstance(fault, HttpProcessingError) or not 400 <= fault.code < 500:
            return True
        if not http_logger.isEnabledFor(logging.DEBUG):
            return False
        record.msg, record.args = (
            "%s: %d %s",
            (
                record.getMessage(),
                fault.code,
                fault.message.strip().splitlines()[0] if fault.message else "",
            ),
        )
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info = record.exc_text = None
        return True


http_logger = logging.getLogger(f"{__name__}.http")
"""What aiohttp itself reports about connections and requests."""
http_logger.addFilter(_MalformedRequests())

HANDLER_SHUTDOWN_TIMEOUT = 5.0
"""Seconds open requests get to finish once the server stops listening."""

LISTEN_BACKLOG = 2048
"""Connections the kernel queues before accept; thousands of clients may
connect at once, and a full queue costs them seconds of SYN retries."""

FD_RESERVE = 256
"""File descriptors kept free of connections: the store, the sandbox's
subprocesses and their pipes need some too."""

LISTENER_CLOSE_TIMEOUT = 5.0

GC_THRESHOLDS = (5_000, 10, 100)
"""Collector thresholds while serving (CPython's defaults: 700, 10, 10).

Full collections are the long pauses (about 1 s with 10,000 open long polls
on a 2-core machine), so they come ten times less often; young collections
a few times less often, and stay short (see benchmarks/healthz_with_waiters.py).
"""


@contextlib.asynccontextmanager
async def serve(
    settings: ServerSettings, *, grade: GradeFunction | None = None
) -> AsyncIterator[str]:
    """Serve on ``settings.host``/``settings.port`` (0: a free port); yield the URL.

    Leaving the block stops listening, lets open requests finish, then
    closes the scheduler, backend and store.
    """
    app = create_app(settings, grade=grade)
    # NOTE: aiohttp starts the keep-alive timer when a connection opens, and
    # only a complete request head stops it, so this one setting closes idle
    # kept-alive connections and clients too slow to send their head alike.
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=HANDLER_SHUTDOWN_TIMEOUT,
        keepalive_timeout=settings.idle_timeout,
        logger=http_logger,
        # NOTE: bodies are read as sent; read_model refuses any
        # Content-Encoding with a 415, where aiohttp's own decoding would
        # answer an undecodable body with a 500 or not at all.
        auto_decompress=False,
    )
    await runner.setup()
    listener: asyncio.Server | None = None
    try:
        listener = await _listen(runner, settings)
        yield _base_url(listener, settings.host)
    finally:
        if listener is not None:
            listener.close()
        await runner.cleanup()
        if listener is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LISTENER_CLOSE_TIMEOUT):
                    await listener.wait_closed()


async def _listen(runner: web.AppRunner, settings: ServerSettings) -> asyncio.Server:
    """Listen on the settings' address; each connection goes through the guard."""
    server = runner.server
    assert server is not None  # set by runner.setup()
    guard = runner.app[STATE].connections
    guard.max_connections = _connection_cap(settings.max_connections)

    loop = asyncio.get_running_loop()
    try:
        return await loop.create_server(
            guard.protocol_factory(server),
            settings.host,
            settings.port,
            backlog=LISTEN_BACKLOG,
        )
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
        ) from exc


def _connection_cap(wanted: int) -> int:
    """Return ``wanted``, lowered to fit the process's file descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or wanted + FD_RESERVE <= soft:
        return wanted
    cap = max(soft - FD_RESERVE, 1)
    logger.warning(
        "max_connections lowered from %d to %d: the open-files limit is %d "
        "(raise it with ulimit -n)",
        wanted,
        cap,
        soft,
    )
    return cap


def run_server(
    settings: ServerSettings,
    *,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM; call ``on_ready`` with the URL once listening.

    This is the process entry point: it also raises the open-files limit for
    ``max_connections`` and tunes the garbage collector for a long-lived server.
    """
    _raise_fd_limit(settings.max_connections + FD_RESERVE)
    asyncio.run(_serve_until_signal(settings, on_ready))


async def _serve_until_signal(
    settings: ServerSettings, on_ready: Callable[[str], None] | None
) -> None:
    """Serve until a stop signal arrives, then shut down gracefully."""
    stop = asyncio.Event()
    with _stop_on_signals(stop):
        async with serve(settings) as url:
            _tune_gc()
            if on_ready is not None:
                on_ready(url)
            await stop.wait()
            logger.info("stopping: no new requests; finishing what runs")


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """Set ``stop`` on SIGINT or SIGTERM, however busy the loop is.

    NOTE: not ``loop.add_signal_handler``. That one learns of a signal from a
    byte in the loop's self-pipe, which every callback from a worker thread
    (each SQLite call) also writes to; a loop swamped by thousands of
    connections lets it fill up, the byte is dropped and the server never
    stops. A Python-level handler always runs, in the main thread (the
    loop's), and a wakeup pipe written by signals alone rouses a sleeping loop.
    """
    loop = asyncio.get_running_loop()
    wake_reader, wake_writer = socket.socketpair()
    for end in (wake_reader, wake_writer):
        end.setblocking(False)
    loop.add_reader(wake_reader.fileno(), _drain, wake_reader)
    previous_fd = signal.set_wakeup_fd(wake_writer.fileno(), warn_on_full_buffer=False)

    def on_signal(signum: int, frame: object) -> None:
        loop.call_soon_threadsafe(stop.set)

    previous = {
        signum: signal.signal(signum, on_signal)
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(previous_fd)
        loop.remove_reader(wake_reader.fileno())
        wake_reader.close()
        wake_writer.close()


def _drain(wake_reader: socket.socket) -> None:
    """Empty the signal wakeup pipe; the handlers themselves do the work."""
    with contextlib.suppress(OSError):
        while wake_reader.recv(4096):
            pass


def _tune_gc() -> None:
    """Keep full garbage collections rare and short while serving.

    With thousands of long polls open, a full collection walks over a million
    objects and stalls every request for the while. What exists at startup
    (modules, schemas, the app) lives as long as the process, so it is frozen
    out of the collector's sight; higher thresholds make the remaining
    collections rarer. Reference cycles are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    logger.debug(
        "garbage collector: %d startup objects frozen, thresholds %s",
        gc.get_freeze_count(),
        GC_THRESHOLDS,
    )


def _raise_fd_limit(wanted: int) -> None:
    """Raise the soft open-files limit toward ``wanted``, within the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target <= soft:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        logger.warning("cannot raise the open-files limit to %d: %s", target, exc)


def _base_url(listener: asyncio.Server, host: str) -> str:
    """Return ``http://host:port`` of the first socket the server listens on."""
    port = listener.sockets[0].getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"
