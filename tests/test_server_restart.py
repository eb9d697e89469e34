"""A server killed with SIGKILL mid-run loses no accepted evaluation."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

EVALUATIONS = 24


@contextlib.asynccontextmanager
async def _serve_process(
    tmp_path: Path, dataset: Path, log_name: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """Run ``python -m agent_v2.cli serve`` on a free port; yield it and its URL."""
    log = (tmp_path / log_name).open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent_v2.cli",
        "serve",
        "--port=0",
        f"--dataset=csum={dataset}",
        "--backend=dummy",
        "--dummy-latency=0.2",
        "--devices=cpu:2",
        f"--store={tmp_path / 'store.sqlite3'}",
        f"--workdir={tmp_path / 'work'}",
        stdout=asyncio.subprocess.PIPE,
        stderr=log,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=60)
        assert b"listening on" in line, (tmp_path / log_name).read_text()
        yield process, line.decode().split()[-1]
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        log.close()


async def _submit_all(
    http: aiohttp.ClientSession, url: str, container_id: str
) -> list[tuple[int, str]]:
    """Submit every evaluation with its idempotency key; return (status, id)."""
    answers = []
    for i in range(EVALUATIONS):
        body = {
            "instance_id": "sum_squares",
            "container_id": container_id,
            "mode": "test",
        }
        async with http.post(
            f"{url}/v1/evaluations", json=body, headers={"Idempotency-Key": f"k{i}"}
        ) as response:
            answers.append((response.status, (await response.json())["id"]))
    return answers


async def _finished(http: aiohttp.ClientSession, url: str, ids: list[str]) -> int:
    body = {"ids": ids, "timeout": 0}
    async with http.post(f"{url}/v1/evaluations/wait", json=body) as response:
        return len((await response.json())["evaluations"])


async def _wait_all(
    http: aiohttp.ClientSession, url: str, ids: list[str]
) -> dict[str, dict[str, Any]]:
    """Long-poll until every evaluation is finished; return their views."""
    views: dict[str, dict[str, Any]] = {}
    pending = list(ids)
    while pending:
        body = {"ids": pending, "timeout": 30}
        async with http.post(f"{url}/v1/evaluations/wait", json=body) as response:
            answer = await response.json()
        assert not answer["unknown"]
        views.update({view["id"]: view for view in answer["evaluations"]})
        pending = answer["pending"]
    return views


@pytest.mark.slow
async def test_every_accepted_evaluation_finishes_once_after_sigkill(
    tmp_path: Path, c_dataset: Path, http: aiohttp.ClientSession
) -> None:
    """SIGKILL mid-run, restart on the same store: each submission gets one outcome."""
    async with _serve_process(tmp_path, c_dataset, "first.log") as (process, url):
        first = await _submit_all(http, url, "c-1")
        ids = [evaluation_id for _, evaluation_id in first]
        assert {status for status, _ in first} == {202}
        for _ in range(1200):  # up to a minute
            if await _finished(http, url, ids) >= 4:
                break
            await asyncio.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        await process.wait()

    async with _serve_process(tmp_path, c_dataset, "second.log") as (process, url):
        again = await _submit_all(http, url, "c-1")
        views = await _wait_all(http, url, ids)

        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0

    # The keys still name the evaluations accepted before the crash: no new ones.
    assert again == [(200, evaluation_id) for evaluation_id in ids]
    assert all(view["status"] == "succeeded" for view in views.values())
    assert any(view["attempts"] >= 2 for view in views.values())  # interrupted
    assert all(view["attempts"] >= 1 for view in views.values())
