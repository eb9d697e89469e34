"""The device pool: GPUs or CPU slots, leased first come, first served."""

from __future__ import annotations

import asyncio
import collections
import os

from agent_v2._devices import DeviceLease
from agent_v2.errors import ConfigError

__all__ = ["DevicePool", "DeviceTimeout", "default_devices_spec", "parse_devices"]


class DeviceTimeout(TimeoutError):
    """No device became free before the acquire deadline."""


def available_cores() -> list[int]:
    """Return the CPU cores this process may run on, sorted."""
    return sorted(os.sched_getaffinity(0))


def default_devices_spec() -> str:
    """Return ``cpu:<cores>``: one slot pinned to each core this process may use."""
    return f"cpu:{len(available_cores())}"


def parse_devices(spec: str) -> list[DeviceLease]:
    """Turn ``gpu:0,1,2,3`` or ``cpu:N`` into the leases of a pool.

    ``cpu:N`` with N no greater than the usable cores gives each slot its own
    disjoint set of ``cores // N`` cores; with more slots than cores the slots
    are not pinned.
    """
    kind, sep, rest = spec.strip().partition(":")
    if not sep or kind not in ("gpu", "cpu") or not rest.strip():
        raise ConfigError(
            f"device spec {spec!r} is not valid: use 'gpu:0,1,...' (GPU ids) "
            "or 'cpu:N' (N slots)"
        )
    if kind == "gpu":
        return _parse_gpus(spec, rest)
    return _parse_cpus(spec, rest)


def _parse_gpus(spec: str, rest: str) -> list[DeviceLease]:
    """Return one lease per GPU id of a ``gpu:`` spec."""
    try:
        ids = [int(part) for part in rest.split(",")]
    except ValueError:
        raise ConfigError(
            f"device spec {spec!r}: GPU ids must be integers separated by commas"
        ) from None
    if any(gpu_id < 0 for gpu_id in ids) or len(set(ids)) != len(ids):
        raise ConfigError(
            f"device spec {spec!r}: GPU ids must be distinct and not negative"
        )

    leases = []
    for gpu_id in ids:
        env = {"CUDA_VISIBLE_DEVICES": str(gpu_id), "HIP_VISIBLE_DEVICES": str(gpu_id)}
        leases.append(
            DeviceLease(kind="gpu", name=f"gpu:{gpu_id}", gpu_id=gpu_id, env=env)
        )
    return leases


def _parse_cpus(spec: str, rest: str) -> list[DeviceLease]:
    """Return the slots of a ``cpu:N`` spec, pinned when there are cores enough."""
    try:
        slots = int(rest)
    except ValueError:
        raise ConfigError(
            f"device spec {spec!r}: the number of CPU slots must be an integer"
        ) from None
    if slots < 1:
        raise ConfigError(f"device spec {spec!r}: at least one CPU slot is needed")

    # NOTE: every slot gets the same number of cores, leaving the remainder
    # idle, so that benchmarks measured on any slot compare with the baseline.
    cores = available_cores()
    if slots > len(cores):
        return [DeviceLease(kind="cpu", name=f"cpu:{i}") for i in range(slots)]
    per_slot = len(cores) // slots
    return [
        DeviceLease(
            kind="cpu",
            name=f"cpu:{i}",
            cpus=frozenset(cores[i * per_slot : (i + 1) * per_slot]),
        )
        for i in range(slots)
    ]


class DevicePool:
    """Hands out leases to waiters in the order they asked.

    A released lease goes straight to the oldest waiter, so a newcomer can
    never overtake someone already waiting.
    """

    def __init__(self, leases: list[DeviceLease]) -> None:
        if not leases:
            raise ConfigError("a device pool needs at least one device")
        self._leases = tuple(leases)
        self._free: collections.deque[DeviceLease] = collections.deque(leases)
        self._waiters: collections.deque[asyncio.Future[DeviceLease]] = (
            collections.deque()
        )
        self._waiting = 0

    @classmethod
    def from_spec(cls, spec: str) -> DevicePool:
        """Build a pool from a ``--devices`` spec."""
        return cls(parse_devices(spec))

    @property
    def leases(self) -> tuple[DeviceLease, ...]:
        """Return every lease of the pool, free or not."""
        return self._leases

    @property
    def total(self) -> int:
        """Return how many devices the pool has."""
        return len(self._leases)

    @property
    def free(self) -> int:
        """Return how many devices nobody holds."""
        return len(self._free)

    @property
    def in_use(self) -> int:
        """Return how many devices are leased."""
        return self.total - self.free

    @property
    def waiting(self) -> int:
        """Return how many callers wait for a device."""
        return self._waiting

    async def acquire(self, *, deadline: float | None = None) -> DeviceLease:
        """Return a lease once one is free.

        ``deadline`` is in the event loop's clock (``loop.time()``); past it,
        DeviceTimeout is raised. None waits for ever.
        """
        if self._free and not self._waiting:
            return self._free.popleft()
        loop = asyncio.get_running_loop()
        if deadline is not None and deadline <= loop.time():
            raise DeviceTimeout("no device is free and the deadline has passed")

        future: asyncio.Future[DeviceLease] = loop.create_future()
        self._waiters.append(future)
        self._waiting += 1
        try:
            async with asyncio.timeout_at(deadline):
                return await future
        except TimeoutError:
            self._give_back(future)
            raise DeviceTimeout("no device became free before the deadline") from None
        except BaseException:
            self._give_back(future)
            raise
        finally:
            self._waiting -= 1

    def release(self, lease: DeviceLease) -> None:
        """Give a lease back: to the oldest live waiter, or to the free list."""
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(lease)
                return
        self._free.append(lease)

    def _give_back(self, future: asyncio.Future[DeviceLease]) -> None:
        """Release a lease that reached a waiter who stopped waiting for it."""
        # NOTE: a cancelled waiter stays in the deque and release() skips it;
        # removing it here would cost O(waiters) per timeout with many waiting.
        if future.done() and not future.cancelled():
            self.release(future.result())
        else:
            future.cancel()
