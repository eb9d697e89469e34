"""The dummy sandbox backend: no processes and no files, only a fixed latency."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import uuid
from collections.abc import Mapping

from agent_v2.datasets import Instance
from agent_v2.errors import ConfigError, ContainerNotFound
from agent_v2.sandbox._base import TIMEOUT_EXIT_CODE, CommandResult, SandboxBackend
from agent_v2.sandbox._ids import validate_container_id

__all__ = ["DEFAULT_BENCHMARK_TIME_NS", "DUMMY_BENCHMARK_NAME", "DummyBackend"]

logger = logging.getLogger(__name__)

DEFAULT_BENCHMARK_TIME_NS = 1_000_000.0
"""Time, in nanoseconds, the dummy benchmark reports unless told otherwise."""

DUMMY_BENCHMARK_NAME = "BM_dummy"


class DummyBackend(SandboxBackend):
    """Containers that live in memory; every command succeeds after ``latency``.

    Made for load tests of clients and of the server's protocol and scheduler,
    where starting real processes would measure process start-up instead.
    Every command prints the same Google Benchmark JSON document, so a
    benchmark command reports ``benchmark_time_ns`` and a speedup of 1.0.

    With ``known_only=False`` any well-formed container id exists (load tests
    submit ids made elsewhere); with ``True`` only ids :meth:`create` returned.
    """

    kind = "dummy"

    def __init__(
        self,
        latency: float,
        *,
        benchmark_time_ns: float = DEFAULT_BENCHMARK_TIME_NS,
        known_only: bool = False,
    ) -> None:
        if not (latency >= 0 and math.isfinite(latency)):
            raise ConfigError(
                f"dummy latency must be a finite number of seconds >= 0, "
                f"got {latency!r}"
            )
        if not (benchmark_time_ns > 0 and math.isfinite(benchmark_time_ns)):
            raise ConfigError(
                f"benchmark_time_ns must be a finite number > 0, "
                f"got {benchmark_time_ns!r}"
            )
        self.latency = latency
        self.benchmark_time_ns = benchmark_time_ns
        self.known_only = known_only
        self._containers: set[str] = set()
        # NOTE: built once; each exec only hands out this same string.
        self._stdout = _benchmark_json(benchmark_time_ns)

    def __repr__(self) -> str:
        return (
            f"DummyBackend(latency={self.latency!r}, "
            f"benchmark_time_ns={self.benchmark_time_ns!r}, "
            f"known_only={self.known_only!r})"
        )

    async def create(self, instance: Instance) -> str:
        """Note a new container in memory and return its id."""
        container_id = f"dummy-{uuid.uuid4().hex}"
        self._containers.add(container_id)
        logger.debug("created container %s for %s", container_id, instance.key)
        return container_id

    async def exists(self, container_id: str) -> bool:
        """Return whether the container counts as existing."""
        validate_container_id(container_id)
        return not self.known_only or container_id in self._containers

    async def exec(
        self,
        container_id: str,
        command: str,
        *,
        timeout: float,  # noqa: ASYNC109 - the interface takes a timeout
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        cpus: frozenset[int] | None = None,
    ) -> CommandResult:
        """Wait ``latency`` seconds, then succeed with the benchmark document."""
        if not await self.exists(container_id):
            raise ContainerNotFound(
                f"no dummy container {container_id!r}; create one first"
            )

        if timeout < self.latency:
            await asyncio.sleep(timeout)
            return CommandResult(
                exit_code=TIMEOUT_EXIT_CODE,
                stdout="",
                stderr="",
                timed_out=True,
                duration=timeout,
            )

        await asyncio.sleep(self.latency)
        return CommandResult(
            exit_code=0, stdout=self._stdout, stderr="", duration=self.latency
        )

    async def remove(self, container_id: str) -> None:
        """Forget the container; unknown ids are ignored."""
        validate_container_id(container_id)
        self._containers.discard(container_id)


def _benchmark_json(time_ns: float) -> str:
    """Return what ``--benchmark_format=json`` prints for one benchmark."""
    document = {
        "context": {
            "date": "1970-01-01T00:00:00+00:00",
            "host_name": "dummy",
            "executable": "dummy",
            "num_cpus": 1,
            "mhz_per_cpu": 0,
            "cpu_scaling_enabled": False,
            "caches": [],
            "load_avg": [],
            "library_build_type": "release",
        },
        "benchmarks": [
            {
                "name": DUMMY_BENCHMARK_NAME,
                "run_name": DUMMY_BENCHMARK_NAME,
                "run_type": "iteration",
                "repetitions": 1,
                "repetition_index": 0,
                "threads": 1,
                "iterations": 1,
                "real_time": time_ns,
                "cpu_time": time_ns,
                "time_unit": "ns",
            }
        ],
    }
    return json.dumps(document, indent=2) + "\n"
