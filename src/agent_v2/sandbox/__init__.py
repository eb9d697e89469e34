"""Sandbox backends: where containers live and commands run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent_v2.sandbox._base import (
    BASE_REF,
    DEFAULT_OUTPUT_LIMIT,
    TIMEOUT_EXIT_CODE,
    CommandResult,
    SandboxBackend,
)
from agent_v2.sandbox._dummy import DummyBackend
from agent_v2.sandbox._ids import validate_container_id
from agent_v2.sandbox._isolation import Isolation, Limits
from agent_v2.sandbox._local import LocalBackend

if TYPE_CHECKING:
    from agent_v2.sandbox._docker import DockerBackend

__all__ = [
    "BASE_REF",
    "DEFAULT_OUTPUT_LIMIT",
    "TIMEOUT_EXIT_CODE",
    "CommandResult",
    "DockerBackend",
    "DummyBackend",
    "Isolation",
    "Limits",
    "LocalBackend",
    "SandboxBackend",
    "validate_container_id",
]


def __getattr__(name: str) -> Any:
    """Import DockerBackend on first use, so that aiodocker stays optional."""
    if name == "DockerBackend":
        from agent_v2.sandbox._docker import DockerBackend

        return DockerBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
