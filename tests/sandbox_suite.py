"""Tests every sandbox backend must pass; subclass SandboxSuite to run them.

A subclass provides a ``backend`` fixture (an opened backend whose output limit
is :attr:`SandboxSuite.output_limit`) and may override ``instance`` (for example
to add an image name). Containers are assumed to offer a POSIX shell,
coreutils, ``grep``, ``/proc`` and git.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shlex
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent_v2.datasets import Instance
from agent_v2.errors import ContainerNotFound, InvalidContainerId
from agent_v2.sandbox import (
    BASE_REF,
    TIMEOUT_EXIT_CODE,
    CommandResult,
    SandboxBackend,
)

REPO_FILES = {
    "README.md": "hello from the instance\n",
    "src/main.c": "int main(void) { return 0; }\n",
    "scripts/run.sh": "#!/bin/sh\necho script ran\n",
}

INVALID_IDS = ["../x", "/etc", "a\x00b", "", "a/b", ".", "..", "-rf", "x" * 129]

UNKNOWN_ID = "agent-v2-no-such-container"

# Succeeds once process $1 is gone (a zombie counts as gone: only its parent,
# which may be the container's init, can reap it); fails after about 10 s.
WAIT_GONE = (
    'pid=$(cat "$1"); for i in $(seq 100); do '
    'if ! kill -0 "$pid" 2>/dev/null; then exit 0; fi; '
    "if grep -qs '^State:[[:space:]]*Z' \"/proc/$pid/status\"; then exit 0; fi; "
    'sleep 0.1; done; echo "process $pid is still alive"; exit 1'
)

# Starts a child, which starts a grandchild; both sleep, and their pids are
# written to child.pid and grandchild.pid before "started" is printed.
PROCESS_TREE = (
    "rm -f child.pid grandchild.pid; "
    "sh -c 'sleep 300 & echo $! > grandchild.pid; wait' & echo $! > child.pid; "
    "while [ ! -s grandchild.pid ]; do sleep 0.05; done; echo started; wait"
)


async def run(
    backend: SandboxBackend,
    container_id: str,
    command: str,
    *,
    timeout: float = 60.0,  # noqa: ASYNC109 - passed on to exec
    **options: Any,
) -> CommandResult:
    """Run a command with a generous default timeout."""
    return await backend.exec(container_id, command, timeout=timeout, **options)


class SandboxSuite:
    """Behaviour shared by every sandbox backend."""

    output_limit = 64 * 1024

    @pytest.fixture
    def backend(self) -> SandboxBackend:
        """Provide the backend under test (subclasses override this)."""
        raise NotImplementedError("a SandboxSuite subclass must provide `backend`")

    @pytest.fixture
    def repo_path(self, tmp_path: Path) -> Path:
        """Write the instance's files into a folder."""
        repo = tmp_path / "instance-repo"
        for name, text in REPO_FILES.items():
            path = repo / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        (repo / "scripts" / "run.sh").chmod(0o755)
        return repo

    @pytest.fixture
    def instance(self, repo_path: Path) -> Instance:
        """Return an instance made of REPO_FILES."""
        return Instance(dataset_name="suite", instance_id="hello", repo_path=repo_path)

    @pytest.fixture
    async def container(
        self, backend: SandboxBackend, instance: Instance
    ) -> AsyncIterator[str]:
        """Create a container of the instance and remove it afterwards."""
        container_id = await backend.create(instance)
        yield container_id
        await backend.remove(container_id)

    async def assert_gone(
        self, backend: SandboxBackend, container_id: str, pid_file: str
    ) -> None:
        """Assert that the process whose pid is in ``pid_file`` is no longer alive."""
        check = f"sh -c {shlex.quote(WAIT_GONE)} check {shlex.quote(pid_file)}"
        result = await run(backend, container_id, check)
        assert result.exit_code == 0, result

    # -- create ---------------------------------------------------------------

    async def test_create_holds_instance_files(
        self, backend: SandboxBackend, container: str
    ) -> None:
        """A new container holds the instance's files, modes included."""
        assert await backend.exists(container)

        result = await run(backend, container, "cat README.md && ./scripts/run.sh")

        assert result.ok, result
        assert result.stdout == REPO_FILES["README.md"] + "script ran\n"

    async def test_create_commits_the_base(
        self, backend: SandboxBackend, container: str
    ) -> None:
        """The files are committed and tagged as the base; nothing is left over."""
        status = await run(backend, container, "git status --porcelain")
        files = await run(backend, container, f"git ls-tree -r --name-only {BASE_REF}")
        tagged = await run(
            backend,
            container,
            f"test $(git rev-parse {BASE_REF}) = $(git rev-parse HEAD)",
        )

        assert status.ok and status.stdout == "", status
        assert files.ok and sorted(files.stdout.split()) == sorted(REPO_FILES), files
        assert tagged.ok, tagged

    async def test_diff_against_base_shows_an_edit(
        self, backend: SandboxBackend, container: str
    ) -> None:
        """After an edit, ``git diff`` against the base tag shows the change."""
        await run(backend, container, "echo 'an agent was here' >> README.md")

        result = await run(backend, container, f"git diff {BASE_REF}")

        assert result.ok, result
        assert "+an agent was here" in result.stdout

    async def test_create_without_repo_path_gives_an_empty_base(
        self, backend: SandboxBackend, instance: Instance
    ) -> None:
        """An instance without files still gets a git repository with a base."""
        empty = dataclasses.replace(instance, repo_path=None)
        container_id = await backend.create(empty)
        try:
            result = await run(
                backend, container_id, f"git rev-parse --verify {BASE_REF}"
            )
            files = await run(backend, container_id, "git ls-files")
        finally:
            await backend.remove(container_id)

        assert result.ok, result
        assert files.ok and files.stdout == "", files

    async def test_containers_are_separate(
        self, backend: SandboxBackend, instance: Instance, container: str
    ) -> None:
        """A file written in one container does not appear in another."""
        other = await backend.create(instance)
        try:
            await run(backend, container, "echo mine > note.txt")
            result = await run(backend, other, "test -e note.txt")
        finally:
            await backend.remove(other)

        assert result.exit_code == 1

    # -- exec -----------------------------------------------------------------

    async def test_exit_codes_are_reported(
        self, backend: SandboxBackend, container: str
    ) -> None:
        """The shell's exit code comes back unchanged."""
        success = await run(backend, container, "true")
        failure = await run(backend, container, "exit 3")

        assert success.exit_code == 0 and success.ok and not success.timed_out
        assert failure.exit_code == 3 and not failure.ok

    async def test_signal_death_is_128_plus_signal(
        self, backend: SandboxBackend, container: str
    ) -> None:
        """A command killed by a signal reports 128 + the signal's number."""
        result = await run(backend, container, "kill -TERM $$")

        assert result.exit_code == 128 + 15
        assert not result.timed_out

    async def test_stdout_and_stderr_are_separate(
        self, backend: SandboxBackend, container: str
    ) -> None:
        """Each stream is captured on its own."""
        result = await run(backend, container, "echo out; echo err >&2")

        assert result.stdout == "out\n"
        assert result.stderr == "err\n"
        assert not result.truncated

    async def test_invalid_utf8_is_replaced(
        self, backend: SandboxBackend, container: str
    ) -> None:
        """Bytes that are not UTF-8 become U+FFFD instead of failing."""
        result = await run(backend, container, r"printf '\377ok'")

        assert result.stdout == "\ufffdok"

    async def test_stdin_is_fed(self, backend: SandboxBackend, container: str) -> None:
        """Bytes given as stdin reach the command, even more than a pipe holds."""
        data = b"x" * (1 << 20)

        result = await run(backend, container, "wc -c", stdin=data)

        assert result.ok, result
        assert result.stdout.strip() == str(len(data))

    async def test_stdin_not_read_is_harmless(
        self, backend: SandboxBackend, container: str
    ) -> None:
        """A command that ignores its stdin still ends normally."""
        result = await run(backend, container, "exit 0", stdin=b"y" * (1 << 20))

        assert result.ok, result

    async def test_no_stdin_reads_end_of_file(
        self, backend: SandboxBackend, container: str
    ) -> None:
        """Without stdin, a reading command sees end of file at once."""
        result = await run(backend, container, "cat; echo done")

        assert result.ok and result.stdout == "done\n", result

    async def test_env_is_added(self, backend: SandboxBackend, container: str) -> None:
        """Variables in ``env`` are visible, and the shell still finds its tools."""
        result = await run(
            backend, container, 'echo "$GREETING"; ls README.md', env={"GREETING": "hi"}
        )

        assert result.ok, result
        assert result.stdout == "hi\nREADME.md\n"

    async def test_cpus_pin_the_command(
        self, backend: SandboxBackend, container: str
    ) -> None:
        """``cpus`` restricts the command to exactly those cores."""
        core = min(os.sched_getaffinity(0))

        result = await run(
            backend,
            container,
            "grep Cpus_allowed_list /proc/self/status",
            cpus=frozenset({core}),
        )

        assert result.ok, result
        assert result.stdout.split() == ["Cpus_allowed_list:", str(core)]

    async def test_concurrent_commands(
        self, backend: SandboxBackend, container: str
    ) -> None:
        """Commands run at the same time in one container do not mix up."""
        results = await asyncio.gather(
            *(run(backend, container, f"sleep 0.2; echo {n}") for n in range(10))
        )

        assert [result.stdout for result in results] == [f"{n}\n" for n in range(10)]

    async def test_output_is_bounded(
        self, backend: SandboxBackend, container: str
    ) -> None:
        """Each stream keeps its first ``output_limit`` bytes; the rest is dropped."""
        command = (
            "head -c 3000000 /dev/zero | tr '\\0' a; "
            "head -c 3000000 /dev/zero | tr '\\0' b >&2"
        )

        result = await run(backend, container, command)

        assert result.ok, result
        assert result.truncated
        assert result.stdout == "a" * self.output_limit
        assert result.stderr == "b" * self.output_limit

    async def test_output_at_the_limit_is_not_truncated(
        self, backend: SandboxBackend, container: str
    ) -> None:
        """Output of exactly ``output_limit`` bytes is kept whole."""
        command = f"head -c {self.output_limit} /dev/zero | tr '\\0' a"

        result = await run(backend, container, command)

        assert result.stdout == "a" * self.output_limit
        assert not result.truncated

    # -- timeouts and cancellation --------------------------------------------

    async def test_timeout_kills_the_process_tree(
        self, backend: SandboxBackend, container: str
    ) -> None:
        """A timeout reports timed_out and kills the command's children too."""
        result = await backend.exec(container, PROCESS_TREE, timeout=3.0)

        assert result.timed_out
        assert result.exit_code == TIMEOUT_EXIT_CODE
        assert not result.ok
        assert "started" in result.stdout
        await self.assert_gone(backend, container, "child.pid")
        await self.assert_gone(backend, container, "grandchild.pid")

    async def test_cancellation_kills_the_process_tree(
        self, backend: SandboxBackend, container: str
    ) -> None:
        """Cancelling exec kills the command with its children, then re-raises."""
        task = asyncio.create_task(backend.exec(container, PROCESS_TREE, timeout=600))
        for _ in range(400):
            started = await run(backend, container, "test -s grandchild.pid")
            if started.ok:
                break
            await asyncio.sleep(0.05)
        assert not task.done()

        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        await self.assert_gone(backend, container, "child.pid")
        await self.assert_gone(backend, container, "grandchild.pid")

    async def test_background_children_do_not_hold_exec(
        self, backend: SandboxBackend, container: str
    ) -> None:
        """A command that leaves a child in the background still returns."""
        command = "sleep 300 & echo $! > child.pid; echo done"

        result = await backend.exec(container, command, timeout=60)

        assert result.ok and result.stdout == "done\n", result
        await self.assert_gone(backend, container, "child.pid")

    # -- ids and removal ------------------------------------------------------

    @pytest.mark.parametrize("container_id", INVALID_IDS)
    async def test_invalid_ids_are_refused(
        self, backend: SandboxBackend, container_id: str
    ) -> None:
        """Malformed ids raise InvalidContainerId naming the id, for every call."""
        with pytest.raises(InvalidContainerId) as raised:
            await backend.exists(container_id)
        assert repr(container_id) in str(raised.value)

        with pytest.raises(InvalidContainerId):
            await backend.exec(container_id, "true", timeout=10)
        with pytest.raises(InvalidContainerId):
            await backend.remove(container_id)

    async def test_unknown_id(self, backend: SandboxBackend) -> None:
        """An unknown id does not exist, cannot exec, and removing it is a no-op."""
        assert not await backend.exists(UNKNOWN_ID)

        with pytest.raises(ContainerNotFound) as raised:
            await backend.exec(UNKNOWN_ID, "true", timeout=10)
        await backend.remove(UNKNOWN_ID)

        assert repr(UNKNOWN_ID) in str(raised.value)

    async def test_remove_deletes_the_container(
        self, backend: SandboxBackend, instance: Instance
    ) -> None:
        """After remove the container is gone; removing again is harmless."""
        container_id = await backend.create(instance)

        await backend.remove(container_id)

        assert not await backend.exists(container_id)
        with pytest.raises(ContainerNotFound):
            await backend.exec(container_id, "true", timeout=10)
        await backend.remove(container_id)

    async def test_remove_ends_running_commands(
        self, backend: SandboxBackend, instance: Instance
    ) -> None:
        """Removing a container ends the commands still running in it."""
        container_id = await backend.create(instance)
        task = asyncio.create_task(backend.exec(container_id, "sleep 300", timeout=600))
        await asyncio.sleep(0.5)

        await backend.remove(container_id)
        done, _ = await asyncio.wait([task], timeout=60)

        assert done, "exec still running after its container was removed"
        if task.exception() is None:
            assert not task.result().ok
