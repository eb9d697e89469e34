"""One waiter per loop multiplexes every pending evaluation into a few long-polls."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

import pytest

from agent_v2.client import ClientConfig, EvalClient, Limits, RetryPolicy, Timeouts
from agent_v2.errors import ClientError, TransportError
from agent_v2.protocol import EvaluationRequest, Status


def requests(count: int) -> list[EvaluationRequest]:
    """Return ``count`` submissions of instance ``a`` of dataset ``toy``."""
    return [
        EvaluationRequest(instance_id="a", container_id=f"c{i}", dataset_name="toy")
        for i in range(count)
    ]


async def evaluate_all(
    client: EvalClient, batch: list[EvaluationRequest]
) -> tuple[list[Any], int, int]:
    """Evaluate ``batch`` at once; return results, peak in flight, peak open."""
    peak_in_flight = peak_open = 0

    async def watch() -> None:
        nonlocal peak_in_flight, peak_open
        while True:
            stats = client.stats()
            peak_in_flight = max(peak_in_flight, stats.evaluations_in_flight)
            peak_open = max(peak_open, stats.open_connections)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(*(client.evaluate(r) for r in batch))
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return results, peak_in_flight, peak_open


@pytest.mark.slow
@pytest.mark.parametrize("connections", [6, 50])
async def test_1000_evaluations_in_flight_use_a_handful_of_connections(
    start_server: Any, memory_dataset: Any, connections: int
) -> None:
    """1,000 evaluations run at once over at most ``connections`` connections."""
    limits = Limits(max_connections=connections, max_per_host=connections)
    async with (
        start_server(
            datasets=[memory_dataset()], devices="cpu:1000", dummy_latency=0.5
        ) as url,
        EvalClient(url, config=ClientConfig(limits=limits)) as client,
    ):
        results, peak_in_flight, peak_open = await evaluate_all(client, requests(1000))
        stats = client.stats()

    assert all(result.outcome.success for result in results)
    assert len({result.evaluation_id for result in results}) == 1000
    assert peak_in_flight >= 500  # most of them were waiting at the same time
    assert peak_open <= connections
    # A waiter may abandon a silent long-poll (and its connection) once a
    # second to make room for newcomers; see agent_v2.client._waiter.
    assert stats.connections_opened <= connections + 10, stats
    assert stats.wait_requests < 1000


async def test_waits_are_sent_in_chunks(start_server: Any, memory_dataset: Any) -> None:
    """No wait request carries more than ``wait_chunk`` ids."""
    config = ClientConfig(wait_chunk=5, limits=Limits(max_wait_requests=2))
    async with (
        start_server(datasets=[memory_dataset()], devices="cpu:40") as url,
        EvalClient(url, config=config) as client,
    ):
        results, _, _ = await evaluate_all(client, requests(40))
        stats = client.stats()

    assert all(result.outcome.success for result in results)
    assert stats.wait_requests >= 40 // 5


async def test_a_healthy_long_poll_outlives_the_read_timeout(
    start_server: Any, memory_dataset: Any
) -> None:
    """A long-poll silent for longer than ``read`` is not cut: its wait is added."""
    timeouts = Timeouts(read=0.2, long_poll=10)
    async with (
        start_server(datasets=[memory_dataset()], dummy_latency=0.4) as url,
        EvalClient(url, config=ClientConfig(timeouts=timeouts)) as client,
    ):
        result = await client.evaluate(requests(1)[0])
        stats = client.stats()

    assert result.outcome.success  # three commands of 0.4 s: > 1 s of silence
    assert stats.retries == 0


async def test_a_newcomer_is_not_stuck_behind_silent_long_polls(
    start_server: Any, memory_dataset: Any
) -> None:
    """With every long-poll busy, a new evaluation still gets its outcome.

    One slow evaluation holds the only wait request, which the server keeps
    for up to five minutes. A fast evaluation submitted next finishes while
    the slow one still runs: the waiter folds it into a new request.
    """
    dataset = memory_dataset(build_command="if [ -f slow ]; then sleep 60; fi")
    config = ClientConfig(
        limits=Limits(max_wait_requests=1), timeouts=Timeouts(long_poll=300)
    )
    async with (
        start_server(datasets=[dataset], backend="local") as url,
        EvalClient(url, config=config) as client,
    ):
        slow_id = (await client.create_container("a", dataset_name="toy")).container_id
        fast_id = (await client.create_container("a", dataset_name="toy")).container_id
        await client.exec(slow_id, "touch slow")

        slow = asyncio.create_task(
            client.evaluate(
                EvaluationRequest(instance_id="a", container_id=slow_id, mode="test")
            )
        )
        while client.stats().wait_requests == 0:  # noqa: ASYNC110  # a counter
            await asyncio.sleep(0.05)
        fast = await client.evaluate(
            EvaluationRequest(instance_id="a", container_id=fast_id, mode="test")
        )

        assert fast.outcome.success
        assert not slow.done()
        slow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await slow


async def test_waiting_for_an_unknown_id_fails(
    start_server: Any, memory_dataset: Any
) -> None:
    """An id the server does not know fails its waiter with a clear message."""
    async with (
        start_server(datasets=[memory_dataset()]) as url,
        EvalClient(url) as client,
    ):
        with pytest.raises(ClientError, match="does not know evaluation 'nope'"):
            await client.wait_for("nope")


async def test_an_abandoned_wait_stops_watching(
    start_server: Any, memory_dataset: Any
) -> None:
    """A caller that gives up leaves no id behind in the waiter."""
    async with (
        start_server(datasets=[memory_dataset()], dummy_latency=5) as url,
        EvalClient(url) as client,
    ):
        accepted = await client.submit(requests(1)[0])
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await client.wait_for(accepted.id)
        await asyncio.sleep(0)

        state = await client._sessions.state()
        assert client._waiter(state).pending == 0
        await client.cancel_evaluation(accepted.id)


async def test_waiting_rides_through_a_server_restart(
    start_server: Any, server_settings: Any, memory_dataset: Any
) -> None:
    """An evaluation waited for across a restart on the same store still arrives."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = server_settings(
        datasets=[memory_dataset()], port=port, dummy_latency=1.0
    )
    retry = RetryPolicy(max_attempts=2, backoff_initial=0.05, outage_grace=60)
    config = ClientConfig(retry=retry)
    async with EvalClient(f"http://127.0.0.1:{port}", config=config) as client:
        async with start_server(settings=settings):
            accepted = await client.submit(requests(1)[0])
            waiting = asyncio.create_task(client.wait_for(accepted.id))
            while client.stats().wait_requests == 0:  # noqa: ASYNC110  # a counter
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # down longer than the request-level retries
        assert not waiting.done()
        async with start_server(settings=settings):
            view = await waiting

    assert view.status is Status.SUCCEEDED


async def test_a_server_gone_for_good_fails_the_wait_after_the_grace(
    start_server: Any, memory_dataset: Any
) -> None:
    """When the server stays away past outage_grace, waiting fails with an error."""
    retry = RetryPolicy(max_attempts=1, outage_grace=0.5)
    async with start_server(datasets=[memory_dataset()], dummy_latency=30) as url:
        client = EvalClient(url, config=ClientConfig(retry=retry))
        accepted = await client.submit(requests(1)[0])
    with pytest.raises(TransportError):
        await client.wait_for(accepted.id)
    await client.aclose()
