"""One waiter per event loop: many pending evaluations, a few long-polls.

Every evaluation submitted on a loop hands its id to that loop's
:class:`Waiter` and awaits a future. The waiter batches the ids of all
pending evaluations into ``POST /v1/evaluations/wait`` requests (at most
``chunk`` ids each, at most ``max_requests`` at once) that the server holds
until one of their evaluations finishes or ``long_poll`` seconds pass. So
1,000 evaluations in flight cost a handful of connections, not 1,000.

A server that restarts keeps its evaluations (the store is durable), so a
wait request that fails because the server is away (after the request's own
retries) is tried again, every second, for up to ``outage_grace`` seconds;
only then do the evaluations it covered fail. A 4xx fails them at once.

Ids that arrive while every wait request is out join the next one. If they
would wait longer than ``rebalance_after`` seconds (every open long-poll is
still silent), the waiter abandons its smallest long-poll and folds its ids
into a new request with the newcomers. That costs one connection, so it is
rate-limited by the same delay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable

from agent_v2.errors import (
    ClientError,
    HTTPStatusError,
    ProtocolError,
    RequestTimeout,
    TransportError,
)
from agent_v2.protocol import EvaluationView, WaitResponse

__all__ = ["WaitFunction", "Waiter"]

logger = logging.getLogger(__name__)

WaitFunction = Callable[[list[str], float], Awaitable[WaitResponse]]

_COALESCE_SECONDS = 0.005
_OUTAGE_PAUSE_SECONDS = 1.0


class Waiter:
    """Resolve futures of evaluation ids as the server reports them finished."""

    def __init__(
        self,
        wait: WaitFunction,
        *,
        long_poll: float,
        max_requests: int,
        chunk: int,
        rebalance_after: float = 1.0,
        outage_grace: float = 120.0,
    ) -> None:
        self._wait = wait
        self._long_poll = long_poll
        self._max_requests = max_requests
        self._chunk = chunk
        self._rebalance_after = rebalance_after
        self._outage_grace = outage_grace
        self._outage_since: float | None = None

        self._futures: dict[str, set[asyncio.Future[EvaluationView]]] = {}
        self._unassigned: dict[str, float] = {}  # id -> when it started waiting
        self._requests: dict[asyncio.Task[None], list[str]] = {}
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._last_rebalance = 0.0
        self._closed = False

    @property
    def pending(self) -> int:
        """Return how many evaluation ids are being waited for."""
        return len(self._futures)

    @property
    def open_requests(self) -> int:
        """Return how many wait requests are out right now."""
        return len(self._requests)

    def watch(self, evaluation_id: str) -> asyncio.Future[EvaluationView]:
        """Return a future resolved with the evaluation once it is finished.

        Cancelling the future (for example with ``asyncio.wait_for``) stops
        watching; the evaluation itself keeps running on the server.
        """
        if self._closed:
            raise ClientError("the waiter is closed; create a new client call")

        future: asyncio.Future[EvaluationView]
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda done: self._unwatch(evaluation_id, done))
        watchers = self._futures.setdefault(evaluation_id, set())
        watchers.add(future)
        if len(watchers) == 1:
            self._unassigned[evaluation_id] = time.monotonic()

        self._wake.set()
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(
                self._dispatch(), name="agent-v2-waiter"
            )
        return future

    async def close(self) -> None:
        """Stop every wait request and fail the futures still pending."""
        self._closed = True
        tasks = list(self._requests)
        if self._dispatcher is not None:
            tasks.append(self._dispatcher)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

        error = ClientError("the client was closed before the evaluation finished")
        for evaluation_id in list(self._futures):
            self._settle(evaluation_id, error=error)

    def _unwatch(
        self, evaluation_id: str, future: asyncio.Future[EvaluationView]
    ) -> None:
        """Forget a future once it is done, and its id once nobody waits."""
        watchers = self._futures.get(evaluation_id)
        if watchers is None:
            return
        watchers.discard(future)
        if not watchers:
            del self._futures[evaluation_id]
            self._unassigned.pop(evaluation_id, None)

    async def _dispatch(self) -> None:
        """Keep wait requests out for every pending id, until none is left."""
        while self._futures:
            timeout = self._time_to_rebalance()
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()

            # A short pause lets a burst of submissions share one request.
            await asyncio.sleep(_COALESCE_SECONDS)
            self._start_requests()
            self._maybe_rebalance()

    def _time_to_rebalance(self) -> float | None:
        """Return how long until the oldest unassigned id waited too long."""
        if not self._unassigned or len(self._requests) < self._max_requests:
            return None
        oldest = min(self._unassigned.values())
        due = max(oldest, self._last_rebalance) + self._rebalance_after
        return max(due - time.monotonic(), 0.0)

    def _start_requests(self) -> None:
        """Send the unassigned ids in chunks while request slots are free."""
        while self._unassigned and len(self._requests) < self._max_requests:
            ids = list(self._unassigned)[: self._chunk]
            for evaluation_id in ids:
                del self._unassigned[evaluation_id]
            task = asyncio.create_task(self._wait_once(ids), name="agent-v2-wait")
            self._requests[task] = ids

    def _maybe_rebalance(self) -> None:
        """Abandon the smallest long-poll when newcomers waited too long."""
        if self._time_to_rebalance() != 0.0:
            return
        # Noted even when nothing is abandoned, so the next check is one
        # rebalance_after away instead of spinning.
        self._last_rebalance = time.monotonic()
        smallest = min(self._requests, key=lambda task: len(self._requests[task]))
        if len(self._requests[smallest]) + len(self._unassigned) > self._chunk:
            return  # merging would not fit in one request anyway

        logger.debug(
            "folding %d waiting ids into a new wait request",
            len(self._unassigned),
        )
        smallest.cancel()  # its ids go back to the unassigned set

    async def _wait_once(self, ids: list[str]) -> None:
        """Send one wait request and settle what it reports."""
        try:
            try:
                response = await self._wait(ids, self._long_poll)
            except ClientError as exc:
                if not _is_outage(exc) or self._outage_too_long():
                    self._fail(ids, exc)
                    return
                logger.debug("server unreachable while waiting (%s); retrying", exc)
                await asyncio.sleep(_OUTAGE_PAUSE_SECONDS)
                self._requeue(ids)
                return
            except asyncio.CancelledError:
                self._requeue(ids)
                raise
            except Exception as exc:
                logger.exception("wait request failed unexpectedly")
                self._fail(ids, exc)
                return
        finally:
            self._requests.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            self._wake.set()

        self._outage_since = None
        self._settle_response(ids, response)

    def _outage_too_long(self) -> bool:
        """Note a failed wait; return whether the outage outlasted the grace."""
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
        return now - self._outage_since > self._outage_grace

    def _settle_response(self, ids: list[str], response: WaitResponse) -> None:
        """Resolve finished evaluations, fail unknown ids, requeue the rest."""
        for view in response.evaluations:
            if view.status.finished and view.outcome is not None:
                self._settle(view.id, view=view)
            elif view.status.finished:
                error: ClientError = ProtocolError(
                    f"the server reported evaluation {view.id!r} {view.status} "
                    "without an outcome"
                )
                self._settle(view.id, error=error)

        for evaluation_id in response.unknown:
            error = ClientError(
                f"the server does not know evaluation {evaluation_id!r}; it may "
                "have lost its store. Submit the evaluation again."
            )
            self._settle(evaluation_id, error=error)

        self._requeue(ids)

    def _requeue(self, ids: Iterable[str]) -> None:
        """Put the ids that are still watched back in the unassigned set."""
        now = time.monotonic()
        for evaluation_id in ids:
            if evaluation_id in self._futures:
                self._unassigned.setdefault(evaluation_id, now)
        self._wake.set()

    def _fail(self, ids: Iterable[str], error: BaseException) -> None:
        """Fail every future of these ids with ``error``."""
        for evaluation_id in ids:
            self._settle(evaluation_id, error=error)

    def _settle(
        self,
        evaluation_id: str,
        *,
        view: EvaluationView | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Resolve or fail every future that watches ``evaluation_id``."""
        # Forgotten right away: done callbacks only run on the next loop turn,
        # and a settled id must not be sent in another wait request.
        watchers = self._futures.pop(evaluation_id, set())
        self._unassigned.pop(evaluation_id, None)
        for future in watchers:
            if future.done():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(view)  # type: ignore[arg-type]


def _is_outage(exc: ClientError) -> bool:
    """Return whether ``exc`` says the server is away rather than refusing us."""
    if isinstance(exc, TransportError | RequestTimeout):
        return True
    return isinstance(exc, HTTPStatusError) and exc.status >= 500
