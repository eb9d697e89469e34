"""One session per event loop, closed with its loop: gather, threads, sequences.

Warnings are errors in this suite, so an unclosed session, connector or
transport fails the test that left it behind. The subprocess tests add a
second, stricter witness: a fresh interpreter under ``-W error`` whose
stderr must not mention any leaked resource or closed loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from agent_v2 import eval_utils
from agent_v2.client import (
    ENV_VARS,
    ClientConfig,
    EvalClient,
    Limits,
    SessionPool,
    Timeouts,
)
from agent_v2.eval_utils import default_client, evaluate_info
from agent_v2.protocol import EvaluationRequest
from agent_v2.server import ServerSettings, serve
from legacy_server import LegacyServer, run_in_thread

LEAK_MARKERS = (
    "Unclosed",
    "unclosed",
    "Event loop is closed",
    "ResourceWarning",
    "Exception ignored",
    "Traceback",
    "Task was destroyed",
)


@pytest.fixture(autouse=True)
def default_client_from_clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Give every test a default client built from an environment without overrides."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    eval_utils.configure(None)
    yield
    eval_utils.configure(None)


@contextlib.contextmanager
def serve_in_thread(settings: ServerSettings) -> Iterator[str]:
    """Run our server on a loop of its own in a background thread; yield its URL."""
    stack = contextlib.AsyncExitStack()
    urls: list[str] = []

    async def start() -> None:
        urls.append(await stack.enter_async_context(serve(settings)))

    with run_in_thread(start, stack.aclose):
        yield urls[0]


@pytest.fixture
def threaded_dummy_url(
    server_settings: Callable[..., ServerSettings], memory_dataset: Any
) -> Iterator[str]:
    """Return the URL of our dummy-backend server running in another thread."""
    settings = server_settings(datasets=[memory_dataset()], devices="cpu:64")
    with serve_in_thread(settings) as url:
        yield url


@pytest.fixture
def threaded_legacy() -> Iterator[LegacyServer]:
    """Return a legacy-only server running in another thread."""
    with LegacyServer(latency=0.01).in_thread() as server:
        yield server


def call(url: str, index: int) -> Any:
    """Return an evaluate_info coroutine for submission number ``index``."""
    return evaluate_info("Submitted", None, f"c{index}", "a", "toy", "test", url)


def assert_no_leaks(caplog: pytest.LogCaptureFixture) -> None:
    """Collect garbage and check that nothing warned or logged a leak."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    leaks = [
        r.getMessage()
        for r in caplog.records
        if any(marker in r.getMessage() for marker in LEAK_MARKERS)
    ]
    assert leaks == []


# -- one loop ----------------------------------------------------------------


async def test_gather_of_100_calls_shares_one_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """100 gathered calls on one loop use one session and the pool's limits."""
    async with LegacyServer(latency=0.05) as server:
        results = await asyncio.gather(*(call(server.url, i) for i in range(100)))
        stats = default_client(server.url).stats()

    assert all(info["meta"]["success"] for _, _, info in results)
    assert stats.sessions == 1
    assert stats.connections_opened <= 50  # the default per-host limit
    assert server.peak_concurrent <= 50
    assert_no_leaks(caplog)


async def test_gather_of_100_calls_on_our_server(
    start_server: Any, memory_dataset: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """100 gathered calls on our server share one session and a few long-polls."""
    async with start_server(datasets=[memory_dataset()], devices="cpu:100") as url:
        results = await asyncio.gather(*(call(url, i) for i in range(100)))
        stats = default_client(url).stats()

    assert all(info["meta"]["success"] for _, _, info in results)
    assert stats.sessions == 1
    assert stats.evaluations_in_flight == 0
    assert stats.evaluations_finished == 100
    assert stats.connections_opened <= 50
    assert_no_leaks(caplog)


async def test_sequential_calls_reuse_a_few_connections(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """100 calls in a row reuse the same keep-alive connection."""
    async with LegacyServer() as server:
        for index in range(100):
            _, _, info = await call(server.url, index)
            assert info["meta"]["success"]
        stats = default_client(server.url).stats()

    assert server.requests == 100
    assert server.connections <= 2
    assert stats.connections_opened <= 2
    # Two probes (/v1/evaluations/batch, /v1/evaluations), then 100 calls.
    assert stats.requests == 102
    assert_no_leaks(caplog)


async def test_sequential_calls_on_our_server_reuse_connections(
    start_server: Any, memory_dataset: Any
) -> None:
    """100 versioned evaluations in a row need only a couple of connections."""
    async with start_server(datasets=[memory_dataset()], dummy_latency=0.0) as url:
        for index in range(100):
            _, _, info = await call(url, index)
            assert info["meta"]["success"], info["meta"]
        stats = default_client(url).stats()

    assert stats.connections_opened <= 3
    assert stats.sessions == 1


async def test_aclose_closes_this_loops_session_and_a_new_call_reopens() -> None:
    """aclose() closes the loop's session now; the next call opens a fresh one."""
    async with LegacyServer() as server:
        client = EvalClient(server.url, config=ClientConfig(api="legacy"))
        request = EvaluationRequest(instance_id="a", container_id="c")
        await client.evaluate(request)
        assert client.stats().sessions == 1

        await client.aclose()
        assert client.stats().sessions == 0
        assert client.stats().open_connections == 0

        await client.evaluate(request)
        assert client.stats().sessions == 1
        await client.aclose()


# -- many loops --------------------------------------------------------------


def test_each_asyncio_run_gets_its_own_session_closed_at_shutdown() -> None:
    """A session belongs to one loop and is closed when asyncio.run ends."""
    pool = SessionPool()

    async def grab() -> Any:
        state = await pool.state()
        assert await pool.state() is state  # shared within the loop
        return state

    first = asyncio.run(grab())
    second = asyncio.run(grab())

    assert first is not second
    assert first.session is not second.session
    assert first.session.closed and second.session.closed
    assert pool.sessions == 0


def test_a_loop_closed_by_hand_after_shutdown_asyncgens_is_clean() -> None:
    """Code that runs its own loop closes the session via shutdown_asyncgens."""
    pool = SessionPool()
    loop = asyncio.new_event_loop()
    try:
        state = loop.run_until_complete(pool.state())
        assert not state.session.closed
        loop.run_until_complete(loop.shutdown_asyncgens())
        assert state.session.closed
    finally:
        loop.close()


def test_threads_running_asyncio_run_against_a_legacy_server(
    threaded_legacy: LegacyServer, caplog: pytest.LogCaptureFixture
) -> None:
    """8 threads each calling asyncio.run(evaluate_info(...)) 10 times are clean."""
    url = threaded_legacy.url

    def worker(first: int) -> list[bool]:
        outcomes = []
        for index in range(first, first + 10):
            _, _, info = asyncio.run(call(url, index))
            outcomes.append(info["meta"]["success"])
        return outcomes

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(worker, range(0, 80, 10)))

    assert all(all(outcomes) for outcomes in results)
    assert threaded_legacy.requests == 80
    assert default_client(url).stats().sessions == 0
    assert_no_leaks(caplog)


def test_threads_running_asyncio_run_against_our_server(
    threaded_dummy_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The same thread pattern on the versioned API: waiters die with their loops."""

    def worker(first: int) -> list[bool]:
        outcomes = []
        for index in range(first, first + 5):
            _, _, info = asyncio.run(call(threaded_dummy_url, index))
            outcomes.append(info["meta"]["success"])
        return outcomes

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(worker, range(0, 40, 5)))

    assert all(all(outcomes) for outcomes in results), results
    stats = default_client(threaded_dummy_url).stats()
    assert stats.sessions == 0
    assert stats.open_connections == 0
    assert stats.evaluations_finished == 40
    assert_no_leaks(caplog)


# -- a fresh interpreter under -W error -------------------------------------

SCRIPT = textwrap.dedent(
    """
    import asyncio, gc, sys
    from concurrent.futures import ThreadPoolExecutor
    from agent_v2.eval_utils import evaluate_info

    URL = sys.argv[1]

    def call(i):
        return evaluate_info("Submitted", None, f"c{i}", "a", "toy", "test", URL)

    def ok(outcome):
        return outcome[2]["meta"]["success"]

    def worker(first):
        return [ok(asyncio.run(call(i))) for i in range(first, first + 6)]

    async def gathered():
        return [ok(r) for r in await asyncio.gather(*map(call, range(100)))]

    async def sequential():
        return [ok(await call(i)) for i in range(100)]

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(all(r) for r in pool.map(worker, range(0, 48, 6)))
    assert all(asyncio.run(gathered()))
    assert all(asyncio.run(sequential()))
    gc.collect()
    print("clean")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("server", ["legacy", "ours"])
def test_all_patterns_in_a_fresh_interpreter_with_warnings_as_errors(
    server: str,
    tmp_path: Path,
    server_settings: Callable[..., ServerSettings],
    memory_dataset: Any,
) -> None:
    """Threads, gather and sequences under ``python -W error`` print no leak."""
    script = tmp_path / "patterns.py"
    script.write_text(SCRIPT)

    with contextlib.ExitStack() as stack:
        if server == "legacy":
            url = stack.enter_context(LegacyServer(latency=0.01).in_thread()).url
        else:
            settings = server_settings(
                datasets=[memory_dataset()], devices="cpu:100", dummy_latency=0.01
            )
            url = stack.enter_context(serve_in_thread(settings))
        done = subprocess.run(
            [sys.executable, "-W", "error", str(script), url],
            capture_output=True,
            text=True,
            timeout=110,
        )

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "clean"
    for marker in LEAK_MARKERS:
        assert marker not in done.stderr, done.stderr


# -- the concurrency limit ---------------------------------------------------


async def test_waiting_for_a_connection_is_not_charged_to_the_timeout() -> None:
    """With 2 connections and a 1 s budget, 10 calls of 0.3 s each all succeed.

    The last call waits about 1.2 s for a connection; were that wait charged
    to its 1 s timeout, it would time out. The server never sees more than
    two requests at once.
    """
    eval_utils.configure(
        ClientConfig(
            limits=Limits(max_connections=2, max_per_host=2),
            timeouts=Timeouts(total=1.0),
            api="legacy",
        )
    )
    async with LegacyServer(latency=0.3) as server:
        results = await asyncio.gather(*(call(server.url, i) for i in range(10)))

    assert [info["meta"]["error"] for _, _, info in results] == [None] * 10
    assert server.peak_concurrent <= 2
    assert server.connections <= 2


async def test_max_in_flight_bounds_evaluations_per_loop(
    start_server: Any, memory_dataset: Any
) -> None:
    """Limits.max_in_flight holds further evaluations back before they submit."""
    eval_utils.configure(ClientConfig(limits=Limits(max_in_flight=3)))
    async with start_server(datasets=[memory_dataset()], devices="cpu:16") as url:
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, default_client(url).stats().evaluations_in_flight)
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        try:
            results = await asyncio.gather(*(call(url, i) for i in range(12)))
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    assert all(info["meta"]["success"] for _, _, info in results)
    assert default_client(url).stats().evaluations_finished == 12
    assert 1 <= peak <= 3
