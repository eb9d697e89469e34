"""Shutdown: SIGTERM stops taking work, then finishes or leaves what runs.

Running evaluations get ``--shutdown-grace`` seconds to finish; those that do
not are stopped (their commands killed) and stay unfinished in the store, to
run again at the next start. Either way, after a restart on the same store
every accepted evaluation has exactly one outcome and none is left running.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from agent_v2.client import EvalClient
from agent_v2.protocol import EvaluationRequest, Mode, Status
from agent_v2.server._serve import _stop_on_signals
from serve_process import ServeProcess


def _rows(store: Path) -> dict[str, dict[str, Any]]:
    """Return every stored evaluation by id: status, attempts, outcome, times."""
    with sqlite3.connect(store) as db:
        rows = db.execute(
            "SELECT id, status, attempts, outcome, finished_at FROM evaluations"
        ).fetchall()
    return {
        row[0]: {
            "status": row[1],
            "attempts": row[2],
            "outcome": json.loads(row[3]) if row[3] else None,
            "finished_at": row[4],
        }
        for row in rows
    }


async def _wait_status(
    client: EvalClient,
    ids: list[str],
    status: Status,
    timeout: float = 60.0,  # noqa: ASYNC109
) -> None:
    """Poll until every evaluation in ``ids`` has ``status``."""
    deadline = time.monotonic() + timeout
    while True:
        views = [await client.get_evaluation(i) for i in ids]
        if all(view.status is status for view in views):
            return
        assert time.monotonic() < deadline, [view.status for view in views]
        await asyncio.sleep(0.05)


async def _submit_refused(url: str) -> bool:
    """Return whether a fresh submission is turned away (refused or 503)."""
    body = {"instance_id": "sum_squares", "container_id": "late", "mode": "test"}
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{url}/v1/evaluations", json=body) as response,
        ):
            return response.status == 503
    except aiohttp.ClientConnectorError:
        return True


@pytest.mark.slow
async def test_sigterm_lets_running_evaluations_finish_within_the_grace(
    tmp_path: Path, c_dataset: Path
) -> None:
    """SIGTERM with 4 evaluations running and 2 queued, grace 30 s: no new work
    is taken, the running ones finish and are recorded, the queued ones wait
    in the store and run after a restart; each ends with one outcome."""
    store = tmp_path / "store.sqlite3"
    args = [
        "--port=0",
        f"--dataset=csum={c_dataset}",
        "--backend=dummy",
        "--dummy-latency=1",  # mode test: three commands, about 3 s
        "--devices=cpu:4",
        "--shutdown-grace=30",
        f"--store={store}",
        f"--workdir={tmp_path / 'work'}",
    ]
    async with ServeProcess.start(args, log=tmp_path / "first.log") as first:
        async with EvalClient(first.url) as client:
            ids = [await _submit(client, f"c-{i}") for i in range(6)]
            await _wait_status(client, ids[:4], Status.RUNNING)
        stopping = time.time()
        first.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert await _submit_refused(first.url)
        assert await first.terminate() == 0
        stopped_after = time.time() - stopping

    rows = await asyncio.to_thread(_rows, store)
    assert len(rows) == 6
    for evaluation_id in ids[:4]:  # finished during the grace period
        row = rows[evaluation_id]
        assert (row["status"], row["attempts"]) == ("succeeded", 1)
        assert row["finished_at"] > stopping
    for evaluation_id in ids[4:]:  # left queued, untouched
        assert (rows[evaluation_id]["status"], rows[evaluation_id]["attempts"]) == (
            "queued",
            0,
        )
    assert stopped_after < 30

    await _restart_and_finish(args, tmp_path, first.port, ids)
    rows = await asyncio.to_thread(_rows, store)
    assert {(row["status"], row["attempts"]) for row in rows.values()} == {
        ("succeeded", 1)
    }


@pytest.mark.slow
async def test_sigterm_past_the_grace_kills_commands_and_requeues(
    tmp_path: Path,
) -> None:
    """Local backend, commands that sleep 60 s, grace 1 s: SIGTERM kills the
    commands, leaves the evaluations unfinished, and a restart runs them once
    more to one outcome each, while a client waiting across it gets them."""
    slow, quick = _nap_datasets(tmp_path)
    store = tmp_path / "store.sqlite3"

    def args(dataset: Path, port: int = 0) -> list[str]:
        return [
            f"--port={port}",
            f"--dataset=nap={dataset}",
            "--backend=local",
            "--devices=cpu:2",
            "--shutdown-grace=1",
            f"--store={store}",
            f"--workdir={tmp_path / 'work'}",
        ]

    async with ServeProcess.start(args(slow), log=tmp_path / "first.log") as first:
        client = EvalClient(first.url)
        ids = []
        for _ in range(2):
            container = await client.create_container("nap", dataset_name="nap")
            ids.append(await _submit(client, container.container_id, "nap", "nap"))
        waiting = [asyncio.create_task(client.wait_for(i)) for i in ids]
        sleepers = await _sleeping_descendants(first.pid, 2)

        stopping = time.monotonic()
        assert await first.terminate() == 0
        stopped_after = time.monotonic() - stopping
        _, alive = await asyncio.to_thread(psutil.wait_procs, sleepers, 10)
        assert not [p for p in alive if _status(p) != psutil.STATUS_ZOMBIE]

    rows = await asyncio.to_thread(_rows, store)
    assert {row["status"] for row in rows.values()} == {"running"}  # unfinished
    assert all(row["outcome"] is None for row in rows.values())
    assert stopped_after < 20

    async with ServeProcess.start(
        args(quick, first.port), log=tmp_path / "second.log"
    ) as second:
        views = await asyncio.wait_for(asyncio.gather(*waiting), timeout=60)
        await client.aclose()
        assert await second.terminate() == 0
    assert "requeued 2 unfinished evaluations" in second.log_text()

    rows = await asyncio.to_thread(_rows, store)
    assert {(row["status"], row["attempts"]) for row in rows.values()} == {
        ("succeeded", 2)
    }
    assert all(view.status is Status.SUCCEEDED for view in views)


async def _submit(
    client: EvalClient,
    container_id: str,
    instance_id: str = "sum_squares",
    dataset_name: str = "csum",
) -> str:
    """Submit a test-mode evaluation; return its id."""
    request = EvaluationRequest(
        instance_id=instance_id,
        container_id=container_id,
        dataset_name=dataset_name,
        mode=Mode.TEST,
    )
    return (await client.submit(request)).id


async def _restart_and_finish(
    args: list[str], tmp_path: Path, port: int, ids: list[str]
) -> None:
    """Restart on the same store and port; wait for every evaluation to finish."""
    restart = [f"--port={port}", *args[1:]]
    async with ServeProcess.start(restart, log=tmp_path / "second.log") as second:
        async with EvalClient(second.url) as client:
            await asyncio.wait_for(
                asyncio.gather(*(client.wait_for(i) for i in ids)), timeout=60
            )
        assert await second.terminate() == 0


def _nap_datasets(root: Path) -> tuple[Path, Path]:
    """Write two datasets of instance ``nap``: tests that sleep 60 s, and quick."""
    repo = root / "repos" / "nap"
    repo.mkdir(parents=True)
    (repo / "README").write_text("an instance whose tests take their time\n")
    paths = []
    for name, test_command in (("slow", "sleep 60"), ("quick", "true")):
        manifest = {
            "defaults": {
                "repo_path": "repos/{instance_id}",
                "build_command": "true",
                "test_command": test_command,
            },
            "instances": [{"instance_id": "nap"}],
        }
        path = root / f"{name}.json"
        path.write_text(json.dumps(manifest))
        paths.append(path)
    return paths[0], paths[1]


async def _sleeping_descendants(pid: int, count: int) -> list[psutil.Process]:
    """Wait until the server runs ``count`` ``sleep`` commands; return them."""
    deadline = time.monotonic() + 60
    while True:
        children = await asyncio.to_thread(psutil.Process(pid).children, recursive=True)
        sleepers = [p for p in children if _name(p) == "sleep"]
        if len(sleepers) >= count:
            return sleepers
        assert time.monotonic() < deadline, "the commands never started"
        await asyncio.sleep(0.1)


def _name(process: psutil.Process) -> str:
    """Return a process's name, or "" when it is gone."""
    try:
        return str(process.name())
    except psutil.Error:
        return ""


def _status(process: psutil.Process) -> str:
    """Return a process's status, or zombie when it is gone."""
    try:
        return str(process.status())
    except psutil.Error:
        return str(psutil.STATUS_ZOMBIE)


async def test_sigterm_is_not_lost_when_the_loop_is_swamped() -> None:
    """A SIGTERM arriving while the loop is blocked and its self-pipe is full
    (thousands of worker-thread callbacks) still stops the server."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def flood() -> None:
        for _ in range(20_000):
            loop.call_soon_threadsafe(lambda: None)

    with _stop_on_signals(stop):
        worker = threading.Thread(target=flood)
        worker.start()
        worker.join()  # the loop is blocked meanwhile: nothing drains the pipe
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(stop.wait(), timeout=10)
