"""HTTP handlers and the route table the router and the OpenAPI document share.

Handlers only translate: wire to domain, domain to wire. Errors they raise
are turned into answers by :mod:`agent_v2.server._errors`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import pydantic
from aiohttp import web
from pydantic import ConfigDict

from agent_v2 import __version__
from agent_v2.errors import AgentV2Error, StoreUnavailable
from agent_v2.protocol import (
    MAX_WAIT_SECONDS,
    BatchItem,
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
from agent_v2.server._errors import (
    EvaluationNotFound,
    InvalidRequest,
    ShuttingDown,
    describe_error,
)
from agent_v2.server._http import idempotency_key, model_response, read_model
from agent_v2.server._state import ServerState
from agent_v2.server._store import EvaluationRecord

__all__ = ["ROUTES", "STATE", "LegacyEvaluationRequest", "Route"]

STATE = web.AppKey("agent_v2_state", ServerState)

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class LegacyEvaluationRequest(EvaluationRequest):
    """Body of ``POST /evaluate_v3``: keys it does not know are ignored, so
    old clients that send more keep working."""

    model_config = ConfigDict(extra="ignore", frozen=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Route:
    """One operation: how the router dispatches it and how OpenAPI shows it.

    ``responses`` maps each status the handler itself answers with to its
    description and body model (None for no JSON body); errors common to every
    route (401, 405, 500, ...) are added by the OpenAPI builder.
    """

    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    body: type[pydantic.BaseModel] | None = None
    responses: Mapping[int, tuple[str, type[pydantic.BaseModel] | None]]
    parameters: tuple[Mapping[str, Any], ...] = ()
    response_headers: Mapping[int, Mapping[str, str]] = dataclasses.field(
        default_factory=dict
    )
    public: bool = False  # reachable without the bearer token
    media_type: str = "application/json"


# -- evaluations -------------------------------------------------------------


async def evaluate_v3(request: web.Request) -> web.Response:
    """Grade a submission and answer with the flat outcome once it is done."""
    state = request.app[STATE]
    state.check_open()
    legacy = await read_model(request, LegacyEvaluationRequest)
    body = EvaluationRequest.model_validate(legacy.model_dump())
    record, _ = await state.scheduler.submit(body)

    await state.scheduler.wait_done(record.id)
    finished = await state.store.get(record.id)
    if finished is None or finished.outcome is None:
        raise ShuttingDown(
            f"the server stopped before evaluation {record.id} finished; it runs "
            "again when the server restarts on the same store",
            extra={"id": record.id},
        )
    return model_response(finished.outcome)


async def submit_evaluation(request: web.Request) -> web.Response:
    """Accept an evaluation; answer 202 at once (200 for a repeated key)."""
    state = request.app[STATE]
    state.check_open()
    key = idempotency_key(request)
    body = await read_model(request, EvaluationRequest)
    record, created = await state.scheduler.submit(body, key)
    return model_response(
        EvaluationAccepted(id=record.id, status=record.status),
        status=202 if created else 200,
        headers={"Location": f"/v1/evaluations/{record.id}"},
    )


async def submit_batch(request: web.Request) -> web.Response:
    """Accept many evaluations at once; answer with what became of each."""
    state = request.app[STATE]
    state.check_open()
    body = await read_model(request, BatchSubmitRequest)
    submissions = [
        (
            EvaluationRequest.model_validate(
                submission.model_dump(exclude={"idempotency_key"})
            ),
            submission.idempotency_key,
        )
        for submission in body.evaluations
    ]
    outcomes = await state.scheduler.submit_many(submissions)
    unavailable = [o for o in outcomes if isinstance(o, StoreUnavailable)]
    if unavailable:
        logger.error(
            "POST %s: answered 503 for %d of %d submissions: %s",
            request.path,
            len(unavailable),
            len(outcomes),
            unavailable[0],
        )
    return model_response(
        BatchSubmitResponse(results=[_batch_item(outcome) for outcome in outcomes])
    )


def _batch_item(outcome: tuple[Any, bool] | BaseException) -> BatchItem:
    """Return what one submission of a batch got, as its own submit would have."""
    if not isinstance(outcome, BaseException):
        record, created = outcome
        return BatchItem(
            status_code=202 if created else 200,
            accepted=EvaluationAccepted(id=record.id, status=record.status),
        )
    described = describe_error(outcome) if isinstance(outcome, AgentV2Error) else None
    if described is None:
        logger.error("a submission of a batch failed", exc_info=outcome)
        return BatchItem(
            status_code=500,
            error=ErrorBody(
                error=ErrorCode.INTERNAL_ERROR.value,
                error_detail="the server failed; see its log",
            ),
        )
    status, error, headers = described
    retry_after = headers.get("Retry-After")
    return BatchItem(
        status_code=status,
        error=error,
        retry_after=int(retry_after) if retry_after is not None else None,
    )


async def get_evaluation(request: web.Request) -> web.Response:
    """Show an evaluation, after waiting up to ``?wait=`` seconds for its outcome."""
    state = request.app[STATE]
    evaluation_id = request.match_info["id"]
    wait = _wait_seconds(request.query)
    if wait > 0:
        await state.scheduler.wait([evaluation_id], wait)
    record = await state.store.get(evaluation_id)
    if record is None:
        raise EvaluationNotFound(f"no evaluation {evaluation_id!r}", field="id")
    return model_response(record.view())


async def wait_evaluations(request: web.Request) -> web.Response:
    """Answer as soon as one of the evaluations asked for is finished."""
    state = request.app[STATE]
    body = await read_model(request, WaitRequest)
    ids = list(dict.fromkeys(body.ids))
    finished, pending, unknown = await _look_up(state, ids)
    if not finished and pending and body.timeout > 0:
        await state.scheduler.wait(pending, body.timeout)
        finished, pending, more_unknown = await _look_up(state, pending)
        unknown += more_unknown

    views = [finished[i].view() for i in ids if i in finished]
    return model_response(
        WaitResponse(evaluations=views, pending=pending, unknown=unknown)
    )


async def _look_up(
    state: ServerState, ids: list[str]
) -> tuple[dict[str, EvaluationRecord], list[str], list[str]]:
    """Sort ids into finished evaluations (by id), unfinished ids and unknown ids.

    What the scheduler still runs is unfinished; only the rest is read, so a
    long poll of many ids costs no store read until they finish.
    """
    running = {i for i in ids if state.scheduler.is_unfinished(i)}
    records = await state.store.get_many(i for i in ids if i not in running)

    finished = {i: r for i, r in records.items() if r.status.finished}
    pending = [i for i in ids if i in running or (i in records and i not in finished)]
    unknown = [i for i in ids if i not in running and i not in records]
    return finished, pending, unknown


async def cancel_evaluation(request: web.Request) -> web.Response:
    """Cancel an evaluation (killing its commands); show it as it ended."""
    state = request.app[STATE]
    record = await state.scheduler.cancel(request.match_info["id"])
    return model_response(record.view())


def _wait_seconds(query: Mapping[str, str]) -> float:
    """Return the ``wait`` query parameter, checked; 0 when absent."""
    raw = query.get("wait")
    if raw is None:
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= MAX_WAIT_SECONDS:
        raise InvalidRequest(
            f"wait must be a number of seconds from 0 to {MAX_WAIT_SECONDS:g}, "
            f"got {raw!r}",
            field="wait",
        )
    return wait


# -- containers --------------------------------------------------------------


async def create_container(request: web.Request) -> web.Response:
    """Create a container holding an instance's unmodified files; a repeated
    Idempotency-Key returns the container it made."""
    state = request.app[STATE]
    state.check_open()
    key = idempotency_key(request)
    body = await read_model(request, ContainerRequest)
    created, new = await state.containers.create(body, key)
    return model_response(created, status=201 if new else 200)


async def exec_in_container(request: web.Request) -> web.Response:
    """Run a command in a container; a repeated Idempotency-Key runs nothing."""
    state = request.app[STATE]
    state.check_open()
    key = idempotency_key(request)
    body = await read_model(request, ExecRequest)
    result = await state.containers.exec(request.match_info["id"], body, key)
    return model_response(result)


async def remove_container(request: web.Request) -> web.Response:
    """Delete a container; unknown ids are fine."""
    state = request.app[STATE]
    await state.containers.remove(request.match_info["id"])
    return web.Response(status=204)


# -- operations --------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    """Say whether the server is up, with its queue and devices."""
    state = request.app[STATE]
    health = Health(
        status="ok" if state.is_open and not state.scheduler.closing else "stopping",
        version=__version__,
        backend=state.backend.kind,
        queued=state.scheduler.queued,
        running=state.scheduler.running,
        devices_total=state.pool.total,
        devices_free=state.pool.free,
        uptime=time.monotonic() - state.started_at,
    )
    return model_response(health)


async def metrics(request: web.Request) -> web.Response:
    """Serve the Prometheus text exposition."""
    state = request.app[STATE]
    response = web.Response(body=state.metrics.render())
    response.headers["Content-Type"] = state.metrics.content_type
    return response


OPENAPI = web.AppKey("agent_v2_openapi", bytes)


async def openapi(request: web.Request) -> web.Response:
    """Serve the OpenAPI document of this server."""
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


# -- the table ---------------------------------------------------------------

_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_KEY_DOC = (
    "Makes a retried request harmless: the first request with a key is "
    "carried out, later ones with the same key get its result."
)
_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": _KEY_DOC,
    "schema": {"type": "string", "minLength": 1, "maxLength": 256},
}
_WAIT = {
    "name": "wait",
    "in": "query",
    "required": False,
    "description": "Seconds to wait for the evaluation to finish before answering.",
    "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT_SECONDS},
}

ROUTES: tuple[Route, ...] = (
    Route(
        method="POST",
        path="/evaluate_v3",
        handler=evaluate_v3,
        operation_id="evaluate_v3",
        summary="Legacy blocking call: grade and answer with the flat outcome. "
        "Unknown body keys are ignored; split defaults to 'test'; dataset_name "
        "may be left out when the server serves one dataset.",
        body=LegacyEvaluationRequest,
        responses={
            200: ("The evaluation finished (successfully or not).", Outcome),
            404: ("Unknown dataset, instance or container.", None),
            429: ("The queue is full; retry after Retry-After seconds.", None),
            503: ("The server is shutting down.", None),
        },
    ),
    Route(
        method="POST",
        path="/v1/evaluations",
        handler=submit_evaluation,
        operation_id="submit_evaluation",
        summary="Accept an evaluation and answer at once.",
        body=EvaluationRequest,
        parameters=(_KEY,),
        responses={
            202: ("Accepted; poll or wait for it by id.", EvaluationAccepted),
            200: (
                "An evaluation with this Idempotency-Key existed.",
                EvaluationAccepted,
            ),
            404: ("Unknown dataset, instance or container.", None),
            409: (
                "The Idempotency-Key was used before for a different submission.",
                None,
            ),
            429: ("The queue is full; retry after Retry-After seconds.", None),
            503: ("The server is shutting down.", None),
        },
        response_headers={
            202: {"Location": "Path of the evaluation."},
            200: {"Location": "Path of the evaluation."},
        },
    ),
    Route(
        method="GET",
        path="/v1/evaluations/{id}",
        handler=get_evaluation,
        operation_id="get_evaluation",
        summary="Show an evaluation; with ?wait=, long-poll for its outcome.",
        parameters=(_ID, _WAIT),
        responses={
            200: ("The evaluation.", EvaluationView),
            404: ("No evaluation with this id.", None),
        },
    ),
    Route(
        method="POST",
        path="/v1/evaluations/wait",
        handler=wait_evaluations,
        operation_id="wait_evaluations",
        summary="Answer as soon as at least one of the ids is finished, "
        "or at the timeout with none.",
        body=WaitRequest,
        responses={200: ("Finished, pending and unknown ids.", WaitResponse)},
    ),
    Route(
        method="POST",
        path="/v1/evaluations/batch",
        handler=submit_batch,
        operation_id="submit_evaluations_batch",
        summary="Accept many evaluations in one request, each with its own "
        "idempotency key; answer with what POST /v1/evaluations would have "
        "answered for each, in order.",
        body=BatchSubmitRequest,
        responses={
            200: ("One item per submission, in order.", BatchSubmitResponse),
            503: ("The server is shutting down.", None),
        },
    ),
    Route(
        method="DELETE",
        path="/v1/evaluations/{id}",
        handler=cancel_evaluation,
        operation_id="cancel_evaluation",
        summary="Cancel an evaluation, killing its commands; a finished one is "
        "shown unchanged.",
        parameters=(_ID,),
        responses={
            200: ("The evaluation as it ended.", EvaluationView),
            404: ("No evaluation with this id.", None),
        },
    ),
    Route(
        method="POST",
        path="/v1/containers",
        handler=create_container,
        operation_id="create_container",
        summary="Create a container holding an instance's unmodified files.",
        body=ContainerRequest,
        parameters=(_KEY,),
        responses={
            201: ("Created.", ContainerCreated),
            200: ("A container with this Idempotency-Key existed.", ContainerCreated),
            404: ("Unknown dataset or instance.", None),
            409: ("The Idempotency-Key was used before for another instance.", None),
            503: ("The server is shutting down.", None),
        },
    ),
    Route(
        method="POST",
        path="/v1/containers/{id}/exec",
        handler=exec_in_container,
        operation_id="exec_in_container",
        summary="Run a shell command in a container's root directory.",
        body=ExecRequest,
        parameters=(_ID, _KEY),
        responses={
            200: ("What the command did.", ExecResult),
            404: ("No container with this id.", None),
            503: ("The server is shutting down.", None),
        },
    ),
    Route(
        method="DELETE",
        path="/v1/containers/{id}",
        handler=remove_container,
        operation_id="remove_container",
        summary="Delete a container and everything in it; unknown ids are fine.",
        parameters=(_ID,),
        responses={204: ("Deleted.", None)},
    ),
    Route(
        method="GET",
        path="/healthz",
        handler=healthz,
        operation_id="healthz",
        summary="Whether the server is up; never needs the token.",
        responses={200: ("Up.", Health)},
        public=True,
    ),
    Route(
        method="GET",
        path="/metrics",
        handler=metrics,
        operation_id="metrics",
        summary="Prometheus metrics in the text exposition format.",
        responses={200: ("The metrics.", None)},
        media_type="text/plain",
    ),
    Route(
        method="GET",
        path="/openapi.json",
        handler=openapi,
        operation_id="openapi",
        summary="This document.",
        responses={200: ("The OpenAPI document.", None)},
    ),
)
