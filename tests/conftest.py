"""Shared fixtures: real evaluation servers on free loopback ports, and datasets.

``start_server`` is the one way tests run a server::

    async def test_x(start_server, memory_dataset):
        async with start_server(datasets=[memory_dataset()]) as url:
            ...  # url is "http://127.0.0.1:<free port>"

It builds :class:`~agent_v2.server.ServerSettings` with the dummy backend, a
store and a workdir under the test's ``tmp_path``, and any field you pass
overriding those defaults; leaving the block shuts the server down cleanly.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent_v2.datasets import Dataset, Instance
from agent_v2.server import ServerSettings, serve

ServerStarter = Callable[..., contextlib.AbstractAsyncContextManager[str]]
DatasetMaker = Callable[..., Dataset]


@pytest.fixture
def memory_dataset() -> DatasetMaker:
    """Return a maker of in-memory datasets for dummy-backend tests.

    ``memory_dataset(name="toy", instance_ids=("a", "b"), **fields)`` gives a
    dataset whose instances (split ``test``) have the commands in ``fields``
    (by default trivial ``true`` commands); no files are needed.
    """

    def make(
        name: str = "toy",
        instance_ids: tuple[str, ...] = ("a", "b"),
        **fields: Any,
    ) -> Dataset:
        commands = {
            "build_command": "true",
            "test_command": "true",
            "benchmark_command": "true",
        }
        commands.update(fields)
        instances = {
            ("test", instance_id): Instance(
                dataset_name=name, instance_id=instance_id, **commands
            )
            for instance_id in instance_ids
        }
        return Dataset(name=name, path=None, instances=instances)

    return make


@pytest.fixture
def server_settings(tmp_path: Path) -> Callable[..., ServerSettings]:
    """Return a maker of ServerSettings for a test server under ``tmp_path``.

    Defaults: loopback, a free port, the dummy backend with 0.05 s latency,
    ``cpu:2`` devices, a short shutdown grace; keyword arguments override.
    """
    counter = itertools.count()

    def make(**overrides: Any) -> ServerSettings:
        run = tmp_path / f"server-{next(counter)}"
        fields: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "backend": "dummy",
            "dummy_latency": 0.05,
            "devices": "cpu:2",
            "workdir": run / "work",
            "store_path": run / "store.sqlite3",
            "shutdown_grace": 0.5,
        }
        fields.update(overrides)
        return ServerSettings(**fields)

    return make


@pytest.fixture
def start_server(
    server_settings: Callable[..., ServerSettings],
) -> ServerStarter:
    """Return ``start_server(**settings)``: an async context manager yielding a URL.

    Pass ``settings=`` to reuse a ServerSettings (for example to restart on
    the same store); otherwise keywords go to the ``server_settings`` maker.
    """

    @contextlib.asynccontextmanager
    async def start(
        settings: ServerSettings | None = None, **overrides: Any
    ) -> AsyncIterator[str]:
        async with serve(settings or server_settings(**overrides)) as url:
            yield url

    return start


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """Return an aiohttp session for talking to test servers; closed afterwards."""
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        yield session
