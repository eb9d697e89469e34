"""The three measurements: concurrency tables, client overhead, server under load.

Each starts its own ``agent-v2 serve`` child on a free loopback port and runs
every client in a child of its own (see :mod:`agent_v2._bench._cells`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import aiohttp

from agent_v2._bench._cells import (
    Cell,
    predicted_seconds,
    run_cell,
    run_interleaved,
    run_worker,
    skipped_cell,
)
from agent_v2._bench._clients import Job
from agent_v2._bench._config import OVERHEAD_VARIANTS, BenchConfig
from agent_v2._bench._machine import git_commit, load_average, machine_info
from agent_v2._bench._server import (
    DATASET_NAME,
    INSTANCE_ID,
    SPLIT,
    BenchError,
    ServerProcess,
    running_server,
    write_dataset,
)
from agent_v2.client import EvalClient
from agent_v2.protocol import EvaluationRequest

__all__ = ["client_overhead", "concurrency_table", "run_bench", "server_load"]

logger = logging.getLogger(__name__)

LONE_RUNS = 3
"""Lone evaluations timed to measure L as our client sees it."""

SPARE_DEVICES = 100
"""Device slots beyond the largest count, so the pool never makes anyone wait."""

LOAD_INTERVAL = 30.0
"""Seconds between two readings of the machine's load average."""

CREATE_CONCURRENCY = 8
HEALTHZ_TIMEOUT = 30.0
WAITING_FRACTION = 0.9
"""Share of the evaluations in flight from which /healthz samples count as
taken while all of them wait."""


async def run_bench(
    config: BenchConfig, *, source: Path | None = None
) -> dict[str, Any]:
    """Run every measurement ``config`` asks for; return the figures as JSON data.

    ``source`` is the checkout whose commit the results name, if any.
    """
    results: dict[str, Any] = {
        "started_at": _now(),
        "machine": await asyncio.to_thread(machine_info),
        "commit": await git_commit(source) if source is not None else None,
        "load_average_before": load_average(),
        "config": _config_dict(config),
        "errors": [],
    }
    scratch = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="agent-v2-bench-"))
    loads: list[tuple[float, float, float]] = []
    watcher = asyncio.create_task(_watch_load(loads))
    try:
        dataset = await asyncio.to_thread(
            write_dataset, scratch / "dataset", latency=config.latency
        )
        results["concurrency"] = []
        for backend in config.backends:
            table = await _scenario(
                results,
                f"concurrency table ({backend})",
                concurrency_table(config, backend, scratch / backend, dataset),
            )
            if table is not None:
                results["concurrency"].append(table)
        if config.overhead:
            results["overhead"] = await _scenario(
                results,
                "client overhead",
                client_overhead(config, scratch / "overhead", dataset),
            )
        if config.load:
            results["load"] = await _scenario(
                results,
                "server under load",
                server_load(config, scratch / "load", dataset),
            )
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await asyncio.to_thread(shutil.rmtree, scratch, ignore_errors=True)

    results["load_average_during"] = loads
    results["load_average_after"] = load_average()
    results["finished_at"] = _now()
    return results


async def _watch_load(loads: list[tuple[float, float, float]]) -> None:
    """Append the load average to ``loads`` every LOAD_INTERVAL s, until cancelled."""
    while True:
        loads.append(load_average())
        await asyncio.sleep(LOAD_INTERVAL)


async def _scenario(
    results: dict[str, Any],
    name: str,
    work: Coroutine[Any, Any, dict[str, Any]],
) -> dict[str, Any] | None:
    """Run one measurement; note its failure in ``results`` and go on to the next."""
    try:
        return await work
    except BenchError as exc:
        logger.error("%s failed: %s", name, exc)
        results["errors"].append(f"{name}: {exc}")
        return None


# -- 1. the concurrency table -------------------------------------------------


async def concurrency_table(
    config: BenchConfig, backend: str, root: Path, dataset: Path
) -> dict[str, Any]:
    """Run every variant at every count against one server; return the table."""
    await asyncio.to_thread(root.mkdir, parents=True)
    largest = max(config.counts)
    async with running_server(
        root,
        dataset=dataset,
        backend=backend,
        latency=config.latency,
        devices=f"cpu:{largest + SPARE_DEVICES}",
        max_queue=100 * largest + 1000,
    ) as server:
        logger.info("concurrency table, %s backend, server at %s", backend, server.url)
        pool = await _containers(server.url, backend, largest, config)
        lone = await _lone_latencies(server.url, pool[0])
        lone_median = statistics.median(lone)
        rows = []
        for count in config.counts:
            job = _job(server.url, pool, count)
            for variant in config.variants:
                rows.append(
                    await _table_cell(config, server, root, job, variant, lone_median)
                )
        cpu = await asyncio.to_thread(server.cpu_seconds)

    return {
        "backend": backend,
        "latency_s": config.latency,
        "lone_latency_s": lone_median,
        "lone_runs_s": lone,
        "containers": len(set(pool)),
        "server_cpu_s": cpu[0] if cpu else None,
        "commands_cpu_s": cpu[1] if cpu else None,
        "rows": rows,
    }


async def _table_cell(
    config: BenchConfig,
    server: ServerProcess,
    root: Path,
    job: Job,
    variant: str,
    lone: float,
) -> dict[str, Any]:
    """Run one cell of the table, or skip it when it would take too long."""
    count = len(job.containers)
    # NOTE: skipped by the nominal L, so that a loaded machine (a longer
    # lone L) does not change which cells the table has.
    nominal = predicted_seconds(variant, count, config.latency)
    if nominal > config.max_cell_seconds:
        reason = (
            f"skipped: needs at least {nominal:.0f} s "
            f"(over the {config.max_cell_seconds:g} s bound)"
        )
        logger.info("variant %s, N=%d: %s", variant, count, reason)
        return skipped_cell(variant, count, reason)

    cell = Cell(
        variant=variant,
        job=job,
        server=server,
        scratch=root,
        predicted=predicted_seconds(variant, count, lone),
        repeats=config.repeats,
        cheap_seconds=config.cheap_seconds,
    )
    return await run_cell(cell)


async def _containers(
    url: str, backend: str, count: int, config: BenchConfig
) -> tuple[str, ...]:
    """Return the containers to grade: ids for dummy, created ones for local.

    On the local backend each container is a folder with a git repository,
    so a few are created and shared; grading only reads them.
    """
    if backend == "dummy":
        return tuple(f"bench-{index:05d}" for index in range(count))

    wanted = min(count, config.local_containers)
    slots = asyncio.Semaphore(CREATE_CONCURRENCY)
    async with EvalClient(url) as client:

        async def create() -> str:
            async with slots:
                created = await client.create_container(
                    INSTANCE_ID, dataset_name=DATASET_NAME, split=SPLIT
                )
                return created.container_id

        return tuple(await asyncio.gather(*(create() for _ in range(wanted))))


def _job(url: str, pool: tuple[str, ...], count: int) -> Job:
    """Return a job grading ``count`` containers, taken round-robin from ``pool``."""
    containers = tuple(pool[index % len(pool)] for index in range(count))
    return Job(
        url=url,
        dataset_name=DATASET_NAME,
        split=SPLIT,
        instance_id=INSTANCE_ID,
        containers=containers,
    )


async def _lone_latencies(url: str, container_id: str) -> list[float]:
    """Grade once to measure the baseline, then time lone evaluations (L)."""
    request = EvaluationRequest(
        instance_id=INSTANCE_ID,
        container_id=container_id,
        dataset_name=DATASET_NAME,
        split=SPLIT,
    )
    async with EvalClient(url) as client:
        warm = await client.evaluate(request)
        if not warm.outcome.success:
            raise BenchError(
                f"a lone evaluation failed on the benchmark server: "
                f"{warm.outcome.error}: {warm.outcome.error_detail}"
            )
        seconds = []
        for _ in range(LONE_RUNS):
            started = time.perf_counter()
            await client.evaluate(request)
            seconds.append(time.perf_counter() - started)
    return seconds


# -- 2. client overhead -------------------------------------------------------


async def client_overhead(
    config: BenchConfig, root: Path, dataset: Path
) -> dict[str, Any]:
    """Time zero-latency evaluations through ours, a raw session, and (c)."""
    await asyncio.to_thread(root.mkdir, parents=True)
    count = config.overhead_evaluations
    async with running_server(
        root,
        dataset=dataset,
        backend="dummy",
        latency=0.0,
        devices=f"cpu:{config.overhead_concurrency + SPARE_DEVICES}",
        max_queue=10 * count + 1000,
    ) as server:
        logger.info("client overhead, server at %s", server.url)
        pool = tuple(f"overhead-{index:05d}" for index in range(count))
        await _lone_latencies(server.url, pool[0])
        job = dataclasses.replace(
            _job(server.url, pool, count), concurrency=config.overhead_concurrency
        )
        # NOTE: every run repeats (no cheap_seconds cut), round-robin, so the
        # three clients see the same machine, loaded or not.
        cells = [
            Cell(
                variant=variant,
                job=job,
                server=server,
                scratch=root,
                predicted=count / 100,
                repeats=config.repeats,
                cheap_seconds=math.inf,
            )
            for variant in OVERHEAD_VARIANTS
        ]
        rows = await run_interleaved(cells)
    for row in rows:
        if not row.get("skipped"):
            row["evaluations_per_s"] = count / row["wall_s"]
            row["cpu_ms_per_evaluation"] = 1000 * row["cpu_s"] / count

    return {
        "evaluations": count,
        "concurrency": config.overhead_concurrency,
        "rows": rows,
    }


# -- 3. the server under load -------------------------------------------------


async def server_load(config: BenchConfig, root: Path, dataset: Path) -> dict[str, Any]:
    """Hold many evaluations in flight, then measure the finish rate.

    The finish rate runs first, at zero latency, so its server measures the
    instance's baseline into the store; the waiting run then starts a fresh
    server on the same store, and no evaluation waits for a baseline.
    """
    await asyncio.to_thread(root.mkdir, parents=True)
    count = config.load_evaluations
    pool = tuple(f"load-{index:05d}" for index in range(count))
    settings: dict[str, Any] = {
        "dataset": dataset,
        "backend": "dummy",
        "devices": f"cpu:{count + SPARE_DEVICES}",
        "max_queue": 2 * count + 1000,
    }

    async with running_server(root, latency=0.0, **settings) as server:
        logger.info("finish rate of %d evaluations, server at %s", count, server.url)
        await _lone_latencies(server.url, pool[0])
        job = _job(server.url, pool, count)
        rate = await _loaded_run(config, server, root, job, 0.0)
    rate["evaluations_per_s"] = count / rate["client"]["wall_s"]

    async with running_server(root, latency=config.load_latency, **settings) as server:
        logger.info("%d evaluations waiting, server at %s", count, server.url)
        job = _job(server.url, pool, count)
        waiting = await _loaded_run(config, server, root, job, config.load_latency)

    return {
        "evaluations": count,
        "latency_s": config.load_latency,
        "waiter": "our client (variant d): POST /v1/evaluations/batch, then "
        "the loop's waiter long-polls POST /v1/evaluations/wait",
        "waiting": waiting,
        "rate": rate,
    }


async def _loaded_run(
    config: BenchConfig,
    server: ServerProcess,
    root: Path,
    job: Job,
    latency: float,
) -> dict[str, Any]:
    """Run our client on ``job`` while timing /healthz; return both and the server's."""
    idle = await asyncio.to_thread(server.memory_mib)
    cell = Cell(
        variant="d",
        job=job,
        server=server,
        scratch=root,
        predicted=latency + len(job.containers) / 100,
        repeats=1,
        cheap_seconds=0.0,
    )
    stop = asyncio.Event()
    sampler = asyncio.create_task(
        _sample_healthz(server.url, config.healthz_interval, stop)
    )
    try:
        client = await run_worker(cell, 0)
    finally:
        stop.set()
        samples = await sampler
    memory = await asyncio.to_thread(server.memory_mib)
    cpu = await asyncio.to_thread(server.cpu_seconds)

    in_flight = [s["queued"] + s["running"] for s in samples if s["ms"] is not None]
    peak = max(in_flight, default=0)
    waiting = [
        s["ms"]
        for s in samples
        if s["ms"] is not None
        and s["queued"] + s["running"] >= WAITING_FRACTION * len(job.containers)
    ]
    return {
        "client": client,
        "server_rss_idle_mib": idle[0] if idle else None,
        "server_rss_mib": memory[0] if memory else None,
        "server_peak_rss_mib": memory[1] if memory else None,
        "server_cpu_s": cpu[0] if cpu else None,
        "peak_in_flight": peak,
        "healthz_ms": _percentiles([s["ms"] for s in samples if s["ms"] is not None]),
        "healthz_all_waiting_ms": _percentiles(waiting),
        "healthz_errors": sum(1 for s in samples if s["ms"] is None),
        "samples": [_compact(sample) for sample in samples],
    }


async def _sample_healthz(
    url: str, interval: float, stop: asyncio.Event
) -> list[dict[str, Any]]:
    """Time ``GET /healthz`` on one kept-alive connection until ``stop`` is set."""
    samples: list[dict[str, Any]] = []
    connector = aiohttp.TCPConnector(limit=1)
    timeout = aiohttp.ClientTimeout(total=HEALTHZ_TIMEOUT)
    origin = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        while not stop.is_set():
            sample: dict[str, Any] = {"t": time.monotonic() - origin, "ms": None}
            started = time.perf_counter()
            try:
                async with http.get(url + "/healthz") as response:
                    body = await response.json()
                sample["ms"] = (time.perf_counter() - started) * 1000
                sample["queued"], sample["running"] = body["queued"], body["running"]
                sample["in_flight"] = body["queued"] + body["running"]
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                sample["error"] = f"{type(exc).__name__}: {exc}"
            samples.append(sample)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
    return samples


# -- helpers ------------------------------------------------------------------


def _percentiles(values: list[float]) -> dict[str, float | int | None]:
    """Return the count, p50, p99 and max of ``values`` (nearest rank)."""
    if not values:
        return {"samples": 0, "p50": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(percent: float) -> float:
        return ordered[max(math.ceil(percent / 100 * len(ordered)) - 1, 0)]

    return {
        "samples": len(ordered),
        "p50": rank(50),
        "p99": rank(99),
        "max": ordered[-1],
    }


def _compact(sample: dict[str, Any]) -> list[float | int | None]:
    """Return a /healthz sample as ``[seconds, ms, in flight]`` for the JSON file."""
    ms = sample["ms"]
    return [
        round(sample["t"], 3),
        None if ms is None else round(ms, 2),
        sample.get("in_flight"),
    ]


def _config_dict(config: BenchConfig) -> dict[str, Any]:
    """Return the config as JSON data."""
    return {
        name: list(value) if isinstance(value, tuple) else value
        for name, value in config.__dict__.items()
    }


def _now() -> str:
    """Return the current UTC time in ISO 8601, to the second."""
    now = datetime.datetime.now(datetime.UTC)
    return now.replace(microsecond=0).isoformat()
