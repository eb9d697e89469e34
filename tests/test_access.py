"""Access: the bearer token guards the server and never leaks.

A non-loopback address cannot be served without a token; every route but
``/healthz`` answers ``401`` JSON without the right token; the comparison is
constant-time; the token appears in no log line, answer or ``repr``, on the
server or on the client, even at DEBUG.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent_v2 import eval_utils
from agent_v2.client import ENV_VARS, ClientConfig, EvalClient
from agent_v2.errors import ConfigError
from agent_v2.eval_utils import evaluate_info
from agent_v2.server import ServerSettings
from agent_v2.server._routes import ROUTES
from serve_process import ServeProcess

TOKEN = "tok-3f9c2a7d51e8b604"
WRONG_TOKENS = ("", "tok-3f9c2a7d51e8b605", "tok-3f9c", f"{TOKEN}x")


@pytest.fixture(autouse=True)
def clean_client_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Build the default client from an environment without AGENT_V2_* values."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    eval_utils.configure(None)
    yield
    eval_utils.configure(None)


# -- who needs a token ---------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.1.2.3", "example.com"])
def test_a_non_loopback_host_needs_a_token(memory_dataset: Any, host: str) -> None:
    """Settings for a host other than loopback are refused without a token."""
    with pytest.raises(ConfigError, match="without a token"):
        ServerSettings(datasets=[memory_dataset()], host=host)

    settings = ServerSettings(datasets=[memory_dataset()], host=host, token=TOKEN)
    assert settings.token == TOKEN


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_a_loopback_host_needs_no_token(memory_dataset: Any, host: str) -> None:
    """Loopback addresses may be served without a token."""
    assert ServerSettings(datasets=[memory_dataset()], host=host).token is None


def test_the_token_is_masked_in_every_repr(memory_dataset: Any) -> None:
    """Neither the server's nor the client's settings show the token."""
    settings = ServerSettings(datasets=[memory_dataset()], token=TOKEN)
    client = EvalClient("http://127.0.0.1:1", config=ClientConfig(token=TOKEN))

    for text in (repr(settings), str(settings), repr(client.config), repr(client)):
        assert TOKEN not in text
        assert "***" in text


# -- what the token guards -----------------------------------------------------


def _paths() -> list[tuple[str, str]]:
    """Return (method, path) of every route, with ``x`` for path parameters."""
    return [(route.method, route.path.replace("{id}", "x")) for route in ROUTES]


async def test_every_route_but_healthz_answers_401_json_without_the_token(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """No, a wrong, a truncated or a non-Bearer token: 401 with a JSON ErrorBody
    that does not echo what was sent; /healthz stays open."""
    sent = [{}] + [{"Authorization": f"Bearer {token}"} for token in WRONG_TOKENS]
    sent.append({"Authorization": f"Basic {TOKEN}"})
    async with start_server(datasets=[memory_dataset()], token=TOKEN) as url:
        for method, path in _paths():
            for headers in sent:
                async with http.request(
                    method, url + path, json={}, headers=headers
                ) as response:
                    body = await response.text()
                    if path == "/healthz":
                        assert response.status == 200
                        continue
                    assert response.status == 401, (method, path)
                    assert response.headers["WWW-Authenticate"] == "Bearer"
                    assert (await response.json())["error"] == "unauthorized"
                    assert TOKEN[4:] not in body


async def test_the_right_token_opens_every_route_whatever_the_scheme_case(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """'Bearer <token>' and 'bearer <token>' both get past the guard."""
    async with start_server(datasets=[memory_dataset()], token=TOKEN) as url:
        for scheme in ("Bearer", "bearer"):
            headers = {"Authorization": f"{scheme} {TOKEN}"}
            async with http.get(f"{url}/metrics", headers=headers) as response:
                assert response.status == 200


async def test_the_token_is_compared_in_constant_time(
    start_server: Any,
    memory_dataset: Any,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every guarded request goes through hmac.compare_digest, right or wrong."""
    calls: list[bool] = []
    real = hmac.compare_digest

    def spy(given: bytes, expected: bytes) -> bool:
        calls.append(real(given, expected))
        return calls[-1]

    monkeypatch.setattr(hmac, "compare_digest", spy)
    async with start_server(datasets=[memory_dataset()], token=TOKEN) as url:
        for token in (*WRONG_TOKENS, TOKEN):
            headers = {"Authorization": f"Bearer {token}"}
            async with http.get(f"{url}/metrics", headers=headers):
                pass

    assert calls == [False] * len(WRONG_TOKENS) + [True]


# -- what web pages cannot do ---------------------------------------------------


@pytest.mark.parametrize("token", [None, TOKEN])
async def test_requests_from_web_pages_get_403_naming_origin(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession, token: Any
) -> None:
    """A request with an Origin header (a browser's) is refused on every route,
    with or without a token, before it does anything."""
    headers = {"Origin": "https://pages.example"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with start_server(datasets=[memory_dataset()], token=token) as url:
        for method, path in _paths():
            async with http.request(method, url + path, headers=headers) as answer:
                body = await answer.json()
                assert answer.status == 403, (method, path)
                assert (body["error"], body["field"]) == ("forbidden", "Origin")
        async with http.get(f"{url}/metrics") as answer:
            metrics = await answer.text()

    assert 'route="/v1/evaluations",status="202"' not in metrics


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("rebound.example", 403),
        ("rebound.example:9528", 403),
        ("localhost:9528", 200),
        ("sub.localhost", 200),
        ("127.0.0.1:9528", 200),
        ("[::1]:9528", 200),
        ("10.20.30.40", 200),
    ],
)
async def test_without_a_token_a_host_name_other_than_localhost_gets_403(
    start_server: Any,
    memory_dataset: Any,
    http: aiohttp.ClientSession,
    host: str,
    status: int,
) -> None:
    """DNS rebinding sends a page's own name in Host: without a token, names
    other than localhost are refused; IP addresses cannot be rebound and pass."""
    async with (
        start_server(datasets=[memory_dataset()]) as url,
        http.get(f"{url}/healthz", headers={"Host": host}) as answer,
    ):
        body = await answer.json()

    assert answer.status == status
    if status == 403:
        assert (body["error"], body["field"]) == ("forbidden", "Host")


async def test_with_a_token_any_host_name_is_served(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """With a token, a page cannot get in anyway, so Host may be any name (a
    server reached through its DNS name)."""
    headers = {"Host": "grader.example:9528", "Authorization": f"Bearer {TOKEN}"}
    async with (
        start_server(datasets=[memory_dataset()], token=TOKEN) as url,
        http.get(f"{url}/metrics", headers=headers) as answer,
    ):
        assert answer.status == 200


# -- never logged --------------------------------------------------------------


@pytest.mark.slow
async def test_the_token_is_never_logged_on_either_side(
    tmp_path: Path,
    c_dataset: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A DEBUG-logging server and client, authorized and refused calls, end to
    end through evaluate_info with AGENT_V2_TOKEN: the token is in no log."""
    caplog.set_level(logging.DEBUG)
    args = [
        "--port=0",
        f"--dataset=csum={c_dataset}",
        "--backend=dummy",
        "--dummy-latency=0.01",
        f"--store={tmp_path / 'store.sqlite3'}",
        f"--workdir={tmp_path / 'work'}",
    ]
    async with ServeProcess.start(
        args,
        log=tmp_path / "server.log",
        log_level="DEBUG",
        env={"AGENT_V2_TOKEN": TOKEN},
    ) as server:
        refused = await _grade(server.url)
        monkeypatch.setenv("AGENT_V2_TOKEN", TOKEN)
        eval_utils.configure(None)
        graded = await _grade(server.url)
        await _raw_calls(server.url)
        assert await server.terminate() == 0
        server_log = server.log_text()

    assert refused[:2] == (0.0, -1.0)
    assert refused[2]["meta"]["error"].startswith("http_status_401")
    assert graded[2]["meta"]["success"], graded[2]["meta"]
    assert "evaluation" in server_log  # it did log, at DEBUG
    assert TOKEN not in server_log
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(refused) + repr(graded)


async def _grade(url: str) -> tuple[float, float, dict[str, Any]]:
    """Grade one submission through the compatibility function."""
    return await evaluate_info(
        "Submitted", None, "c-1", "sum_squares", "csum", "test", url
    )


async def _raw_calls(url: str) -> None:
    """Make refused and authorized calls that might log headers if anything did."""
    async with aiohttp.ClientSession() as http:
        for token in (*WRONG_TOKENS, TOKEN):
            headers = {"Authorization": f"Bearer {token}"}
            for method, path in _paths():
                async with http.request(method, url + path, headers=headers) as answer:
                    await answer.read()
