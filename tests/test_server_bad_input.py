"""Bad input to every endpoint gets a JSON 4xx naming the field, never a 5xx."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import aiohttp
import pytest

GOOD = {"instance_id": "a", "container_id": "c-1"}
JSON = {"Content-Type": "application/json"}

# (method, path, request kwargs, expected status, expected field or None)
CASES: list[tuple[str, str, dict[str, Any], int, str | None]] = [
    # evaluations
    ("POST", "/v1/evaluations", {"data": b"{not json", "headers": JSON}, 400, "body"),
    ("POST", "/v1/evaluations", {"data": b"", "headers": JSON}, 400, "body"),
    ("POST", "/v1/evaluations", {"data": b"\xff\xfe", "headers": JSON}, 400, "body"),
    ("POST", "/v1/evaluations", {"data": b"[" * 100000, "headers": JSON}, 400, "body"),
    ("POST", "/v1/evaluations", {"json": [GOOD]}, 400, "body"),
    ("POST", "/v1/evaluations", {"json": {"container_id": "c"}}, 400, "instance_id"),
    (
        "POST",
        "/v1/evaluations",
        {"json": {**GOOD, "instance_id": 7}},
        400,
        "instance_id",
    ),
    ("POST", "/v1/evaluations", {"json": {**GOOD, "mode": "fast"}}, 400, "mode"),
    ("POST", "/v1/evaluations", {"json": {**GOOD, "timeout": -1}}, 400, "timeout"),
    ("POST", "/v1/evaluations", {"json": {**GOOD, "timeout": "x"}}, 400, "timeout"),
    (
        "POST",
        "/v1/evaluations",
        {
            "data": b'{"instance_id":"a","container_id":"c","timeout":NaN}',
            "headers": JSON,
        },
        400,
        "timeout",
    ),
    ("POST", "/v1/evaluations", {"json": {**GOOD, "extra": 1}}, 400, "extra"),
    (
        "POST",
        "/v1/evaluations",
        {"json": {**GOOD, "instance_id": ""}},
        400,
        "instance_id",
    ),
    (
        "POST",
        "/v1/evaluations",
        {"json": {**GOOD, "container_id": "a\x00b"}},
        400,
        "container_id",
    ),
    (
        "POST",
        "/v1/evaluations",
        {"json": {**GOOD, "container_id": "/etc"}},
        400,
        "container_id",
    ),
    (
        "POST",
        "/v1/evaluations",
        {"data": b"instance_id=a", "headers": {"Content-Type": "text/plain"}},
        415,
        "Content-Type",
    ),
    (
        "POST",
        "/v1/evaluations",
        {"json": GOOD, "headers": {"Idempotency-Key": "k" * 300}},
        400,
        "Idempotency-Key",
    ),
    ("POST", "/evaluate_v3", {"json": {"container_id": "c"}}, 400, "instance_id"),
    ("POST", "/evaluate_v3", {"json": "text"}, 400, "body"),
    ("POST", "/evaluate_v3", {"json": {**GOOD, "split": 3}}, 400, "split"),
    ("GET", "/v1/evaluations/nope", {}, 404, "id"),
    ("GET", "/v1/evaluations/nope?wait=abc", {}, 400, "wait"),
    ("GET", "/v1/evaluations/nope?wait=301", {}, 400, "wait"),
    ("GET", "/v1/evaluations/nope?wait=-1", {}, 400, "wait"),
    ("POST", "/v1/evaluations/wait", {"json": {"ids": []}}, 400, "ids"),
    ("POST", "/v1/evaluations/wait", {"json": {"ids": "abc"}}, 400, "ids"),
    ("POST", "/v1/evaluations/wait", {"json": {"ids": [1]}}, 400, "ids.0"),
    (
        "POST",
        "/v1/evaluations/wait",
        {"json": {"ids": ["a"], "timeout": 301}},
        400,
        "timeout",
    ),
    # containers
    ("POST", "/v1/containers", {"json": {}}, 400, "instance_id"),
    ("POST", "/v1/containers", {"json": {"instance_id": "zz"}}, 404, "instance_id"),
    (
        "POST",
        "/v1/containers",
        {"json": {"instance_id": "a", "dataset_name": "zz"}},
        404,
        "dataset_name",
    ),
    ("POST", "/v1/containers/c-1/exec", {"json": {}}, 400, "command"),
    ("POST", "/v1/containers/c-1/exec", {"json": {"command": ""}}, 400, "command"),
    (
        "POST",
        "/v1/containers/c-1/exec",
        {"json": {"command": "true", "timeout": 0}},
        400,
        "timeout",
    ),
    (
        "POST",
        "/v1/containers/c-1/exec",
        {"json": {"command": "true", "stdin": 5}},
        400,
        "stdin",
    ),
    (
        "POST",
        "/v1/containers/-rf/exec",
        {"json": {"command": "true"}},
        400,
        "container_id",
    ),
    ("POST", "/v1/containers/..%2Fx/exec", {"json": {"command": "true"}}, 400, None),
    ("DELETE", "/v1/containers/-rf", {}, 400, "container_id"),
    ("DELETE", "/v1/containers/%7B", {}, 400, "container_id"),
    ("POST", "/v1/containers/a%7Db/exec", {"json": {"command": "true"}}, 400, None),
    ("GET", "/v1/evaluations/%7B", {}, 404, None),
    # routing
    ("GET", "/no/such/path", {}, 404, None),
    ("PUT", "/v1/evaluations", {}, 405, None),
    ("GET", "/evaluate_v3", {}, 405, None),
]


def _operation(document: dict[str, Any], method: str, path: str) -> Any:
    """Return the OpenAPI operation serving ``method path``, or None."""
    bare = path.split("?")[0]
    for template, operations in document["paths"].items():
        pattern = re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, bare) and method.lower() in operations:
            return operations[method.lower()]
    return None


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "field"),
    CASES,
    ids=[f"{c[0]} {c[1]} {i}" for i, c in enumerate(CASES)],
)
async def test_bad_input_gets_a_4xx_error_body_naming_the_problem(
    start_server: Any,
    memory_dataset: Any,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    field: str | None,
) -> None:
    """Each malformed request is answered with its 4xx and a JSON ErrorBody."""
    async with start_server(datasets=[memory_dataset()], backend="local") as url:
        async with http.request(method, f"{url}{path}", **kwargs) as response:
            body = await response.json()
        async with http.get(f"{url}/openapi.json") as document_response:
            document = await document_response.json()

    assert response.status == status, body
    operation = _operation(document, method, path)
    if operation is not None:  # the status is one the document promises
        assert str(status) in operation["responses"], (method, path, status)
    assert body["success"] is False
    assert body["error"] and body["error_detail"]
    if field is not None:
        assert body["field"] == field, body
    if status == 405:
        assert response.headers["Allow"]


async def test_a_body_over_the_size_limit_gets_413(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """A body larger than max_body_size is refused with 413 payload_too_large."""
    big = {**GOOD, "instance_id": "x" * 5000}
    async with (
        start_server(datasets=[memory_dataset()], max_body_size=1024) as url,
        http.post(f"{url}/v1/evaluations", json=big) as response,
    ):
        body = await response.json()

    assert response.status == 413
    assert body["error"] == "payload_too_large"


async def test_the_server_keeps_serving_after_bad_input(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """A run of bad requests leaves the server healthy and grading."""
    async with start_server(datasets=[memory_dataset()]) as url:
        for _, path, kwargs, _, _ in CASES[:10]:
            async with http.post(f"{url}{path}", **kwargs) as response:
                assert 400 <= response.status < 500
        async with http.post(f"{url}/evaluate_v3", json=GOOD) as response:
            assert response.status == 200
            assert (await response.json())["success"] is True


async def test_requests_aiohttp_cannot_parse_log_one_debug_line_not_a_traceback(
    start_server: Any, memory_dataset: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A request line or header aiohttp refuses gets its 400, and the server logs
    one DEBUG line for it, not an ERROR with a traceback that any client could
    repeat until the log fills the disk."""
    malformed = [
        b"POST /v1/evaluations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}",
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: x\r\n\r\n",
    ]
    caplog.set_level(logging.DEBUG, logger="agent_v2.server._serve.http")
    async with start_server(datasets=[memory_dataset()]) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        for request in malformed:
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(request)
            answer = await asyncio.wait_for(reader.read(65536), timeout=10)
            writer.close()
            await writer.wait_closed()
            assert answer.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), answer

    reports = [r for r in caplog.records if r.name == "agent_v2.server._serve.http"]
    assert [r.levelno for r in reports] == [logging.DEBUG] * len(malformed)
    assert all(r.exc_info is None and " 400 " in r.getMessage() for r in reports)
