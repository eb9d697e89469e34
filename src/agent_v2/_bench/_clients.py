"""The client variants a benchmark cell runs: the old ways of calling, and ours.

Each variant grades every container of a :class:`Job` and returns a
:class:`Tally`. The old ways (``a``-``c``) call the legacy
``POST /evaluate_v3`` with the body the old client sent; ours (``d``-``f``)
call :func:`agent_v2.eval_utils.evaluate_info`, which submits to the versioned
API through the loop's submitter (in batches) and waits through its waiter.

NOTE: third-party modules are imported inside the variants, and the worker
imports them (see :data:`IMPORTS`) before it starts the clock, so a child
process that runs the ``requests`` variants never loads aiohttp and its peak
RSS is the old client's own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = [
    "IMPORTS",
    "LEGACY_PATH",
    "OLD_CONNECTIONS",
    "OLD_PER_HOST",
    "OLD_TIMEOUT",
    "THREADS",
    "VARIANTS",
    "Job",
    "Tally",
    "import_for",
]

_T = TypeVar("_T")

LEGACY_PATH = "/evaluate_v3"
OLD_TIMEOUT = 3600.0
"""Total timeout of one call of the old client, in seconds."""

OLD_CONNECTIONS = 100
OLD_PER_HOST = 50
"""The old client's connection pool: 100 connections, at most 50 per host."""

THREADS = 8
"""Worker threads of the threaded variants (``b``, ``e``, ``f``)."""

MAX_ERRORS_KEPT = 5


@dataclasses.dataclass(frozen=True, kw_only=True)
class Job:
    """What one benchmark cell grades, and how many calls may run at once.

    ``concurrency`` None means every call starts at once (gathered);
    otherwise a semaphore lets at most that many run.
    """

    url: str
    dataset_name: str
    split: str
    instance_id: str
    containers: tuple[str, ...]
    concurrency: int | None = None


@dataclasses.dataclass(kw_only=True)
class Tally:
    """How the calls of one cell ended, plus what the client said about itself."""

    ok: int = 0
    failed: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)
    client_stats: dict[str, int] | None = None

    def add(self, success: bool, error: object) -> None:
        """Count one call; keep the first few errors for the report."""
        if success:
            self.ok += 1
            return
        self.failed += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(str(error))


# -- the old ways -----------------------------------------------------------


def _legacy_body(job: Job, container_id: str) -> dict[str, str]:
    """Return the body the old client posted to ``/evaluate_v3``."""
    return {
        "instance_id": job.instance_id,
        "container_id": container_id,
        "mode": "benchmark",
    }


def _requests_call(job: Job, container_id: str) -> tuple[bool, object]:
    """Make one blocking legacy call with ``requests``, as the old code did."""
    import requests

    try:
        response = requests.post(
            job.url + LEGACY_PATH,
            json=_legacy_body(job, container_id),
            timeout=OLD_TIMEOUT,
        )
        body = response.json()
    except (requests.RequestException, ValueError) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return bool(body.get("success")), body.get("error_detail") or body.get("error")


def blocking_requests_gathered(job: Job) -> Tally:
    """(a) A blocking ``requests`` call inside ``async def``, gathered."""

    async def one(container_id: str) -> tuple[bool, object]:
        return _requests_call(job, container_id)

    async def run() -> list[tuple[bool, object]]:
        return await _gather(job, (one(cid) for cid in job.containers))

    return _tally(asyncio.run(run()))


def requests_in_threads(job: Job) -> Tally:
    """(b) ``requests`` in a pool of 8 threads, each call in its own asyncio.run."""

    async def one(container_id: str) -> tuple[bool, object]:
        return _requests_call(job, container_id)

    def in_thread(container_id: str) -> tuple[bool, object]:
        return asyncio.run(one(container_id))

    return _tally(_thread_map(in_thread, job.containers))


def aiohttp_session_per_call(job: Job) -> Tally:
    """(c) aiohttp with a new session and connector per call (100, 50 per host)."""
    import aiohttp

    async def one(container_id: str) -> tuple[bool, object]:
        connector = aiohttp.TCPConnector(
            limit=OLD_CONNECTIONS, limit_per_host=OLD_PER_HOST
        )
        timeout = aiohttp.ClientTimeout(total=OLD_TIMEOUT)
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as http,
                http.post(
                    job.url + LEGACY_PATH, json=_legacy_body(job, container_id)
                ) as response,
            ):
                body = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return False, f"{type(exc).__name__}: {exc}"
        return bool(body.get("success")), body.get("error_detail") or body.get("error")

    async def run() -> list[tuple[bool, object]]:
        return await _gather(job, (one(cid) for cid in job.containers))

    return _tally(asyncio.run(run()))


def aiohttp_shared_session(job: Job) -> Tally:
    """(raw) One shared aiohttp session posting to ``/evaluate_v3``: the floor.

    Its pool has a connection for every call that may run at once, so the
    blocking legacy calls never queue for a connection.
    """
    import aiohttp

    async def run() -> list[tuple[bool, object]]:
        size = job.concurrency or len(job.containers)
        connector = aiohttp.TCPConnector(limit=size, limit_per_host=size)
        timeout = aiohttp.ClientTimeout(total=OLD_TIMEOUT)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

            async def one(container_id: str) -> tuple[bool, object]:
                body = _legacy_body(job, container_id)
                try:
                    async with http.post(job.url + LEGACY_PATH, json=body) as answer:
                        outcome = await answer.json()
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    return False, f"{type(exc).__name__}: {exc}"
                return bool(outcome.get("success")), outcome.get("error")

            return await _gather(job, (one(cid) for cid in job.containers))

    return _tally(asyncio.run(run()))


# -- ours ---------------------------------------------------------------------


async def _evaluate_one(job: Job, container_id: str) -> tuple[bool, object]:
    """Grade one container with our ``evaluate_info``."""
    from agent_v2.eval_utils import evaluate_info

    _, _, info = await evaluate_info(
        "Submitted",
        None,
        container_id,
        job.instance_id,
        job.dataset_name,
        job.split,
        job.url,
    )
    return bool(info["meta"]["success"]), info["meta"]["error"]


def ours_gathered(job: Job) -> Tally:
    """(d) Our ``evaluate_info``, gathered on one event loop."""

    async def run() -> list[tuple[bool, object]]:
        return await _gather(job, (_evaluate_one(job, cid) for cid in job.containers))

    return _with_stats(job, _tally(asyncio.run(run())))


def ours_threads_gathered(job: Job) -> Tally:
    """(e) Our ``evaluate_info`` from 8 threads, each asyncio.run over its share."""
    shares = [job.containers[index::THREADS] for index in range(THREADS)]

    async def run(share: tuple[str, ...]) -> list[tuple[bool, object]]:
        return await asyncio.gather(*(_evaluate_one(job, cid) for cid in share))

    def in_thread(share: tuple[str, ...]) -> list[tuple[bool, object]]:
        return asyncio.run(run(share)) if share else []

    results = _thread_map(in_thread, shares)
    return _with_stats(job, _tally(pair for share in results for pair in share))


def ours_threads_per_call(job: Job) -> Tally:
    """(f) Our ``evaluate_info`` from 8 threads, one asyncio.run per call."""

    def in_thread(container_id: str) -> tuple[bool, object]:
        return asyncio.run(_evaluate_one(job, container_id))

    return _with_stats(job, _tally(_thread_map(in_thread, job.containers)))


VARIANTS: dict[str, Callable[[Job], Tally]] = {
    "a": blocking_requests_gathered,
    "b": requests_in_threads,
    "c": aiohttp_session_per_call,
    "d": ours_gathered,
    "e": ours_threads_gathered,
    "f": ours_threads_per_call,
    "raw": aiohttp_shared_session,
}
"""Every variant by its key; see each function for what it does."""

IMPORTS: dict[str, tuple[str, ...]] = {
    "a": ("requests",),
    "b": ("requests",),
    "c": ("aiohttp",),
    "raw": ("aiohttp",),
    "d": ("agent_v2.eval_utils",),
    "e": ("agent_v2.eval_utils",),
    "f": ("agent_v2.eval_utils",),
}
"""The modules a variant needs, imported before its clock starts."""


def import_for(variant: str) -> None:
    """Import what ``variant`` needs and set our client to its default config."""
    for module in IMPORTS[variant]:
        importlib.import_module(module)
    if variant in ("d", "e", "f"):
        from agent_v2.client import ClientConfig
        from agent_v2.eval_utils import configure

        # NOTE: defaults, not the environment: AGENT_V2_* variables left in
        # the shell must not change what the benchmark measures.
        configure(ClientConfig())


# -- helpers ------------------------------------------------------------------


async def _gather(
    job: Job, calls: Iterable[Awaitable[tuple[bool, object]]]
) -> list[tuple[bool, object]]:
    """Await every call at once, or at most ``job.concurrency`` at a time."""
    if job.concurrency is None:
        return await asyncio.gather(*calls)
    slots = asyncio.Semaphore(job.concurrency)

    async def bounded(call: Awaitable[tuple[bool, object]]) -> tuple[bool, object]:
        async with slots:
            return await call

    return await asyncio.gather(*(bounded(call) for call in calls))


def _thread_map(function: Callable[[Any], _T], items: Iterable[Any]) -> list[_T]:
    """Run ``function`` over ``items`` in a pool of :data:`THREADS` threads."""
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        return list(pool.map(function, items))


def _tally(results: Iterable[tuple[bool, object]]) -> Tally:
    """Count successes and failures."""
    tally = Tally()
    for success, error in results:
        tally.add(success, error)
    return tally


def _with_stats(job: Job, tally: Tally) -> Tally:
    """Attach our client's own statistics to the tally."""
    from agent_v2.eval_utils import default_client

    stats = default_client(job.url).stats()
    tally.client_stats = dataclasses.asdict(stats)
    return tally
