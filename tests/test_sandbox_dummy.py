"""Tests of the dummy sandbox backend: in-memory containers and a fixed latency."""

from __future__ import annotations

import asyncio
import json
import time

import psutil
import pytest

from agent_v2.datasets import Instance
from agent_v2.errors import ConfigError, ContainerNotFound, InvalidContainerId
from agent_v2.sandbox import TIMEOUT_EXIT_CODE, DummyBackend

INSTANCE = Instance(dataset_name="load", instance_id="one")


async def test_create_gives_a_dummy_id() -> None:
    """create returns a fresh ``dummy-`` id that then exists."""
    backend = DummyBackend(0.0, known_only=True)

    first = await backend.create(INSTANCE)
    second = await backend.create(INSTANCE)

    assert first.startswith("dummy-") and first != second
    assert await backend.exists(first) and await backend.exists(second)


async def test_exec_prints_google_benchmark_json() -> None:
    """Every command succeeds and prints one benchmark with the configured time."""
    backend = DummyBackend(0.0, benchmark_time_ns=2500.0)

    result = await backend.exec("any-id", "./bench --benchmark_format=json", timeout=5)
    document = json.loads(result.stdout)

    assert result.ok and result.stderr == ""
    assert "context" in document
    [benchmark] = document["benchmarks"]
    assert benchmark["name"] == "BM_dummy"
    assert benchmark["run_type"] == "iteration"
    assert benchmark["iterations"] == 1
    assert benchmark["real_time"] == 2500.0
    assert benchmark["time_unit"] == "ns"


async def test_exec_waits_the_latency() -> None:
    """exec takes at least ``latency`` seconds."""
    backend = DummyBackend(0.2)

    started = time.monotonic()
    result = await backend.exec("c1", "true", timeout=5)

    assert time.monotonic() - started >= 0.19
    assert result.duration == 0.2


async def test_timeout_shorter_than_latency_times_out() -> None:
    """A timeout below the latency ends as a timed-out command."""
    backend = DummyBackend(30.0)

    result = await backend.exec("c1", "true", timeout=0.05)

    assert result.timed_out
    assert result.exit_code == TIMEOUT_EXIT_CODE


async def test_any_well_formed_id_exists_by_default() -> None:
    """Without known_only, ids made elsewhere count as existing."""
    backend = DummyBackend(0.0)

    assert await backend.exists("made-by-another-service")
    assert (await backend.exec("made-by-another-service", "true", timeout=5)).ok


async def test_known_only_accepts_only_created_ids() -> None:
    """With known_only, unknown and removed ids do not exist."""
    backend = DummyBackend(0.0, known_only=True)
    container_id = await backend.create(INSTANCE)

    assert not await backend.exists("made-elsewhere")
    with pytest.raises(ContainerNotFound, match="made-elsewhere"):
        await backend.exec("made-elsewhere", "true", timeout=5)

    await backend.remove(container_id)
    await backend.remove(container_id)
    assert not await backend.exists(container_id)


@pytest.mark.parametrize("container_id", ["../x", "/etc", "a\x00b", "", "a/b"])
async def test_invalid_ids_are_refused(container_id: str) -> None:
    """Malformed ids raise InvalidContainerId for every call."""
    backend = DummyBackend(0.0)

    with pytest.raises(InvalidContainerId):
        await backend.exists(container_id)
    with pytest.raises(InvalidContainerId):
        await backend.exec(container_id, "true", timeout=5)
    with pytest.raises(InvalidContainerId):
        await backend.remove(container_id)


async def test_many_concurrent_execs_start_no_process() -> None:
    """10,000 concurrent commands all succeed, and no process is started."""
    backend = DummyBackend(0.2)
    this = psutil.Process()
    children_before = len(this.children(recursive=True))

    results = await asyncio.gather(
        *(backend.exec(f"c{n}", "true", timeout=60) for n in range(10_000))
    )

    assert all(result.ok for result in results)
    assert len({id(result.stdout) for result in results}) == 1  # one shared string
    assert len(this.children(recursive=True)) == children_before


@pytest.mark.parametrize(
    ("latency", "time_ns"), [(-1.0, 1.0), (float("nan"), 1.0), (0.0, 0.0)]
)
def test_bad_settings_are_refused(latency: float, time_ns: float) -> None:
    """A negative or NaN latency, or a non-positive time, raise ConfigError."""
    with pytest.raises(ConfigError):
        DummyBackend(latency, benchmark_time_ns=time_ns)
