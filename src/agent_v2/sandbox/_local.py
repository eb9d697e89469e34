"""The local sandbox backend: a container is a folder, commands are subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from agent_v2.datasets import Instance
from agent_v2.errors import (
    ConfigError,
    ContainerNotFound,
    InvalidContainerId,
    SandboxError,
)
from agent_v2.sandbox._base import (
    BASE_REF,
    DEFAULT_OUTPUT_LIMIT,
    TIMEOUT_EXIT_CODE,
    CommandResult,
    SandboxBackend,
)
from agent_v2.sandbox._ids import validate_container_id
from agent_v2.sandbox._isolation import (
    DEFAULT_PATH,
    Confined,
    Isolation,
    Isolator,
    hand_over,
)

__all__ = ["LocalBackend"]

logger = logging.getLogger(__name__)

TMP_DIR = ".agent-v2-tmp"
"""Folder in each container's root that ``TMPDIR`` points to; git ignores it."""

DRAIN_TIMEOUT = 2.0
"""Seconds to keep reading output after a command's process group is gone."""

REAP_TIMEOUT = 10.0
"""Seconds to wait for a killed command's leader to be reaped."""

_GIT_USER = ("agent-v2", "agent-v2@localhost")


class LocalBackend(SandboxBackend):
    """Containers as folders under ``workdir/containers``, commands as subprocesses.

    Each command runs in its own process group, which is killed when the
    command times out, is cancelled, or its leader exits (so background
    children never outlive it). ``isolation`` says how commands are confined
    (see :class:`~agent_v2.sandbox.Isolation`): by default, when the server
    runs as root, each container has its own unprivileged uid and every
    command runs without network, in its own mount and PID namespaces, within
    resource limits. It is not a virtual machine: the kernel is shared.
    """

    kind = "local"

    def __init__(
        self,
        workdir: Path,
        *,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        isolation: Isolation | None = None,
    ) -> None:
        if output_limit <= 0:
            raise ConfigError(
                f"output_limit must be a positive number of bytes, got {output_limit!r}"
            )
        self._containers = (Path(workdir) / "containers").resolve()
        self._output_limit = output_limit
        self._isolation = isolation if isolation is not None else Isolation()
        self._isolator: Isolator | None = None
        self._shell = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
        self._taskset = shutil.which("taskset", path=DEFAULT_PATH)
        self._running = _RunningCommands()

    def __repr__(self) -> str:
        return (
            f"LocalBackend(containers={str(self._containers)!r}, "
            f"isolation={self.isolation_level!r})"
        )

    @property
    def containers_dir(self) -> Path:
        """Return the folder that holds one subfolder per container."""
        return self._containers

    @property
    def isolation_level(self) -> str:
        """Return how commands are confined: ``full``, ``limits`` or ``none``.

        Known once the backend is open; ``none`` before.
        """
        return "none" if self._isolator is None else self._isolator.level

    async def open(self) -> None:
        """Create the containers folder; check and set up isolation."""
        try:
            await asyncio.to_thread(self._containers.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the workdir's containers folder {self._containers}: "
                f"{exc.strerror or exc}"
            ) from exc
        self._isolator = await Isolator.start(
            self._isolation, self._containers, tmp_name=TMP_DIR
        )

    async def close(self) -> None:
        """Kill every command still running in any container."""
        self._running.kill_all()

    async def create(self, instance: Instance) -> str:
        """Copy the instance's files into a new folder and commit them as the base."""
        container_id = f"local-{uuid.uuid4().hex}"
        root = self._containers / container_id
        copy = asyncio.ensure_future(
            asyncio.to_thread(_populate, root, instance.repo_path)
        )
        try:
            # NOTE: shielded because a thread cannot be stopped: on cancellation
            # the copy runs on, and must end before its folder can be deleted.
            await asyncio.shield(copy)
            await _commit_base(root)
            await self._hand_over(root)
        except BaseException:
            await _discard(root, copy)
            raise

        logger.debug("created container %s for %s", container_id, instance.key)
        return container_id

    async def exists(self, container_id: str) -> bool:
        """Return whether the container's folder exists."""
        validate_container_id(container_id)
        return await asyncio.to_thread(self._exists, container_id)

    async def exec(
        self,
        container_id: str,
        command: str,
        *,
        timeout: float,  # noqa: ASYNC109 - the interface takes a timeout
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        cpus: frozenset[int] | None = None,
    ) -> CommandResult:
        """Run ``command`` with the shell in the container's folder."""
        validate_container_id(container_id)
        _check_command(command, timeout, env)
        argv = [self._shell, "-c", command]
        if cpus is not None:
            argv = [*self._pin(cpus), *argv]
        root, confined = await asyncio.to_thread(self._prepare, container_id)
        if self._isolator is not None:
            argv = self._isolator.wrap(argv, root=root, confined=confined)

        result = await _run(
            argv,
            cwd=root,
            env=_environment(root, env),
            stdin=stdin,
            timeout=timeout,
            output_limit=self._output_limit,
            running=self._running,
            container_id=container_id,
        )
        logger.debug(
            "command in container %s: exit code %d after %.3f s%s",
            container_id,
            result.exit_code,
            result.duration,
            " (timed out)" if result.timed_out else "",
        )
        return result

    async def remove(self, container_id: str) -> None:
        """Kill the container's running commands and delete its folder."""
        validate_container_id(container_id)
        root = await asyncio.to_thread(self._resolve, container_id)
        self._running.kill(container_id)
        isolator = self._isolator
        uid = None
        if isolator is not None:
            uid = await asyncio.to_thread(isolator.owner, root)
        if await asyncio.to_thread(_delete_tree, root):
            logger.debug("removed container %s", container_id)
        if isolator is not None:
            isolator.release(uid)

    async def _hand_over(self, root: Path) -> None:
        """Give a new container its own sandbox uid, when commands are confined."""
        isolator = self._isolator
        if isolator is None or not isolator.owns_uids:
            return
        uid = isolator.allocate()
        try:
            await asyncio.to_thread(hand_over, root, uid)
        except BaseException:
            isolator.release(uid)
            raise

    def _resolve(self, container_id: str) -> Path:
        """Return the container's folder, refusing one that leads elsewhere."""
        root = (self._containers / container_id).resolve()
        if root.parent != self._containers:
            raise InvalidContainerId(
                f"container id {container_id!r} resolves to {str(root)!r}, outside "
                f"{str(self._containers)!r}; use the container_id returned when "
                f"the container was created"
            )
        return root

    def _exists(self, container_id: str) -> bool:
        """Return whether the container's folder exists."""
        return self._resolve(container_id).is_dir()

    def _prepare(self, container_id: str) -> tuple[Path, Confined]:
        """Return the folder of an existing container, with its TMPDIR present."""
        root = self._resolve(container_id)
        isolator = self._isolator

        # NOTE: the agent may have deleted TMPDIR (``git clean -fdx``), so it
        # is made again before every command rather than once at create.
        try:
            if isolator is not None and isolator.owns_uids:
                return root, isolator.prepare(root)
            (root / TMP_DIR).mkdir(exist_ok=True)
        except (FileNotFoundError, NotADirectoryError):
            raise ContainerNotFound(
                f"no container {container_id!r} in {str(self._containers)!r}; "
                f"create one first"
            ) from None
        return root, Confined(uid=os.geteuid(), tmp_identity="")

    def _pin(self, cpus: frozenset[int]) -> list[str]:
        """Return the taskset prefix that pins a command to ``cpus``."""
        available = os.sched_getaffinity(0)
        if not cpus or not cpus <= available:
            raise ConfigError(
                f"cannot pin a command to cores {sorted(cpus)!r}; this machine "
                f"offers cores {sorted(available)!r}"
            )
        if self._taskset is None:
            raise SandboxError(
                "taskset was not found; install util-linux to pin commands to cores"
            )
        return [self._taskset, "-c", ",".join(str(cpu) for cpu in sorted(cpus))]


class _RunningCommands:
    """The process groups of the commands running in each container."""

    def __init__(self) -> None:
        self._groups: dict[str, set[int]] = {}

    def add(self, container_id: str, pgid: int) -> None:
        """Note a command that started in the container."""
        self._groups.setdefault(container_id, set()).add(pgid)

    def discard(self, container_id: str, pgid: int) -> None:
        """Forget a command that ended."""
        groups = self._groups.get(container_id, set())
        groups.discard(pgid)
        if not groups:
            self._groups.pop(container_id, None)

    def kill(self, container_id: str) -> None:
        """Kill every command running in the container."""
        for pgid in self._groups.get(container_id, ()):
            _kill_group(pgid)

    def kill_all(self) -> None:
        """Kill every command running in any container."""
        for container_id in list(self._groups):
            self.kill(container_id)


def _check_command(command: str, timeout: float, env: Mapping[str, str] | None) -> None:
    """Refuse a command, timeout or environment that cannot be run."""
    if "\x00" in command:
        raise ConfigError(f"command {command!r} contains a NUL byte; remove it")
    if not timeout > 0:
        raise ConfigError(
            f"timeout must be a positive number of seconds, not {timeout!r}"
        )

    for name, value in (env or {}).items():
        if not name or "=" in name or "\x00" in name or "\x00" in value:
            raise ConfigError(
                f"environment variable {name!r}={value!r} cannot be set; names "
                f"must be non-empty without '=', and neither may contain NUL"
            )


def _environment(root: Path, extra: Mapping[str, str] | None) -> dict[str, str]:
    """Return the small, clean environment every command starts with."""
    environment = {
        "PATH": DEFAULT_PATH,
        "HOME": str(root),
        "LANG": "C.UTF-8",
        "TMPDIR": str(root / TMP_DIR),
    }
    environment.update(extra or {})
    return environment


def _populate(root: Path, repo_path: Path | None) -> None:
    """Fill a new container folder with the instance's files, without ``.git``."""
    if repo_path is None:
        root.mkdir(parents=True)
        return
    if not repo_path.is_dir():
        raise SandboxError(
            f"instance repo_path {str(repo_path)!r} is not a folder; fix the "
            f"dataset so that repo_path names the instance's files"
        )

    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(
            repo_path,
            root,
            symlinks=True,
            ignore=lambda _folder, names: [name for name in names if name == ".git"],
        )
    except OSError as exc:
        raise SandboxError(
            f"could not copy instance files from {str(repo_path)!r} into a "
            f"container: {exc}"
        ) from exc


async def _commit_base(root: Path) -> None:
    """Make the container folder a git repository whose one commit is the base."""
    await _git(root, "init", "--quiet", "--initial-branch=main")
    await asyncio.to_thread(_exclude_tmp_dir, root)
    await _git(root, "config", "user.name", _GIT_USER[0])
    await _git(root, "config", "user.email", _GIT_USER[1])
    await _git(root, "add", "--all")
    await _git(root, "commit", "--quiet", "--no-verify", "--allow-empty", "-m", "base")
    await _git(root, "tag", BASE_REF)


def _exclude_tmp_dir(root: Path) -> None:
    """Keep the TMPDIR folder out of ``git status`` and ``git add``."""
    exclude = root / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    with exclude.open("a", encoding="utf-8") as file:
        file.write(f"/{TMP_DIR}/\n")


async def _git(root: Path, *args: str) -> None:
    """Run one git command in ``root``; raise SandboxError when it fails."""
    # NOTE: the host's global and system git config are left out, so hooks or
    # signing set up for a person never run on the base commit.
    env = {
        "PATH": DEFAULT_PATH,
        "HOME": str(root),
        "LANG": "C.UTF-8",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
    }
    try:
        process = await asyncio.create_subprocess_exec(
            "git",
            *args,
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    except FileNotFoundError as exc:
        raise SandboxError(
            "git was not found; install git to create containers"
        ) from exc

    try:
        output, _ = await process.communicate()
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise

    if process.returncode != 0:
        detail = output.decode("utf-8", errors="replace").strip()
        raise SandboxError(
            f"git {' '.join(args)} failed in {str(root)!r} with exit code "
            f"{process.returncode}: {detail}"
        )


async def _discard(root: Path, copy: asyncio.Future[None]) -> None:
    """Delete a container that could not be created, once its copy has ended."""
    try:
        await asyncio.wait([copy])
        await asyncio.to_thread(_delete_tree, root)
    except OSError:
        logger.warning("could not delete the unfinished container %s", root)


def _delete_tree(root: Path) -> bool:
    """Delete a folder and all in it, even read-only parts; say if it existed."""
    if not root.exists() and not root.is_symlink():
        return False
    shutil.rmtree(root, onerror=_make_writable_and_retry)
    return True


def _make_writable_and_retry(
    function: Callable[..., Any], path: str, exc_info: Any
) -> None:
    """Let shutil.rmtree delete something a read-only folder protects."""
    if isinstance(exc_info[1], FileNotFoundError):  # deleted meanwhile
        return
    parent = os.path.dirname(path)
    os.chmod(parent, os.stat(parent).st_mode | stat.S_IRWXU)
    if os.path.isdir(path) and not os.path.islink(path):
        os.chmod(path, os.stat(path).st_mode | stat.S_IRWXU)
    function(path)


class _Capture(asyncio.SubprocessProtocol):
    """Keep the first bytes of stdout and stderr, count the rest, note exit and EOF."""

    def __init__(self, limit: int) -> None:
        loop = asyncio.get_running_loop()
        self.kept = {1: bytearray(), 2: bytearray()}
        self.dropped = 0
        self.exited: asyncio.Future[None] = loop.create_future()
        self.drained: asyncio.Future[None] = loop.create_future()
        self._limit = limit
        self._open_pipes = {1, 2}

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        kept = self.kept[fd]
        room = self._limit - len(kept)
        if room > 0:
            kept += data[:room]
        self.dropped += max(len(data) - max(room, 0), 0)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._open_pipes.discard(fd)
        if not self._open_pipes and not self.drained.done():
            self.drained.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def text(self, fd: int) -> str:
        """Return what was kept of one output stream, decoded."""
        return self.kept[fd].decode("utf-8", errors="replace")


async def _run(
    argv: list[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    stdin: bytes | None,
    timeout: float,  # noqa: ASYNC109 - applies to the subprocess, not to us
    output_limit: int,
    running: _RunningCommands,
    container_id: str,
) -> CommandResult:
    """Run ``argv`` in its own process group with bounded output and a timeout."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    try:
        transport, capture = await loop.subprocess_exec(
            lambda: _Capture(output_limit),
            *argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        if not await asyncio.to_thread(cwd.is_dir):  # removed meanwhile
            raise ContainerNotFound(
                f"container {container_id!r} was removed; create a new one"
            ) from exc
        raise SandboxError(f"could not start {argv[0]!r}: {exc}") from exc
    except OSError as exc:
        raise SandboxError(
            f"could not start a command in container {container_id!r}: {exc}"
        ) from exc
    pgid = transport.get_pid()
    running.add(container_id, pgid)

    try:
        if stdin is not None:
            _feed(transport, stdin)
        done, _ = await asyncio.wait([capture.exited], timeout=_wait_limit(timeout))
        timed_out = not done

        # NOTE: kill the group even when the leader exited by itself: children
        # it left in the background would otherwise outlive the command and
        # hold its output pipes open forever.
        _kill_group(pgid)
        await _wait_reaped(capture, container_id)
        await _drain(capture, container_id)
    finally:
        running.discard(container_id, pgid)
        try:
            if not capture.exited.done():  # cancelled, or failed on the way
                _kill_group(pgid)
                await _wait_reaped(capture, container_id)
        finally:
            transport.close()

    return CommandResult(
        exit_code=_exit_code(transport.get_returncode(), timed_out),
        stdout=capture.text(1),
        stderr=capture.text(2),
        timed_out=timed_out,
        duration=time.monotonic() - started,
        truncated=capture.dropped > 0,
    )


def _wait_limit(timeout: float) -> float | None:
    """Return a timeout asyncio.wait accepts; an infinite one means no limit."""
    return None if math.isinf(timeout) else timeout


def _feed(transport: asyncio.SubprocessTransport, data: bytes) -> None:
    """Write ``data`` to the command's stdin, then close it.

    A command that exits without reading closes the pipe; the write error that
    follows is expected and only logged by asyncio at debug level.
    """
    pipe = cast(asyncio.WriteTransport, transport.get_pipe_transport(0))
    pipe.write(data)
    pipe.close()


def _kill_group(pgid: int) -> None:
    """Send SIGKILL to a whole process group; a group already gone is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def _wait_reaped(capture: _Capture, label: str) -> None:
    """Wait, bounded, for the command's leader to exit after being killed."""
    # NOTE: closing the transport before the child watcher reaped the leader
    # makes asyncio reap it too, and then warn about an unknown child.
    done, _ = await asyncio.wait([capture.exited], timeout=REAP_TIMEOUT)
    if not done:
        logger.warning(
            "command in container %s did not exit %.0f s after SIGKILL",
            label,
            REAP_TIMEOUT,
        )


async def _drain(capture: _Capture, label: str) -> None:
    """Read what the command's output pipes still hold, for a bounded time."""
    done, _ = await asyncio.wait([capture.drained], timeout=DRAIN_TIMEOUT)
    if not done:
        # Only a process that left the group (setsid) can still hold the pipes.
        logger.warning(
            "command in container %s left a process outside its process group "
            "holding its output open; stopped reading after %.0f s",
            label,
            DRAIN_TIMEOUT,
        )


def _exit_code(returncode: int | None, timed_out: bool) -> int:
    """Turn a subprocess return code into a shell-style exit code."""
    if timed_out:
        return TIMEOUT_EXIT_CODE
    if returncode is None:  # never reaped: it was killed, as far as we know
        return 128 + signal.SIGKILL
    if returncode < 0:
        return 128 - returncode
    return returncode
