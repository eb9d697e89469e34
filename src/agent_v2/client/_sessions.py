"""One aiohttp session per event loop, closed when that loop shuts down.

An ``aiohttp.ClientSession`` belongs to the loop it was created on, so code
that calls ``asyncio.run`` from many threads needs one session per loop. The
:class:`SessionPool` keeps them in a registry keyed weakly by loop and closes
each one from inside its own loop just before the loop closes.

How the closing works: when a loop's state is created, the pool starts a
tiny async generator on that loop and keeps it suspended. ``asyncio.run``
(and ``asyncio.Runner``, which pytest-asyncio uses) calls
``loop.shutdown_asyncgens()`` after cancelling the remaining tasks and
before closing the loop; that finalizes the generator, whose ``finally``
block closes the session while the loop can still run the close. This uses
only documented asyncio behaviour: no method of the loop is patched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any, Protocol, TypeVar

import aiohttp

from agent_v2 import __version__
from agent_v2.client._config import Limits

__all__ = ["LoopState", "SessionPool"]

logger = logging.getLogger(__name__)

USER_AGENT = f"agent-v2-client/{__version__}"

BACKGROUND_GRACE = 5.0
"""Seconds a closing loop state lets its background tasks (such as telling the
server that a cancelled call's evaluation is no longer wanted) finish."""


class _Closeable(Protocol):
    async def close(self) -> None: ...


_R = TypeVar("_R", bound=_Closeable)
_Work = Callable[[], Coroutine[Any, Any, None]]


class _CountingConnector(aiohttp.TCPConnector):
    """A TCPConnector that tells its pool about every connection it opens."""

    def __init__(self, pool: SessionPool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pool = pool

    async def _create_connection(self, *args: Any, **kwargs: Any) -> Any:
        # NOTE: aiohttp has no public hook that hands out the connection, and
        # counting live connections needs the protocol object; this private
        # method has kept its shape across aiohttp 3.x.
        protocol = await super()._create_connection(*args, **kwargs)
        self._pool._connection_opened(protocol)
        return protocol


class LoopState:
    """What one event loop owns: its session, its request slots, its waiters."""

    def __init__(self, pool: SessionPool, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pool = pool
        self.closed = False
        limits = pool.limits

        self.session = aiohttp.ClientSession(
            connector=_CountingConnector(
                pool,
                limit=limits.max_connections,
                limit_per_host=limits.max_per_host,
            ),
            headers={"User-Agent": USER_AGENT},
            timeout=aiohttp.ClientTimeout(total=None),
        )
        self._all_slots = asyncio.Semaphore(limits.max_connections)
        self._host_slots: dict[str, asyncio.Semaphore] = {}
        self.evaluation_slots = (
            asyncio.Semaphore(limits.max_in_flight)
            if limits.max_in_flight is not None
            else None
        )
        self._resources: dict[object, _Closeable] = {}
        # Background work by its task; a task cancelled before it finished
        # stays, and close() runs its work again.
        self._background: dict[asyncio.Task[None], _Work] = {}
        self._closer: AsyncGenerator[None, None] | None = None

    def request_slots(self, host: str) -> tuple[asyncio.Semaphore, asyncio.Semaphore]:
        """Return the slots a request to ``host`` holds: ``async with`` both.

        The first bounds the requests to ``host``, the second all of this
        loop's requests; take them in this order.
        """
        # NOTE: the slots are taken *before* the request starts its clock, and
        # there are never more slots than pooled connections, so a request
        # never waits inside aiohttp for a free connection: such a wait would
        # be charged to the request's timeout. The host slot comes first so
        # that requests queued for one busy server do not hold global slots
        # that requests to another server could use. Two semaphores, not a
        # context manager of ours built on a generator: requests are also
        # made while the loop shuts down (see run_in_background), when asyncio
        # refuses new async generators.
        host_slots = self._host_slots.get(host)
        if host_slots is None:
            host_slots = asyncio.Semaphore(self.pool.limits.requests_per_host)
            self._host_slots[host] = host_slots
        return host_slots, self._all_slots

    def resource(self, key: object, factory: Callable[[], _R]) -> _R:
        """Return the resource stored under ``key``, creating it on first use.

        Resources are closed, newest first, before the session.
        """
        found = self._resources.get(key)
        if found is None:
            found = factory()
            self._resources[key] = found
        return found  # type: ignore[return-value]  # stored by this factory

    def run_in_background(self, work: _Work) -> None:
        """Run ``work()`` in a task of this loop that outlives its caller.

        For what must happen even though the call that wanted it was
        cancelled. When the loop shuts down first (``asyncio.run`` cancels
        every task before it finalizes this state), :meth:`close` runs the
        work again; either way it gets BACKGROUND_GRACE seconds.
        """
        task = self.loop.create_task(work())
        self._background[task] = work
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            self._background.pop(task, None)

    async def _finish_background(self) -> None:
        """Wait for background work; run again what was cancelled unfinished."""
        running = [task for task in self._background if not task.done()]
        if running:
            await asyncio.wait(running, timeout=BACKGROUND_GRACE)
        unfinished = list(self._background.items())
        self._background.clear()
        late = [task for task, _ in unfinished if not task.done()]
        for task in late:
            task.cancel()  # had its grace
        again = [work() for task, work in unfinished if task.cancelled()]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(BACKGROUND_GRACE):
                await asyncio.gather(*late, *again, return_exceptions=True)

    def take(self, key: object) -> _Closeable | None:
        """Remove and return the resource stored under ``key``, if any."""
        return self._resources.pop(key, None)

    async def close(self) -> None:
        """Close every resource of this loop, then the session."""
        if self.closed:
            return
        self.closed = True
        # Before this state is forgotten, so that the work's requests still
        # find it (and its session) instead of opening another.
        await self._finish_background()
        self.pool._forget(self)

        for resource in reversed(list(self._resources.values())):
            try:
                await resource.close()
            except Exception:
                logger.exception("closing %r failed", resource)
        self._resources.clear()

        await self.session.close()
        # One more turn of the loop lets the transports finish closing
        # before the loop itself is closed.
        await asyncio.sleep(0)
        logger.debug("closed the client session of loop %#x", id(self.loop))

    async def _start_closer(self) -> None:
        """Arrange for :meth:`close` to run when the loop shuts down."""
        closer = _close_at_shutdown(self)
        await anext(closer)  # the first step registers it with the loop
        self._closer = closer

    async def release_closer(self) -> None:
        """Close now, and finalize the generator that waited for shutdown."""
        closer, self._closer = self._closer, None
        if closer is not None:
            await closer.aclose()
        await self.close()


async def _close_at_shutdown(state: LoopState) -> AsyncGenerator[None, None]:
    """Suspend until the loop finalizes async generators, then close ``state``."""
    try:
        yield
    finally:
        await state.close()


class SessionPool:
    """Sessions for every event loop that uses them, with shared limits.

    Safe to use from many threads; each loop only ever sees its own session.
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits if limits is not None else Limits()
        self._lock = threading.Lock()
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopState]
        self._states = weakref.WeakKeyDictionary()
        self._connections: weakref.WeakSet[Any] = weakref.WeakSet()
        self._connections_opened = 0

    async def state(self) -> LoopState:
        """Return the running loop's state, creating it on first use."""
        loop = asyncio.get_running_loop()
        with self._lock:
            state = self._states.get(loop)
            if state is not None:
                return state
            state = LoopState(self, loop)
            self._states[loop] = state

        # Registered before this await, so concurrent callers on this loop
        # share the state even while the closer is being started.
        await state._start_closer()
        return state

    def current(self) -> LoopState | None:
        """Return the running loop's state if it exists, without creating it."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        with self._lock:
            return self._states.get(loop)

    async def aclose(self) -> None:
        """Close the running loop's session now (a no-op when it has none)."""
        state = self.current()
        if state is not None:
            await state.release_closer()

    @property
    def sessions(self) -> int:
        """Return how many loops have an open session."""
        with self._lock:
            return sum(1 for state in self._states.values() if not state.closed)

    @property
    def open_connections(self) -> int:
        """Return how many TCP connections are open right now, all loops."""
        with self._lock:
            protocols = list(self._connections)
        return sum(1 for protocol in protocols if protocol.is_connected())

    @property
    def connections_opened(self) -> int:
        """Return how many TCP connections were ever opened, all loops."""
        with self._lock:
            return self._connections_opened

    def _connection_opened(self, protocol: Any) -> None:
        with self._lock:
            self._connections.add(protocol)
            self._connections_opened += 1

    def _forget(self, state: LoopState) -> None:
        with self._lock:
            if self._states.get(state.loop) is state:
                del self._states[state.loop]
