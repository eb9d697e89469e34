"""Tests of the container routes on a real server with the local backend."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp


async def _create(http: aiohttp.ClientSession, url: str) -> str:
    body = {"instance_id": "sum_squares", "dataset_name": "csum"}
    async with http.post(f"{url}/v1/containers", json=body) as response:
        assert response.status == 201, await response.text()
        created = await response.json()
    assert created["split"] == "test" and created["instance_id"] == "sum_squares"
    container_id: str = created["container_id"]
    return container_id


async def _exec(
    http: aiohttp.ClientSession, url: str, container_id: str, **body: Any
) -> dict[str, Any]:
    key = body.pop("key", None)
    headers = {"Idempotency-Key": key} if key else {}
    async with http.post(
        f"{url}/v1/containers/{container_id}/exec", json=body, headers=headers
    ) as response:
        assert response.status == 200, await response.text()
        result: dict[str, Any] = await response.json()
        return result


async def test_container_lifecycle_create_exec_remove(
    start_server: Any, c_dataset: Path, http: aiohttp.ClientSession
) -> None:
    """A created container holds the files; exec runs in it; DELETE ends it."""
    async with start_server(datasets=[f"csum={c_dataset}"], backend="local") as url:
        container_id = await _create(http, url)

        listing = await _exec(http, url, container_id, command="ls")
        assert listing["exit_code"] == 0 and listing["timed_out"] is False
        assert "kernel.c" in listing["stdout"].split()

        echoed = await _exec(http, url, container_id, command="cat", stdin="hi there")
        assert echoed["stdout"] == "hi there"
        failed = await _exec(http, url, container_id, command="echo no >&2; exit 3")
        assert (failed["exit_code"], failed["stderr"]) == (3, "no\n")
        slow = await _exec(http, url, container_id, command="sleep 30", timeout=0.5)
        assert slow["timed_out"] is True

        async with http.delete(f"{url}/v1/containers/{container_id}") as response:
            assert response.status == 204
        async with http.post(
            f"{url}/v1/containers/{container_id}/exec", json={"command": "ls"}
        ) as response:
            assert response.status == 404
            assert (await response.json())["error"] == "container_not_found"
        async with http.delete(f"{url}/v1/containers/{container_id}") as response:
            assert response.status == 204  # removing twice is fine


async def test_exec_with_a_repeated_key_runs_the_command_once(
    start_server: Any, c_dataset: Path, http: aiohttp.ClientSession
) -> None:
    """Sequential and concurrent execs with one key run once, with one result."""
    async with start_server(datasets=[f"csum={c_dataset}"], backend="local") as url:
        container_id = await _create(http, url)
        command = "echo run >> runs.txt; sleep 0.3; wc -l < runs.txt"

        results = await asyncio.gather(
            *(
                _exec(http, url, container_id, command=command, key="k1")
                for _ in range(5)
            )
        )
        again = await _exec(http, url, container_id, command=command, key="k1")
        other = await _exec(http, url, container_id, command=command, key="k2")

    assert all(result == results[0] for result in [*results, again])
    assert results[0]["stdout"].strip() == "1"
    assert other["stdout"].strip() == "2"


async def test_submitting_a_removed_container_gets_404(
    start_server: Any, c_dataset: Path, http: aiohttp.ClientSession
) -> None:
    """An evaluation of a container that was removed is refused at submit."""
    async with start_server(datasets=[f"csum={c_dataset}"], backend="local") as url:
        container_id = await _create(http, url)
        async with http.delete(f"{url}/v1/containers/{container_id}"):
            pass
        body = {"instance_id": "sum_squares", "container_id": container_id}
        async with http.post(f"{url}/v1/evaluations", json=body) as response:
            assert response.status == 404
            assert (await response.json())["error"] == "container_not_found"


async def _create_keyed(
    http: aiohttp.ClientSession, url: str, key: str, instance_id: str = "a"
) -> tuple[int, dict[str, Any]]:
    body = {"instance_id": instance_id, "dataset_name": "toy"}
    headers = {"Idempotency-Key": key}
    async with http.post(f"{url}/v1/containers", json=body, headers=headers) as answer:
        return answer.status, await answer.json()


def _containers(workdir: Path) -> list[str]:
    """Return the names of the local backend's container folders."""
    return sorted(
        p.name for p in (workdir / "containers").iterdir() if p.name[0] != "."
    )


async def test_a_repeated_idempotency_key_returns_the_first_container(
    start_server: Any, memory_dataset: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The first create with a key makes a container (201); repeats, also
    concurrent ones, get that container (200) and make none; the key for
    another instance is a 409; once the container is removed, the key is free."""
    workdir = tmp_path / "work"
    dataset = memory_dataset(instance_ids=("a", "b"))
    async with start_server(
        datasets=[dataset], backend="local", workdir=workdir
    ) as url:
        first = await _create_keyed(http, url, "k-1")
        again = await _create_keyed(http, url, "k-1")
        burst = await asyncio.gather(
            *(_create_keyed(http, url, "k-2") for _ in range(5))
        )
        other = await _create_keyed(http, url, "k-1", instance_id="b")
        made = _containers(workdir)
        container_id = first[1]["container_id"]
        async with http.delete(f"{url}/v1/containers/{container_id}") as answer:
            assert answer.status == 204
        fresh = await _create_keyed(http, url, "k-1")

    assert first[0] == 201 and again == (200, first[1])
    assert sorted(status for status, _ in burst) == [200, 200, 200, 200, 201]
    assert len({created["container_id"] for _, created in burst}) == 1
    assert made == sorted([container_id, burst[0][1]["container_id"]])
    assert other[0] == 409
    assert (other[1]["error"], other[1]["field"]) == (
        "idempotency_conflict",
        "Idempotency-Key",
    )
    assert fresh[0] == 201 and fresh[1]["container_id"] != container_id


async def test_a_creation_key_outlives_a_restart(
    start_server: Any,
    server_settings: Any,
    memory_dataset: Any,
    http: aiohttp.ClientSession,
) -> None:
    """The key is kept in the store: after a restart it still names its container."""
    settings = server_settings(datasets=[memory_dataset()], backend="local")
    async with start_server(settings=settings) as url:
        first = await _create_keyed(http, url, "k-restart")
    async with start_server(settings=settings) as url:
        again = await _create_keyed(http, url, "k-restart")

    assert first[0] == 201 and again == (200, first[1])
    assert _containers(settings.workdir) == [first[1]["container_id"]]
