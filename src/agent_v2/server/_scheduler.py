"""The scheduler: turns accepted evaluations into graded outcomes, in order.

Each accepted evaluation becomes one task that waits for a device (first
come, first served), grades the container with it, and records the outcome.
Waiters (long polls) hold a future per unfinished evaluation, resolved when
its outcome is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import math
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Protocol, TypeAlias

from agent_v2._devices import DeviceLease
from agent_v2.datasets import Dataset, Instance
from agent_v2.errors import AgentV2Error, ContainerNotFound, StoreUnavailable
from agent_v2.evaluation import BaselineCache
from agent_v2.protocol import ErrorCode, EvaluationRequest, Mode, Outcome, Status
from agent_v2.sandbox import SandboxBackend
from agent_v2.server._catalog import Catalog
from agent_v2.server._devices import DevicePool, DeviceTimeout
from agent_v2.server._errors import (
    EvaluationNotFound,
    IdempotencyConflict,
    QueueFullError,
    ShuttingDown,
)
from agent_v2.server._metrics import Metrics
from agent_v2.server._store import EvaluationRecord, EvaluationStore

__all__ = ["GradeFunction", "Scheduler"]

logger = logging.getLogger(__name__)

TIMEOUT_SLACK = 30.0
"""Seconds past an evaluation's timeout before the scheduler itself stops it;
the pipeline is expected to stop first and report what ran."""

MAX_RETRY_AFTER = 60

STORE_RETRY_INITIAL = 1.0
STORE_RETRY_MAX = 30.0
"""Seconds between tries to write an outcome while the store is unavailable:
doubling from the first to the second bound."""

_Answer: TypeAlias = "tuple[EvaluationRecord, bool] | BaseException"
"""What became of one submission: ``(record, created)`` or the error it got."""


class GradeFunction(Protocol):
    """The grading pipeline as the scheduler calls it."""

    async def __call__(
        self,
        *,
        backend: SandboxBackend,
        dataset: Dataset,
        instance: Instance,
        container_id: str,
        mode: Mode,
        lease: DeviceLease,
        timeout: float,  # noqa: ASYNC109 - the pipeline bounds its own commands
        baselines: BaselineCache,
    ) -> Outcome: ...


class _Phase(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHING = "finishing"


@dataclasses.dataclass(eq=False, kw_only=True)
class _Entry:
    """An unfinished evaluation in memory."""

    record: EvaluationRecord
    accepted_at: float  # loop time; the device deadline counts from here
    done: asyncio.Future[None]
    phase: _Phase = _Phase.QUEUED
    task: asyncio.Task[None] | None = None
    cancel_requested: bool = False
    lease: DeviceLease | None = None


class Scheduler:
    """Queues, runs, cancels and waits for evaluations."""

    def __init__(
        self,
        *,
        store: EvaluationStore,
        pool: DevicePool,
        backend: SandboxBackend,
        catalog: Catalog,
        grade: GradeFunction,
        metrics: Metrics,
        max_queue: int,
        evaluation_timeout: float,
        gpu_acquire_timeout: float,
    ) -> None:
        self._store = store
        self._pool = pool
        self._backend = backend
        self._catalog = catalog
        self._grade = grade
        self._metrics = metrics
        self._max_queue = max_queue
        self._evaluation_timeout = evaluation_timeout
        self._gpu_acquire_timeout = gpu_acquire_timeout

        self._entries: dict[str, _Entry] = {}
        self._queued = 0
        self._reserved = 0  # submissions between the queue check and the insert
        self._running = 0
        self._background: set[asyncio.Task[None]] = set()
        self._closing: asyncio.Future[None] | None = None
        self._mean_duration = 1.0

    # -- state -------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Return how many evaluations wait for a device."""
        return self._queued

    @property
    def running(self) -> int:
        """Return how many evaluations hold a device."""
        return self._running

    @property
    def closing(self) -> bool:
        """Return whether the scheduler has stopped taking evaluations."""
        return self._closing is not None and self._closing.done()

    def is_unfinished(self, evaluation_id: str) -> bool:
        """Return whether this evaluation is known here and not finished yet."""
        return evaluation_id in self._entries

    # -- life --------------------------------------------------------------

    async def start(self) -> int:
        """Requeue what the store holds unfinished, oldest first; return how many."""
        self._closing = asyncio.get_running_loop().create_future()
        records = await self._store.requeue_unfinished()
        for record in records:
            record = dataclasses.replace(record, status=Status.QUEUED)
            self._start(record, self._register(record))
        if records:
            logger.info("requeued %d unfinished evaluations", len(records))
        return len(records)

    def begin_shutdown(self) -> None:
        """Refuse new evaluations and wake every waiter."""
        if self._closing is not None and not self._closing.done():
            self._closing.set_result(None)

    async def close(self, grace: float) -> None:
        """Stop: give running evaluations ``grace`` seconds, then cancel the rest.

        Evaluations stopped here stay queued or running in the store, so the
        next start on the same store runs them again.
        """
        self.begin_shutdown()
        for entry in list(self._entries.values()):
            if entry.phase is _Phase.QUEUED and entry.task is not None:
                entry.task.cancel()

        running = [e.task for e in self._entries.values() if e.task is not None]
        if running and grace > 0:
            await asyncio.wait(running, timeout=grace)
        tasks = [e.task for e in self._entries.values() if e.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *self._background, return_exceptions=True)
        left = len(self._entries)
        if left:
            logger.info("%d evaluations left unfinished for the next start", left)

    # -- submit ------------------------------------------------------------

    async def submit(
        self, request: EvaluationRequest, idempotency_key: str | None = None
    ) -> tuple[EvaluationRecord, bool]:
        """Accept an evaluation; return ``(record, created)``.

        With an idempotency key seen before, the earlier evaluation is
        returned with ``created=False`` and nothing new starts; the key
        naming a different submission raises IdempotencyConflict.
        """
        if self.closing:
            raise ShuttingDown("the server is shutting down; submit again later")
        existing = None
        if idempotency_key is not None:
            existing = await self._store.find_by_key(idempotency_key)
        if existing is not None:
            answer = _reuse(existing, request)
        else:
            [answer] = await self._accept([(request, idempotency_key)])
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def submit_many(
        self, submissions: Sequence[tuple[EvaluationRequest, str]]
    ) -> list[_Answer]:
        """Accept many keyed submissions; return, in order, what :meth:`submit`
        would have returned or raised for each.

        The keys are looked up in one read and the new rows are committed
        together, so a batch costs about as much as one submission.
        """
        if self.closing:
            raise ShuttingDown("the server is shutting down; submit again later")
        known = await self._store.find_by_keys(key for _, key in submissions)
        answers: list[_Answer | None] = []
        fresh: list[tuple[EvaluationRequest, str | None]] = []
        for request, key in submissions:
            existing = known.get(key)
            if existing is None:
                answers.append(None)
                fresh.append((request, key))
            else:
                answers.append(_reuse(existing, request))
        accepted = iter(await self._accept(fresh))
        return [next(accepted) if answer is None else answer for answer in answers]

    async def _accept(
        self, submissions: Sequence[tuple[EvaluationRequest, str | None]]
    ) -> list[_Answer]:
        """Check new submissions, store those that pass in one commit and
        start them; return, in order, ``(record, created)`` or the error of each.
        """
        checked = [self._resolve(request) for request, _ in submissions]
        containers = await self._find_containers(
            {
                request.container_id
                for request in checked
                if isinstance(request, EvaluationRequest)
            }
        )

        answers, records = self._admit(submissions, checked, containers)

        stored: dict[str, _Answer] = {}
        if records:
            # NOTE: shielded so that a client that goes away mid-insert cannot
            # leave a committed evaluation without a task to run it.
            try:
                stored = await asyncio.shield(self._insert(records))
            except AgentV2Error as exc:
                stored = {record.id: exc for record in records}
        return [
            stored[answer.id] if isinstance(answer, EvaluationRecord) else answer
            for answer in answers
        ]

    def _admit(
        self,
        submissions: Sequence[tuple[EvaluationRequest, str | None]],
        checked: Sequence[EvaluationRequest | Exception],
        containers: dict[str, bool | BaseException],
    ) -> tuple[list[_Answer | EvaluationRecord], list[EvaluationRecord]]:
        """Make a queued record of each checked submission the queue has room
        for; return what each got (its error or its record) and the records.
        """
        answers: list[_Answer | EvaluationRecord] = []
        records: list[EvaluationRecord] = []
        for (_, key), request in zip(submissions, checked, strict=True):
            if isinstance(request, Exception):
                answers.append(request)
                continue
            refusal = self._refusal(request, containers[request.container_id])
            if refusal is not None:
                answers.append(refusal)
                continue

            record = EvaluationRecord(
                id=uuid.uuid4().hex,
                request=request,
                status=Status.QUEUED,
                created_at=time.time(),
                idempotency_key=key,
            )
            # NOTE: reserved in the same step as the room check, so that the
            # submissions checked after this one count it.
            self._reserved += 1
            records.append(record)
            answers.append(record)
        return answers, records

    def _resolve(self, request: EvaluationRequest) -> EvaluationRequest | Exception:
        """Return the request naming its dataset and split, or why it cannot."""
        try:
            instance = self._catalog.resolve(
                request.instance_id, request.dataset_name, request.split
            )
        except Exception as exc:
            return exc
        if (request.dataset_name, request.split) == (
            instance.dataset_name,
            instance.split,
        ):
            return request
        return request.model_copy(
            update={"dataset_name": instance.dataset_name, "split": instance.split}
        )

    async def _find_containers(
        self, container_ids: set[str]
    ) -> dict[str, bool | BaseException]:
        """Ask the backend which of these containers exist, all at once."""
        ids = list(container_ids)
        found = await asyncio.gather(
            *(self._backend.exists(container_id) for container_id in ids),
            return_exceptions=True,
        )
        return dict(zip(ids, found, strict=True))

    def _refusal(
        self, request: EvaluationRequest, exists: bool | BaseException
    ) -> BaseException | None:
        """Return why a resolved request cannot be queued; None when it can."""
        if isinstance(exists, BaseException):
            return exists
        if not exists:
            return ContainerNotFound(
                f"no container {request.container_id!r}; create one with "
                "POST /v1/containers or use the id your sandbox gave you"
            )
        try:
            self._check_room()
        except QueueFullError as exc:
            return exc
        return None

    def _check_room(self) -> None:
        """Raise QueueFullError when max_queue evaluations already wait."""
        if self._queued + self._reserved < self._max_queue:
            return
        per_slot = self._mean_duration / max(1, self._pool.total)
        retry_after = min(MAX_RETRY_AFTER, max(1, math.ceil(per_slot)))
        raise QueueFullError(
            f"the queue is full ({self._max_queue} evaluations wait); "
            f"retry after {retry_after} s",
            retry_after=retry_after,
        )

    async def _insert(self, records: list[EvaluationRecord]) -> dict[str, _Answer]:
        """Store new evaluations and start their tasks; a key already taken
        gets the evaluation that took it. Return the answers by record id.

        The caller has reserved a place in the queue for each record; this
        gives them back.
        """
        # Registered before the insert commits, so a GET that sees a new row
        # always finds a future to wait on.
        entries = [self._register(record) for record in records]
        try:
            stored = await self._store.add_many(records)
        except BaseException:
            for record in records:
                self._entries.pop(record.id, None)
            raise
        finally:
            self._reserved -= len(records)

        answers: dict[str, _Answer] = {}
        for record, entry, (found, created) in zip(
            records, entries, stored, strict=True
        ):
            if created:
                self._start(record, entry)
                answers[record.id] = (record, True)
            else:
                self._entries.pop(record.id, None)
                answers[record.id] = _reuse(found, record.request)
        return answers

    def _register(self, record: EvaluationRecord) -> _Entry:
        """Track an unfinished evaluation in memory."""
        loop = asyncio.get_running_loop()
        entry = _Entry(
            record=record, accepted_at=loop.time(), done=loop.create_future()
        )
        self._entries[record.id] = entry
        return entry

    def _start(self, record: EvaluationRecord, entry: _Entry) -> None:
        """Create the evaluation's task."""
        self._queued += 1
        entry.task = asyncio.create_task(self._run(entry), name=f"eval-{record.id}")
        entry.task.add_done_callback(lambda task: self._after_task(entry, task))

    # -- wait and cancel ---------------------------------------------------

    async def wait(self, ids: Iterable[str], seconds: float) -> None:
        """Return once any of these evaluations finishes, at shutdown or after
        ``seconds``."""
        futures: set[asyncio.Future[None]] = set()
        for evaluation_id in ids:
            entry = self._entries.get(evaluation_id)
            if entry is None:
                return  # finished already, or unknown: nothing to wait for
            futures.add(entry.done)
        if not futures or seconds <= 0 or self._closing is None:
            return
        futures.add(self._closing)
        await asyncio.wait(
            futures, timeout=seconds, return_when=asyncio.FIRST_COMPLETED
        )

    async def wait_done(self, evaluation_id: str) -> None:
        """Return once this evaluation finishes, or at shutdown."""
        entry = self._entries.get(evaluation_id)
        if entry is None or self._closing is None:
            return
        await asyncio.wait(
            {entry.done, self._closing}, return_when=asyncio.FIRST_COMPLETED
        )

    async def cancel(self, evaluation_id: str) -> EvaluationRecord:
        """Cancel an unfinished evaluation; return it as it ends up."""
        entry = self._entries.get(evaluation_id)
        if entry is not None and entry.phase is not _Phase.FINISHING:
            entry.cancel_requested = True
            if entry.task is not None:
                entry.task.cancel()
        if entry is not None:
            await self.wait_done(evaluation_id)

        record = await self._store.get(evaluation_id)
        if record is None:
            raise EvaluationNotFound(f"no evaluation {evaluation_id!r}", field="id")
        return record

    # -- running -----------------------------------------------------------

    async def _run(self, entry: _Entry) -> None:
        """Grade one evaluation and record its outcome."""
        try:
            outcome = await self._grade_with_device(entry)
        except asyncio.CancelledError:
            if not entry.cancel_requested:
                raise  # the server is stopping: leave it for the next start
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # the cancellation was ours, and is handled
            outcome = _failure(
                entry, ErrorCode.CANCELLED, "cancelled by DELETE /v1/evaluations/{id}"
            )
        except Exception as exc:
            logger.exception("evaluation %s failed unexpectedly", entry.record.id)
            outcome = _failure(
                entry,
                ErrorCode.INTERNAL_ERROR,
                f"the server failed while grading: {exc!r}",
                infra_failure=True,
            )
        await self._finish(entry, outcome)

    async def _grade_with_device(self, entry: _Entry) -> Outcome:
        """Find the instance, lease a device and grade with it."""
        request = entry.record.request
        try:
            dataset = self._catalog.dataset(request.dataset_name)
            instance = dataset.get(request.instance_id, request.split)
        except (AgentV2Error, LookupError) as exc:
            self._leave_queue(entry)
            return _failure(
                entry, ErrorCode.INSTANCE_NOT_FOUND, str(exc), infra_failure=True
            )

        lease = await self._lease(entry)
        if lease is None:
            return _failure(
                entry,
                ErrorCode.DEVICE_UNAVAILABLE,
                f"no device became free within {self._acquire_timeout(entry):g} s "
                "(gpu_acquire_timeout)",
                infra_failure=True,
            )
        try:
            # NOTE: not awaited: grading need not wait for this commit, and the
            # store commits writes in order, so the outcome lands after it.
            entry.record = self._store.mark_running(entry.record, time.time())
            outcome = await self._grade_bounded(entry, dataset, instance, lease)
        finally:
            entry.phase = _Phase.FINISHING
            entry.lease = None
            self._running -= 1
            self._pool.release(lease)
        return outcome.model_copy(
            update={"device": lease.name, "gpu_id": lease.gpu_id, "mode": request.mode}
        )

    async def _lease(self, entry: _Entry) -> DeviceLease | None:
        """Wait for a device until the acquire deadline; None when none came."""
        deadline = entry.accepted_at + self._acquire_timeout(entry)
        try:
            lease = await self._pool.acquire(deadline=deadline)
        except DeviceTimeout:
            return None
        finally:
            self._leave_queue(entry)
        entry.lease = lease
        entry.phase = _Phase.RUNNING
        self._running += 1
        return lease

    async def _grade_bounded(
        self, entry: _Entry, dataset: Dataset, instance: Instance, lease: DeviceLease
    ) -> Outcome:
        """Call the pipeline; stop it if it overruns the timeout by far."""
        request = entry.record.request
        timeout = request.timeout or instance.timeout or self._evaluation_timeout
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout + TIMEOUT_SLACK):
                return await self._grade(
                    backend=self._backend,
                    dataset=dataset,
                    instance=instance,
                    container_id=request.container_id,
                    mode=request.mode,
                    lease=lease,
                    timeout=timeout,
                    baselines=self._store,
                )
        except TimeoutError:
            if time.monotonic() - started < timeout:
                raise
            return _failure(
                entry,
                ErrorCode.TIMED_OUT,
                f"the evaluation ran past its timeout of {timeout:g} s",
                timed_out=True,
            )

    def _leave_queue(self, entry: _Entry) -> None:
        """Count the evaluation out of the queue, once."""
        if entry.phase is _Phase.QUEUED:
            entry.phase = _Phase.FINISHING
            self._queued -= 1

    def _acquire_timeout(self, entry: _Entry) -> float:
        """Return the seconds this evaluation may wait for a device."""
        timeout = entry.record.request.gpu_acquire_timeout
        return self._gpu_acquire_timeout if timeout is None else timeout

    async def _finish(self, entry: _Entry, outcome: Outcome) -> None:
        """Commit the outcome, count it, log it and wake its waiters."""
        self._leave_queue(entry)
        entry.phase = _Phase.FINISHING
        record = entry.record
        if outcome.error == ErrorCode.CANCELLED:
            status = Status.CANCELLED
        else:
            status = Status.SUCCEEDED if outcome.success else Status.FAILED
        finished_at = time.time()
        try:
            finished = await self._record(record, status, outcome, finished_at)
        except AgentV2Error as exc:
            logger.error(
                "evaluation %s: cannot record its outcome (%s); it stays unfinished "
                "in the store and runs again when the server restarts on it",
                record.id,
                exc,
                exc_info=not isinstance(exc, StoreUnavailable),  # else a bug
            )
        else:
            self._account(finished, outcome, finished_at - record.created_at)
        finally:
            self._entries.pop(record.id, None)
            if not entry.done.done():
                entry.done.set_result(None)

    async def _record(
        self,
        record: EvaluationRecord,
        status: Status,
        outcome: Outcome,
        finished_at: float,
    ) -> EvaluationRecord:
        """Write the outcome; while the store is unavailable, keep trying.

        Its waiters wait meanwhile, and get the outcome once it is written.
        Gives up when the server begins to shut down.
        """
        delay = STORE_RETRY_INITIAL
        while True:
            try:
                return await self._store.finish(
                    record, status=status, outcome=outcome, finished_at=finished_at
                )
            except StoreUnavailable as exc:
                if self._closing is None or self._closing.done():
                    raise
                logger.error(
                    "evaluation %s: cannot record its outcome (%s); trying again "
                    "in %g s",
                    record.id,
                    exc,
                    delay,
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await asyncio.shield(self._closing)
            delay = min(delay * 2, STORE_RETRY_MAX)

    def _account(
        self, record: EvaluationRecord, outcome: Outcome, seconds: float
    ) -> None:
        """Update metrics and write the finished evaluation's one log line."""
        request, status = record.request, record.status
        self._metrics.observe_finished(
            status=status.value, error=outcome.error, mode=request.mode, seconds=seconds
        )
        self._mean_duration = 0.9 * self._mean_duration + 0.1 * seconds
        logger.info(
            "evaluation %s %s: instance=%s/%s/%s container=%s mode=%s error=%s "
            "reward=%.3f speedup=%.3f device=%s attempts=%d duration=%.2fs",
            record.id,
            status.value,
            request.dataset_name,
            request.split,
            request.instance_id,
            request.container_id,
            request.mode.value,
            outcome.error,
            outcome.reward,
            outcome.speedup,
            outcome.device,
            record.attempts,
            seconds,
        )

    def _after_task(self, entry: _Entry, task: asyncio.Task[None]) -> None:
        """Record a cancellation that struck before the task's first step."""
        if entry.done.done() or not task.cancelled() or not entry.cancel_requested:
            return
        outcome = _failure(entry, ErrorCode.CANCELLED, "cancelled before it started")
        finisher = asyncio.get_running_loop().create_task(self._finish(entry, outcome))
        self._background.add(finisher)
        finisher.add_done_callback(self._background.discard)


def _reuse(existing: EvaluationRecord, request: EvaluationRequest) -> _Answer:
    """Return the answer to a key used before: the same evaluation or a conflict."""
    try:
        _check_same_submission(existing, request)
    except IdempotencyConflict as exc:
        return exc
    return existing, False


def _check_same_submission(
    existing: EvaluationRecord, request: EvaluationRequest
) -> None:
    """Raise IdempotencyConflict when a reused key comes with another request.

    The stored request names its dataset and split as resolved; the new one
    may leave them out, and then matches whatever was resolved.
    """
    stored = existing.request
    differing = [
        name
        for name, value in request
        if value != getattr(stored, name)
        and not (name in ("dataset_name", "split") and value is None)
    ]
    if differing:
        raise IdempotencyConflict(
            f"Idempotency-Key {existing.idempotency_key!r} was first used for "
            f"evaluation {existing.id} with a different {', '.join(differing)}; "
            "use a new key for a new submission",
            field="Idempotency-Key",
            extra={"id": existing.id},
        )


def _failure(
    entry: _Entry,
    error: ErrorCode,
    detail: str,
    *,
    infra_failure: bool = False,
    timed_out: bool = False,
) -> Outcome:
    """Return the outcome of an evaluation that ended without a grade."""
    return Outcome(
        success=False,
        error=error.value,
        error_detail=detail,
        infra_failure=infra_failure,
        timed_out=timed_out,
        mode=entry.record.request.mode,
    )
