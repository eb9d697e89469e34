"""A bounded soak of a real server with the local backend: nothing may grow.

A server process grades a few hundred evaluations of tiny instances, with exec
calls around each, in rounds. Between rounds, once idle, its file
descriptors, child processes, memory and workspaces are measured: after a
warm-up round, none of them may grow.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from agent_v2.sandbox import Isolation

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

WARM_UP = 40
"""Evaluations of the warm-up round, after which nothing may grow."""

ROUNDS = 4
ROUND_SIZE = 70
"""Measured rounds, and evaluations in each; two exec calls go with each."""

CONCURRENCY = 8
"""Agents working at once: each creates a container, execs, submits, waits."""

RSS_SLACK = 32 << 20
"""Bytes the server's resident memory may exceed its size after warm-up."""

FD_SLACK = 4
"""File descriptors the server may hold beyond its count after warm-up."""

BENCHMARK = """\
cat <<'EOF'
{"benchmarks": [{"name": "BM_tiny", "run_type": "iteration", "iterations": 1,
  "real_time": 1.0, "cpu_time": 1.0, "time_unit": "ns"}]}
EOF
"""

_SERVER = """
import asyncio, sys
from pathlib import Path
from agent_v2.server import ServerSettings, serve

root = Path(sys.argv[1])
settings = ServerSettings(
    datasets=[f"tiny={root / 'dataset.json'}"],
    host="127.0.0.1",
    port=0,
    backend="local",
    devices="cpu:2",
    workdir=root / "work",
    store_path=root / "store.sqlite3",
)

async def main():
    async with serve(settings) as url:
        print(url, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What the idle server held at one moment."""

    fds: int
    rss: int
    children: int
    containers: int
    sandbox_processes: int


@dataclasses.dataclass
class Tally:
    """What one round did."""

    evaluations: int = 0
    execs: int = 0
    outcomes: dict[str, int] = dataclasses.field(default_factory=dict)


def write_dataset(root: Path) -> None:
    """Write a dataset of two tiny instances with files and protected tests."""
    for name in ("one", "two"):
        repo = root / "repos" / name
        repo.mkdir(parents=True)
        (repo / "value.txt").write_text("1\n")
        (repo / "test.sh").write_text("grep -q 1 value.txt\n")
        (repo / "bench.sh").write_text(BENCHMARK)
    manifest = {
        "defaults": {
            "repo_path": "repos/{instance_id}",
            "build_command": "cat value.txt > built.txt",
            "test_command": "sh test.sh",
            "benchmark_command": "sh bench.sh",
            "protected_files": ["test.sh", "bench.sh"],
        },
        "instances": [{"instance_id": "one"}, {"instance_id": "two"}],
    }
    (root / "dataset.json").write_text(json.dumps(manifest))


@contextlib.asynccontextmanager
async def server_process(root: Path) -> AsyncIterator[tuple[str, psutil.Process]]:
    """Run the server in its own process; yield its URL and the process."""
    log = root / "server.log"
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _SERVER,
            str(root),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    assert process.stdin is not None and process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout=60)
        url = line.decode().strip()
        assert url.startswith("http://"), log.read_text()[-2000:]
        yield url, psutil.Process(process.pid)
    finally:
        process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), timeout=60)
        except TimeoutError:
            process.kill()
            await process.wait()


def sandbox_processes(workdir: Path) -> int:
    """Return how many processes run as a sandbox uid in one of our containers.

    Other tests may run sandboxes meanwhile; ours have HOME in ``workdir``.
    """
    uids = Isolation().uids
    count = 0
    for process in psutil.process_iter(["uids"]):
        info = process.info["uids"]
        if info is None or info.real not in uids:
            continue
        with contextlib.suppress(psutil.Error):
            if process.environ().get("HOME", "").startswith(str(workdir)):
                count += 1
    return count


async def snapshot(server: psutil.Process, containers: Path) -> Snapshot:
    """Measure the idle server, once its children and sockets have settled."""
    for _ in range(50):
        if not server.children(recursive=True):
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)  # let closed client connections be released
    return Snapshot(
        fds=server.num_fds(),
        rss=server.memory_info().rss,
        children=len(server.children(recursive=True)),
        containers=len(os.listdir(containers)),
        sandbox_processes=sandbox_processes(containers),
    )


async def call(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> Any:
    """Make one request; return its JSON after checking for success."""
    async with http.request(method, url, **kwargs) as response:
        assert response.status < 300, await response.text()
        return await response.json() if response.status != 204 else None


async def one_agent(
    http: aiohttp.ClientSession, url: str, n: int, tally: Tally
) -> None:
    """Work like an agent: create, exec, submit, wait, then remove the container."""
    instance = ("one", "two")[n % 2]
    mode = ("build", "test", "benchmark")[n % 3]
    body = {"dataset_name": "tiny", "instance_id": instance}
    container_id = (await call(http, "POST", f"{url}/v1/containers", json=body))[
        "container_id"
    ]
    try:
        for command in ("echo 1 > value.txt && ls", "git status --porcelain"):
            result = await call(
                http,
                "POST",
                f"{url}/v1/containers/{container_id}/exec",
                json={"command": command, "timeout": 60},
            )
            assert result["exit_code"] == 0, result
            tally.execs += 1

        submission = {**body, "container_id": container_id, "mode": mode}
        accepted = await call(http, "POST", f"{url}/v1/evaluations", json=submission)
        view = await call(
            http, "GET", f"{url}/v1/evaluations/{accepted['id']}?wait=120"
        )
        assert view["status"] == "succeeded", view
        outcome = view["outcome"]
        assert outcome["success"], outcome
        tally.evaluations += 1
        tally.outcomes[mode] = tally.outcomes.get(mode, 0) + 1
    finally:
        await call(http, "DELETE", f"{url}/v1/containers/{container_id}")


async def run_round(url: str, size: int, first: int) -> Tally:
    """Run ``size`` agents, ``CONCURRENCY`` at a time, with a fresh session."""
    tally = Tally()
    limit = asyncio.Semaphore(CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=300)

    async def bounded(n: int) -> None:
        async with limit:
            await one_agent(http, url, n, tally)

    async with aiohttp.ClientSession(timeout=timeout) as http:
        await asyncio.gather(*(bounded(first + n) for n in range(size)))
    return tally


async def test_soak_leaves_nothing_behind(tmp_path: Path) -> None:
    """Hundreds of evaluations and execs: no growth in fds, processes, memory,
    workspaces or sandbox processes once the warm-up round is done."""
    write_dataset(tmp_path)
    containers = tmp_path / "work" / "containers"
    started = time.monotonic()
    async with server_process(tmp_path) as (url, server):
        warm = await run_round(url, WARM_UP, 0)
        baseline = await snapshot(server, containers)

        rounds = []
        for index in range(ROUNDS):
            tally = await run_round(url, ROUND_SIZE, WARM_UP + index * ROUND_SIZE)
            rounds.append((tally, await snapshot(server, containers)))

    evaluations = warm.evaluations + sum(t.evaluations for t, _ in rounds)
    execs = warm.execs + sum(t.execs for t, _ in rounds)
    print(
        f"\nsoak: {evaluations} evaluations and {execs} execs in "
        f"{time.monotonic() - started:.0f} s (local backend, isolation "
        f"{'on' if os.geteuid() == 0 else 'limits only'}); after warm-up: "
        f"{baseline}; after each round: {[s for _, s in rounds]}"
    )
    assert evaluations == WARM_UP + ROUNDS * ROUND_SIZE
    for tally, after in rounds:
        assert after.fds <= baseline.fds + FD_SLACK, (baseline, after)
        assert after.rss <= baseline.rss + RSS_SLACK, (baseline, after)
        assert after.children == 0, after
        assert after.containers == 0, after
        assert after.sandbox_processes == 0, after
        assert tally.evaluations == ROUND_SIZE
