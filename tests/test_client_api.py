"""EvalClient's evaluation API: versioned or legacy, evaluate_many, stats, auth."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from agent_v2.client import ClientConfig, EvalClient, Evaluated, EvaluationResult
from agent_v2.client._client import Trace
from agent_v2.errors import ClientError, ConfigError, HTTPStatusError
from agent_v2.protocol import EvaluationRequest, Status
from legacy_server import Answer, LegacyServer
from tcp_proxy import TcpProxy


def request(container_id: str = "c1", **fields: Any) -> EvaluationRequest:
    """Return a submission of instance ``a`` of dataset ``toy``."""
    return EvaluationRequest(
        instance_id="a", container_id=container_id, dataset_name="toy", **fields
    )


def legacy_client(url: str) -> EvalClient:
    """Return a client that uses only the legacy blocking call."""
    return EvalClient(url, config=ClientConfig(api="legacy"))


async def test_evaluate_uses_the_versioned_api_of_our_server(
    start_server: Any, memory_dataset: Any
) -> None:
    """On our server, evaluate submits, waits and returns the evaluation's id."""
    async with (
        start_server(datasets=[memory_dataset()]) as url,
        EvalClient(url) as client,
    ):
        result = await client.evaluate(request())
        view = await client.get_evaluation(result.evaluation_id or "")
        stats = client.stats()

    assert isinstance(result, EvaluationResult)
    assert result.api == "v1" and client.server_api == "v1"
    assert result.url == url + "/v1/evaluations"
    assert result.outcome == view.outcome
    assert view.status is Status.SUCCEEDED
    assert result.duration > 0
    assert stats.evaluations_started == stats.evaluations_finished == 1
    assert stats.evaluations_in_flight == 0
    assert stats.wait_requests >= 1


@pytest.mark.parametrize("batch_submit", [True, False])
async def test_gathered_evaluations_share_batch_requests(
    start_server: Any, memory_dataset: Any, batch_submit: bool
) -> None:
    """200 calls gathered go out in a few batches, or one by one when asked."""
    config = ClientConfig(batch_submit=batch_submit, submit_chunk=64)
    async with (
        start_server(
            datasets=[memory_dataset()], devices="cpu:200", dummy_latency=0.2
        ) as url,
        EvalClient(url, config=config) as client,
    ):
        results = await asyncio.gather(
            *(client.evaluate(request(f"c{i}")) for i in range(200))
        )
        stats = client.stats()

    assert all(result.outcome.success for result in results)
    assert len({result.evaluation_id for result in results}) == 200
    assert all(result.url == url + "/v1/evaluations" for result in results)
    submits = stats.requests - stats.wait_requests
    if batch_submit:
        # Chunks of 64: at least 4 batches; newcomers may make a few more.
        assert 4 <= stats.batch_requests <= 10
        assert submits == stats.batch_requests
    else:
        assert stats.batch_requests == 0
        assert submits == 200


async def test_a_legacy_server_is_detected_once_and_remembered() -> None:
    """The first submit's 404s (batch, then alone) switch the client to
    /evaluate_v3 for good."""
    async with LegacyServer() as server, EvalClient(server.url) as client:
        results = [await client.evaluate(request(f"c{i}")) for i in range(3)]

    assert [r.api for r in results] == ["legacy"] * 3
    assert all(r.url == server.url + "/evaluate_v3" for r in results)
    assert all(r.evaluation_id is None for r in results)
    assert client.server_api == "legacy"
    assert server.other_requests == [
        "POST /v1/evaluations/batch",
        "POST /v1/evaluations",
    ]
    assert server.requests == 3


async def test_a_404_about_the_submission_is_not_mistaken_for_legacy(
    start_server: Any, memory_dataset: Any
) -> None:
    """Our server's 404 for an unknown instance is an error, not a fallback."""
    async with (
        start_server(datasets=[memory_dataset()]) as url,
        EvalClient(url) as client,
    ):
        with pytest.raises(HTTPStatusError, match="instance_not_found") as caught:
            await client.evaluate(EvaluationRequest(instance_id="x", container_id="c"))

    assert caught.value.status == 404
    assert isinstance(caught.value.body, dict)
    assert client.server_api is None


async def test_the_api_can_be_forced(start_server: Any, memory_dataset: Any) -> None:
    """api='legacy' uses /evaluate_v3 even on our server; api='v1' never falls back."""
    async with (
        LegacyServer() as legacy,
        start_server(datasets=[memory_dataset()]) as url,
    ):
        async with EvalClient(url, config=ClientConfig(api="legacy")) as client:
            result = await client.evaluate(request())
        async with EvalClient(legacy.url, config=ClientConfig(api="v1")) as client:
            with pytest.raises(HTTPStatusError) as caught:
                await client.evaluate(request())

    assert result.api == "legacy" and result.outcome.success
    assert caught.value.status == 404
    assert legacy.requests == 0


async def test_evaluate_many_yields_in_finishing_order() -> None:
    """Outcomes come out as they finish, not in submission order."""
    async with LegacyServer() as server:
        server.script = [Answer(latency=0.5), Answer(latency=0.0)]
        async with legacy_client(server.url) as client:
            order = [
                item.request.container_id
                async for item in client.evaluate_many(
                    [request("slow"), request("fast")], concurrency=2
                )
            ]

    assert order == ["fast", "slow"]


async def test_evaluate_many_yields_failures_instead_of_raising() -> None:
    """A failed call is yielded with its error; the others still run."""
    async with LegacyServer() as server:
        server.script = [Answer(), Answer(status=500, body="boom"), Answer()]
        async with legacy_client(server.url) as client:
            items = [
                item
                async for item in client.evaluate_many(
                    (request(f"c{i}") for i in range(3)), concurrency=1
                )
            ]

    assert all(isinstance(item, Evaluated) for item in items)
    assert [item.error is None for item in items] == [True, False, True]
    assert isinstance(items[1].error, HTTPStatusError)
    assert items[1].result is None
    assert items[0].result is not None and items[0].result.outcome.success


async def test_evaluate_many_bounds_concurrency_and_accepts_async_input() -> None:
    """At most ``concurrency`` calls run at once; an async iterable works too."""

    async def source() -> Any:
        for index in range(12):
            yield request(f"c{index}")

    async with (
        LegacyServer(latency=0.05) as server,
        legacy_client(server.url) as client,
    ):
        many = client.evaluate_many(source(), concurrency=4)
        items = [item async for item in many]

    assert len(items) == 12
    assert server.peak_concurrent <= 4


async def test_evaluate_many_refuses_bad_concurrency() -> None:
    """concurrency must be a positive int."""
    client = EvalClient("http://127.0.0.1:1")
    with pytest.raises(ConfigError):
        async for _ in client.evaluate_many([request()], concurrency=0):
            pass
    with pytest.raises(TypeError):
        async for _ in client.evaluate_many([request()], concurrency=2.5):  # type: ignore[arg-type]
            pass


async def test_breaking_out_of_evaluate_many_cancels_the_rest() -> None:
    """Leaving the loop early cancels what still runs on this side."""
    async with LegacyServer() as server:
        server.script = [Answer(latency=0.0)] + [Answer(latency=30.0)] * 3
        async with legacy_client(server.url) as client:
            many = client.evaluate_many([request(f"c{i}") for i in range(4)])
            async for _ in many:
                break
            await many.aclose()
            stats = client.stats()

    assert stats.evaluations_in_flight == 0


async def test_a_token_is_sent_as_a_bearer_header(
    start_server: Any, memory_dataset: Any
) -> None:
    """With the server's token the call works; without it, 401."""
    async with start_server(datasets=[memory_dataset()], token="t0ken") as url:
        async with EvalClient(url, config=ClientConfig(token="t0ken")) as client:
            result = await client.evaluate(request())
        async with EvalClient(url) as client:
            with pytest.raises(HTTPStatusError) as caught:
                await client.evaluate(request())

    assert result.outcome.success
    assert caught.value.status == 401


async def test_health_get_and_cancel(start_server: Any, memory_dataset: Any) -> None:
    """health(), get_evaluation(wait=...) and cancel_evaluation() work end to end."""
    async with (
        start_server(datasets=[memory_dataset()], dummy_latency=5) as url,
        EvalClient(url) as client,
    ):
        health = await client.health()
        accepted = await client.submit(request(), idempotency_key="key-1")
        again = await client.submit(request(), idempotency_key="key-1")
        waited = await client.get_evaluation(accepted.id, wait=0.1)
        await client.cancel_evaluation(accepted.id)
        cancelled = await client.wait_for(accepted.id)

    assert health.status == "ok" and health.backend == "dummy"
    assert again.id == accepted.id
    assert not waited.status.finished
    assert cancelled.status is Status.CANCELLED


async def test_a_cancelled_call_cancels_its_evaluation_on_the_server(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """Cancelling evaluate() while it waits frees the evaluation's place on the
    server: it ends ``cancelled`` instead of running on."""
    async with (
        start_server(datasets=[memory_dataset()], dummy_latency=30) as url,
        EvalClient(url) as client,
    ):
        trace = Trace(url=url)
        call = asyncio.create_task(client.evaluate_traced(request(), trace))
        for _ in range(1000):  # until the server has accepted it
            if trace.evaluation_id is not None:
                break
            await asyncio.sleep(0.01)
        assert trace.evaluation_id is not None
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        async with asyncio.timeout(10):  # graded to the end, it would take 90 s
            view = await client.wait_for(trace.evaluation_id)
        assert await _cancelled_on(http, url) == 1

    assert view.status is Status.CANCELLED


async def test_a_call_cancelled_before_its_submit_was_answered_cancels_too(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession
) -> None:
    """The server took the submission, its answer is held back, the call is
    cancelled; once the answer arrives, the client cancels the evaluation."""
    async with (
        start_server(datasets=[memory_dataset()], dummy_latency=30) as url,
        TcpProxy(url) as proxy,
        EvalClient(proxy.url) as client,
    ):
        proxy.hold_match = b'"accepted"'
        call = asyncio.create_task(client.evaluate(request()))
        for _ in range(1000):  # until the answer to the submit is held
            if proxy.held:
                break
            await asyncio.sleep(0.01)
        assert proxy.held == 1
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        proxy.release.set()
        for _ in range(100):
            if await _cancelled_on(http, url):
                break
            await asyncio.sleep(0.1)
        assert await _cancelled_on(http, url) == 1


async def _cancelled_on(http: aiohttp.ClientSession, url: str) -> float:
    """Return how many evaluations the server at ``url`` ended as cancelled."""
    async with http.get(f"{url}/metrics") as response:
        text = await response.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("agent_v2_evaluations_finished_total{")
        and 'status="cancelled"' in line
    )


async def test_request_must_be_an_evaluation_request() -> None:
    """evaluate() takes an EvaluationRequest; anything else is a TypeError."""
    client = EvalClient("http://127.0.0.1:1")
    with pytest.raises(TypeError):
        await client.evaluate({"instance_id": "a"})  # type: ignore[arg-type]


async def test_errors_of_a_gathered_call_do_not_disturb_the_others(
    start_server: Any, memory_dataset: Any
) -> None:
    """One bad submission among many fails alone."""
    async with (
        start_server(datasets=[memory_dataset()], devices="cpu:8") as url,
        EvalClient(url) as client,
    ):
        calls = [client.evaluate(request(f"c{i}")) for i in range(8)]
        calls.append(
            client.evaluate(EvaluationRequest(instance_id="x", container_id="c"))
        )
        results = await asyncio.gather(*calls, return_exceptions=True)

    assert all(isinstance(r, EvaluationResult) for r in results[:8])
    assert isinstance(results[8], ClientError)
