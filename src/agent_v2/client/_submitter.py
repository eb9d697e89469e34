"""One submitter per event loop: many submissions, a few batch requests.

Every evaluation submitted on a loop hands its request (with its own
idempotency key) to that loop's :class:`Submitter` and awaits a future. The
submitter sends whatever has gathered as one ``POST /v1/evaluations/batch``
(at most ``chunk`` submissions each, at most ``max_requests`` at once), so a
thousand calls started together cost a few requests, not a thousand. While
requests are out, newcomers gather for the next one: a lone call goes out
at once, a crowd goes out in a few batches.

Batching only saves requests; it never decides an outcome. A batch is sent
once, without retries. When it fails in any way (the server lacks the
endpoint, refuses the request, or cannot be reached), each of its futures
resolves to None, and its caller submits alone with ``POST /v1/evaluations``
and that path's retries, errors and legacy fallback. The idempotency keys
make that safe even when the failed batch did reach the server.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable

from agent_v2.protocol import BatchItem, BatchSubmission

__all__ = ["SendBatch", "Submitter"]

logger = logging.getLogger(__name__)

SendBatch = Callable[[list[BatchSubmission]], Awaitable[list[BatchItem] | None]]
"""Send one batch; return one item per submission, or None when it failed."""

_Pending = tuple[BatchSubmission, "asyncio.Future[BatchItem | None]"]


class Submitter:
    """Gather the submissions of one event loop into batch requests."""

    def __init__(
        self,
        send: SendBatch,
        *,
        chunk: int,
        max_requests: int,
        abandoned: Callable[[str], None] | None = None,
    ) -> None:
        """``abandoned`` is told the id of each evaluation the server accepted
        after its caller had stopped waiting (was cancelled) for the answer."""
        self._send = send
        self._abandoned = abandoned
        self._chunk = chunk
        self._max_requests = max_requests
        self._pending: collections.deque[_Pending] = collections.deque()
        self._requests: set[asyncio.Task[None]] = set()
        self._flush_scheduled = False
        self._closed = False

    @property
    def pending(self) -> int:
        """Return how many submissions wait for a batch request."""
        return len(self._pending)

    def submit(self, submission: BatchSubmission) -> asyncio.Future[BatchItem | None]:
        """Return a future of what the server made of this submission.

        The future resolves to None when the submission must be sent alone.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[BatchItem | None] = loop.create_future()
        if self._closed:
            future.set_result(None)
            return future
        self._pending.append((submission, future))
        if not self._flush_scheduled:
            # NOTE: call_soon, not at once: calls started in the same loop
            # iteration (a gather) all join the first batch.
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    async def close(self) -> None:
        """Stop the batch requests; their callers submit alone, or give up."""
        self._closed = True
        for _, future in self._pending:
            if not future.done():
                future.set_result(None)
        self._pending.clear()
        tasks = list(self._requests)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _flush(self) -> None:
        """Start batch requests for what is pending, up to ``max_requests``."""
        self._flush_scheduled = False
        while self._pending and len(self._requests) < self._max_requests:
            batch: list[_Pending] = []
            while self._pending and len(batch) < self._chunk:
                submission, future = self._pending.popleft()
                if not future.done():  # its caller may have given up
                    batch.append((submission, future))
            if not batch:
                continue
            task = asyncio.create_task(self._run(batch), name="agent-v2-submitter")
            self._requests.add(task)
            task.add_done_callback(self._request_done)

    def _request_done(self, task: asyncio.Task[None]) -> None:
        """Forget a finished batch request and send what gathered meanwhile."""
        self._requests.discard(task)
        if self._pending and not self._closed:
            self._flush()

    async def _run(self, batch: list[_Pending]) -> None:
        """Send one batch and resolve its futures."""
        items: list[BatchItem] | None = None
        try:
            items = await self._send([submission for submission, _ in batch])
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("a batch of %d submissions failed", len(batch))
        finally:
            if items is not None and len(items) != len(batch):
                logger.warning(
                    "the server answered %d items for a batch of %d; "
                    "submitting them one by one",
                    len(items),
                    len(batch),
                )
                items = None
            for index, (_, future) in enumerate(batch):
                item = None if items is None else items[index]
                if not future.done():
                    future.set_result(item)
                elif item is not None and item.accepted is not None:
                    self._report_abandoned(item.accepted.id)

    def _report_abandoned(self, evaluation_id: str) -> None:
        """Pass on an evaluation accepted for a caller that is gone."""
        if self._abandoned is not None:
            self._abandoned(evaluation_id)
