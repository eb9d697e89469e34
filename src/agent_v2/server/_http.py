"""Wire helpers for handlers: read a JSON body into a model, answer with one."""

from __future__ import annotations

import asyncio
import json
from typing import TypeVar

import pydantic
from aiohttp import web

from agent_v2.protocol import MAX_IDEMPOTENCY_KEY
from agent_v2.server._errors import BodyTimeout, InvalidRequest, UnsupportedMediaType

__all__ = ["BODY_TIMEOUT", "idempotency_key", "model_response", "read_model"]

M = TypeVar("M", bound=pydantic.BaseModel)

BODY_TIMEOUT = web.AppKey("agent_v2_body_timeout", float)
"""Seconds a client has to send a request body (ServerSettings.body_timeout)."""


async def read_model(request: web.Request, model: type[M]) -> M:
    """Parse the JSON body into ``model``; raise InvalidRequest naming the field."""
    if "Content-Type" in request.headers:
        media_type = _media_type(request)
        if not _is_json(media_type):
            raise UnsupportedMediaType(
                f"the body must be JSON (Content-Type: application/json), "
                f"got {media_type!r}",
                field="Content-Type",
            )
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UnsupportedMediaType(
            f"the body must be sent unencoded, got Content-Encoding {encoding!r}",
            field="Content-Encoding",
        )
    raw = await _read_body(request)
    if not raw.strip():
        raise InvalidRequest("the body is empty; send a JSON object", field="body")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(
            f"the body is not valid JSON: {exc}", field="body"
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequest(
            f"the body must be a JSON object, got {type(data).__name__}", field="body"
        )

    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise InvalidRequest.from_validation(exc) from None


async def _read_body(request: web.Request) -> bytes:
    """Return the body; raise BodyTimeout when it trickles in too slowly."""
    seconds = request.app[BODY_TIMEOUT]
    try:
        async with asyncio.timeout(seconds):
            return await request.read()  # raises 413 past client_max_size
    except TimeoutError:
        raise BodyTimeout(
            f"the request body did not arrive within {seconds:g} s; send it at once",
            field="body",
            headers={"Connection": "close"},
        ) from None


def idempotency_key(request: web.Request) -> str | None:
    """Return the ``Idempotency-Key`` header, checked; None when absent."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise InvalidRequest(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters",
            field="Idempotency-Key",
        )
    return key


def model_response(
    model: pydantic.BaseModel,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """Return a JSON answer holding the model."""
    return web.Response(
        status=status,
        text=model.model_dump_json(),
        content_type="application/json",
        headers=headers,
    )


def _media_type(request: web.Request) -> str:
    """Return the request's media type; raise UnsupportedMediaType if unreadable."""
    try:
        return request.content_type
    except Exception:
        # NOTE: aiohttp parses the header with the standard library's email
        # parser, which raises IndexError (and others) on some malformed
        # values, such as ';0*'.
        raise UnsupportedMediaType(
            f"the Content-Type header {request.headers['Content-Type']!r} cannot "
            "be parsed; send Content-Type: application/json",
            field="Content-Type",
        ) from None


def _is_json(content_type: str) -> bool:
    """Return whether a media type is JSON."""
    return content_type == "application/json" or content_type.endswith("+json")
