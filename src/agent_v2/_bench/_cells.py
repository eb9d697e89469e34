"""One cell of a table: a client variant run in child processes, repeated, summed up."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from agent_v2._bench._clients import THREADS, Job
from agent_v2._bench._server import BenchError, ServerProcess

__all__ = [
    "Cell",
    "predicted_seconds",
    "run_cell",
    "run_interleaved",
    "run_worker",
    "skipped_cell",
]

logger = logging.getLogger(__name__)

WORKER_MODULE = "agent_v2._bench._worker"
WORKER_SLACK = 120.0
"""Seconds a client child gets beyond twice its predicted time before it is killed."""

_STDERR_TAIL = 2000

_MEDIAN_FIELDS = (
    "wall_s",
    "cpu_s",
    "server_cpu_s",
    "commands_cpu_s",
    "peak_rss_mib",
    "rss_ready_mib",
    "connections",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Cell:
    """Where and how to run one variant: the server, the job, the bounds."""

    variant: str
    job: Job
    server: ServerProcess
    scratch: Path
    predicted: float
    repeats: int
    cheap_seconds: float


def predicted_seconds(variant: str, count: int, latency: float) -> float:
    """Return the wall time a variant needs at best: serial, 8 threads, or at once."""
    if variant == "a":
        return count * latency
    if variant in ("b", "f"):
        return math.ceil(count / THREADS) * latency
    return latency


async def run_cell(cell: Cell) -> dict[str, Any]:
    """Run a cell up to ``repeats`` times; return the runs and their medians.

    Only cheap cells are repeated: once a run takes ``cheap_seconds`` or
    more, the first run stands alone. A run that crashes or overruns its
    bound ends the cell; without any finished run the cell reports why.
    """
    (summary,) = await run_interleaved([cell])
    return summary


async def run_interleaved(cells: list[Cell]) -> list[dict[str, Any]]:
    """Run the cells' repeats round-robin; return one summary per cell.

    Interleaving spreads a change in the machine's load over every cell
    instead of letting it fall on whichever ran last.
    """
    runs: list[list[dict[str, Any]]] = [[] for _ in cells]
    failures: list[str | None] = [None for _ in cells]
    done = [False for _ in cells]
    for index in range(max(cell.repeats for cell in cells)):
        for position, cell in enumerate(cells):
            if done[position] or index >= cell.repeats:
                continue
            try:
                run = await run_worker(cell, index)
            except BenchError as exc:
                logger.warning("variant %s failed: %s", cell.variant, exc)
                failures[position] = f"failed: {str(exc).splitlines()[0]}"
                done[position] = True
                continue
            _log_run(cell, index, run)
            runs[position].append(run)
            done[position] = run["wall_s"] >= cell.cheap_seconds

    return [
        _summary(cell, cell_runs)
        if cell_runs
        else skipped_cell(cell.variant, len(cell.job.containers), failure or "")
        for cell, cell_runs, failure in zip(cells, runs, failures, strict=True)
    ]


def _log_run(cell: Cell, index: int, run: dict[str, Any]) -> None:
    """Log one finished run of a cell."""
    logger.info(
        "variant %s, N=%d, run %d: %.3f s wall, %d ok, %d failed",
        cell.variant,
        len(cell.job.containers),
        index + 1,
        run["wall_s"],
        run["ok"],
        run["failed"],
    )


async def run_worker(cell: Cell, index: int) -> dict[str, Any]:
    """Run the cell's client once in a child process; return its figures."""
    stem = f"{cell.variant}-{len(cell.job.containers)}-{index}"
    spec_path = cell.scratch / f"{stem}.spec.json"
    out_path = cell.scratch / f"{stem}.out.json"
    spec = {"variant": cell.variant, "port": cell.server.port}
    spec["job"] = _job_dict(cell.job)
    await asyncio.to_thread(spec_path.write_text, json.dumps(spec))
    server_cpu = await asyncio.to_thread(cell.server.cpu_seconds)

    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        WORKER_MODULE,
        str(spec_path),
        str(out_path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    limit = 2 * cell.predicted + WORKER_SLACK
    try:
        async with asyncio.timeout(limit):
            _, stderr = await process.communicate()
    except TimeoutError:
        raise BenchError(
            f"client variant {cell.variant} with N={len(cell.job.containers)} "
            f"ran past its {limit:g} s bound and was killed"
        ) from None
    finally:
        if process.returncode is None:  # timed out, or the benchmark stops
            process.kill()
            await process.wait()

    if process.returncode != 0:
        tail = stderr.decode(errors="replace")[-_STDERR_TAIL:]
        raise BenchError(
            f"client variant {cell.variant} exited with code "
            f"{process.returncode}:\n{tail}"
        )
    figures: dict[str, Any] = json.loads(await asyncio.to_thread(out_path.read_text))
    # NOTE: the server's CPU seconds while this client ran, from its start
    # (interpreter and imports, a second at most) to its end; nothing else
    # talks to the server meanwhile, except /healthz during the load runs.
    server_after = await asyncio.to_thread(cell.server.cpu_seconds)
    own = commands = None
    if server_cpu is not None and server_after is not None:
        own = server_after[0] - server_cpu[0]
        commands = server_after[1] - server_cpu[1]
    figures["server_cpu_s"] = own
    figures["commands_cpu_s"] = commands
    return figures


def _job_dict(job: Job) -> dict[str, Any]:
    """Return the job as JSON-ready values."""
    fields = dataclasses.asdict(job)
    fields["containers"] = list(job.containers)
    return fields


def _summary(cell: Cell, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the medians of the runs, their count, and the runs themselves."""
    summary: dict[str, Any] = {
        "variant": cell.variant,
        "n": len(cell.job.containers),
        "repeats": len(runs),
        "ok": sum(run["ok"] for run in runs),
        "failed": sum(run["failed"] for run in runs),
        "errors": [error for run in runs for error in run["errors"]][:5],
        "skipped": None,
    }
    for name in _MEDIAN_FIELDS:
        values = [run[name] for run in runs if run[name] is not None]
        summary[name] = statistics.median(values) if values else None
    summary["runs"] = runs
    return summary


def skipped_cell(variant: str, count: int, reason: str) -> dict[str, Any]:
    """Return the summary of a cell that was not run, with the reason."""
    return {"variant": variant, "n": count, "repeats": 0, "skipped": reason}
