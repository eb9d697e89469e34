"""The OpenAPI 3.1 document, built from the route table and the wire models."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pydantic
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from agent_v2 import __version__
from agent_v2.protocol import ErrorBody
from agent_v2.server._routes import Route

__all__ = ["build_openapi"]

_REF = "#/components/schemas/{model}"

_RETRY_AFTER = {
    "Retry-After": {
        "description": "Whole seconds to wait before trying again.",
        "schema": {"type": "integer", "minimum": 1},
    }
}


def build_openapi(
    routes: Iterable[Route], *, token_required: bool, max_body_size: int
) -> dict[str, Any]:
    """Return the document describing exactly these routes."""
    routes = tuple(routes)
    refs, schemas = _schemas(routes)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        operation = _operation(route, refs, token_required, max_body_size)
        paths.setdefault(route.path, {})[route.method.lower()] = operation

    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "agent_v2 evaluation server",
            "version": __version__,
            "description": "Grades coding agents' containers: submit evaluations, "
            "wait for their outcomes, manage containers. Every error answer is an "
            "ErrorBody naming the problem and, when there is one, the field.",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if token_required:
        document["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"}
        }
    return document


def _schemas(
    routes: tuple[Route, ...],
) -> tuple[dict[tuple[type[pydantic.BaseModel], str], str], dict[str, Any]]:
    """Return each (model, mode)'s reference and the shared schema definitions."""
    wanted: dict[tuple[type[pydantic.BaseModel], JsonSchemaMode], None] = {
        (ErrorBody, "serialization"): None
    }
    for route in routes:
        if route.body is not None:
            wanted[(route.body, "validation")] = None
        for _, response in route.responses.values():
            if response is not None:
                wanted[(response, "serialization")] = None

    mapping, top = models_json_schema(list(wanted), ref_template=_REF)
    refs: dict[tuple[type[pydantic.BaseModel], str], str] = {}
    for key in wanted:
        refs[key] = mapping[key]["$ref"]
    return refs, top.get("$defs", {})


def _operation(
    route: Route,
    refs: dict[tuple[type[pydantic.BaseModel], str], str],
    token_required: bool,
    max_body_size: int,
) -> dict[str, Any]:
    """Return the OpenAPI operation object of one route."""
    error = {"$ref": refs[(ErrorBody, "serialization")]}
    operation: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "responses": {},
    }
    if route.parameters:
        operation["parameters"] = [dict(p) for p in route.parameters]
    if route.body is not None:
        operation["requestBody"] = {
            "required": True,
            "description": f"JSON, at most {max_body_size} bytes.",
            "content": {
                "application/json": {
                    "schema": {"$ref": refs[(route.body, "validation")]}
                }
            },
        }

    for status, (description, model) in sorted(_all_responses(route, token_required)):
        answer: dict[str, Any] = {"description": description}
        if model is not None:
            schema = {"$ref": refs[(model, "serialization")]}
            answer["content"] = {"application/json": {"schema": schema}}
        elif status >= 400:
            answer["content"] = {"application/json": {"schema": error}}
        elif status != 204:
            answer["content"] = {route.media_type: {"schema": {}}}
        headers = dict(route.response_headers.get(status, {}))
        if headers or status in (429, 503):
            answer["headers"] = {
                name: {"description": text, "schema": {"type": "string"}}
                for name, text in headers.items()
            }
            if status in (429, 503):
                answer["headers"].update(_RETRY_AFTER)
        operation["responses"][str(status)] = answer

    if token_required:
        operation["security"] = [] if route.public else [{"bearer": []}]
    return operation


def _all_responses(
    route: Route, token_required: bool
) -> Iterable[tuple[int, tuple[str, type[pydantic.BaseModel] | None]]]:
    """Yield the route's own answers plus the errors any route can give."""
    responses = dict(route.responses)
    if route.body is not None or route.parameters:
        responses.setdefault(400, ("The body or a parameter is invalid.", None))
    if route.body is not None:
        responses.setdefault(413, ("The body is larger than the limit.", None))
        responses.setdefault(415, ("The body is not sent as JSON.", None))
        responses.setdefault(408, ("The body did not arrive in time.", None))
    if token_required and not route.public:
        responses.setdefault(401, ("Missing or wrong bearer token.", None))
    responses.setdefault(
        403,
        (
            "Sent by a web page (an Origin header), or, without a token, to a "
            "host name that is not localhost.",
            None,
        ),
    )
    responses.setdefault(417, ("The Expect header is not 100-continue.", None))
    responses.setdefault(500, ("The server failed; the error is logged.", None))
    responses.setdefault(
        503,
        (
            "The server is shutting down, all its connections are busy "
            "(overloaded), or its store cannot be written for now "
            "(store_unavailable); retry after Retry-After seconds.",
            None,
        ),
    )
    return responses.items()
