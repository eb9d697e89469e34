"""Container calls on EvalClient: create, exec (keyed), remove."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent_v2.client import EvalClient
from agent_v2.errors import HTTPStatusError
from agent_v2.eval_utils import evaluate_info
from tcp_proxy import TcpProxy


@pytest.fixture
async def local_url(start_server: Any, memory_dataset: Any) -> AsyncIterator[str]:
    """Return the URL of our server on the local backend, dataset ``toy``."""
    dataset = memory_dataset(build_command="test -f built || exit 3")
    async with start_server(datasets=[dataset], backend="local") as url:
        yield url


async def test_create_exec_remove(local_url: str) -> None:
    """A container is created, runs commands with stdin, and is removed."""
    async with EvalClient(local_url) as client:
        created = await client.create_container("a", dataset_name="toy", split="test")
        echoed = await client.exec(created.container_id, "cat; echo err >&2", "hi")
        failed = await client.exec(created.container_id, "exit 7")
        removed = await client.remove_container(created.container_id)
        with pytest.raises(HTTPStatusError) as caught:
            await client.exec(created.container_id, "true")

    assert (created.dataset_name, created.split, created.instance_id) == (
        "toy",
        "test",
        "a",
    )
    assert echoed.exit_code == 0
    assert echoed.stdout == "hi"
    assert echoed.stderr == "err\n"
    assert failed.exit_code == 7
    assert removed is True
    assert caught.value.status == 404


async def test_exec_timeout_is_reported(local_url: str) -> None:
    """A command past its timeout comes back with timed_out, not an exception."""
    async with EvalClient(local_url) as client:
        created = await client.create_container("a", dataset_name="toy")
        result = await client.exec(created.container_id, "sleep 30", timeout=0.5)
        await client.remove_container(created.container_id)

    assert result.timed_out is True


async def test_every_exec_has_its_own_idempotency_key(local_url: str) -> None:
    """Two execs of the same command both run: keys are per call, not per text."""
    async with EvalClient(local_url) as client:
        created = await client.create_container("a", dataset_name="toy")
        for _ in range(2):
            await client.exec(created.container_id, "echo once >> log.txt")
        log = await client.exec(created.container_id, "cat log.txt")
        await client.remove_container(created.container_id)

    assert log.stdout.splitlines() == ["once", "once"]


async def test_an_agent_changes_its_container_and_submits(local_url: str) -> None:
    """The agent flow: create, change files with exec, submit with evaluate_info."""
    async with EvalClient(local_url) as client:
        created = await client.create_container("a", dataset_name="toy")
        before = await evaluate_info(
            "Submitted", None, created.container_id, "a", "toy", "test", local_url
        )
        await client.exec(created.container_id, "touch built")
        after = await evaluate_info(
            "Submitted", None, created.container_id, "a", "toy", "test", local_url
        )
        await client.remove_container(created.container_id)

    assert before[2]["meta"]["error"] == "build_failed"
    assert after[2]["meta"]["error"] != "build_failed"


async def test_unknown_instance_is_a_404(local_url: str) -> None:
    """Creating a container for an unknown instance raises HTTPStatusError 404."""
    async with EvalClient(local_url) as client:
        with pytest.raises(HTTPStatusError, match="no-such") as caught:
            await client.create_container("no-such", dataset_name="toy")

    assert caught.value.status == 404


async def test_a_create_whose_answer_was_lost_is_retried_into_one_container(
    start_server: Any, memory_dataset: Any, tmp_path: Path
) -> None:
    """The server made the container but its 201 never arrived: the client
    retries under the same key and gets that container; no second one exists."""
    workdir = tmp_path / "work"
    async with (
        start_server(
            datasets=[memory_dataset()], backend="local", workdir=workdir
        ) as url,
        TcpProxy(url) as proxy,
        EvalClient(proxy.url) as client,
    ):
        proxy.cut_responses, proxy.cut_match = 1, b" 201 "
        created = await client.create_container("a", dataset_name="toy")
        folders = [p.name for p in (workdir / "containers").iterdir()]

    assert proxy.cuts == 1
    assert [name for name in folders if name[0] != "."] == [created.container_id]
