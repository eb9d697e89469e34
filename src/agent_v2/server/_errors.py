"""The one place that turns errors into HTTP answers.

Handlers raise domain errors (:mod:`agent_v2.errors`) or the API errors
below; :func:`error_middleware` maps each to a status and a JSON
:class:`~agent_v2.protocol.ErrorBody`. Anything else is a bug: it is logged
once, with its traceback, and answered ``500 internal_error``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pydantic
from aiohttp import web
from aiohttp.typedefs import Handler

from agent_v2.errors import (
    AgentV2Error,
    ContainerNotFound,
    InstanceNotFound,
    InvalidContainerId,
    StoreUnavailable,
)
from agent_v2.protocol import ErrorBody, ErrorCode

__all__ = [
    "ApiError",
    "BodyTimeout",
    "EvaluationNotFound",
    "Forbidden",
    "IdempotencyConflict",
    "InvalidRequest",
    "QueueFullError",
    "ShuttingDown",
    "Unauthorized",
    "UnknownDataset",
    "UnsupportedMediaType",
    "describe_error",
    "error_middleware",
    "error_response",
]

logger = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 5

SHUTDOWN_RETRY_AFTER = 2
"""Seconds a client refused at shutdown is asked to wait: about one restart."""

STORE_RETRY_AFTER = 5
"""Seconds a client is asked to wait while the store cannot be written (a full
disk, say): long enough for its retries to outlast a short outage."""


class ApiError(AgentV2Error):
    """An error the server answers with a 4xx or 5xx of its own choosing."""

    status = 400
    code = ErrorCode.INVALID_REQUEST

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.field = field
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


class InvalidRequest(ApiError, ValueError):
    """A request body, parameter or header that cannot be used (400)."""

    @classmethod
    def from_validation(cls, exc: pydantic.ValidationError) -> InvalidRequest:
        """Name the first invalid field and say what is wrong with each."""
        problems = []
        for error in exc.errors()[:MAX_REPORTED_ERRORS]:
            where = ".".join(str(part) for part in error["loc"]) or "body"
            problems.append(f"{where}: {error['msg']}")
        first = exc.errors()[0]["loc"] if exc.error_count() else ()
        field = ".".join(str(part) for part in first) or None
        return cls("; ".join(problems) or str(exc), field=field)


class UnsupportedMediaType(ApiError):
    """A body that is not sent as JSON (415)."""

    status = 415
    code = ErrorCode.UNSUPPORTED_MEDIA_TYPE


class Unauthorized(ApiError):
    """A request without the right bearer token (401)."""

    status = 401
    code = ErrorCode.UNAUTHORIZED


class Forbidden(ApiError):
    """A request refused whoever sends it: one made by a web page (403)."""

    status = 403
    code = ErrorCode.FORBIDDEN


class EvaluationNotFound(ApiError, LookupError):
    """No evaluation with this id (404)."""

    status = 404
    code = ErrorCode.NOT_FOUND


class UnknownDataset(ApiError, LookupError):
    """No dataset with this name is served (404 ``instance_not_found``)."""

    status = 404
    code = ErrorCode.INSTANCE_NOT_FOUND


class IdempotencyConflict(ApiError):
    """An Idempotency-Key already names a different submission (409)."""

    status = 409
    code = ErrorCode.IDEMPOTENCY_CONFLICT


class QueueFullError(ApiError):
    """The queue holds ``max_queue`` evaluations already (429)."""

    status = 429
    code = ErrorCode.QUEUE_FULL

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after


class BodyTimeout(ApiError):
    """A request body that did not arrive within ``body_timeout`` (408)."""

    status = 408
    code = ErrorCode.REQUEST_TIMEOUT


class ShuttingDown(ApiError):
    """The server is stopping and takes no more work (503 with Retry-After)."""

    status = 503
    code = ErrorCode.SHUTTING_DOWN

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        headers = {"Retry-After": str(SHUTDOWN_RETRY_AFTER)}
        super().__init__(message, field=field, headers=headers, extra=extra)


def error_response(
    status: int,
    code: ErrorCode,
    detail: str,
    *,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> web.Response:
    """Return a JSON ErrorBody answer; ``extra`` adds fields to it."""
    body = ErrorBody(
        error=code.value, error_detail=detail, field=field, **(extra or {})
    )
    return web.Response(
        status=status,
        text=body.model_dump_json(),
        content_type="application/json",
        headers=headers,
    )


def describe_error(exc: AgentV2Error) -> tuple[int, ErrorBody, dict[str, str]] | None:
    """Return the status, body and headers an error is answered with.

    None when the error is not one a request can cause: a bug.
    """
    if isinstance(exc, ApiError):
        body = ErrorBody(
            error=exc.code.value, error_detail=str(exc), field=exc.field, **exc.extra
        )
        return exc.status, body, exc.headers
    if isinstance(exc, StoreUnavailable):
        body = ErrorBody(
            error=ErrorCode.STORE_UNAVAILABLE.value,
            error_detail=f"{exc}; nothing was done, retry after Retry-After seconds",
        )
        return 503, body, {"Retry-After": str(STORE_RETRY_AFTER)}
    for kind, status, code, field in _DOMAIN_ERRORS:
        if isinstance(exc, kind):
            body = ErrorBody(error=code.value, error_detail=str(exc), field=field)
            return status, body, {}
    return None


_DOMAIN_ERRORS: tuple[tuple[type[AgentV2Error], int, ErrorCode, str], ...] = (
    (InstanceNotFound, 404, ErrorCode.INSTANCE_NOT_FOUND, "instance_id"),
    (InvalidContainerId, 400, ErrorCode.INVALID_REQUEST, "container_id"),
    (ContainerNotFound, 404, ErrorCode.CONTAINER_NOT_FOUND, "container_id"),
)


def _domain_response(exc: AgentV2Error) -> web.Response | None:
    """Map an error of agent_v2.errors to its answer; None when it is a bug."""
    described = describe_error(exc)
    if described is None:
        return None
    status, body, headers = described
    return web.Response(
        status=status,
        text=body.model_dump_json(),
        content_type="application/json",
        headers=headers,
    )


def _http_response(exc: web.HTTPException) -> web.Response:
    """Give aiohttp's own 4xx answers (no route, wrong method, ...) a JSON body."""
    if isinstance(exc, web.HTTPNotFound):
        return error_response(404, ErrorCode.NOT_FOUND, "no such path")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return error_response(
            405,
            ErrorCode.METHOD_NOT_ALLOWED,
            f"method {exc.method} is not allowed here; use {allowed}",
            headers={"Allow": allowed},
        )
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return error_response(
            413,
            ErrorCode.PAYLOAD_TOO_LARGE,
            f"the body is larger than the limit: {exc.text}",
        )
    return error_response(exc.status, ErrorCode.INVALID_REQUEST, exc.reason)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """Answer every error with a JSON ErrorBody; log only the unexpected ones."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_response(exc)
    except AgentV2Error as exc:
        response = _domain_response(exc)
        if isinstance(exc, StoreUnavailable):
            # Not a bug, so no traceback: the operator needs the reason only.
            logger.error("%s %s: answered 503: %s", request.method, request.path, exc)
        if response is not None:
            return response
        logger.exception("%s %s failed", request.method, request.path)
        return error_response(500, ErrorCode.INTERNAL_ERROR, str(exc))
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        return error_response(
            500, ErrorCode.INTERNAL_ERROR, "the server failed; see its log"
        )
