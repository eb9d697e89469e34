"""Grading a submissions file: stream its lines, grade, append results as they come."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from agent_v2._runs._embedded import EmbeddedOptions, embedded_server
from agent_v2._runs._results import (
    ExistingResults,
    ResultsFile,
    not_submitted_record,
    outcome_record,
    refused_record,
)
from agent_v2._runs._submissions import (
    LineReader,
    Malformed,
    Submission,
    SubmissionKey,
    count_lines,
    key_digest,
    parse_line,
    request_key,
)
from agent_v2._runs._summary import Problem, RunCounts, RunSummary, summarize_results
from agent_v2.client import ClientConfig, EvalClient, Evaluated
from agent_v2.errors import (
    ClientError,
    ConfigError,
    HTTPStatusError,
    ProtocolError,
    QueueFull,
    RequestTimeout,
    TransportError,
)
from agent_v2.protocol import ErrorCode, EvaluationRequest

__all__ = [
    "DEFAULT_CONCURRENCY",
    "RunObserver",
    "RunOptions",
    "check_server",
    "evaluate_file",
    "grade_run",
]

logger = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = 64
PROBE_OUTAGE_GRACE = 5.0  # seconds a --server may be away when a run starts

# Refusals that are the submission's own fault: the same request would be
# refused again, so they are results, not failures to retry.
_FINAL_REFUSALS = frozenset(
    {
        ErrorCode.INSTANCE_NOT_FOUND.value,
        ErrorCode.CONTAINER_NOT_FOUND.value,
        ErrorCode.INVALID_REQUEST.value,
    }
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions:
    """What to grade and where to put the results.

    With ``server_url`` None, an embedded server is started from
    ``embedded`` (which must then be given). ``token`` replaces the one of
    the client configuration read from the ``AGENT_V2_*`` variables.
    """

    submissions: Path
    output: Path
    concurrency: int = DEFAULT_CONCURRENCY
    server_url: str | None = None
    token: str | None = None
    embedded: EmbeddedOptions | None = None

    def __post_init__(self) -> None:
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int):
            raise ConfigError(
                f"concurrency must be an integer, got {self.concurrency!r}"
            )
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.server_url is None and self.embedded is None:
            raise ConfigError("give a server URL, or options for an embedded server")
        if Path(self.submissions).resolve() == Path(self.output).resolve():
            raise ConfigError(
                f"the output {self.output} is the submissions file itself; "
                "write the results to another file"
            )


class RunObserver(Protocol):
    """What a progress display is told while a run goes on."""

    def updated(self, counts: RunCounts) -> None:
        """The counts changed (``counts.lines`` is the total, known at start)."""

    def problem(self, problem: Problem) -> None:
        """A line was malformed or could not be graded."""


async def evaluate_file(
    options: RunOptions, observer: RunObserver | None = None
) -> RunSummary:
    """Grade a submissions file on a server, or on an embedded one."""
    config = ClientConfig.from_env()
    if options.token is not None:
        config = dataclasses.replace(config, token=options.token)

    async with contextlib.AsyncExitStack() as stack:
        url = options.server_url
        if url is None:
            assert options.embedded is not None  # checked by RunOptions
            server = await stack.enter_async_context(embedded_server(options.embedded))
            url = server.url
        if options.server_url is not None:
            await check_server(url, config)
        client = await stack.enter_async_context(EvalClient(url, config=config))
        return await grade_run(options, client, observer)
    raise AssertionError("unreachable")  # pragma: no cover - for mypy


async def check_server(url: str, config: ClientConfig) -> None:
    """Fail early, with a clear message, when the server cannot be reached.

    A server that only has the legacy API answers 404 here; that is fine.
    """
    # NOTE: the client rides out a server that is away for outage_grace
    # (minutes); before any work, a few seconds of patience are enough.
    retry = dataclasses.replace(config.retry, outage_grace=PROBE_OUTAGE_GRACE)
    probe = dataclasses.replace(config, retry=retry)
    async with EvalClient(url, config=probe) as client:
        try:
            await client.health()
        except TransportError as exc:
            raise ConfigError(
                f"cannot reach the evaluation server at {client.base_url} "
                f"({exc}); check --server, or leave it out to start an "
                "embedded server"
            ) from None
        except ClientError as exc:
            logger.debug("health check of %s: %s", client.base_url, exc)


async def grade_run(
    options: RunOptions, client: EvalClient, observer: RunObserver | None = None
) -> RunSummary:
    """Grade every line of ``options.submissions`` not yet in ``options.output``.

    Lines are read in batches, at most ``options.concurrency`` evaluations
    run at once, and each result is on disk before the next step counts it.
    """
    started = time.monotonic()
    counts = RunCounts(lines=await asyncio.to_thread(count_lines, options.submissions))
    async with ResultsFile(options.output) as results:
        existing = await results.open()
        run = _Run(results, existing, counts, observer)
        run.update()
        evaluations = client.evaluate_many(
            run.requests(options.submissions), concurrency=options.concurrency
        )
        async with contextlib.aclosing(evaluations):
            async for evaluated in evaluations:
                await run.finish(evaluated)

    figures = await asyncio.to_thread(summarize_results, options.output)
    return RunSummary(
        submissions=options.submissions,
        output=options.output,
        run=counts,
        results=figures,
        wall_seconds=time.monotonic() - started,
        dropped_partial=existing.dropped_partial,
    )


class _Run:
    """The state of one run: which keys are done, started, and in flight."""

    def __init__(
        self,
        results: ResultsFile,
        existing: ExistingResults,
        counts: RunCounts,
        observer: RunObserver | None,
    ) -> None:
        self._results = results
        self._existing = existing
        self._counts = counts
        self._observer = observer
        # NOTE: digests of every key started in this run, so a repeated line
        # is graded once; 16 bytes each, the only state that grows with the file.
        self._started: set[bytes] = set()
        self._in_flight: dict[SubmissionKey, Submission] = {}

    def update(self) -> None:
        """Tell the observer the counts changed."""
        self._counts.in_flight = len(self._in_flight)
        if self._observer is not None:
            self._observer.updated(self._counts)

    async def requests(self, path: Path) -> AsyncIterator[EvaluationRequest]:
        """Yield the request of every line that must be graded, in file order."""
        file = await asyncio.to_thread(path.open, "rb")
        try:
            reader = LineReader(file)
            while batch := await asyncio.to_thread(reader.read_batch):
                for number, raw in batch:
                    request = await self._triage(parse_line(number, raw))
                    if request is not None:
                        yield request
        finally:
            await asyncio.to_thread(file.close)

    async def _triage(self, parsed: Submission | Malformed) -> EvaluationRequest | None:
        """Deal with a line that needs no evaluation; return the request of others."""
        if isinstance(parsed, Malformed):
            self._problem(
                Problem(parsed.line, "malformed", "malformed", parsed.problem)
            )
            return None

        digest = key_digest(parsed.key)
        if digest in self._existing.digests:
            self._counts.skipped += 1
        elif digest in self._started:
            self._counts.duplicates += 1
            logger.debug("line %d repeats an earlier submission", parsed.line)
        elif not parsed.submitted:
            self._started.add(digest)
            await self._results.append(not_submitted_record(parsed))
            self._counts.not_submitted += 1
        else:
            self._started.add(digest)
            self._in_flight[parsed.key] = parsed
            self.update()
            return parsed.request()
        self.update()
        return None

    async def finish(self, evaluated: Evaluated) -> None:
        """Write the result of one evaluation, or report why there is none."""
        submission = self._in_flight.pop(request_key(evaluated.request))
        if evaluated.result is not None:
            outcome = evaluated.result.outcome
            if outcome.infra_failure:
                error = outcome.error or ErrorCode.INTERNAL_ERROR.value
                detail = outcome.error_detail or ""
                self._problem(Problem(submission.line, "infra_failure", error, detail))
                return
            await self._results.append(outcome_record(submission, evaluated.result))
        else:
            assert evaluated.error is not None
            error, final = _classify(evaluated.error)
            if not final:
                detail = str(evaluated.error)
                self._problem(Problem(submission.line, "infra_failure", error, detail))
                return
            detail = str(evaluated.error)
            await self._results.append(refused_record(submission, error, detail))
        self._counts.graded += 1
        self.update()

    def _problem(self, problem: Problem) -> None:
        """Count a problem and tell the observer about it."""
        self._counts.add_problem(problem)
        logger.debug("line %d: %s: %s", problem.line, problem.error, problem.detail)
        if self._observer is not None:
            self._observer.problem(problem)
        self.update()


def _classify(error: ClientError) -> tuple[str, bool]:
    """Return the error code of a client failure, and whether it is final."""
    if isinstance(error, QueueFull):
        return "queue_full", False
    if isinstance(error, HTTPStatusError):
        body = error.body if isinstance(error.body, dict) else {}
        code = body.get("error")
        if isinstance(code, str) and code in _FINAL_REFUSALS:
            return code, True
        return (code if isinstance(code, str) else f"http_status_{error.status}"), False
    if isinstance(error, RequestTimeout):
        return "timeout", False
    if isinstance(error, TransportError):
        return "transport_error", False
    if isinstance(error, ProtocolError):
        return "protocol_error", False
    return "client_error", False
