"""Retries happen only where safe, and a retried submit never grades twice.

The dangerous fault is a connection cut after the server has received a
request: ``tests/tcp_proxy.py`` produces it on loopback, and the evaluations
are then counted in the server's own SQLite store.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_v2 import eval_utils
from agent_v2.client import ENV_VARS, ClientConfig, EvalClient, RetryPolicy, Timeouts
from agent_v2.errors import HTTPStatusError, QueueFull, TransportError
from agent_v2.eval_utils import evaluate_info
from agent_v2.protocol import EvaluationRequest
from agent_v2.server import ServerSettings
from legacy_server import Answer, LegacyServer
from tcp_proxy import TcpProxy, http_answer

QUICK = RetryPolicy(
    max_attempts=4, backoff_initial=0.01, backoff_max=0.05, outage_grace=0.001
)
REQUEST = EvaluationRequest(instance_id="a", container_id="c1", dataset_name="toy")


@pytest.fixture(autouse=True)
def default_client_from_clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Give every test a default client built from an environment without overrides."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    eval_utils.configure(None)
    yield
    eval_utils.configure(None)


@pytest.fixture
def settings(
    server_settings: Callable[..., ServerSettings], memory_dataset: Any
) -> ServerSettings:
    """Return settings of a dummy-backend server whose store file we can read."""
    return server_settings(datasets=[memory_dataset()], devices="cpu:4")


@pytest.fixture
async def proxied(
    start_server: Any, settings: ServerSettings
) -> AsyncIterator[TcpProxy]:
    """Return a proxy in front of our server (upstream URL in ``proxy.upstream``)."""
    async with start_server(settings=settings) as url, TcpProxy(url) as proxy:
        yield proxy


def evaluations_in_store(path: Path) -> int:
    """Return how many evaluations the server's store file holds."""
    with sqlite3.connect(path) as db:
        (count,) = db.execute("SELECT COUNT(*) FROM evaluations").fetchone()
    return int(count)


def client_for(url: str, **config: Any) -> EvalClient:
    """Return a client with quick retries (and any other config fields)."""
    config.setdefault("retry", QUICK)
    return EvalClient(url, config=ClientConfig(**config))


# -- the submit cut after the server got it ----------------------------------


@pytest.mark.parametrize("cuts", [1, 2])
async def test_a_retried_submit_never_starts_a_second_evaluation(
    start_server: Any, settings: ServerSettings, cuts: int
) -> None:
    """The answer to a submit is lost after acceptance; the retry reuses its key."""
    async with start_server(settings=settings) as url, TcpProxy(url) as proxy:
        proxy.cut_responses = cuts
        proxy.cut_match = b" 202 "  # only the acceptance of a new evaluation
        async with client_for(proxy.url, batch_submit=False) as client:
            result = await client.evaluate(REQUEST)
            stats = client.stats()

    assert result.outcome.success
    assert proxy.cuts == 1  # the retries got "200: that key exists", not 202
    assert stats.retries == 1
    assert evaluations_in_store(settings.store_path) == 1


async def test_a_batch_cut_after_acceptance_starts_nothing_twice(
    start_server: Any, settings: ServerSettings
) -> None:
    """A batch whose answer is lost is submitted again one by one, same keys."""
    requests = [REQUEST.model_copy(update={"container_id": f"c{i}"}) for i in range(5)]
    async with start_server(settings=settings) as url, TcpProxy(url) as proxy:
        proxy.cut_responses = 1
        proxy.cut_match = b'"status_code":202'  # a batch that accepted some
        async with client_for(proxy.url) as client:
            results = await asyncio.gather(*(client.evaluate(r) for r in requests))
            stats = client.stats()

    assert all(result.outcome.success for result in results)
    assert proxy.cuts == 1
    assert stats.batch_requests >= 1
    assert len({result.evaluation_id for result in results}) == 5
    assert evaluations_in_store(settings.store_path) == 5


async def test_the_compatibility_path_survives_a_cut_submit(
    start_server: Any, settings: ServerSettings
) -> None:
    """evaluate_info through a cutting proxy succeeds with one evaluation."""
    eval_utils.configure(ClientConfig(retry=QUICK))
    async with start_server(settings=settings) as url, TcpProxy(url) as proxy:
        proxy.cut_responses = 1
        proxy.cut_match = b" 202 "
        _, _, info = await evaluate_info(
            "Submitted", None, "c1", "a", "toy", "test", proxy.url
        )

    assert info["meta"]["success"] is True, info["meta"]
    assert evaluations_in_store(settings.store_path) == 1


async def test_a_cut_wait_request_is_retried(proxied: TcpProxy) -> None:
    """A long-poll whose answer is lost is simply asked again."""
    proxied.cut_responses = 1
    proxied.cut_match = b'"evaluations"'  # the answer of /v1/evaluations/wait
    async with client_for(proxied.url) as client:
        result = await client.evaluate(REQUEST)
        stats = client.stats()

    assert result.outcome.success
    assert proxied.cuts == 1
    assert stats.retries >= 1


async def test_a_legacy_call_cut_after_sending_is_not_retried() -> None:
    """The legacy call has no idempotency key: a lost answer is not retried."""
    async with LegacyServer() as server, TcpProxy(server.url) as proxy:
        proxy.cut_responses = 1
        async with client_for(proxy.url, api="legacy") as client:
            with pytest.raises(TransportError):
                await client.evaluate(REQUEST)
            stats = client.stats()

    assert server.requests == 1
    assert stats.retries == 0


# -- statuses ----------------------------------------------------------------


async def test_gateway_errors_on_idempotent_requests_are_retried(
    proxied: TcpProxy,
) -> None:
    """502 and 504 from a gateway are retried for a keyed submit."""
    proxied.inject = [http_answer(502, "Bad Gateway"), http_answer(504, "Timeout")]
    async with client_for(proxied.url, batch_submit=False) as client:
        result = await client.evaluate(REQUEST)
        stats = client.stats()

    assert result.outcome.success
    assert proxied.injected == 2
    assert stats.retries == 2


async def test_a_failed_batch_falls_back_to_single_submits(
    proxied: TcpProxy, settings: ServerSettings
) -> None:
    """A batch answered 502 is sent once; its submissions then go alone."""
    proxied.inject = [http_answer(502, "Bad Gateway")]
    async with client_for(proxied.url) as client:
        result = await client.evaluate(REQUEST)
        stats = client.stats()

    assert result.outcome.success
    assert proxied.injected == 1
    assert stats.batch_requests == 1
    assert stats.retries == 0  # the batch itself is never retried
    assert evaluations_in_store(settings.store_path) == 1


async def test_429_honours_retry_after() -> None:
    """A 429 with Retry-After is retried no sooner than asked."""
    async with LegacyServer() as server:
        server.script = [Answer(status=429, headers={"Retry-After": "0.3"}, body="")]
        async with client_for(server.url, api="legacy") as client:
            result = await client.evaluate(REQUEST)
            stats = client.stats()

    assert result.outcome.success
    assert server.requests == 2
    assert server.request_times[1] - server.request_times[0] >= 0.3
    assert stats.retries == 1


async def test_503_is_retried_even_for_the_legacy_call() -> None:
    """503 means the server did nothing, so even the legacy call is retried."""
    async with LegacyServer() as server:
        server.script = [Answer(status=503, body="busy")] * 2
        async with client_for(server.url, api="legacy") as client:
            result = await client.evaluate(REQUEST)

    assert result.outcome.success
    assert server.requests == 3


@pytest.mark.parametrize("status", [500, 502, 504])
async def test_errors_that_may_have_graded_are_not_retried_for_legacy(
    status: int,
) -> None:
    """500, and 502/504 without an idempotency key, are reported at once."""
    async with LegacyServer() as server:
        server.script = [Answer(status=status, body="oops")]
        async with client_for(server.url, api="legacy") as client:
            with pytest.raises(HTTPStatusError) as caught:
                await client.evaluate(REQUEST)

    assert caught.value.status == status
    assert server.requests == 1


async def test_a_429_lasting_past_the_time_budget_raises_queue_full() -> None:
    """429 is retried past max_attempts, until the time budget runs out; then
    QueueFull (an HTTPStatusError)."""
    async with LegacyServer(status=429, body="full") as server:
        server.headers = {"Retry-After": "0.05"}
        timeouts = Timeouts(total=1.0)
        async with client_for(server.url, api="legacy", timeouts=timeouts) as client:
            with pytest.raises(QueueFull) as caught:
                await client.evaluate(REQUEST)

    assert caught.value.status == 429
    assert server.requests > QUICK.max_attempts


async def test_our_server_answers_429_when_its_queue_is_full(
    start_server: Any, memory_dataset: Any
) -> None:
    """Our server's 429 becomes QueueFull once the time budget is used up."""
    async with (
        start_server(
            datasets=[memory_dataset()], devices="cpu:1", max_queue=1, dummy_latency=5
        ) as url,
        client_for(url, timeouts=Timeouts(total=0.5)) as client,
    ):
        for index in range(2):
            request = REQUEST.model_copy(update={"container_id": f"c{index}"})
            await client.submit(request)
        with pytest.raises(QueueFull):
            await client.submit(REQUEST)


async def test_no_retry_sleeps_past_the_time_budget() -> None:
    """A Retry-After longer than the time left ends the call instead."""
    async with LegacyServer() as server:
        server.script = [Answer(status=429, headers={"Retry-After": "30"}, body="")]
        config = {"api": "legacy", "timeouts": Timeouts(total=2.0)}
        async with client_for(server.url, **config) as client:
            started = time.monotonic()
            with pytest.raises(QueueFull):
                await client.evaluate(REQUEST)

    assert time.monotonic() - started < 30
    assert server.requests == 1


# -- connection errors -------------------------------------------------------


async def test_a_refused_connection_is_retried_then_reported() -> None:
    """Nobody listening: max_attempts tries with backoff, then TransportError."""
    async with LegacyServer() as server:
        url = server.url
    async with client_for(url) as client:
        with pytest.raises(TransportError, match="Cannot connect"):
            await client.evaluate(REQUEST)
        stats = client.stats()

    # One batch, sent once, then the submit alone with its retries.
    assert stats.batch_requests == 1
    assert stats.requests == 1 + QUICK.max_attempts
    assert stats.retries == QUICK.max_attempts - 1


# -- exec --------------------------------------------------------------------


async def test_a_retried_exec_never_runs_the_command_twice(
    start_server: Any, memory_dataset: Any
) -> None:
    """An exec whose answer is lost is retried with its key: it ran once."""
    dataset = memory_dataset()
    async with (
        start_server(datasets=[dataset], backend="local") as url,
        client_for(url) as direct,
    ):
        created = await direct.create_container("a", dataset_name="toy")
        container = created.container_id
        async with TcpProxy(url) as proxy, client_for(proxy.url) as client:
            proxy.cut_responses = 1
            result = await client.exec(container, "echo ran >> runs.txt")
            stats = client.stats()
        runs = await direct.exec(container, "cat runs.txt")

    assert result.exit_code == 0
    assert proxy.cuts == 1
    assert stats.retries == 1
    assert runs.stdout.splitlines() == ["ran"]
