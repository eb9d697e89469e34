"""Measure /healthz latency and GC pauses while 10,000 long polls are open.

Starts ``agent-v2 serve`` (dummy backend, evaluations that never finish) in
a subprocess, has worker processes hold ``--waiters`` open
``GET /v1/evaluations/{id}?wait=`` long polls (each re-asked when it
returns, at a steady rate, so the server keeps allocating), and times sequential
``GET /healthz`` calls from this process. The server runs with the garbage
collector as ``agent-v2 serve`` tunes it (``--gc tuned``) or with CPython's
defaults (``--gc default``), and reports each collection's pause.

    .venv/bin/python benchmarks/healthz_with_waiters.py [--gc both] [--waiters 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

# The server, started through this wrapper so that its collections can be
# timed; ``default`` undoes the tuning that ``agent-v2 serve`` applies.
_SERVER = """
import atexit, gc, json, sys, time
from agent_v2.server import _serve
mode, report, thresholds = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "default":
    _serve._tune_gc = lambda: None
elif thresholds:
    _serve.GC_THRESHOLDS = tuple(int(n) for n in thresholds.split(","))
pauses = []  # (wall-clock end, generation, seconds)
started = [0.0]
def timed(phase, info):
    if phase == "start":
        started[0] = time.perf_counter()
    else:
        pause = time.perf_counter() - started[0]
        pauses.append((time.time(), info["generation"], pause))
gc.callbacks.append(timed)
atexit.register(lambda: open(report, "w").write(json.dumps(pauses)))
from agent_v2.cli import main
sys.exit(main(sys.argv[4:]))
"""

POLL_IDS = 10


def _write_dataset(root: Path) -> Path:
    """Write a one-instance dataset (the dummy backend never runs its commands)."""
    path = root / "dataset.json"
    path.write_text(json.dumps([{"instance_id": "idle", "test_command": "true"}]))
    return path


async def _start_server(
    root: Path, mode: str, thresholds: str
) -> tuple[asyncio.subprocess.Process, str, Path]:
    """Start the server; return it, its URL and where it reports GC pauses."""
    report = root / f"gc-{mode}.json"
    args = [
        "-c",
        _SERVER,
        mode,
        str(report),
        thresholds,
        "--log-level=WARNING",
        "serve",
        "--port=0",
        "--backend=dummy",
        "--dummy-latency=3600",
        "--devices=cpu:2",
        f"--dataset=idle={_write_dataset(root)}",
        f"--workdir={root / 'work'}",
        f"--store={root / f'store-{mode}.sqlite3'}",
        "--shutdown-grace=0",
    ]
    process = await asyncio.create_subprocess_exec(
        sys.executable, *args, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout=60)
    return process, line.decode().split()[-1], report


async def _submit_idle_evaluations(http: aiohttp.ClientSession, url: str) -> list[str]:
    """Submit evaluations that will not finish while we measure; return ids."""
    ids = []
    for index in range(POLL_IDS + 2):  # two hold the devices, the rest queue
        body = {"instance_id": "idle", "container_id": f"c{index}", "mode": "test"}
        async with http.post(f"{url}/v1/evaluations", json=body) as response:
            ids.append((await response.json())["id"])
    return ids[-POLL_IDS:]


async def _worker(url: str, ids: list[str], count: int, wait: float) -> None:
    """Hold ``count`` long polls open until killed, asking again as each returns."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def poll(index: int) -> None:
            path = f"{url}/v1/evaluations/{ids[index % len(ids)]}"
            rng = random.Random(index)
            await asyncio.sleep(index * 0.001)  # ramp up
            while True:
                # Waits spread over [wait / 2, 3 * wait / 2], so the polls come
                # back at a steady rate instead of all in the same second.
                seconds = rng.uniform(wait / 2, 3 * wait / 2)
                try:
                    async with http.get(f"{path}?wait={seconds:.2f}") as response:
                        await response.read()
                except aiohttp.ClientError:
                    await asyncio.sleep(1)

        await asyncio.gather(*(poll(i) for i in range(count)))


async def _open_waiters(
    url: str, ids: list[str], waiters: int, workers: int, wait: float
) -> list[asyncio.subprocess.Process]:
    """Start worker processes that together hold ``waiters`` long polls."""
    processes = []
    for _ in range(workers):
        processes.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--worker",
                url,
                str(waiters // workers),
                str(wait),
                *ids,
            )
        )
    return processes


async def _sample(url: str, seconds: float, interval: float) -> list[float]:
    """Time GET /healthz every ``interval`` for ``seconds``; return ms each."""
    latencies = []
    async with aiohttp.ClientSession() as http:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            async with http.get(f"{url}/healthz") as response:
                await response.read()
            latencies.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(interval)
    return latencies


async def _connections(url: str) -> int:
    """Return how many HTTP connections the server has open."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith("agent_v2_http_connections "):
            return int(float(line.split()[1]))
    return 0


def _summary(latencies: list[float]) -> dict[str, float]:
    """Return p50, p99 and max of latencies in ms."""
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "samples": len(latencies),
        "p50": cuts[49],
        "p99": cuts[98],
        "max": max(latencies),
    }


async def run_one(args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Measure one server, its GC tuned or not; return the figures."""
    with tempfile.TemporaryDirectory(prefix="agent-v2-waiters-") as tmp:
        process, url, report = await _start_server(Path(tmp), mode, args.thresholds)
        workers: list[asyncio.subprocess.Process] = []
        try:
            async with aiohttp.ClientSession() as http:
                ids = await _submit_idle_evaluations(http, url)
            workers = await _open_waiters(
                url, ids, args.waiters, args.workers, args.wait
            )
            deadline = time.monotonic() + 120
            while await _connections(url) < args.waiters * 0.95:
                assert time.monotonic() < deadline, "the waiters never connected"
                await asyncio.sleep(1)
            open_polls = await _connections(url)
            print(f"gc {mode}: {open_polls} connections open; sampling", flush=True)
            window = (time.time(), time.time() + args.duration)
            latencies = await _sample(url, args.duration, args.interval)
        finally:
            for worker in workers:
                worker.kill()
                await worker.wait()
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), timeout=60)
        pauses = json.loads(report.read_text())

    return {
        "gc": mode,
        "open_connections": open_polls,
        "healthz_ms": _summary(latencies),
        "while_sampling": _pause_figures(pauses, *window),
        "whole_run": _pause_figures(pauses, 0.0, float("inf")),
    }


def _pause_figures(
    pauses: list[tuple[float, int, float]], start: float, end: float
) -> dict[str, Any]:
    """Return collections and their longest pauses (ms) per generation in a window."""
    figures: dict[str, Any] = {}
    for generation in (0, 1, 2):
        times = sorted(
            pause * 1000
            for when, gen, pause in pauses
            if gen == generation and start <= when <= end
        )
        figures[f"gen{generation}"] = {
            "collections": len(times),
            "longest_ms": [round(t, 1) for t in times[-3:]],
        }
    return figures


def main() -> None:
    """Parse flags, run, print the figures."""
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        url, count, wait, *ids = sys.argv[2:]
        asyncio.run(_worker(url, ids, int(count), float(wait)))
        return

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gc", choices=["tuned", "default", "both"], default="both")
    parser.add_argument("--waiters", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--wait", type=float, default=10.0, help="long-poll seconds")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument(
        "--thresholds",
        default="",
        metavar="G0,G1,G2",
        help="collector thresholds to try with --gc tuned (default: the server's)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    modes = ["default", "tuned"] if args.gc == "both" else [args.gc]
    results = [asyncio.run(run_one(args, mode)) for mode in modes]
    print(f"machine: {len(os.sched_getaffinity(0))} cores")
    for figures in results:
        row = figures["healthz_ms"]
        print(
            f"gc {figures['gc']:>7}: {figures['open_connections']} open; /healthz "
            f"n={row['samples']} p50={row['p50']:.1f} ms p99={row['p99']:.1f} ms "
            f"max={row['max']:.1f} ms"
        )
        for name in ("while_sampling", "whole_run"):
            counts = ", ".join(
                f"{gen}: {info['collections']} (longest {info['longest_ms']} ms)"
                for gen, info in figures[name].items()
            )
            print(f"    collections {name.replace('_', ' ')}: {counts}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
