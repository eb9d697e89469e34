"""The interface every sandbox backend implements."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from typing import ClassVar

from agent_v2.datasets import Instance

__all__ = [
    "BASE_REF",
    "DEFAULT_OUTPUT_LIMIT",
    "TIMEOUT_EXIT_CODE",
    "CommandResult",
    "SandboxBackend",
]

BASE_REF = "agent-v2-base"
"""Git tag on every container's base commit: ``git diff agent-v2-base`` shows
what an agent changed."""

DEFAULT_OUTPUT_LIMIT = 1_000_000
"""Bytes kept of each of stdout and stderr; the rest is dropped and counted."""

TIMEOUT_EXIT_CODE = 124
"""Exit code reported for a command killed by its timeout (as ``timeout(1)``)."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CommandResult:
    """What one command run in a container did."""

    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool = False
    duration: float = 0.0
    truncated: bool = False

    @property
    def ok(self) -> bool:
        """Return whether the command exited 0 within its timeout."""
        return self.exit_code == 0 and not self.timed_out


class SandboxBackend(abc.ABC):
    """Creates containers and runs commands in them.

    Implementations raise :class:`~agent_v2.errors.InvalidContainerId` for an
    id that is malformed (``../x``, absolute paths, NUL bytes, ...) and
    :class:`~agent_v2.errors.ContainerNotFound` for one that does not exist.
    Cancelling a running :meth:`exec` kills everything the command started.
    """

    kind: ClassVar[str]

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Acquire what the backend needs; called once by the server's lifespan."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`open` acquired."""

    @abc.abstractmethod
    async def create(self, instance: Instance) -> str:
        """Create a container holding the instance's unmodified files; return its id.

        The files are committed as the base so that ``git diff`` in the container
        shows what an agent changed.
        """

    @abc.abstractmethod
    async def exists(self, container_id: str) -> bool:
        """Return whether the container exists (raises on a malformed id)."""

    @abc.abstractmethod
    async def exec(
        self,
        container_id: str,
        command: str,
        *,
        timeout: float,  # noqa: ASYNC109 - a command's own timeout
        env: Mapping[str, str] | None = None,
        stdin: bytes | None = None,
        cpus: frozenset[int] | None = None,
    ) -> CommandResult:
        """Run a shell command in the container's root directory.

        ``env`` adds variables; ``cpus`` pins the command to those cores. A
        command still running after ``timeout`` seconds is killed with all its
        descendants and reported with ``timed_out=True``.
        """

    @abc.abstractmethod
    async def remove(self, container_id: str) -> None:
        """Delete the container and everything in it; unknown ids are ignored."""
