"""Measure /healthz latency while every device is busy with CPU-heavy evaluations.

Starts ``agent-v2 serve`` (local backend) in a subprocess with a dataset whose
test command spins the CPU, keeps the device pool full of such evaluations,
and times sequential ``GET /healthz`` calls from a separate client: first on
the idle server, then under load. Prints p50/p90/p99/max in milliseconds and
whether p99 stayed under the 50 ms goal. Loopback only; bounded in time.

    .venv/bin/python benchmarks/healthz_under_load.py [--duration 10] [--spin 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

GOAL_P99_MS = 50.0


def _write_dataset(root: Path, spin_seconds: float) -> Path:
    """Write a one-instance dataset whose test command spins one core."""
    repo = root / "repos" / "spin"
    repo.mkdir(parents=True)
    (repo / "README").write_text("an instance whose tests keep a core busy\n")
    spin = f"timeout {spin_seconds:g} sh -c 'while :; do :; done'; true"
    manifest = {
        "defaults": {
            "repo_path": "repos/{instance_id}",
            "build_command": "true",
            "test_command": spin,
        },
        "instances": [{"instance_id": "spin"}],
    }
    path = root / "dataset.json"
    path.write_text(json.dumps(manifest))
    return path


async def _start_server(
    root: Path, dataset: Path, devices: str | None
) -> tuple[asyncio.subprocess.Process, str]:
    """Start the server process; return it with its URL."""
    args = [
        "-m",
        "agent_v2.cli",
        "--log-level=WARNING",
        "serve",
        "--port=0",
        "--backend=local",
        f"--dataset=spin={dataset}",
        f"--workdir={root / 'work'}",
        f"--store={root / 'store.sqlite3'}",
        "--shutdown-grace=0",
    ]
    if devices:
        args.append(f"--devices={devices}")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout=60)
    return process, line.decode().split()[-1]


async def _sample(
    http: aiohttp.ClientSession, url: str, seconds: float, interval: float
) -> tuple[list[float], list[dict[str, Any]]]:
    """Time GET /healthz every ``interval`` for ``seconds``; return ms and bodies."""
    latencies: list[float] = []
    bodies: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        async with http.get(f"{url}/healthz") as response:
            bodies.append(await response.json())
        latencies.append((time.perf_counter() - started) * 1000)
        await asyncio.sleep(interval)
    return latencies, bodies


def _summary(latencies: list[float]) -> dict[str, float]:
    """Return p50, p90, p99 and max of latencies in ms."""
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "samples": len(latencies),
        "p50": cuts[49],
        "p90": cuts[89],
        "p99": cuts[98],
        "max": max(latencies),
    }


async def _fill_pool(
    http: aiohttp.ClientSession, url: str, evaluations: int
) -> list[str]:
    """Create a container and submit CPU-heavy evaluations; return their ids."""
    async with http.post(f"{url}/v1/containers", json={"instance_id": "spin"}) as r:
        container_id = (await r.json())["container_id"]
    ids = []
    body = {"instance_id": "spin", "container_id": container_id, "mode": "test"}
    for _ in range(evaluations):
        async with http.post(f"{url}/v1/evaluations", json=body) as response:
            ids.append((await response.json())["id"])
    for _ in range(200):  # wait until every device is taken
        async with http.get(f"{url}/healthz") as response:
            health = await response.json()
        if health["devices_free"] == 0:
            break
        await asyncio.sleep(0.05)
    return ids


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; return its figures."""
    with tempfile.TemporaryDirectory(prefix="agent-v2-healthz-") as tmp:
        root = Path(tmp)
        dataset = _write_dataset(root, args.spin)
        process, url = await _start_server(root, dataset, args.devices)
        try:
            async with aiohttp.ClientSession() as http:
                idle, _ = await _sample(http, url, args.idle, args.interval)
                async with http.get(f"{url}/healthz") as response:
                    devices = (await response.json())["devices_total"]
                count = int(devices * (args.duration / args.spin + 2))
                ids = await _fill_pool(http, url, count)
                loaded, bodies = await _sample(http, url, args.duration, args.interval)
                for evaluation_id in ids:
                    async with http.delete(f"{url}/v1/evaluations/{evaluation_id}"):
                        pass
        finally:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), timeout=30)

    busy = sum(body["devices_free"] == 0 for body in bodies) / len(bodies)
    return {
        "cores": len(os.sched_getaffinity(0)),
        "devices": devices,
        "evaluations_submitted": count,
        "pool_busy_fraction": busy,
        "idle_ms": _summary(idle),
        "loaded_ms": _summary(loaded),
    }


def main() -> None:
    """Parse flags, run, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds loaded")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds idle first")
    parser.add_argument("--spin", type=float, default=2.0, help="seconds per test")
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--devices", default=None, help="default: one slot per core")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    figures = asyncio.run(run(args))
    loaded = figures["loaded_ms"]
    print(
        f"machine: {figures['cores']} cores; {figures['devices']} devices busy "
        f"{figures['pool_busy_fraction']:.0%} of the loaded samples"
    )
    for name in ("idle_ms", "loaded_ms"):
        row = figures[name]
        print(
            f"/healthz {name[:-3]:>6}: n={row['samples']:4d}  p50={row['p50']:.2f} ms  "
            f"p90={row['p90']:.2f} ms  p99={row['p99']:.2f} ms  max={row['max']:.2f} ms"
        )
    verdict = "met" if loaded["p99"] < GOAL_P99_MS else "NOT met"
    print(f"goal p99 < {GOAL_P99_MS:g} ms under load: {verdict}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
