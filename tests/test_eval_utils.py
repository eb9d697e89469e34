"""The compatibility contract of evaluate_info / evaluate, field by field.

Each behaviour is checked against our real server and against a server that
offers only the legacy ``POST /evaluate_v3`` (``tests/legacy_server.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from agent_v2 import eval_utils
from agent_v2.client import ENV_VARS, ClientConfig, EvalClient, RetryPolicy, Timeouts
from agent_v2.datasets import bundled_dataset_path
from agent_v2.eval_utils import (
    SubmissionResult,
    evaluate,
    evaluate_info,
    evaluate_info_sync,
    evaluate_many,
)
from agent_v2.protocol import Status
from legacy_server import DEFAULT_OUTCOME, LegacyServer

INFO_KEYS = {"request", "response", "meta", "extracted"}
FAST_RETRY = RetryPolicy(
    max_attempts=2, backoff_initial=0.01, backoff_max=0.02, outage_grace=0.001
)


@pytest.fixture(autouse=True)
def default_client_from_clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Give every test a default client built from an environment without overrides."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    eval_utils.configure(None)
    yield
    eval_utils.configure(None)


@pytest.fixture
async def legacy() -> AsyncIterator[LegacyServer]:
    """Return a legacy-only server on a free loopback port."""
    async with LegacyServer() as server:
        yield server


@pytest.fixture
async def dummy_url(start_server: Any, memory_dataset: Any) -> AsyncIterator[str]:
    """Return the URL of our server with the dummy backend and dataset ``toy``."""
    async with start_server(datasets=[memory_dataset()], devices="cpu:8") as url:
        yield url


def closed_port_url() -> str:
    """Return a loopback URL on which nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def submitted(url: str, **overrides: Any) -> dict[str, Any]:
    """Return evaluate_info keyword arguments for a submitted run."""
    arguments = {
        "exit_status": "Submitted",
        "result": "patch applied",
        "container_id": "container-1",
        "instance_id": "a",
        "dataset_name": "toy",
        "split": "test",
        "eval_server_url": url,
    }
    arguments.update(overrides)
    return arguments


def assert_failure(
    outcome: tuple[float, float, dict[str, Any]], prefix: str
) -> dict[str, Any]:
    """Check the (0.0, -1.0, info) failure shape and the error prefix."""
    reward, speedup, info = outcome
    assert (reward, speedup) == (0.0, -1.0)
    assert set(info) >= INFO_KEYS
    assert info["meta"]["success"] is False
    assert info["meta"]["error"].startswith(prefix), info["meta"]["error"]
    return info


# -- success -----------------------------------------------------------------


async def test_success_against_a_legacy_server_field_by_field(
    legacy: LegacyServer,
) -> None:
    """Every documented field is filled from the flat outcome /evaluate_v3 sent."""
    reward, speedup, info = await evaluate_info(**submitted(legacy.url))

    payload = {
        "instance_id": "a",
        "container_id": "container-1",
        "mode": "benchmark",
        "dataset_name": "toy",
        "split": "test",
    }
    assert (reward, speedup) == (0.75, 1.5)
    assert info["request"] == {
        "url": legacy.url + "/evaluate_v3",
        "payload": payload,
        "timeout_sec": 3600.0,
    }
    assert info["response"]["status_code"] == 200
    assert json.loads(info["response"]["raw"]) == DEFAULT_OUTCOME
    assert info["response"]["json"] == DEFAULT_OUTCOME
    assert info["meta"]["reason"] == "evaluated"
    assert info["meta"]["success"] is True
    assert info["meta"]["error"] is None
    assert info["meta"]["api"] == "legacy"
    assert info["extracted"] == {
        "reward": 0.75,
        "speedup": 1.5,
        "exit_code": 0,
        "timed_out": False,
        "gpu_id": 3,
        "stdout_preview": DEFAULT_OUTCOME["stdout"][:200],
    }
    assert legacy.payloads == [payload]


async def test_success_against_our_server_field_by_field(dummy_url: str) -> None:
    """On the versioned API the same fields come from the evaluation's outcome."""
    reward, speedup, info = await evaluate_info(**submitted(dummy_url))

    async with EvalClient(dummy_url) as client:
        view = await client.get_evaluation(info["meta"]["evaluation_id"])
    assert view.status is Status.SUCCEEDED and view.outcome is not None
    outcome = view.outcome

    assert (reward, speedup) == (outcome.reward, outcome.speedup)
    assert speedup == pytest.approx(1.0)
    assert info["request"]["url"] == dummy_url + "/v1/evaluations"
    assert info["request"]["payload"] == {
        "instance_id": "a",
        "container_id": "container-1",
        "mode": "benchmark",
        "dataset_name": "toy",
        "split": "test",
    }
    assert info["request"]["timeout_sec"] == 3600.0
    assert info["response"]["status_code"] == 200
    assert json.loads(info["response"]["raw"]) == info["response"]["json"]
    assert info["response"]["json"]["success"] is True
    assert info["response"]["json"]["reward"] == outcome.reward
    assert info["meta"] | {"duration_sec": 0} == {
        "reason": "evaluated",
        "success": True,
        "error": None,
        "exit_status": "Submitted",
        "api": "v1",
        "evaluation_id": view.id,
        "duration_sec": 0,
    }
    assert info["extracted"] == {
        "reward": outcome.reward,
        "speedup": outcome.speedup,
        "exit_code": outcome.exit_code,
        "timed_out": False,
        "gpu_id": outcome.gpu_id,
        "stdout_preview": outcome.stdout[:200],
    }


async def test_evaluate_returns_reward_and_speedup(legacy: LegacyServer) -> None:
    """evaluate() is evaluate_info() without the info."""
    assert await evaluate(**submitted(legacy.url)) == (0.75, 1.5)


async def test_real_graded_evaluation_on_the_local_backend(
    start_server: Any,
) -> None:
    """The local backend builds, tests and benchmarks an unchanged sample kernel."""
    dataset = f"sample={bundled_dataset_path('sample')}"
    async with start_server(datasets=[dataset], backend="local") as url:
        async with EvalClient(url) as client:
            created = await client.create_container(
                "count_primes", dataset_name="sample"
            )
        reward, speedup, info = await evaluate_info(
            **submitted(
                url,
                container_id=created.container_id,
                instance_id="count_primes",
                dataset_name="sample",
            )
        )

    assert info["meta"]["success"] is True, info["meta"]
    assert reward > 0.0
    assert speedup > 0.0
    assert info["extracted"]["exit_code"] == 0
    assert info["extracted"]["timed_out"] is False


# -- no request --------------------------------------------------------------


@pytest.mark.parametrize("exit_status", ["LimitsExceeded", "Error", "", None])
async def test_a_run_that_was_not_submitted_makes_no_request(
    legacy: LegacyServer, exit_status: str | None
) -> None:
    """exit_status != 'Submitted' returns (0.0, -1.0) without any request."""
    reward, speedup, info = await evaluate_info(
        **submitted(legacy.url, exit_status=exit_status)
    )

    assert (reward, speedup) == (0.0, -1.0)
    assert info["meta"]["reason"].startswith("not_submitted")
    assert repr(exit_status) in info["meta"]["reason"]
    assert info["meta"]["success"] is False
    assert info["response"] == {"status_code": None, "raw": None, "json": None}
    assert info["request"]["payload"]["container_id"] == "container-1"
    assert legacy.requests == 0 and legacy.other_requests == []
    assert legacy.connections == 0


# -- failures ----------------------------------------------------------------


async def test_unsuccessful_outcome_from_a_legacy_server(
    legacy: LegacyServer,
) -> None:
    """success: false gives (0.0, -1.0) and the details the server sent."""
    legacy.outcome = {
        "success": False,
        "error": "tests_failed",
        "error_detail": "2 of 5 tests failed",
        "build_output": "built fine",
        "reward": 0.0,
        "speedup": None,
        "exit_code": 1,
        "timed_out": False,
        "gpu_id": 1,
        "stdout": "FAILED test_x\n" * 40,
        "stderr": "assertion failed",
    }
    info = assert_failure(await evaluate_info(**submitted(legacy.url)), "tests_failed")

    assert info["meta"]["reason"] == "evaluation_failed"
    assert info["response"]["json"] == legacy.outcome
    extracted = info["extracted"]
    assert extracted["error_detail"] == "2 of 5 tests failed"
    assert extracted["build_output"] == "built fine"
    assert extracted["stdout"] == legacy.outcome["stdout"]
    assert extracted["stderr"] == "assertion failed"
    assert extracted["stdout_preview"] == legacy.outcome["stdout"][:200]
    assert extracted["exit_code"] == 1
    assert extracted["gpu_id"] == 1


async def test_unsuccessful_outcome_from_our_server(
    start_server: Any, memory_dataset: Any
) -> None:
    """A build that fails on the local backend is reported with its output."""
    dataset = memory_dataset(build_command="echo compiler says no >&2; exit 2")
    async with start_server(datasets=[dataset], backend="local") as url:
        async with EvalClient(url) as client:
            created = await client.create_container("a", dataset_name="toy")
        info = assert_failure(
            await evaluate_info(**submitted(url, container_id=created.container_id)),
            "build_failed",
        )

    assert info["meta"]["reason"] == "evaluation_failed"
    assert info["meta"]["api"] == "v1"
    assert "compiler says no" in info["extracted"]["build_output"]
    assert info["extracted"]["error_detail"]
    assert info["response"]["json"]["error"] == "build_failed"


@pytest.mark.parametrize("status", [400, 404, 500])
async def test_http_errors_from_a_legacy_server(
    legacy: LegacyServer, status: int
) -> None:
    """An HTTP status >= 400 gives http_status_<code> and the body."""
    legacy.status = status
    legacy.body = {"success": False, "error": "boom", "error_detail": "it broke"}
    info = assert_failure(
        await evaluate_info(**submitted(legacy.url)), f"http_status_{status}"
    )

    assert info["meta"]["reason"] == "http_error"
    assert info["response"]["status_code"] == status
    assert info["response"]["json"] == legacy.body
    assert info["extracted"]["error_detail"] == "it broke"
    assert info["request"]["url"] == legacy.url + "/evaluate_v3"
    assert legacy.requests == 1  # none of these statuses is retried


async def test_http_error_from_our_server_names_the_problem(dummy_url: str) -> None:
    """An unknown instance gives http_status_404 with the server's detail."""
    info = assert_failure(
        await evaluate_info(**submitted(dummy_url, instance_id="no-such")),
        "http_status_404",
    )

    assert info["response"]["status_code"] == 404
    assert info["response"]["json"]["error"] == "instance_not_found"
    assert "no-such" in info["extracted"]["error_detail"]
    assert info["request"]["url"] == dummy_url + "/v1/evaluations"


async def test_timeout_against_a_legacy_server(legacy: LegacyServer) -> None:
    """A call past timeouts.total gives 'timeout: ' and never raises."""
    eval_utils.configure(ClientConfig(timeouts=Timeouts(total=0.3)))
    legacy.latency = 5.0
    info = assert_failure(await evaluate_info(**submitted(legacy.url)), "timeout: ")

    assert info["meta"]["reason"] == "timeout"
    assert info["request"]["timeout_sec"] == 0.3
    assert info["response"]["status_code"] is None


async def test_timeout_against_our_server_cancels_the_evaluation(
    start_server: Any, memory_dataset: Any
) -> None:
    """Giving up on a versioned evaluation cancels it on the server."""
    eval_utils.configure(ClientConfig(timeouts=Timeouts(total=0.5)))
    async with start_server(datasets=[memory_dataset()], dummy_latency=5.0) as url:
        info = assert_failure(await evaluate_info(**submitted(url)), "timeout: ")
        async with EvalClient(url) as client:
            view = await client.get_evaluation(info["meta"]["evaluation_id"])

    assert info["meta"]["api"] == "v1"
    assert view.status is Status.CANCELLED


async def test_a_call_cancelled_as_asyncio_run_ends_still_cancels_its_evaluation(
    start_server: Any, memory_dataset: Any, http: Any
) -> None:
    """An agent thread runs ``asyncio.run(asyncio.wait_for(evaluate_info(...),
    2))``: the run ends right after the call is cancelled, cancelling every
    task left, and the evaluation is cancelled on the server all the same."""

    async def agent(url: str) -> None:
        with contextlib.suppress(TimeoutError):
            # 2 s: long past the submit, however slow the machine; the
            # evaluation itself would take 30 s.
            await asyncio.wait_for(evaluate_info(**submitted(url)), 2)

    async with start_server(datasets=[memory_dataset()], dummy_latency=30) as url:
        await asyncio.to_thread(asyncio.run, agent(url))
        async with http.get(f"{url}/metrics") as response:
            metrics = await response.text()

    cancelled = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("agent_v2_evaluations_finished_total{")
        and 'status="cancelled"' in line
    ]
    assert sum(cancelled) == 1, metrics


async def test_connection_refused_gives_client_error() -> None:
    """No server listening gives 'client_error: ' after the allowed retries."""
    eval_utils.configure(ClientConfig(retry=FAST_RETRY))
    url = closed_port_url()
    info = assert_failure(await evaluate_info(**submitted(url)), "client_error: ")

    assert info["meta"]["reason"] == "client_error"
    assert info["response"]["status_code"] is None
    assert eval_utils.default_client(url).stats().retries == 1


@pytest.mark.parametrize(
    "body",
    ["<html>gateway error</html>", '{"reward": 1.0}', "[1, 2]", '{"success": "?"}'],
)
async def test_unparsable_answers_give_parse_error(
    legacy: LegacyServer, body: str
) -> None:
    """A 200 whose body is not a flat outcome gives 'parse_error: '."""
    legacy.body = body
    info = assert_failure(await evaluate_info(**submitted(legacy.url)), "parse_error: ")

    assert info["meta"]["reason"] == "parse_error"
    assert info["response"]["status_code"] == 200
    assert info["response"]["raw"] == body


async def test_unexpected_errors_give_unexpected_and_a_traceback(
    legacy: LegacyServer, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception nobody planned for is reported, with its traceback."""
    legacy.body = "[" * 200_000 + "]" * 200_000  # too deep for the JSON parser
    with caplog.at_level(logging.ERROR, logger="agent_v2.eval_utils"):
        info = assert_failure(
            await evaluate_info(**submitted(legacy.url)), "unexpected: "
        )

    assert info["meta"]["reason"] == "unexpected"
    assert "RecursionError" in info["meta"]["error"]
    assert "Traceback" in info["meta"]["traceback"]
    assert info["response"]["status_code"] == 200


# -- programming errors ------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"container_id": 12}, "container_id must be a str"),
        ({"instance_id": None}, "instance_id must be a str"),
        ({"dataset_name": 3}, "dataset_name must be a str or None"),
        ({"split": ["test"]}, "split must be a str or None"),
        ({"exit_status": True}, "exit_status must be a str or None"),
        ({"eval_server_url": None}, "eval_server_url must be a str"),
    ],
)
async def test_wrong_argument_types_raise_type_error(
    legacy: LegacyServer, overrides: dict[str, Any], fragment: str
) -> None:
    """A wrong argument type is a programming error: TypeError naming it."""
    with pytest.raises(TypeError, match=fragment):
        await evaluate_info(**submitted(legacy.url, **overrides))
    assert legacy.requests == 0


@pytest.mark.parametrize(
    "overrides",
    [
        {"eval_server_url": "localhost:9528"},
        {"eval_server_url": "http://"},
        {"eval_server_url": "not a url"},
        {"container_id": ""},
    ],
)
async def test_invalid_values_raise_value_error(
    legacy: LegacyServer, overrides: dict[str, Any]
) -> None:
    """An invalid URL or an empty id is a programming error: ValueError."""
    with pytest.raises(ValueError):
        await evaluate_info(**submitted(legacy.url, **overrides))
    assert legacy.requests == 0


# -- sync, many, logging -----------------------------------------------------


def test_sync_wrapper_works_without_a_loop() -> None:
    """evaluate_info_sync runs the call for code that has no event loop."""
    with LegacyServer().in_thread() as server:
        reward, speedup, info = evaluate_info_sync(**submitted(server.url))
        again = evaluate_info_sync(**submitted(server.url))

    assert (reward, speedup) == (0.75, 1.5)
    assert info["meta"]["success"] is True
    assert again[:2] == (0.75, 1.5)


async def test_sync_wrapper_refuses_a_running_loop(legacy: LegacyServer) -> None:
    """evaluate_info_sync inside a running loop raises RuntimeError, no request."""
    with pytest.raises(RuntimeError, match="await evaluate_info"):
        evaluate_info_sync(**submitted(legacy.url))
    assert legacy.requests == 0


async def test_evaluate_many_yields_every_submission_once(
    legacy: LegacyServer,
) -> None:
    """evaluate_many yields one result per submission, at most N at once."""
    legacy.latency = 0.05
    submissions = [
        {
            "exit_status": "Submitted" if i % 4 else "Error",
            "container_id": f"c{i}",
            "instance_id": "a",
            "dataset_name": "toy",
            "split": "test",
        }
        for i in range(20)
    ]
    results = [r async for r in evaluate_many(submissions, legacy.url, concurrency=3)]

    assert all(isinstance(r, SubmissionResult) for r in results)
    assert sorted(r.submission["container_id"] for r in results) == sorted(
        s["container_id"] for s in submissions
    )
    for r in results:
        submitted_run = r.submission["exit_status"] == "Submitted"
        expected = (0.75, 1.5) if submitted_run else (0, -1)
        assert (r.reward, r.speedup) == expected, r.info["meta"]
    assert legacy.requests == 15
    assert legacy.peak_concurrent <= 3


async def test_one_info_line_per_evaluation_and_bodies_only_at_debug(
    legacy: LegacyServer, caplog: pytest.LogCaptureFixture
) -> None:
    """INFO gets one line per evaluation with ids and results; bodies are DEBUG."""
    with caplog.at_level(logging.INFO, logger="agent_v2"):
        await evaluate_info(**submitted(legacy.url, container_id="c-log"))

    lines = [r for r in caplog.records if r.levelno == logging.INFO]
    evaluation_lines = [r for r in lines if "c-log" in r.getMessage()]
    assert len(evaluation_lines) == 1
    message = evaluation_lines[0].getMessage()
    for part in ("instance=a", "api=legacy", "outcome=succeeded", "reward=0.750"):
        assert part in message
    assert "speedup=1.500" in message and "duration=" in message
    assert all("benchmark output" not in r.getMessage() for r in lines)

    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="agent_v2"):
        await evaluate_info(**submitted(legacy.url, container_id="c-debug"))
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("benchmark output" in line for line in debug)


async def test_many_calls_in_one_gather_all_succeed(dummy_url: str) -> None:
    """A gather of 100 calls on our server all get their own outcome."""
    calls = [
        evaluate_info(**submitted(dummy_url, container_id=f"c{i}")) for i in range(100)
    ]
    results = await asyncio.gather(*calls)

    assert all(info["meta"]["success"] for _, _, info in results)
    ids = {info["meta"]["evaluation_id"] for _, _, info in results}
    assert len(ids) == 100
