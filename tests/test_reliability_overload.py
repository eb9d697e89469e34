"""Overload: far more submissions than the queue holds, through our client.

The server answers ``429`` with ``Retry-After`` once ``--max-queue``
evaluations wait; the client backs off and tries again until its time budget
runs out. Every submission must finish with a correct outcome, graded once,
and the server's memory must not grow with the number of submissions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent_v2.client import ClientConfig
from agent_v2.eval_utils import configure, default_client, evaluate_info
from agent_v2.evaluation.reward import RewardPolicy
from serve_process import ServeProcess

SUBMISSIONS = 5000
MAX_QUEUE = 100
DEVICES = 8
RSS_GROWTH_BOUND = 150 * 2**20  # bytes over the RSS of the idle server
EXPECTED_REWARD = RewardPolicy().reward(1.0)  # the dummy benchmark: speedup 1.0


@pytest.fixture(autouse=True)
def default_client_config() -> Iterator[None]:
    """Use the default ClientConfig (not the environment's) and reset it after."""
    configure(ClientConfig())
    yield
    configure(None)


async def _grade(index: int, url: str) -> tuple[float, float, dict[str, object]]:
    """Grade container ``c-<index>`` through evaluate_info."""
    return await evaluate_info(
        "Submitted", None, f"c-{index}", "sum_squares", "csum", "test", url
    )


async def _sample_rss(server: ServeProcess, samples: list[int]) -> None:
    """Append the server's RSS to ``samples`` every 0.2 s until cancelled."""
    while True:
        samples.append(await asyncio.to_thread(server.rss))
        await asyncio.sleep(0.2)


async def _probe_429(url: str, found: list[dict[str, str]]) -> None:
    """Submit now and then until one answer is a 429; keep its headers."""
    body = {"instance_id": "sum_squares", "container_id": "probe", "mode": "build"}
    async with aiohttp.ClientSession() as http:
        for attempt in range(200):
            headers = {"Idempotency-Key": f"probe-{attempt}"}
            async with http.post(
                f"{url}/v1/evaluations", json=body, headers=headers
            ) as response:
                if response.status == 429:
                    found.append({**response.headers, "body": await response.text()})
                    return
            await asyncio.sleep(0.1)


def _evaluations(store: Path) -> list[tuple[str, str, int]]:
    """Return ``(container_id, status, attempts)`` of every stored evaluation."""
    with sqlite3.connect(store) as db:
        rows = db.execute("SELECT request, status, attempts FROM evaluations")
        return [
            (json.loads(request)["container_id"], status, attempts)
            for request, status, attempts in rows
        ]


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_5000_submissions_against_a_queue_of_100_all_finish(
    tmp_path: Path, c_dataset: Path
) -> None:
    """5,000 concurrent evaluate_info calls, queue limit 100: the server answers
    429 with Retry-After, the client backs off, every call gets its correct
    outcome, each submission is graded once and server RSS stays bounded."""
    store = tmp_path / "store.sqlite3"
    args = [
        "--port=0",
        f"--dataset=csum={c_dataset}",
        "--backend=dummy",
        "--dummy-latency=0.005",
        f"--devices=cpu:{DEVICES}",
        f"--max-queue={MAX_QUEUE}",
        f"--store={store}",
        f"--workdir={tmp_path / 'work'}",
    ]
    async with ServeProcess.start(
        args, log=tmp_path / "server.log", log_level="WARNING"
    ) as server:
        idle_rss = server.rss()
        rss: list[int] = []
        sampler = asyncio.create_task(_sample_rss(server, rss))
        refusals: list[dict[str, str]] = []
        started = time.monotonic()
        try:
            results, _ = await asyncio.wait_for(
                asyncio.gather(
                    asyncio.gather(
                        *(_grade(i, server.url) for i in range(SUBMISSIONS))
                    ),
                    _probe_429(server.url, refusals),
                ),
                timeout=240,
            )
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        elapsed = time.monotonic() - started
        stats = default_client(server.url).stats()
        assert await server.terminate() == 0

    failures = [info["meta"] for _, _, info in results if not info["meta"]["success"]]  # type: ignore[index]
    assert not failures[:3], f"{len(failures)} calls failed"
    assert {(reward, speedup) for reward, speedup, _ in results} == {
        (EXPECTED_REWARD, 1.0)
    }
    rows = [row for row in await asyncio.to_thread(_evaluations, store)]
    graded = [row for row in rows if row[0] != "probe"]
    assert sorted(row[0] for row in graded) == sorted(
        f"c-{i}" for i in range(SUBMISSIONS)
    )
    assert {row[1:] for row in graded} == {("succeeded", 1)}

    assert refusals and int(refusals[0]["Retry-After"]) >= 1
    assert '"queue_full"' in refusals[0]["body"]
    assert stats.retries > 0
    peak = max(rss)
    assert peak - idle_rss < RSS_GROWTH_BOUND
    print(
        f"overload: {SUBMISSIONS} submissions, queue {MAX_QUEUE}, {elapsed:.1f} s, "
        f"{stats.retries} client retries, RSS idle {idle_rss / 2**20:.0f} MiB, "
        f"peak {peak / 2**20:.0f} MiB"
    )


async def test_a_burst_of_submissions_never_overfills_the_queue(
    start_server: Any, memory_dataset: Any
) -> None:
    """50 submissions at once against max_queue=10 and one device: at most 11
    accepted (10 waiting, 1 running), the rest answered 429 with Retry-After."""
    async with (
        start_server(
            datasets=[memory_dataset()], devices="cpu:1", max_queue=10, dummy_latency=30
        ) as url,
        aiohttp.ClientSession() as http,
    ):

        async def submit(index: int) -> tuple[int, str | None]:
            body = {"instance_id": "a", "container_id": f"c{index}"}
            async with http.post(f"{url}/v1/evaluations", json=body) as response:
                return response.status, response.headers.get("Retry-After")

        answers = await asyncio.gather(*(submit(i) for i in range(50)))
        async with http.get(f"{url}/healthz") as response:
            health = await response.json()

    accepted = [status for status, _ in answers if status == 202]
    assert len(accepted) <= 11
    assert {status for status, _ in answers} == {202, 429}
    assert all(after for status, after in answers if status == 429)
    assert health["queued"] <= 10
