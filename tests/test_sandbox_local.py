"""Tests of the local sandbox backend: the shared suite plus local-only checks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from agent_v2.datasets import Instance
from agent_v2.errors import ConfigError, InvalidContainerId, SandboxError
from agent_v2.sandbox import Isolation, LocalBackend, SandboxBackend
from sandbox_suite import SandboxSuite, run


class TestLocalBackend(SandboxSuite):
    """The local backend passes the shared backend suite, with default isolation."""

    @pytest.fixture
    async def backend(self, tmp_path: Path) -> AsyncIterator[SandboxBackend]:
        """Provide a local backend working in a temporary folder."""
        backend = LocalBackend(tmp_path / "work", output_limit=self.output_limit)
        await backend.open()
        yield backend
        await backend.close()


class TestUnconfinedLocalBackend(SandboxSuite):
    """The local backend passes the shared suite with isolation turned off."""

    @pytest.fixture
    async def backend(self, tmp_path: Path) -> AsyncIterator[SandboxBackend]:
        """Provide a local backend that confines nothing."""
        backend = LocalBackend(
            tmp_path / "work",
            output_limit=self.output_limit,
            isolation=Isolation(enabled=False),
        )
        await backend.open()
        assert backend.isolation_level == "none"
        yield backend
        await backend.close()


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[LocalBackend]:
    """Provide an opened local backend with a small output limit."""
    backend = LocalBackend(tmp_path / "work", output_limit=4096)
    await backend.open()
    yield backend
    await backend.close()


@pytest.fixture
def git_instance(tmp_path: Path) -> Instance:
    """Return an instance whose files are a real git repository with history."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "main.c").write_text("int main(void) { return 0; }\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*git, "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "one"], cwd=repo, check=True)
    subprocess.run(
        [*git, "commit", "-qm", "two", "--allow-empty"], cwd=repo, check=True
    )
    return Instance(dataset_name="local", instance_id="c", repo_path=repo)


@pytest.fixture
async def box(local: LocalBackend, git_instance: Instance) -> AsyncIterator[str]:
    """Create a container of the git instance and remove it afterwards."""
    container_id = await local.create(git_instance)
    yield container_id
    await local.remove(container_id)


async def wait_for_no_processes_of(uid: int) -> list[psutil.Process]:
    """Wait up to 10 s for the processes running as ``uid`` to end; return the rest."""
    for _ in range(100):
        left: list[psutil.Process] = [
            process
            for process in psutil.process_iter(["uids"])
            if process.info["uids"] is not None and process.info["uids"].real == uid
        ]
        if not left:
            break
        await asyncio.sleep(0.1)
    return left


def own_descendants() -> list[psutil.Process]:
    """Return the processes this test process started that still exist."""
    return psutil.Process().children(recursive=True)


async def wait_for_no_descendants() -> list[psutil.Process]:
    """Wait up to 10 s for every child process to be reaped; return those left."""
    for _ in range(100):
        left = own_descendants()
        if not left:
            break
        await asyncio.sleep(0.1)
    return left


async def test_container_is_a_folder_under_workdir(
    local: LocalBackend, box: str, tmp_path: Path
) -> None:
    """A container is ``workdir/containers/<id>``, and exec runs in it."""
    folder = (tmp_path / "work" / "containers" / box).resolve()

    result = await run(local, box, "pwd")

    assert box.startswith("local-")
    assert folder.is_dir()
    assert result.stdout == f"{folder}\n"


async def test_source_git_folder_is_not_copied(local: LocalBackend, box: str) -> None:
    """The instance's own ``.git`` is skipped: the base is the only commit."""
    result = await run(local, box, "git rev-list --count HEAD; git ls-files")

    assert result.stdout == "1\nmain.c\n"


async def test_environment_is_clean(
    local: LocalBackend, box: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host variables do not leak; HOME is the root and TMPDIR lies inside it."""
    monkeypatch.setenv("AGENT_V2_HOST_SECRET", "leak")

    result = await run(
        local,
        box,
        'echo "${AGENT_V2_HOST_SECRET:-unset}"; test "$HOME" = "$PWD" && echo home; '
        'case "$TMPDIR" in "$PWD"/*) echo tmp;; esac; mktemp > /dev/null && '
        "git status --porcelain",
    )

    assert result.ok, result
    assert result.stdout == "unset\nhome\ntmp\n"


async def test_taskset_shows_the_pinning(local: LocalBackend, box: str) -> None:
    """``taskset -p`` inside the command reports the cores it was pinned to."""
    core = max(os.sched_getaffinity(0))

    result = await run(local, box, "taskset -cp $$", cpus=frozenset({core}))

    assert result.ok, result
    assert result.stdout.strip().endswith(f": {core}")


async def test_unavailable_cores_are_refused(local: LocalBackend, box: str) -> None:
    """Pinning to a core the machine does not offer raises ConfigError."""
    missing = max(os.sched_getaffinity(0)) + 1000

    with pytest.raises(ConfigError, match=str(missing)):
        await local.exec(box, "true", timeout=10, cpus=frozenset({missing}))
    with pytest.raises(ConfigError):
        await local.exec(box, "true", timeout=10, cpus=frozenset())


async def test_symlink_out_of_workdir_is_refused(
    local: LocalBackend, tmp_path: Path
) -> None:
    """An id whose folder is a symlink leading outside is invalid, and kept."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    (local.containers_dir / "escape").symlink_to(outside)

    with pytest.raises(InvalidContainerId, match="outside"):
        await local.exists("escape")
    with pytest.raises(InvalidContainerId):
        await local.exec("escape", "true", timeout=10)
    with pytest.raises(InvalidContainerId):
        await local.remove("escape")

    assert (outside / "keep.txt").read_text() == "precious"


async def test_remove_deletes_read_only_parts(local: LocalBackend, box: str) -> None:
    """Read-only files and folders (such as git objects) do not stop remove."""
    await run(local, box, "mkdir -p locked && touch locked/f && chmod -R a-w .")
    folder = local.containers_dir / box

    await local.remove(box)

    assert not folder.exists()


async def test_process_group_left_by_a_setsid_child_is_bounded(
    git_instance: Instance, tmp_path: Path
) -> None:
    """Unconfined, a child that escapes the process group cannot hold exec open."""
    local = LocalBackend(tmp_path / "plain", isolation=Isolation(enabled=False))
    await local.open()
    box = await local.create(git_instance)
    command = (
        "setsid sh -c 'echo $$ > escaped.pid; exec sleep 300' & "
        "while [ ! -s escaped.pid ]; do sleep 0.05; done; echo done"
    )
    try:
        result = await local.exec(box, command, timeout=60)
    finally:
        pid_file = local.containers_dir / box / "escaped.pid"
        for _ in range(100):
            if pid_file.exists() and pid_file.read_text().strip():
                break
            await asyncio.sleep(0.05)
        os.kill(int(pid_file.read_text()), 9)
        await local.remove(box)
        await local.close()

    assert result.ok and result.stdout == "done\n", result
    assert not result.timed_out


async def test_confined_setsid_child_ends_with_its_command(
    local: LocalBackend, box: str
) -> None:
    """Confined, a child that leaves the process group still dies with the command."""
    if local.isolation_level != "full":
        pytest.skip("needs root: commands are not confined here")
    uid = (local.containers_dir / box).stat().st_uid
    command = (
        "setsid sh -c 'echo $$ > escaped.pid; exec sleep 300' & "
        "while [ ! -s escaped.pid ]; do sleep 0.05; done; echo done"
    )

    result = await local.exec(box, command, timeout=60)

    assert result.ok and result.stdout == "done\n", result
    assert await wait_for_no_processes_of(uid) == []


async def test_no_leaks_after_many_commands(local: LocalBackend, box: str) -> None:
    """Many commands, killed ones included, leave no processes or open fds."""
    this = psutil.Process()
    await run(local, box, "true")  # warm up lazily opened fds
    fds_before = this.num_fds()

    for round_ in range(3):
        commands = [
            local.exec(box, "echo ok", timeout=30),
            local.exec(box, "sleep 300", timeout=0.5),
            local.exec(box, "sleep 300 & echo bg", timeout=30),
            local.exec(box, "cat", timeout=30, stdin=b"z" * 100_000),
            local.exec(box, "yes | head -c 100000", timeout=30),
            local.exec(box, "kill -KILL $$", timeout=30),
        ]
        results = await asyncio.gather(*commands)
        assert [result.exit_code for result in results] == [0, 124, 0, 0, 0, 137]

        cancelled = asyncio.create_task(local.exec(box, "sleep 300", timeout=60))
        await asyncio.sleep(0.2 * (round_ + 1))
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled

    assert await wait_for_no_descendants() == []
    assert this.num_fds() <= fds_before


async def test_bad_arguments_are_refused(local: LocalBackend, box: str) -> None:
    """A NUL in the command, a bad timeout or a bad variable raise ConfigError."""
    with pytest.raises(ConfigError, match="NUL"):
        await local.exec(box, "echo \x00", timeout=10)
    with pytest.raises(ConfigError, match="timeout"):
        await local.exec(box, "true", timeout=0)
    with pytest.raises(ConfigError, match="A=B"):
        await local.exec(box, "true", timeout=10, env={"A=B": "c"})


async def test_missing_repo_path_is_reported(
    local: LocalBackend, tmp_path: Path
) -> None:
    """An instance whose repo_path is not a folder fails with the path named."""
    missing = tmp_path / "nowhere"
    instance = Instance(dataset_name="local", instance_id="x", repo_path=missing)

    with pytest.raises(SandboxError, match="nowhere"):
        await local.create(instance)

    assert list(local.containers_dir.iterdir()) == []


async def test_cancelled_create_leaves_nothing(
    local: LocalBackend, tmp_path: Path
) -> None:
    """Cancelling create at any point leaves no container folder behind."""
    repo = tmp_path / "big"
    for n in range(300):
        (repo / f"d{n % 10}").mkdir(parents=True, exist_ok=True)
        (repo / f"d{n % 10}" / f"f{n}.txt").write_text("x" * 1000)
    instance = Instance(dataset_name="local", instance_id="big", repo_path=repo)

    for delay in (0.0, 0.01, 0.05, 0.1, 0.2, 0.4):
        task = asyncio.create_task(local.create(instance))
        await asyncio.sleep(delay)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await local.remove(await task)  # it finished before the cancel

    assert list(local.containers_dir.iterdir()) == []


def test_output_limit_must_be_positive(tmp_path: Path) -> None:
    """A zero output limit is refused at construction."""
    with pytest.raises(ConfigError, match="output_limit"):
        LocalBackend(tmp_path, output_limit=0)
