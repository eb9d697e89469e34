"""Wall time and connections of N concurrent evaluate_info calls.

Starts ``agent-v2 serve`` in its own process on a free loopback port, then,
for each N, gathers N ``evaluate_info`` calls on one event loop and reports
the wall time, the time one evaluation takes on the server (L) and the TCP
connections the client opened. With ``--baseline`` it also runs the old way
of calling: a new aiohttp session (limit 100, 50 per host) per call, blocking
on the legacy ``POST /evaluate_v3``.

Usage::

    .venv/bin/python benchmarks/client_concurrency.py               # dummy
    .venv/bin/python benchmarks/client_concurrency.py --backend local \\
        --counts 1000 --baseline

The dummy backend runs three commands per evaluation (build, tests,
benchmark), each taking ``--dummy-latency``; the default of 1/3 s makes one
evaluation take L = 1 s. The local backend runs real processes that sleep
for the same time. Every run is bounded: each N is capped by ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import aiohttp

from agent_v2.client import ClientConfig, EvalClient
from agent_v2.eval_utils import configure, default_client, evaluate_info

DATASET = "bench"
INSTANCE = "kernel"

BENCHMARK_JSON = {
    "context": {"date": "1970-01-01T00:00:00+00:00", "num_cpus": 1},
    "benchmarks": [
        {
            "name": "BM_kernel",
            "run_type": "iteration",
            "iterations": 1,
            "real_time": 1000.0,
            "cpu_time": 1000.0,
            "time_unit": "ns",
        }
    ],
}


def parse_args() -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("dummy", "local"), default="dummy")
    parser.add_argument("--dummy-latency", type=float, default=1 / 3)
    parser.add_argument("--counts", default="100,1000")
    parser.add_argument("--baseline", action="store_true")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args()


def free_port() -> int:
    """Return a loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_dataset(root: Path, seconds: float) -> Path:
    """Write a one-instance dataset whose commands each sleep ``seconds``."""
    repo = root / "repo"
    repo.mkdir(parents=True)
    (repo / "bench.json").write_text(json.dumps(BENCHMARK_JSON))
    sleep = f"sleep {seconds:.3f}"
    dataset = {
        "instances": [
            {
                "instance_id": INSTANCE,
                "repo_path": "repo",
                "build_command": sleep,
                "test_command": sleep,
                "benchmark_command": f"{sleep}; cat bench.json",
            }
        ]
    }
    path = root / "dataset.json"
    path.write_text(json.dumps(dataset))
    return path


@contextlib.contextmanager
def server_process(args: argparse.Namespace, root: Path) -> Iterator[str]:
    """Run ``agent-v2 serve`` in a child process; yield its URL."""
    port = free_port()
    dataset = write_dataset(root / "data", args.dummy_latency)
    command = [
        sys.executable,
        "-m",
        "agent_v2.cli",
        "serve",
        "--port",
        str(port),
        "--dataset",
        f"{DATASET}={dataset}",
        "--backend",
        args.backend,
        "--dummy-latency",
        str(args.dummy_latency),
        "--devices",
        "cpu:2000",
        "--max-queue",
        "100000",
        "--workdir",
        str(root / "work"),
        "--store",
        str(root / "store.sqlite3"),
    ]
    log = (root / "server.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        asyncio.run(wait_until_up(url, process))
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


async def wait_until_up(url: str, process: subprocess.Popen[bytes]) -> None:
    """Poll /healthz until the server answers (at most 30 s)."""
    async with EvalClient(url) as client:
        for _ in range(300):
            if process.poll() is not None:
                raise RuntimeError("the server exited; see server.log")
            try:
                await client.health()
                return
            except Exception:
                await asyncio.sleep(0.1)
    raise RuntimeError("the server did not answer /healthz within 30 s")


async def make_containers(url: str, backend: str, count: int) -> list[str]:
    """Return ``count`` container ids (created on the server for ``local``)."""
    if backend == "dummy":
        return [f"bench-{index}" for index in range(count)]
    async with EvalClient(url) as client:
        semaphore = asyncio.Semaphore(20)

        async def one() -> str:
            async with semaphore:
                created = await client.create_container(INSTANCE, dataset_name=DATASET)
                return created.container_id

        return list(await asyncio.gather(*(one() for _ in range(count))))


async def ours(url: str, containers: list[str]) -> dict[str, Any]:
    """Gather evaluate_info for every container; return wall time and stats."""
    configure(ClientConfig())
    client = default_client(url)
    before = client.stats()
    started = time.perf_counter()
    results = await asyncio.gather(
        *(
            evaluate_info("Submitted", None, cid, INSTANCE, DATASET, "test", url)
            for cid in containers
        )
    )
    wall = time.perf_counter() - started
    after = client.stats()
    return summarize(
        "evaluate_info, gathered",
        wall,
        [info for _, _, info in results],
        connections=after.connections_opened - before.connections_opened,
        requests=after.requests - before.requests,
    )


async def session_per_call(url: str, containers: list[str]) -> dict[str, Any]:
    """Gather legacy calls that each open their own session and connector."""
    opened = 0

    async def count(*_: Any) -> None:
        nonlocal opened
        opened += 1

    async def one(container_id: str) -> dict[str, Any]:
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(count)
        connector = aiohttp.TCPConnector(limit=100, limit_per_host=50)
        async with aiohttp.ClientSession(
            connector=connector,
            trace_configs=[trace],
            timeout=aiohttp.ClientTimeout(total=3600),
        ) as session:
            body = {
                "instance_id": INSTANCE,
                "container_id": container_id,
                "mode": "benchmark",
                "dataset_name": DATASET,
            }
            async with session.post(f"{url}/evaluate_v3", json=body) as response:
                outcome: dict[str, Any] = await response.json()
                return {"meta": {"success": outcome.get("success", False)}}

    started = time.perf_counter()
    infos = await asyncio.gather(*(one(cid) for cid in containers))
    wall = time.perf_counter() - started
    return summarize(
        "new session per call (legacy)",
        wall,
        list(infos),
        connections=opened,
        requests=len(containers),
    )


async def bounded(
    work: Coroutine[Any, Any, dict[str, Any]], seconds: float
) -> dict[str, Any]:
    """Return what ``work`` returns, or raise TimeoutError after ``seconds``."""
    async with asyncio.timeout(seconds):
        return await work


def summarize(
    name: str,
    wall: float,
    infos: list[dict[str, Any]],
    *,
    connections: int,
    requests: int,
) -> dict[str, Any]:
    """Return one result row."""
    durations = [
        info["meta"]["duration_sec"] for info in infos if "duration_sec" in info["meta"]
    ]
    return {
        "client": name,
        "n": len(infos),
        "wall_s": round(wall, 3),
        "succeeded": sum(1 for info in infos if info["meta"]["success"]),
        "connections_opened": connections,
        "requests": requests,
        "median_call_s": round(statistics.median(durations), 3) if durations else None,
    }


async def measure_l(url: str, backend: str) -> float:
    """Return how long one lone evaluation takes, end to end (L)."""
    (container,) = await make_containers(url, backend, 1)
    configure(ClientConfig())
    started = time.perf_counter()
    _, _, info = await evaluate_info(
        "Submitted", None, container, INSTANCE, DATASET, "test", url
    )
    if not info["meta"]["success"]:
        raise RuntimeError(f"a lone evaluation failed: {info['meta']}")
    return time.perf_counter() - started


def main() -> int:
    """Run the measurements and print a table."""
    args = parse_args()
    counts = [int(part) for part in args.counts.split(",")]
    rows: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="agent-v2-bench-") as tmp,
        server_process(args, Path(tmp)) as url,
    ):
        asyncio.run(measure_l(url, args.backend))  # warm the baseline cache
        lone = asyncio.run(measure_l(url, args.backend))
        for count in counts:
            containers = asyncio.run(make_containers(url, args.backend, count))
            rows.append(asyncio.run(bounded(ours(url, containers), args.timeout)))
            if args.baseline:
                containers = asyncio.run(make_containers(url, args.backend, count))
                rows.append(
                    asyncio.run(
                        bounded(session_per_call(url, containers), args.timeout)
                    )
                )

    print(
        f"backend={args.backend} command latency={args.dummy_latency:.3f}s "
        f"L (one lone evaluation)={lone:.3f}s cpus={os.cpu_count()}"
    )
    header = f"{'client':32} {'N':>5} {'wall s':>7} {'wall/L':>6} {'ok':>5} "
    print(header + f"{'conns':>6} {'reqs':>6}")
    for row in rows:
        print(
            f"{row['client']:32} {row['n']:>5} {row['wall_s']:>7.3f} "
            f"{row['wall_s'] / lone:>6.2f} {row['succeeded']:>5} "
            f"{row['connections_opened']:>6} {row['requests']:>6}"
        )
    if args.json is not None:
        args.json.write_text(
            json.dumps({"lone_s": lone, "args": vars(args), "rows": rows}, default=str)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
