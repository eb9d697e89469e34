"""Tests of device specs and the device pool's leases."""

from __future__ import annotations

import asyncio
import os

import pytest

from agent_v2.errors import ConfigError
from agent_v2.server import DevicePool, parse_devices
from agent_v2.server._devices import DeviceTimeout, default_devices_spec

CORES = sorted(os.sched_getaffinity(0))


def test_gpu_spec_gives_one_lease_per_id_with_visible_devices_env() -> None:
    """gpu:0,2 leases GPUs 0 and 2 and sets CUDA/HIP_VISIBLE_DEVICES for each."""
    leases = parse_devices("gpu:0,2")

    assert [lease.name for lease in leases] == ["gpu:0", "gpu:2"]
    assert [lease.gpu_id for lease in leases] == [0, 2]
    assert leases[1].env == {"CUDA_VISIBLE_DEVICES": "2", "HIP_VISIBLE_DEVICES": "2"}
    assert all(lease.kind == "gpu" and lease.cpus is None for lease in leases)


@pytest.mark.parametrize("slots", list(range(1, len(CORES) + 1)))
def test_cpu_slots_within_the_cores_get_disjoint_equal_core_sets(slots: int) -> None:
    """cpu:N with N <= cores pins each slot to its own cores, all slots alike."""
    leases = parse_devices(f"cpu:{slots}")

    sets = [lease.cpus for lease in leases]
    assert all(s is not None and len(s) == len(CORES) // slots for s in sets)
    union = set().union(*(s for s in sets if s is not None))
    assert len(union) == sum(len(s) for s in sets if s is not None)
    assert union <= set(CORES)
    assert all(lease.gpu_id is None and not lease.env for lease in leases)


def test_more_cpu_slots_than_cores_are_unpinned() -> None:
    """cpu:N with N > cores gives N slots that are not pinned."""
    leases = parse_devices(f"cpu:{len(CORES) + 1}")

    assert len(leases) == len(CORES) + 1
    assert all(lease.cpus is None for lease in leases)


def test_default_spec_is_one_slot_per_core() -> None:
    """The default devices are cpu:<usable cores>."""
    assert default_devices_spec() == f"cpu:{len(CORES)}"


@pytest.mark.parametrize(
    "spec",
    ["", "gpu", "gpu:", "gpu:a", "gpu:0,0", "gpu:-1", "cpu:0", "cpu:x", "tpu:1", "1"],
)
def test_bad_specs_raise_config_error_naming_the_spec(spec: str) -> None:
    """Every malformed spec fails with a message that quotes it."""
    with pytest.raises(ConfigError, match=repr(spec).replace("\\", "\\\\")):
        parse_devices(spec)


async def test_waiters_get_devices_first_come_first_served() -> None:
    """Released devices go to waiters in the order they started waiting."""
    pool = DevicePool(parse_devices("cpu:1"))
    held = await pool.acquire()
    order: list[int] = []

    async def wait(i: int) -> None:
        lease = await pool.acquire()
        order.append(i)
        await asyncio.sleep(0)
        pool.release(lease)

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(wait(i)))
        await asyncio.sleep(0)  # let it join the queue before the next one
    assert pool.waiting == 5
    pool.release(held)
    await asyncio.gather(*tasks)

    assert order == [0, 1, 2, 3, 4]
    assert pool.free == 1 and pool.waiting == 0


async def test_acquire_times_out_at_the_deadline() -> None:
    """With every device held, acquire raises DeviceTimeout at its deadline."""
    pool = DevicePool(parse_devices("cpu:1"))
    held = await pool.acquire()
    loop = asyncio.get_running_loop()

    with pytest.raises(DeviceTimeout):
        await pool.acquire(deadline=loop.time() + 0.05)
    with pytest.raises(DeviceTimeout):
        await pool.acquire(deadline=loop.time() - 1)

    pool.release(held)
    assert (await pool.acquire(deadline=loop.time())) == held


async def test_a_waiter_that_gives_up_never_swallows_a_device() -> None:
    """Cancelled and timed-out waiters are skipped; the lease reaches the next one."""
    pool = DevicePool(parse_devices("cpu:1"))
    held = await pool.acquire()
    loop = asyncio.get_running_loop()

    cancelled = asyncio.create_task(pool.acquire())
    timed_out = asyncio.create_task(pool.acquire(deadline=loop.time() + 0.01))
    patient = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0.05)
    cancelled.cancel()
    await asyncio.gather(cancelled, timed_out, return_exceptions=True)

    pool.release(held)
    assert await patient == held
    assert pool.in_use == 1


async def test_a_lease_handed_to_a_waiter_cancelled_in_the_same_step_returns() -> None:
    """A waiter cancelled right after a release handed it a device gives it back."""
    pool = DevicePool(parse_devices("cpu:1"))
    held = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)

    pool.release(held)  # resolves the waiter's future ...
    waiter.cancel()  # ... but the waiter is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter

    assert pool.free == 1
