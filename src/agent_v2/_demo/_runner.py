"""The demo: an embedded server, and scripted agents grading every variant at once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from agent_v2._demo._agent import AgentResult, Phase, run_agent
from agent_v2._demo._variants import (
    BUNDLED_VARIANTS,
    DEMO_DATASET,
    Variant,
    load_variants,
    select_variants,
)
from agent_v2._runs import EmbeddedOptions, embedded_server
from agent_v2.client import EvalClient
from agent_v2.datasets import bundled_dataset_path
from agent_v2.errors import ClientError, ConfigError
from agent_v2.protocol import Health

__all__ = [
    "DemoObserver",
    "DemoOptions",
    "DemoReport",
    "missing_toolchain",
    "run_demo",
]

logger = logging.getLogger(__name__)

HEALTH_INTERVAL = 0.5  # seconds between looks at the server's queue
_INCLUDE_DIRS = (Path("/usr/include"), Path("/usr/local/include"))
_HEADERS = (
    ("gtest/gtest.h", "libgtest-dev"),
    ("benchmark/benchmark.h", "libbenchmark-dev"),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoOptions:
    """What the demo grades and how.

    ``instances`` and ``variants`` None mean all of the variants file.
    ``concurrency`` bounds the agents at work at once (None: all of them).
    ``devices`` None gives each evaluation its own core(s). With
    ``keep_workdir`` the server's folder and the agents' containers stay.
    """

    instances: Sequence[str] | None = None
    variants: Sequence[str] | None = None
    concurrency: int | None = None
    devices: str | None = None
    keep_workdir: bool = False
    variants_file: Path = BUNDLED_VARIANTS

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, got {self.concurrency}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoReport:
    """Every agent's result, in the order of the variants file."""

    results: list[AgentResult]
    wall_seconds: float
    devices: str
    kept_folder: Path | None = None

    @property
    def unexpected(self) -> list[AgentResult]:
        """Return the results that are not what their variant must get."""
        return [result for result in self.results if not result.as_expected]

    @property
    def evaluation_seconds(self) -> float:
        """Return the sum of the evaluations' own times."""
        return sum(result.seconds or 0.0 for result in self.results)

    @property
    def mean_reward(self) -> float:
        """Return the mean reward over every agent."""
        return sum(r.reward for r in self.results) / max(1, len(self.results))

    @property
    def exit_code(self) -> int:
        """Return 0 when every outcome is as expected, else 1."""
        return 1 if self.unexpected else 0


class DemoObserver(Protocol):
    """What a live display is told while the demo runs."""

    def started(self, variants: Sequence[Variant], devices: str) -> None:
        """The server is up and the agents are about to start."""

    def phase(self, variant: Variant, phase: Phase) -> None:
        """An agent moved on."""

    def server(self, health: Health) -> None:
        """The server's queue and devices, as last seen."""

    def finished(self, result: AgentResult) -> None:
        """An agent got its outcome."""


def missing_toolchain() -> list[str]:
    """Return what the demo's C++ builds need and this machine lacks."""
    missing = [tool for tool in ("git", "cmake", "g++") if shutil.which(tool) is None]
    for header, package in _HEADERS:
        if not any((folder / header).is_file() for folder in _INCLUDE_DIRS):
            missing.append(package)
    return missing


async def run_demo(
    options: DemoOptions, observer: DemoObserver | None = None
) -> DemoReport:
    """Serve the demo dataset, run one agent per variant, return what they got."""
    variants = await asyncio.to_thread(load_variants, options.variants_file)
    chosen = select_variants(variants, options.instances, options.variants)
    missing = await asyncio.to_thread(missing_toolchain)
    if missing:
        raise ConfigError(
            f"the demo builds C++ kernels and needs {', '.join(missing)}; "
            "run scripts/setup.sh demo to install them"
        )

    embedded = EmbeddedOptions(
        datasets=[f"{DEMO_DATASET}={bundled_dataset_path(DEMO_DATASET)}"],
        devices=options.devices,
        keep=options.keep_workdir,
    )
    started = time.monotonic()
    async with embedded_server(embedded) as server, EvalClient(server.url) as client:
        if observer is not None:
            observer.started(chosen, server.settings.devices)
        watcher = asyncio.create_task(_watch_server(client, observer))
        try:
            results = await _run_agents(client, chosen, options, observer)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    return DemoReport(
        results=results,
        wall_seconds=time.monotonic() - started,
        devices=server.settings.devices,
        kept_folder=server.folder if options.keep_workdir else None,
    )


async def _run_agents(
    client: EvalClient,
    variants: Sequence[Variant],
    options: DemoOptions,
    observer: DemoObserver | None,
) -> list[AgentResult]:
    """Run one agent per variant, at most ``options.concurrency`` at once."""
    slots = asyncio.Semaphore(options.concurrency or len(variants))
    on_phase = observer.phase if observer is not None else None

    async def one(variant: Variant) -> AgentResult:
        if on_phase is not None:
            on_phase(variant, Phase.WAITING)
        async with slots:
            result = await run_agent(
                client,
                variant,
                keep_container=options.keep_workdir,
                on_phase=on_phase,
            )
        if observer is not None:
            observer.phase(variant, Phase.DONE)
            observer.finished(result)
        return result

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(variant)) for variant in variants]
    return [task.result() for task in tasks]


async def _watch_server(client: EvalClient, observer: DemoObserver | None) -> None:
    """Tell the observer the server's queue and devices until cancelled."""
    if observer is None:
        return
    while True:
        try:
            observer.server(await client.health())
        except ClientError as exc:
            logger.debug("cannot read the server's health: %s", exc)
        await asyncio.sleep(HEALTH_INTERVAL)
