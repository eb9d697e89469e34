"""The docker sandbox backend: containers on a Docker engine, reached with aiodocker."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import math
import re
import stat
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal, get_args

import aiodocker
import aiohttp
from aiodocker.containers import DockerContainer
from aiodocker.execs import Exec
from aiodocker.stream import Stream

from agent_v2.datasets import Instance
from agent_v2.errors import (
    ConfigError,
    ContainerNotFound,
    DatasetError,
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

__all__ = [
    "CONTAINER_LABEL",
    "DEFAULT_FILE_SIZE",
    "DEFAULT_MEMORY",
    "DEFAULT_PIDS_LIMIT",
    "DEFAULT_USER",
    "DEFAULT_WORKDIR",
    "GPU_VENDORS",
    "DockerBackend",
    "GpuVendor",
    "gpu_env",
    "gpu_host_config",
    "parse_size",
]

logger = logging.getLogger(__name__)

GpuVendor = Literal["none", "amd", "nvidia"]
GPU_VENDORS: tuple[str, ...] = get_args(GpuVendor)

CONTAINER_LABEL = "agent-v2"
"""Label (value ``1``) on every container this backend creates."""

DEFAULT_WORKDIR = "/workspace"
DEFAULT_MEMORY = "8g"
DEFAULT_PIDS_LIMIT = 4096
DEFAULT_FILE_SIZE = "16g"
DEFAULT_USER = "1000:1000"
"""Numeric ``uid:gid`` that containers created by this backend run as."""

AMD_DEVICES = {"/dev/kfd": "/dev/kfd", "/dev/dri": "/dev/dri"}
"""Host path -> container path of the nodes an AMD GPU needs (ROCm)."""

AMD_FALLBACK_GROUPS = ("video",)
"""Groups added when the AMD device nodes are not on this host to ask."""

KILL_TIMEOUT = 30.0
"""Seconds that one of our own helper commands (kill, ``id``) may take."""

DRAIN_TIMEOUT = 10.0
"""Seconds to keep reading output after a command's process tree was killed."""

API_TIMEOUT = aiohttp.ClientTimeout(sock_connect=30, sock_read=600)
# TODO(many agents exec at once): aiodocker's connector allows 100 connections
# and every running command holds one for its output, so the 101st concurrent
# command waits for a free one; pass a connector with a larger limit if needed.

_GIT_USER = ("agent-v2", "agent-v2@localhost")

_SIZE = re.compile(r"(?i)\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

# The control files of one command live in /tmp of the container under a
# random token: ``.pid`` holds the pid of the session leader, ``.stdin`` the
# bytes to feed.
#
# NOTE: the tree is killed by process group and by session, so children that
# start their own group (job control) die too; only a child that starts its
# own session escapes, and that one is ended when the container is removed.
# Only shell builtins are used, so a full process table does not stop it.
_KILL_TREE = """
kill -s KILL -- "-$leader" 2>/dev/null
for stat in /proc/[0-9]*/stat; do
    { read -r line <"$stat"; } 2>/dev/null || continue
    set -- ${line##*) }
    if [ "$4" = "$leader" ]; then
        pid=${stat#/proc/}
        kill -s KILL "${pid%/stat}" 2>/dev/null
    fi
done
"""

# argv: token, command, then the taskset prefix (if any).
#
# NOTE: setsid runs as a child of this shell, which is not a process group
# leader, so setsid does not fork: this shell waits for the command itself and
# reports a death by signal as 128 + the signal's number. Its own messages
# ("Killed") go to /dev/null, so that stderr holds only the command's.
_RUN = (
    """
control=/tmp/agent-v2-$1
command=$2
shift 2
if [ -f "$control.stdin" ]; then
    exec <"$control.stdin"
    rm -f "$control.stdin"
else
    exec </dev/null
fi
shell=/bin/sh
if [ -x /bin/bash ]; then shell=/bin/bash; fi
exec 3>&2 2>/dev/null
setsid -w "$@" /bin/sh -c 'echo $$ >"$1.pid"; "$2" -c "$3"; exit $?' \\
    agent-v2 "$control" "$shell" "$command" 2>&3 3>&-
status=$?
{ read -r leader <"$control.pid"; } 2>/dev/null && {"""
    + _KILL_TREE
    + """}
rm -f "$control.pid"
exit $status
"""
)

# argv: token. Waits briefly for the leader's pid: a timeout can fire before
# a just-started command has written it.
_KILL = (
    """
control=/tmp/agent-v2-$1
tries=0
while [ ! -s "$control.pid" ] && [ $tries -lt 20 ]; do
    sleep 0.1
    tries=$((tries + 1))
done
{ read -r leader <"$control.pid"; } 2>/dev/null || exit 0
"""
    + _KILL_TREE
    + "exit 0\n"
)


def parse_size(value: str | int, *, what: str) -> int:
    """Return a size in bytes from an int or a string such as ``512m`` or ``8g``."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a size such as '8g', got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.fullmatch(value)
        if match is None:
            raise ConfigError(
                f"{what} {value!r} is not a size; use bytes or a number with "
                f"k, m, g or t (for example '512m' or '8g')"
            )
        size = int(float(match[1]) * _UNITS[match[2].lower()])
    if size <= 0:
        raise ConfigError(f"{what} must be more than 0 bytes, got {value!r}")
    return size


def gpu_host_config(
    gpu_vendor: GpuVendor,
    *,
    devices: Mapping[str, str] | None = None,
    groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Return the HostConfig entries that give a container a vendor's GPUs.

    AMD (ROCm): the device nodes ``devices`` (default ``/dev/kfd`` and
    ``/dev/dri``) and the groups that own them. NVIDIA: a device request for
    every GPU through the NVIDIA container runtime. Which GPU an evaluation
    uses is chosen per command by the lease's environment (:func:`gpu_env`).
    """
    if gpu_vendor == "none":
        return {}
    if gpu_vendor == "nvidia":
        request = {"Driver": "nvidia", "Count": -1, "Capabilities": [["gpu"]]}
        return {"DeviceRequests": [request]}
    if gpu_vendor == "amd":
        mapped = AMD_DEVICES if devices is None else devices
        return {
            "Devices": [
                {
                    "PathOnHost": host,
                    "PathInContainer": inside,
                    "CgroupPermissions": "rwm",
                }
                for host, inside in mapped.items()
            ],
            "GroupAdd": list(amd_groups(mapped) if groups is None else groups),
        }
    raise ConfigError(
        f"gpu_vendor {gpu_vendor!r} is not one of {', '.join(GPU_VENDORS)}"
    )


def amd_groups(devices: Mapping[str, str] = AMD_DEVICES) -> tuple[str, ...]:
    """Return the numeric groups owning the AMD device nodes found on this host.

    Numbers rather than names (``video``, ``render``), because the image may
    not know a ``render`` group, or give it another number than the host.
    """
    gids: set[int] = set()
    for host_path in devices:
        for node in _device_nodes(Path(host_path)):
            gids.add(node.stat().st_gid)
    return tuple(str(gid) for gid in sorted(gids)) or AMD_FALLBACK_GROUPS


def _device_nodes(path: Path) -> Iterator[Path]:
    """Yield the device nodes at ``path``: itself, or those in it if a folder."""
    with contextlib.suppress(OSError):
        if path.is_dir():
            yield from (
                node
                for node in path.iterdir()
                if stat.S_ISCHR(node.stat().st_mode) and node.stat().st_gid
            )
        elif stat.S_ISCHR(path.stat().st_mode):
            yield path


def gpu_env(gpu_vendor: GpuVendor, env: Mapping[str, str]) -> dict[str, str]:
    """Return a command's environment with a GPU lease translated for the vendor.

    On AMD the lease's ``HIP_VISIBLE_DEVICES`` (host GPU ids) becomes
    ``ROCR_VISIBLE_DEVICES``, which the ROCm runtime applies first; HIP then
    numbers the remaining GPUs from 0, so ``HIP_VISIBLE_DEVICES`` and
    ``CUDA_VISIBLE_DEVICES`` (which HIP also reads) are renumbered to match.
    NVIDIA and ``none`` pass the environment through.
    """
    result = dict(env)
    hip = result.get("HIP_VISIBLE_DEVICES")
    if gpu_vendor != "amd" or hip is None or "ROCR_VISIBLE_DEVICES" in result:
        return result

    count = len([part for part in hip.split(",") if part.strip()])
    renumbered = ",".join(str(index) for index in range(count))
    result["ROCR_VISIBLE_DEVICES"] = hip
    result["HIP_VISIBLE_DEVICES"] = renumbered
    if "CUDA_VISIBLE_DEVICES" in result:
        result["CUDA_VISIBLE_DEVICES"] = renumbered
    return result


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Limits:
    """What one container may use; see DockerBackend for the meaning."""

    memory: int
    pids_limit: int
    cpus: float | None
    file_size: int
    network: bool


class DockerBackend(SandboxBackend):
    """Containers on a Docker engine; commands run through the exec API.

    Containers this backend creates run ``instance.image_name`` as ``user``
    with the instance's files in ``workdir`` (or the instance's own
    ``workdir``), without network unless ``network``, within ``memory``,
    ``pids_limit`` processes, ``cpus`` cores' worth of time and files of at
    most ``file_size``; they carry the label ``agent-v2=1``. Containers
    started by other tools on the same engine can be used by id or name;
    ``require_label`` (``key`` or ``key=value``) limits that to containers
    carrying the label.
    """

    kind = "docker"

    def __init__(
        self,
        *,
        docker_url: str | None = None,
        gpu_vendor: GpuVendor = "none",
        memory: str | int = DEFAULT_MEMORY,
        pids_limit: int = DEFAULT_PIDS_LIMIT,
        cpus: float | None = None,
        network: bool = False,
        workdir: str = DEFAULT_WORKDIR,
        user: str | None = DEFAULT_USER,
        file_size: str | int = DEFAULT_FILE_SIZE,
        gpu_devices: Mapping[str, str] | None = None,
        gpu_groups: Sequence[str] | None = None,
        require_label: str | None = None,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
    ) -> None:
        if gpu_vendor not in GPU_VENDORS:
            raise ConfigError(
                f"gpu_vendor {gpu_vendor!r} is not one of {', '.join(GPU_VENDORS)}"
            )
        self._url = docker_url
        self._gpu_vendor: GpuVendor = gpu_vendor
        self._limits = _Limits(
            memory=parse_size(memory, what="memory"),
            pids_limit=_positive_int(pids_limit, "pids_limit"),
            cpus=_positive_cpus(cpus),
            file_size=parse_size(file_size, what="file_size"),
            network=network,
        )
        self._workdir = _absolute_dir(workdir, "workdir")
        self._user = user
        self._owner = _numeric_owner(user)
        self._gpu_devices = gpu_devices
        self._gpu_groups = gpu_groups
        self._require_label = _label_filter(require_label)
        self._output_limit = _positive_int(output_limit, "output_limit")

        self._docker: aiodocker.Docker | None = None
        self._host_cpus: frozenset[int] = frozenset()
        self._kills: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return (
            f"DockerBackend(docker_url={self._url!r}, "
            f"gpu_vendor={self._gpu_vendor!r}, memory={self._limits.memory}, "
            f"pids_limit={self._limits.pids_limit}, cpus={self._limits.cpus}, "
            f"network={self._limits.network})"
        )

    @property
    def gpu_vendor(self) -> GpuVendor:
        """Return whose GPUs containers get."""
        return self._gpu_vendor

    async def open(self) -> None:
        """Connect to the engine and check that it answers."""
        if self._docker is not None:
            return
        # NOTE: aiodocker asserts when no address is given and none is found
        # (no Docker context, DOCKER_HOST or local socket), and imports its
        # ssh support only for ssh:// addresses.
        try:
            docker = aiodocker.Docker(url=self._url, timeout=API_TIMEOUT)
        except (ValueError, AssertionError, ImportError, aiodocker.DockerError) as exc:
            raise ConfigError(
                f"cannot use Docker engine address {self._url!r}: {exc}"
            ) from exc

        try:
            info = await docker.system.info()
        except aiodocker.DockerError as exc:
            await docker.close()
            raise SandboxError(
                f"the Docker engine at {self._address} does not answer: "
                f"{exc.message}; start it or pass another docker_url"
            ) from exc
        self._docker = docker
        self._host_cpus = frozenset(range(int(info.get("NCPU") or 1)))
        logger.info(
            "docker backend on %s (engine %s, %d cores, gpu vendor %s)",
            self._address,
            info.get("ServerVersion", "?"),
            len(self._host_cpus),
            self._gpu_vendor,
        )

    async def close(self) -> None:
        """Wait for pending kills, then disconnect from the engine."""
        if self._kills:
            await asyncio.wait(self._kills, timeout=KILL_TIMEOUT)
        if self._docker is not None:
            docker, self._docker = self._docker, None
            await docker.close()

    # -- containers -----------------------------------------------------------

    def container_config(self, instance: Instance) -> dict[str, Any]:
        """Return the engine's create-container body for one instance."""
        if not instance.image_name:
            raise DatasetError(
                f"instance {instance.instance_id!r} of dataset "
                f"{instance.dataset_name!r} has no image_name; the docker backend "
                f"starts containers from it, so set image_name in the dataset"
            )
        workdir = _absolute_dir(instance.workdir or self._workdir, "workdir")
        limits = self._limits
        host_config: dict[str, Any] = {
            "NetworkMode": "default" if limits.network else "none",
            "Memory": limits.memory,
            "MemorySwap": limits.memory,  # the same: no swap on top
            "PidsLimit": limits.pids_limit,
            "Ulimits": [
                {"Name": "fsize", "Soft": limits.file_size, "Hard": limits.file_size}
            ],
            "CapDrop": ["ALL"],
            "SecurityOpt": ["no-new-privileges"],
            "Init": True,  # reaps the orphans of killed commands
            **gpu_host_config(
                self._gpu_vendor, devices=self._gpu_devices, groups=self._gpu_groups
            ),
        }
        if limits.cpus is not None:
            host_config["NanoCpus"] = round(limits.cpus * 1e9)

        config: dict[str, Any] = {
            "Image": instance.image_name,
            "Cmd": ["sleep", "infinity"],
            "WorkingDir": workdir,
            "Env": ["HOME=/tmp"],
            "Labels": {
                CONTAINER_LABEL: "1",
                f"{CONTAINER_LABEL}.dataset": instance.dataset_name,
                f"{CONTAINER_LABEL}.split": instance.split,
                f"{CONTAINER_LABEL}.instance": instance.instance_id,
            },
            "HostConfig": host_config,
        }
        if self._user:
            config["User"] = self._user
        return config

    async def create(self, instance: Instance) -> str:
        """Start a container of the instance's image with its files, committed."""
        config = self.container_config(instance)
        docker = self._client()
        name = f"agent-v2-{uuid.uuid4().hex[:16]}"
        try:
            container = await docker.containers.create(config, name=name)
        except aiodocker.DockerError as exc:
            raise SandboxError(
                f"cannot create a container of image {config['Image']!r} for "
                f"instance {instance.instance_id!r}: {exc.message}"
                + (" (pull or import the image first)" if exc.status == 404 else "")
            ) from exc

        try:
            await container.start()
            await self._copy_files(container, instance, config["WorkingDir"])
            await self._commit_base(name)
        except BaseException as exc:
            await asyncio.shield(self._delete(container))
            if isinstance(exc, aiodocker.DockerError):
                raise SandboxError(
                    f"cannot start a container of image {config['Image']!r} for "
                    f"instance {instance.instance_id!r}: {exc.message}"
                ) from exc
            raise

        logger.debug("created container %s for %s", name, instance.key)
        return name

    async def exists(self, container_id: str) -> bool:
        """Return whether a running container has this id or name."""
        validate_container_id(container_id)
        try:
            await self._inspect(container_id)
        except ContainerNotFound:
            return False
        return True

    async def remove(self, container_id: str) -> None:
        """Kill and delete a container this backend created.

        Containers started by other tools are left alone: a SandboxError says
        to remove them with the tool that started them.
        """
        validate_container_id(container_id)
        try:
            details = await self._client().containers.get(container_id)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return
            raise self._error(exc, container_id) from exc

        if not _is_ours(details):
            raise SandboxError(
                f"container {container_id!r} was not created by agent-v2 (it has "
                f"no label {CONTAINER_LABEL}=1); remove it with the tool that "
                f"started it"
            )
        await self._delete(details)
        logger.debug("removed container %s", container_id)

    # -- commands -------------------------------------------------------------

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
        """Run ``command`` with the container's shell in its working directory."""
        validate_container_id(container_id)
        _check_command(command, timeout, env)
        pin = self._pin(cpus) if cpus is not None else []
        container = await self._inspect(container_id)
        token = uuid.uuid4().hex
        if stdin is not None:
            await self._put_stdin(container, token, stdin)

        started = time.monotonic()
        try:
            execution = await container.exec(
                ["/bin/sh", "-c", _RUN, "agent-v2", token, command, *pin],
                environment=gpu_env(self._gpu_vendor, env or {}),
            )
        except aiodocker.DockerError as exc:
            raise self._error(exc, container_id) from exc

        try:
            output, timed_out = await self._read(execution, timeout, container, token)
        except BaseException:
            self._kill_later(container, token)
            raise
        exit_code = await self._exit_code(execution, container_id, timed_out)

        return CommandResult(
            exit_code=exit_code,
            stdout=output.text(1),
            stderr=output.text(2),
            timed_out=timed_out,
            duration=time.monotonic() - started,
            truncated=output.dropped > 0,
        )

    async def _read(
        self,
        execution: Exec,
        timeout: float,  # noqa: ASYNC109 - the command's own timeout
        container: DockerContainer,
        token: str,
    ) -> tuple[_Output, bool]:
        """Read the command's output until it ends or its timeout; kill it then."""
        output = _Output(self._output_limit)
        timed_out = False
        async with execution.start(detach=False) as stream:
            try:
                async with asyncio.timeout(None if math.isinf(timeout) else timeout):
                    await output.read(stream)
            except TimeoutError:
                timed_out = True
            if timed_out:
                await self._kill(container, token)
                try:
                    async with asyncio.timeout(DRAIN_TIMEOUT):
                        await output.read(stream)
                except TimeoutError:
                    logger.warning(
                        "command in container %s left a process holding its "
                        "output open; stopped reading after %.0f s",
                        container.id,
                        DRAIN_TIMEOUT,
                    )
        return output, timed_out

    async def _exit_code(
        self, execution: Exec, container_id: str, timed_out: bool
    ) -> int:
        """Return the exit code of a finished exec (124 when it timed out)."""
        if timed_out:
            return TIMEOUT_EXIT_CODE
        for _ in range(50):
            try:
                details = await execution.inspect()
            except aiodocker.DockerError as exc:
                if exc.status == 404:  # exec records go with their container
                    raise ContainerNotFound(
                        f"container {container_id!r} was removed while a command "
                        f"ran in it"
                    ) from exc
                raise self._error(exc, container_id) from exc
            if not details.get("Running") and details.get("ExitCode") is not None:
                return int(details["ExitCode"])
            # The output can end a moment before the engine notes the exit.
            await asyncio.sleep(0.1)
        raise SandboxError(
            f"the Docker engine reported no exit code for a command in container "
            f"{container_id!r}; the container may have been removed meanwhile"
        )

    async def _kill(self, container: DockerContainer, token: str) -> None:
        """Kill the process tree of the command with this token."""
        try:
            _, exit_code = await _run_helper(
                container, ["/bin/sh", "-c", _KILL, "agent-v2", token]
            )
            problem = f"exit code {exit_code}" if exit_code != 0 else None
        except (aiodocker.DockerError, TimeoutError, aiohttp.ClientError) as exc:
            problem = str(exc)
        if problem is None:
            return

        # NOTE: a command that used up the container's process limit (a fork
        # bomb) leaves no room for the kill; restarting the container ends
        # every process in it and keeps its files.
        if not _is_ours(container):
            logger.warning(
                "could not kill a command in container %s (%s)", container.id, problem
            )
            return
        logger.warning(
            "could not kill a command in container %s (%s); restarting it",
            container.id,
            problem,
        )
        with contextlib.suppress(aiodocker.DockerError, TimeoutError):
            async with asyncio.timeout(KILL_TIMEOUT):
                await container.restart(timeout=0)

    def _kill_later(self, container: DockerContainer, token: str) -> None:
        """Kill a cancelled command's tree in a task that outlives the caller."""
        task = asyncio.get_running_loop().create_task(self._kill(container, token))
        self._kills.add(task)
        task.add_done_callback(self._kills.discard)

    async def _put_stdin(
        self, container: DockerContainer, token: str, data: bytes
    ) -> None:
        """Copy ``data`` into the container, owned by the user commands run as."""
        uid, gid = await self._exec_owner(container)
        name = f"agent-v2-{token}.stdin"
        # NOTE: a file, not bytes: aiohttp sends a file from a thread, while a
        # large bytes body would be copied on the event loop.
        with tempfile.TemporaryFile() as archive:
            await asyncio.to_thread(_single_file_tar, archive, name, data, uid, gid)
            try:
                await _put_archive(container, "/tmp", archive)
            except aiodocker.DockerError as exc:
                raise self._error(exc, container.id) from exc

    async def _exec_owner(self, container: DockerContainer) -> tuple[int, int]:
        """Return the numeric uid and gid that commands in the container run as."""
        user = container["Config"].get("User") or ""
        owner = _numeric_owner(user or None)
        if owner is not None:
            return owner

        # A user name: only the container's own passwd file knows its number.
        try:
            text, _ = await _run_helper(container, ["/bin/sh", "-c", "id -u; id -g"])
        except (aiodocker.DockerError, TimeoutError) as exc:
            raise SandboxError(
                f"cannot tell which uid user {user!r} of container "
                f"{container.id!r} has: {exc}"
            ) from exc
        numbers = re.findall(r"\d+", text)
        if len(numbers) < 2:
            raise SandboxError(
                f"cannot tell which uid user {user!r} of container "
                f"{container.id!r} has; `id` printed {text!r}"
            )
        return int(numbers[-2]), int(numbers[-1])

    def _pin(self, cpus: frozenset[int]) -> list[str]:
        """Return the taskset prefix that pins a command to ``cpus``."""
        if not cpus or not cpus <= self._host_cpus:
            raise ConfigError(
                f"cannot pin a command to cores {sorted(cpus)!r}; the Docker "
                f"engine's host offers cores {sorted(self._host_cpus)!r}"
            )
        return ["taskset", "-c", ",".join(str(cpu) for cpu in sorted(cpus))]

    # -- engine helpers -------------------------------------------------------

    @property
    def _address(self) -> str:
        """Return the engine address for messages."""
        return self._url or "the default Docker address"

    def _client(self) -> aiodocker.Docker:
        """Return the engine client; open() must have been called."""
        if self._docker is None:
            raise SandboxError(
                "the docker backend is not open; call `await backend.open()` first"
            )
        return self._docker

    async def _inspect(self, container_id: str) -> DockerContainer:
        """Return a running container by id or name, or raise ContainerNotFound."""
        try:
            container = await self._client().containers.get(container_id)
        except aiodocker.DockerError as exc:
            raise self._error(exc, container_id) from exc

        if not container["State"].get("Running"):
            raise ContainerNotFound(
                f"container {container_id!r} exists on {self._address} but is "
                f"not running (status {container['State'].get('Status')!r}); "
                f"start it first"
            )
        if self._require_label is not None:
            key, value = self._require_label
            labels = _labels(container)
            if key not in labels or (value is not None and labels[key] != value):
                raise ContainerNotFound(
                    f"no container {container_id!r} with label "
                    f"{'='.join(filter(None, self._require_label))!r} on "
                    f"{self._address}"
                )
        return container

    async def _copy_files(
        self,
        container: DockerContainer,
        instance: Instance,
        workdir: str,
    ) -> None:
        """Copy the instance's files, without ``.git``, into ``workdir``."""
        uid, gid = self._owner or (0, 0)
        with tempfile.TemporaryFile() as archive:
            await asyncio.to_thread(
                _write_tree_tar, archive, instance.repo_path, workdir, uid, gid
            )
            await _put_archive(container, "/", archive)

    async def _commit_base(self, container_id: str) -> None:
        """Make the working directory a git repository whose one commit is the base."""
        name, email = _GIT_USER
        command = (
            "git init --quiet && git symbolic-ref HEAD refs/heads/main && "
            f"git config user.name {name} && git config user.email {email} && "
            "git add --all && "
            "git commit --quiet --no-verify --allow-empty -m base && "
            f"git tag {BASE_REF}"
        )
        result = await self.exec(
            container_id, command, timeout=600, env={"GIT_CONFIG_NOSYSTEM": "1"}
        )
        if not result.ok:
            raise SandboxError(
                f"committing the base in container {container_id!r} failed with "
                f"exit code {result.exit_code}: {(result.stderr or result.stdout)!r}"
            )

    async def _delete(self, container: DockerContainer) -> None:
        """Kill and delete a container; one already gone is fine."""
        try:
            await container.delete(force=True, v=True)
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                raise SandboxError(
                    f"cannot remove container {container.id!r}: {exc.message}"
                ) from exc

    def _error(self, exc: aiodocker.DockerError, container_id: str) -> SandboxError:
        """Translate an engine error about one container."""
        if exc.status == 404:
            return ContainerNotFound(
                f"no container {container_id!r} on {self._address}; use the "
                f"container_id returned when the container was created"
            )
        if exc.status == 409:
            return SandboxError(
                f"container {container_id!r} cannot run commands: {exc.message}"
            )
        return SandboxError(
            f"the Docker engine at {self._address} failed for container "
            f"{container_id!r}: {exc.message}"
        )


async def _put_archive(
    container: DockerContainer, path: str, archive: IO[bytes]
) -> None:
    """Extract a tar archive into the container at ``path``."""
    # NOTE: aiodocker leaves this one method without annotations.
    await container.put_archive(path, archive)  # type: ignore[no-untyped-call]


async def _run_helper(container: DockerContainer, argv: list[str]) -> tuple[str, int]:
    """Run one of our own short commands; return its stdout and exit code."""
    output = _Output(DEFAULT_OUTPUT_LIMIT)
    async with asyncio.timeout(KILL_TIMEOUT):
        execution = await container.exec(argv)
        async with execution.start(detach=False) as stream:
            await output.read(stream)
        details = await execution.inspect()
    exit_code = details.get("ExitCode")
    return output.text(1), -1 if exit_code is None else int(exit_code)


class _Output:
    """The first bytes of stdout and stderr of one command, and a count of the rest."""

    def __init__(self, limit: int) -> None:
        self.kept = {1: bytearray(), 2: bytearray()}
        self.dropped = 0
        self._limit = limit

    async def read(self, stream: Stream) -> None:
        """Read the exec stream to its end."""
        while (message := await stream.read_out()) is not None:
            kept = self.kept.get(message.stream)
            if kept is None:  # not stdout or stderr: nothing we asked for
                continue
            room = max(self._limit - len(kept), 0)
            kept += message.data[:room]
            self.dropped += max(len(message.data) - room, 0)

    def text(self, fd: int) -> str:
        """Return what was kept of one output stream, decoded."""
        return self.kept[fd].decode("utf-8", errors="replace")


def _labels(container: DockerContainer) -> dict[str, str]:
    """Return the labels of an inspected container."""
    labels: dict[str, str] | None = container["Config"].get("Labels")
    return labels or {}


def _is_ours(container: DockerContainer) -> bool:
    """Return whether this backend (on any server) created the container."""
    return _labels(container).get(CONTAINER_LABEL) == "1"


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


def _write_tree_tar(
    archive: IO[bytes], repo_path: Path | None, workdir: str, uid: int, gid: int
) -> None:
    """Write a tar of ``repo_path`` (without ``.git``) placed at ``workdir``."""
    if repo_path is not None and not repo_path.is_dir():
        raise SandboxError(
            f"instance repo_path {str(repo_path)!r} is not a folder; fix the "
            f"dataset so that repo_path names the instance's files"
        )

    def owned(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if PurePosixPath(info.name).name == ".git":
            return None
        info.uid, info.gid, info.uname, info.gname = uid, gid, "", ""
        return info

    # NOTE: missing parents of the working directory are made by the engine;
    # naming them here would change the modes of existing ones such as /tmp.
    top = PurePosixPath(workdir).relative_to("/")
    with tarfile.open(fileobj=archive, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_dir_info(str(top), uid, gid))
        if repo_path is not None:
            for child in sorted(repo_path.iterdir()):
                tar.add(child, arcname=str(top / child.name), filter=owned)
    archive.seek(0)


def _dir_info(name: str, uid: int, gid: int) -> tarfile.TarInfo:
    """Return the tar entry of a folder with mode 0755."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    info.uid, info.gid = uid, gid
    info.mtime = int(time.time())
    return info


def _single_file_tar(
    archive: IO[bytes], name: str, data: bytes, uid: int, gid: int
) -> None:
    """Write a tar holding one file readable only by its owner."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uid, info.gid = len(data), 0o600, uid, gid
    info.mtime = int(time.time())
    with tarfile.open(fileobj=archive, mode="w") as tar:
        tar.addfile(info, io.BytesIO(data))
    archive.seek(0)


def _numeric_owner(user: str | None) -> tuple[int, int] | None:
    """Return ``(uid, gid)`` for ``uid[:gid]``, ``(0, 0)`` for None, else None."""
    if user is None:
        return (0, 0)
    match = re.fullmatch(r"(\d+)(?::(\d+))?", user)
    if match is None:
        return None
    uid = int(match[1])
    return uid, int(match[2]) if match[2] else uid


def _positive_int(value: int, what: str) -> int:
    """Return ``value`` if it is an int above 0, else raise ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{what} must be a whole number above 0, got {value!r}")
    return value


def _positive_cpus(cpus: float | None) -> float | None:
    """Return the CPU limit if it is None or a number of cores above 0."""
    if cpus is None:
        return None
    if isinstance(cpus, bool) or not isinstance(cpus, int | float) or not cpus > 0:
        raise ConfigError(f"cpus must be a number of cores above 0, got {cpus!r}")
    return float(cpus)


def _absolute_dir(path: str, what: str) -> str:
    """Return a normalised absolute container path, refusing ``..`` and NUL."""
    pure = PurePosixPath(path)
    if not pure.is_absolute() or ".." in pure.parts or "\x00" in path or path == "/":
        raise ConfigError(
            f"{what} {path!r} must be an absolute folder below / without '..'"
        )
    return str(pure)


def _label_filter(label: str | None) -> tuple[str, str | None] | None:
    """Split ``key`` or ``key=value`` into its parts."""
    if label is None:
        return None
    key, sep, value = label.partition("=")
    if not key:
        raise ConfigError(f"require_label {label!r} needs a key, as in 'key=value'")
    return key, value if sep else None
