"""EvalClient: submit evaluations, wait for outcomes, drive containers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Iterable,
    Mapping,
)
from typing import Any, Literal, NamedTuple, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp
import pydantic

from agent_v2.client._config import ClientConfig
from agent_v2.client._retry import (
    RETRY_STATUSES,
    is_retryable_error,
    is_retryable_status,
    is_unreachable,
    parse_retry_after,
)
from agent_v2.client._sessions import LoopState, SessionPool
from agent_v2.client._stats import ClientStats, Counters
from agent_v2.client._submitter import Submitter
from agent_v2.client._waiter import Waiter
from agent_v2.errors import (
    ClientError,
    ConfigError,
    HTTPStatusError,
    ProtocolError,
    QueueFull,
    RequestTimeout,
    TransportError,
)
from agent_v2.protocol import (
    DEFAULT_EXEC_TIMEOUT,
    BatchItem,
    BatchSubmission,
    BatchSubmitRequest,
    BatchSubmitResponse,
    ContainerCreated,
    ContainerRequest,
    ErrorBody,
    ErrorCode,
    EvaluationAccepted,
    EvaluationRequest,
    EvaluationView,
    ExecRequest,
    ExecResult,
    Health,
    Outcome,
    WaitRequest,
    WaitResponse,
)

__all__ = ["EvalClient", "Evaluated", "EvaluationResult", "validate_base_url"]

logger = logging.getLogger(__name__)

Api = Literal["v1", "legacy"]
_M = TypeVar("_M", bound=pydantic.BaseModel)

LEGACY_PATH = "/evaluate_v3"
EVALUATIONS_PATH = "/v1/evaluations"
WAIT_PATH = "/v1/evaluations/wait"
BATCH_PATH = "/v1/evaluations/batch"
CONTAINERS_PATH = "/v1/containers"

# Route-level errors that mean "this server has no such endpoint", as opposed
# to an answer about the submitted evaluation.
_NO_ROUTE_ERRORS = frozenset({ErrorCode.NOT_FOUND, ErrorCode.METHOD_NOT_ALLOWED})


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluationResult:
    """The outcome of one evaluation and how it was obtained.

    ``url`` is the URL the evaluation was submitted to: ``{base}/v1/evaluations``
    on the versioned API, ``{base}/evaluate_v3`` on the legacy one. ``raw`` is
    the outcome as JSON text, exactly as the server sent it on the legacy API.
    """

    request: EvaluationRequest
    outcome: Outcome
    evaluation_id: str | None
    api: Api
    url: str
    status_code: int
    raw: str
    duration: float


class Evaluated(NamedTuple):
    """One item of :meth:`EvalClient.evaluate_many`: a result or an error."""

    request: EvaluationRequest
    result: EvaluationResult | None
    error: ClientError | None


@dataclasses.dataclass
class Trace:
    """What happened during one call, filled in as it goes.

    The compatibility functions read it to report a failure with the URL,
    status and body of the last answer.
    """

    url: str
    api: Api | None = None
    evaluation_id: str | None = None
    idempotency_key: str | None = None
    status_code: int | None = None
    raw: str | None = None


@dataclasses.dataclass(frozen=True)
class _Response:
    method: str
    url: str
    status: int
    text: str
    retry_after: str | None


class _Outage:
    """How long one request has found the server away (unreachable, or 503)."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._since: float | None = None

    def note(self, *, away: bool) -> bool:
        """Note an attempt's result; return whether to retry past max_attempts."""
        if not away:
            self._since = None
            return False
        now = time.monotonic()
        if self._since is None:
            self._since = now
        return now - self._since < self.grace


class _Budget:
    """A time budget whose clock starts at the first request, not at creation."""

    def __init__(self, total: float | None) -> None:
        self.total = total
        self._deadline: float | None = None

    def start(self) -> None:
        """Start the clock (later calls do nothing)."""
        if self._deadline is None and self.total is not None:
            self._deadline = time.monotonic() + self.total

    def remaining(self) -> float | None:
        """Return the seconds left, or None for an unbounded budget."""
        if self.total is None:
            return None
        if self._deadline is None:
            return self.total
        return max(self._deadline - time.monotonic(), 0.0)


def validate_base_url(url: object, name: str = "base_url") -> str:
    """Return ``url`` without a trailing slash, or raise TypeError/ValueError."""
    if not isinstance(url, str):
        raise TypeError(f"{name} must be a str, got {type(url).__name__}: {url!r}")
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018  # raises ValueError for a bad port
    except ValueError as exc:
        raise ConfigError(f"{name} {url!r} is not a valid URL: {exc}") from None

    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{name} must look like http://HOST:PORT (got {url!r}); "
            "give the server's address without a path to an endpoint"
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"{name} must not have a query or fragment, got {url!r}")
    return url.strip().rstrip("/")


class EvalClient:
    """A client of one evaluation server, usable from any number of loops.

    Each event loop that uses the client gets its own connection pool (see
    :class:`~agent_v2.client.SessionPool`), closed when the loop shuts down
    or on :meth:`aclose`. Methods raise :class:`~agent_v2.errors.ClientError`
    subclasses: ``TransportError``, ``RequestTimeout``, ``HTTPStatusError``
    (``QueueFull`` for a lasting 429) and ``ProtocolError``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        config: ClientConfig | None = None,
        sessions: SessionPool | None = None,
    ) -> None:
        self.base_url = validate_base_url(base_url)
        self.config = config if config is not None else ClientConfig()
        if not isinstance(self.config, ClientConfig):
            raise TypeError(f"config must be a ClientConfig, got {config!r}")

        self._owns_sessions = sessions is None
        self._sessions = sessions or SessionPool(self.config.limits)
        self._host = urlsplit(self.base_url).netloc
        self._counters = Counters()
        self._server_api: Api | None = (
            None if self.config.api == "auto" else self.config.api
        )
        # None until a batch request tells; False once the server lacks it.
        self._batch_api: bool | None = None if self.config.batch_submit else False

    def __repr__(self) -> str:
        return f"EvalClient({self.base_url!r}, config={self.config!r})"

    async def __aenter__(self) -> EvalClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Release what this client holds on the running loop.

        A client that owns its session pool closes the loop's session; one
        that shares a pool only stops its waiter there. Other loops' sessions
        close when those loops shut down.
        """
        if self._owns_sessions:
            await self._sessions.aclose()
            return
        state = self._sessions.current()
        if state is None:
            return
        for name in ("submitter", "waiter"):
            resource = state.take((self, name))
            if resource is not None:
                await resource.close()

    @property
    def server_api(self) -> Api | None:
        """Return the API this client uses with its server, once known."""
        return self._server_api

    def stats(self) -> ClientStats:
        """Return a snapshot of what the client is doing."""
        count = self._counters.get
        return ClientStats(
            evaluations_in_flight=count("evaluations_in_flight"),
            evaluations_started=count("evaluations_started"),
            evaluations_finished=count("evaluations_finished"),
            requests_in_flight=count("requests_in_flight"),
            requests=count("requests"),
            retries=count("retries"),
            wait_requests=count("wait_requests"),
            batch_requests=count("batch_requests"),
            open_connections=self._sessions.open_connections,
            connections_opened=self._sessions.connections_opened,
            sessions=self._sessions.sessions,
        )

    # -- evaluations ---------------------------------------------------------

    async def evaluate(self, request: EvaluationRequest) -> EvaluationResult:
        """Grade one submission and return its outcome.

        On the versioned API this submits with a fresh idempotency key (reused
        by every retry) and waits through the loop's waiter; on a server
        without it, it makes the legacy blocking call. ``timeouts.total``
        bounds the whole evaluation.
        """
        return await self.evaluate_traced(request, Trace(url=self.base_url))

    async def evaluate_traced(
        self, request: EvaluationRequest, trace: Trace
    ) -> EvaluationResult:
        """Do :meth:`evaluate`, recording the requests made in ``trace``."""
        if not isinstance(request, EvaluationRequest):
            raise TypeError(f"request must be an EvaluationRequest, got {request!r}")
        state = await self._sessions.state()
        started = time.monotonic()
        self._counters.add("evaluations_started")
        slots = state.evaluation_slots
        async with slots if slots is not None else contextlib.nullcontext():
            self._counters.add("evaluations_in_flight")
            try:
                result = await self._evaluate(state, request, trace, started)
            except ClientError as exc:
                self._log_evaluation(request, trace, started, error=exc)
                raise
            finally:
                self._counters.add("evaluations_in_flight", -1)
                self._counters.add("evaluations_finished")

        self._log_evaluation(request, trace, started, outcome=result.outcome)
        return result

    async def evaluate_many(
        self,
        requests: Iterable[EvaluationRequest] | AsyncIterable[EvaluationRequest],
        *,
        concurrency: int = 100,
    ) -> AsyncGenerator[Evaluated, None]:
        """Yield an :class:`Evaluated` per request, in the order they finish.

        At most ``concurrency`` evaluations run at once; ``requests`` is read
        lazily. Failures are yielded (``error`` set), not raised. Breaking out
        of the loop cancels the evaluations still running on this side; wrap
        the iteration in ``contextlib.aclosing`` to do that promptly.
        """
        if isinstance(concurrency, bool) or not isinstance(concurrency, int):
            raise TypeError(f"concurrency must be an int, got {concurrency!r}")
        if concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, got {concurrency}")

        source = _aiter(requests)
        running: set[asyncio.Task[Evaluated]] = set()
        exhausted = False
        try:
            while True:
                while not exhausted and len(running) < concurrency:
                    request = await anext(source, None)
                    if request is None:
                        exhausted = True
                    else:
                        running.add(asyncio.create_task(self._evaluated(request)))
                if not running:
                    return

                done, running = await asyncio.wait(
                    running, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    yield task.result()
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            await source.aclose()

    async def submit(
        self, request: EvaluationRequest, *, idempotency_key: str | None = None
    ) -> EvaluationAccepted:
        """Submit one evaluation on the versioned API and return its id."""
        key = idempotency_key or str(uuid.uuid4())
        trace = Trace(url=self.base_url + EVALUATIONS_PATH, idempotency_key=key)
        response = await self._submit_request(
            request, key, _Budget(self.config.timeouts.total), trace
        )
        _raise_for_status(response)
        return _parse(EvaluationAccepted, response)

    async def wait_for(self, evaluation_id: str) -> EvaluationView:
        """Wait (through the loop's waiter) until the evaluation is finished.

        Bound it with ``asyncio.timeout(...)``; the evaluation keeps running
        on the server when the wait is abandoned.
        """
        state = await self._sessions.state()
        return await self._waiter(state).watch(evaluation_id)

    async def get_evaluation(
        self, evaluation_id: str, *, wait: float | None = None
    ) -> EvaluationView:
        """Return an evaluation, long-polling up to ``wait`` seconds."""
        path = f"{EVALUATIONS_PATH}/{quote(evaluation_id, safe='')}"
        if wait is not None:
            path += f"?wait={wait:g}"
        response = await self._call("GET", path, idempotent=True, extra_read=wait)
        return _parse(EvaluationView, response)

    async def cancel_evaluation(self, evaluation_id: str) -> None:
        """Cancel an evaluation; running commands are killed by the server."""
        path = f"{EVALUATIONS_PATH}/{quote(evaluation_id, safe='')}"
        await self._call("DELETE", path, idempotent=True)

    async def health(self) -> Health:
        """Return the server's ``/healthz`` answer."""
        return _parse(Health, await self._call("GET", "/healthz", idempotent=True))

    # -- containers ----------------------------------------------------------

    async def create_container(
        self,
        instance_id: str,
        *,
        dataset_name: str | None = None,
        split: str | None = None,
    ) -> ContainerCreated:
        """Start a container for an instance and return its id."""
        body = ContainerRequest(
            instance_id=instance_id, dataset_name=dataset_name, split=split
        )
        # The key makes a retry after a lost answer return the container the
        # first attempt made, instead of leaving a second one behind.
        response = await self._call(
            "POST",
            CONTAINERS_PATH,
            body=body,
            headers={"Idempotency-Key": str(uuid.uuid4())},
            idempotent=True,
        )
        return _parse(ContainerCreated, response)

    async def exec(
        self,
        container_id: str,
        command: str,
        stdin: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109  # the command's own limit
    ) -> ExecResult:
        """Run a shell command in a container and return what it did.

        Every call carries a fresh ``Idempotency-Key``, so a retry after a
        dropped connection returns the first run's result instead of running
        the command twice.
        """
        body = ExecRequest(command=command, stdin=stdin, timeout=timeout)
        path = f"{CONTAINERS_PATH}/{quote(container_id, safe='')}/exec"
        response = await self._call(
            "POST",
            path,
            body=body,
            headers={"Idempotency-Key": str(uuid.uuid4())},
            idempotent=True,
            extra_read=timeout if timeout is not None else DEFAULT_EXEC_TIMEOUT,
        )
        return _parse(ExecResult, response)

    async def remove_container(self, container_id: str) -> bool:
        """Remove a container; return False when it did not exist."""
        path = f"{CONTAINERS_PATH}/{quote(container_id, safe='')}"
        try:
            await self._call("DELETE", path, idempotent=True)
        except HTTPStatusError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    # -- internals: one evaluation -------------------------------------------

    async def _evaluate(
        self,
        state: LoopState,
        request: EvaluationRequest,
        trace: Trace,
        started: float,
    ) -> EvaluationResult:
        """Run one evaluation on the versioned API, or on the legacy one."""
        budget = _Budget(self.config.timeouts.total)
        if self._server_api != "legacy":
            key = str(uuid.uuid4())
            trace.idempotency_key = key
            accepted = await self._submit(request, key, budget, trace)
            if accepted is not None:
                view = await self._wait_outcome(state, accepted.id, budget, trace)
                return _v1_result(request, view, trace, started)

        return await self._evaluate_legacy(request, budget, trace, started)

    async def _submit(
        self,
        request: EvaluationRequest,
        key: str,
        budget: _Budget,
        trace: Trace,
    ) -> EvaluationAccepted | None:
        """Submit; return None when the server turns out to be a legacy one."""
        response = await self._submit_request(request, key, budget, trace)
        # NOTE: tested against the configured choice, not the detected API:
        # concurrent first calls all probe, and each must fall back alone.
        if self.config.api == "auto" and _lacks_route(response):
            if self._server_api != "legacy":
                logger.info(
                    "server %s has no versioned API (HTTP %d on %s); using "
                    "the legacy POST %s",
                    self.base_url,
                    response.status,
                    EVALUATIONS_PATH,
                    LEGACY_PATH,
                )
            self._server_api = "legacy"
            return None

        _raise_for_status(response)
        accepted = _parse(EvaluationAccepted, response)
        self._server_api = "v1"
        trace.evaluation_id = accepted.id
        return accepted

    async def _submit_request(
        self,
        request: EvaluationRequest,
        key: str,
        budget: _Budget,
        trace: Trace,
    ) -> _Response:
        """Submit with the idempotency key ``key``: in the loop's next batch
        when the server takes batches, else with ``POST /v1/evaluations``."""
        trace.api = "v1"
        trace.url = self.base_url + EVALUATIONS_PATH
        if self._batch_api is not False:
            response = await self._submit_batched(request, key, budget, trace)
            if response is not None:
                return response
        # TODO(a cancel while a lone submit is answered): a call cancelled
        # before this answer arrives never learns the evaluation's id, so the
        # evaluation runs to its end; batched submits report it (Submitter).
        return await self._request(
            "POST",
            EVALUATIONS_PATH,
            body=request,
            headers={"Idempotency-Key": key},
            idempotent=True,
            read=self.config.timeouts.read,
            budget=budget,
            trace=trace,
        )

    async def _submit_batched(
        self,
        request: EvaluationRequest,
        key: str,
        budget: _Budget,
        trace: Trace,
    ) -> _Response | None:
        """Submit through the loop's submitter; None: submit alone instead.

        A submission the server refused for now (429, 503) is sent alone
        after the backoff a refused single submit would get.
        """
        state = await self._sessions.state()
        submission = BatchSubmission.model_validate(
            {**request.model_dump(), "idempotency_key": key}
        )
        answer = self._submitter(state).submit(submission)
        try:
            item = await answer
        except asyncio.CancelledError:
            # Answered, but this call was cancelled before it could resume (the
            # submitter reports those answered after the cancel itself).
            done = answer.done() and not answer.cancelled()
            if done and (taken := answer.result()) and taken.accepted is not None:
                self._abandon(state, taken.accepted.id)
            raise
        if item is None:
            return None
        body = item.accepted if item.accepted is not None else item.error
        response = _Response(
            "POST",
            trace.url,
            item.status_code,
            body.model_dump_json() if body is not None else "",
            None if item.retry_after is None else str(item.retry_after),
        )
        trace.status_code = response.status
        trace.raw = response.text
        if response.status not in RETRY_STATUSES:
            return response
        retry = await self._backoff(
            1,
            parse_retry_after(response.retry_after),
            budget,
            "POST",
            trace.url,
            response.status,
            persist=True,
        )
        return None if retry else response

    def _submitter(self, state: LoopState) -> Submitter:
        """Return this client's submitter on the running loop."""
        return state.resource(
            (self, "submitter"),
            lambda: Submitter(
                self._batch_request,
                chunk=self.config.submit_chunk,
                max_requests=self.config.limits.max_wait_requests,
                abandoned=lambda evaluation_id: self._abandon(state, evaluation_id),
            ),
        )

    async def _batch_request(
        self, submissions: list[BatchSubmission]
    ) -> list[BatchItem] | None:
        """Send one ``POST /v1/evaluations/batch``, once; None when it failed."""
        state = await self._sessions.state()
        url = self.base_url + BATCH_PATH
        data = BatchSubmitRequest(evaluations=submissions).model_dump_json(
            exclude_none=True
        )
        headers = self._headers(None, has_body=True)
        timeouts = self.config.timeouts
        self._counters.add("batch_requests")
        try:
            response = await self._send(
                state,
                "POST",
                url,
                data,
                headers,
                timeouts.read,
                _Budget(timeouts.connect + timeouts.read),
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.debug("POST %s failed (%s); submitting alone", url, exc)
            return None
        if response.status != 200:
            if _lacks_route(response):
                if self._batch_api is not False:
                    logger.info(
                        "server %s takes no batches (HTTP %d on %s); "
                        "submitting one by one",
                        self.base_url,
                        response.status,
                        BATCH_PATH,
                    )
                self._batch_api = False
            return None
        try:
            results = BatchSubmitResponse.model_validate_json(response.text).results
        except pydantic.ValidationError as exc:
            logger.warning("POST %s: unexpected answer (%s)", url, exc)
            return None
        self._batch_api = True
        return results

    async def _wait_outcome(
        self,
        state: LoopState,
        evaluation_id: str,
        budget: _Budget,
        trace: Trace,
    ) -> EvaluationView:
        """Wait for a submitted evaluation through the loop's waiter."""
        future = self._waiter(state).watch(evaluation_id)
        try:
            view = await asyncio.wait_for(future, budget.remaining())
        except TimeoutError:
            await self._cancel_quietly(evaluation_id)
            raise RequestTimeout(
                f"evaluation {evaluation_id!r} did not finish within "
                f"{budget.total:g} s (timeouts.total); it was cancelled"
            ) from None
        except asyncio.CancelledError:
            # The caller gave up on the evaluation, which only this call knew
            # of (its key was fresh): free its place on the server, from a
            # task that outlives this cancelled one.
            self._abandon(state, evaluation_id)
            raise
        trace.status_code = 200
        return view

    def _abandon(self, state: LoopState, evaluation_id: str) -> None:
        """Cancel an evaluation whose caller was cancelled, in the background."""
        state.run_in_background(lambda: self._cancel_quietly(evaluation_id))

    async def _cancel_quietly(self, evaluation_id: str) -> None:
        """Ask the server to cancel an evaluation we gave up on; ignore failure."""
        try:
            await self.cancel_evaluation(evaluation_id)
        except ClientError as exc:
            logger.debug("could not cancel evaluation %s: %s", evaluation_id, exc)

    def _waiter(self, state: LoopState) -> Waiter:
        """Return this client's waiter on the running loop."""
        timeouts = self.config.timeouts
        return state.resource(
            (self, "waiter"),
            lambda: Waiter(
                self._wait_request,
                long_poll=timeouts.long_poll,
                max_requests=self.config.limits.max_wait_requests,
                chunk=self.config.wait_chunk,
                outage_grace=self.config.retry.outage_grace,
            ),
        )

    async def _wait_request(self, ids: list[str], long_poll: float) -> WaitResponse:
        """Send one ``POST /v1/evaluations/wait`` for ``ids``."""
        self._counters.add("wait_requests")
        response = await self._call(
            "POST",
            WAIT_PATH,
            body=WaitRequest(ids=ids, timeout=long_poll),
            idempotent=True,
            extra_read=long_poll,
        )
        return _parse(WaitResponse, response)

    async def _evaluate_legacy(
        self,
        request: EvaluationRequest,
        budget: _Budget,
        trace: Trace,
        started: float,
    ) -> EvaluationResult:
        """Make the legacy blocking ``POST /evaluate_v3`` call."""
        trace.api = "legacy"
        trace.url = self.base_url + LEGACY_PATH
        trace.evaluation_id = None
        trace.status_code = trace.raw = None  # forget the probe's 404
        # NOTE: no per-read bound here: a legacy server is silent until the
        # evaluation is done, which may take up to timeouts.total.
        response = await self._request(
            "POST",
            LEGACY_PATH,
            body=request,
            idempotent=False,
            read=None,
            budget=budget,
            trace=trace,
        )
        _raise_for_status(response)
        return EvaluationResult(
            request=request,
            outcome=parse_outcome(response.text),
            evaluation_id=None,
            api="legacy",
            url=response.url,
            status_code=response.status,
            raw=response.text,
            duration=time.monotonic() - started,
        )

    async def _evaluated(self, request: EvaluationRequest) -> Evaluated:
        """Evaluate one request for evaluate_many, catching client errors."""
        try:
            result = await self.evaluate(request)
        except ClientError as exc:
            return Evaluated(request, None, exc)
        return Evaluated(request, result, None)

    def _log_evaluation(
        self,
        request: EvaluationRequest,
        trace: Trace,
        started: float,
        *,
        outcome: Outcome | None = None,
        error: ClientError | None = None,
    ) -> None:
        """Log the one INFO line every evaluation gets."""
        if outcome is not None:
            result = "succeeded" if outcome.success else (outcome.error or "failed")
        else:
            result = f"client_error:{type(error).__name__}"
        logger.info(
            "evaluation %s instance=%s container=%s api=%s outcome=%s "
            "reward=%.3f speedup=%.3f duration=%.2fs",
            trace.evaluation_id or "-",
            request.instance_id,
            request.container_id,
            trace.api or "-",
            result,
            outcome.reward if outcome is not None else 0.0,
            outcome.speedup if outcome is not None else -1.0,
            time.monotonic() - started,
        )
        if error is not None:
            logger.debug("evaluation of %s failed: %s", request.container_id, error)

    # -- internals: HTTP ------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: pydantic.BaseModel | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool,
        extra_read: float | None = None,
    ) -> _Response:
        """Make one short request and raise for an error status.

        ``extra_read`` is how long the server may legitimately stay silent
        (a long-poll, a command's timeout); it is added to the read bound.
        """
        timeouts = self.config.timeouts
        read = timeouts.read + (extra_read or 0.0)
        response = await self._request(
            method,
            path,
            body=body,
            headers=headers,
            idempotent=idempotent,
            read=read,
            budget=_Budget(read + timeouts.connect),
        )
        _raise_for_status(response)
        return response

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: pydantic.BaseModel | None = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool,
        read: float | None,
        budget: _Budget,
        trace: Trace | None = None,
    ) -> _Response:
        """Send a request, retrying where safe; return the final answer."""
        state = await self._sessions.state()
        url = self.base_url + path
        data = None if body is None else body.model_dump_json(exclude_none=True)
        all_headers = self._headers(headers, has_body=data is not None)
        if data is not None:
            logger.debug("%s %s body=%s", method, url, data)

        attempt = 0
        outage = _Outage(self.config.retry.outage_grace)
        while True:
            attempt += 1
            try:
                response = await self._send(
                    state, method, url, data, all_headers, read, budget
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                persist = outage.note(away=is_unreachable(exc))
                if is_retryable_error(exc, idempotent=idempotent) and (
                    await self._backoff(
                        attempt, None, budget, method, url, exc, persist=persist
                    )
                ):
                    continue
                raise _translate(exc, method, url, self.config) from exc

            if trace is not None:
                trace.status_code = response.status
                trace.raw = response.text
            # NOTE: a 429 means the server is up and asked us to come back, so
            # it is retried for as long as the time budget lasts.
            persist = outage.note(away=response.status == 503)
            if (
                response.status in RETRY_STATUSES
                and is_retryable_status(response.status, idempotent=idempotent)
                and await self._backoff(
                    attempt,
                    parse_retry_after(response.retry_after),
                    budget,
                    method,
                    url,
                    response.status,
                    persist=persist or response.status == 429,
                )
            ):
                continue
            return response

    def _headers(
        self, extra: Mapping[str, str] | None, *, has_body: bool
    ) -> dict[str, str]:
        """Return the headers of a request: auth, content type, extras."""
        headers: dict[str, str] = {}
        if has_body:
            headers["Content-Type"] = "application/json"
        if self.config.token is not None:
            headers["Authorization"] = f"Bearer {self.config.token}"
        if extra:
            headers.update(extra)
        return headers

    async def _send(
        self,
        state: LoopState,
        method: str,
        url: str,
        data: str | None,
        headers: dict[str, str],
        read: float | None,
        budget: _Budget,
    ) -> _Response:
        """Send one attempt, holding a request slot of this loop."""
        host_slots, all_slots = state.request_slots(self._host)
        async with host_slots, all_slots:
            budget.start()
            remaining = budget.remaining()
            if remaining is not None and remaining <= 0:
                raise TimeoutError("the time budget ran out before the request")
            timeout = aiohttp.ClientTimeout(
                total=remaining,
                sock_connect=self.config.timeouts.connect,
                sock_read=read,
            )

            self._counters.add("requests")
            self._counters.add("requests_in_flight")
            try:
                async with state.session.request(
                    method, url, data=data, headers=headers, timeout=timeout
                ) as answer:
                    text = (await answer.read()).decode("utf-8", errors="replace")
                    response = _Response(
                        method,
                        url,
                        answer.status,
                        text,
                        answer.headers.get("Retry-After"),
                    )
            finally:
                self._counters.add("requests_in_flight", -1)

        logger.debug("%s %s -> %d %s", method, url, response.status, text)
        return response

    async def _backoff(
        self,
        attempt: int,
        retry_after: float | None,
        budget: _Budget,
        method: str,
        url: str,
        cause: object,
        *,
        persist: bool = False,
    ) -> bool:
        """Sleep before the next attempt; return False when we must give up.

        ``persist`` lets it go on past ``max_attempts``, within the budget.
        """
        policy = self.config.retry
        if attempt >= policy.max_attempts and not persist:
            return False
        delay = policy.delay(attempt, retry_after)
        remaining = budget.remaining()
        if remaining is not None and delay >= remaining:
            return False

        self._counters.add("retries")
        logger.debug(
            "retrying %s %s in %.2fs (attempt %d of %d failed: %s)",
            method,
            url,
            delay,
            attempt,
            policy.max_attempts,
            cause,
        )
        await asyncio.sleep(delay)
        return True


def parse_outcome(text: str) -> Outcome:
    """Parse a flat outcome; null values count as absent, like old servers sent."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ProtocolError(
            f"the outcome is not JSON ({exc}): {text[:200]!r}"
        ) from None
    if not isinstance(data, dict):
        raise ProtocolError(f"the outcome is not a JSON object: {text[:200]!r}")
    try:
        return Outcome.model_validate(
            {key: value for key, value in data.items() if value is not None}
        )
    except pydantic.ValidationError as exc:
        raise ProtocolError(f"the outcome does not fit the protocol: {exc}") from None


def _v1_result(
    request: EvaluationRequest,
    view: EvaluationView,
    trace: Trace,
    started: float,
) -> EvaluationResult:
    """Build the result of an evaluation finished on the versioned API."""
    assert view.outcome is not None  # the waiter only hands out finished views
    raw = view.outcome.model_dump_json(exclude_unset=True)
    trace.raw = raw
    return EvaluationResult(
        request=request,
        outcome=view.outcome,
        evaluation_id=view.id,
        api="v1",
        url=trace.url,
        status_code=200,
        raw=raw,
        duration=time.monotonic() - started,
    )


def _lacks_route(response: _Response) -> bool:
    """Return whether a 404/405 means the endpoint itself does not exist."""
    if response.status not in (404, 405):
        return False
    try:
        body = ErrorBody.model_validate_json(response.text)
    except pydantic.ValidationError:
        return True
    return body.error in _NO_ROUTE_ERRORS


def _raise_for_status(response: _Response) -> None:
    """Raise HTTPStatusError (QueueFull for 429) for a status of 400 or more."""
    if response.status < 400:
        return
    try:
        body: Any = json.loads(response.text)
    except ValueError:
        body = response.text

    if isinstance(body, dict) and "error" in body:
        reason = f"{body.get('error')}: {body.get('error_detail', '')}".rstrip(": ")
    else:
        reason = response.text[:200] or "(empty body)"
    message = (
        f"{response.method} {response.url} answered HTTP {response.status}: {reason}"
    )
    error = QueueFull if response.status == 429 else HTTPStatusError
    raise error(response.status, message, body)


def _parse(model: type[_M], response: _Response) -> _M:
    """Parse a JSON answer into ``model`` or raise ProtocolError."""
    try:
        return model.model_validate_json(response.text)
    except pydantic.ValidationError as exc:
        raise ProtocolError(
            f"{response.method} {response.url} answered HTTP {response.status} "
            f"with a body that is not a {model.__name__}: {exc}"
        ) from None


def _translate(
    exc: BaseException, method: str, url: str, config: ClientConfig
) -> ClientError:
    """Turn an aiohttp or timeout exception into our exception tree."""
    if isinstance(exc, TimeoutError):
        timeouts = config.timeouts
        return RequestTimeout(
            f"{method} {url} timed out ({type(exc).__name__}; limits: "
            f"total {timeouts.total} s, connect {timeouts.connect} s, "
            f"read {timeouts.read} s)"
        )
    detail = str(exc) or type(exc).__name__
    return TransportError(f"{method} {url} failed: {type(exc).__name__}: {detail}")


async def _aiter(
    items: Iterable[EvaluationRequest] | AsyncIterable[EvaluationRequest],
) -> AsyncGenerator[EvaluationRequest, None]:
    """Iterate a sync or async iterable of requests asynchronously."""
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
