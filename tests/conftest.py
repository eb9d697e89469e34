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
import json
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


# -- a small C instance on disk, graded for real by the local backend --------

SLOW_KERNEL = """\
#include "kernel.h"
long long sum_squares(const int *values, int n) {
    long long total = 0;
    for (int repeat = 0; repeat < 16; repeat++) { /* wasted work to remove */
        total = 0;
        for (int i = 0; i < n; i++) total += (long long)values[i] * values[i];
    }
    return total;
}
"""

FAST_KERNEL = """\
#include "kernel.h"
long long sum_squares(const int *values, int n) {
    long long total = 0;
    for (int i = 0; i < n; i++) total += (long long)values[i] * values[i];
    return total;
}
"""

_C_FILES = {
    "kernel.h": "long long sum_squares(const int *values, int n);\n",
    "kernel.c": SLOW_KERNEL,
    "test_main.c": """\
#include <stdio.h>
#include "kernel.h"
int main(void) {
    int values[] = {1, 2, 3, 4};
    long long got = sum_squares(values, 4);
    if (got != 30) { printf("FAIL: sum_squares = %lld, want 30\\n", got); return 1; }
    printf("ok\\n");
    return 0;
}
""",
    "bench.c": """\
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "kernel.h"
#define N 100000
#define ITERATIONS 20
int main(void) {
    static int values[N];
    for (int i = 0; i < N; i++) values[i] = i % 97;
    struct timespec start, end;
    volatile long long sink = 0;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (int k = 0; k < ITERATIONS; k++) sink += sum_squares(values, N);
    clock_gettime(CLOCK_MONOTONIC, &end);
    double ns = ((end.tv_sec - start.tv_sec) * 1e9 + (end.tv_nsec - start.tv_nsec))
        / ITERATIONS;
    printf("{\\"benchmarks\\": [{\\"name\\": \\"BM_sum_squares\\", "
           "\\"run_type\\": \\"iteration\\", \\"iterations\\": %d, "
           "\\"real_time\\": %f, \\"cpu_time\\": %f, \\"time_unit\\": \\"ns\\"}]}\\n",
           ITERATIONS, ns, ns);
    return (int)(sink & 0);
}
""",
}


@pytest.fixture
def c_dataset(tmp_path: Path) -> Path:
    """Write a one-instance C dataset and return its dataset file.

    Instance ``sum_squares`` (split ``test``): ``kernel.c`` is 16 times slower
    than it needs to be (``FAST_KERNEL`` is the fix); ``test_main.c`` and
    ``bench.c`` are protected; the benchmark prints Google Benchmark JSON.
    Built at ``-O0`` so the compiler cannot remove the wasted work. Serve it
    with ``datasets=[f"csum={c_dataset}"]``.
    """
    root = tmp_path / "c-dataset"
    repo = root / "repos" / "sum_squares"
    repo.mkdir(parents=True)
    for name, text in _C_FILES.items():
        (repo / name).write_text(text)
    manifest = {
        "defaults": {
            "repo_path": "repos/{instance_id}",
            "build_command": "cc -O0 -o test_main test_main.c kernel.c "
            "&& cc -O0 -o bench bench.c kernel.c",
            "test_command": "./test_main",
            "benchmark_command": "./bench",
            "protected_files": ["test_main.c", "bench.c", "kernel.h"],
        },
        "instances": [{"instance_id": "sum_squares"}],
    }
    path = root / "dataset.json"
    path.write_text(json.dumps(manifest, indent=2))
    return path
