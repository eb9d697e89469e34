"""Sandbox backends: where containers live and commands run."""

from __future__ import annotations

from agent_v2.sandbox._base import (
    BASE_REF,
    DEFAULT_OUTPUT_LIMIT,
    TIMEOUT_EXIT_CODE,
    CommandResult,
    SandboxBackend,
)
from agent_v2.sandbox._dummy import DummyBackend
from agent_v2.sandbox._ids import validate_container_id
from agent_v2.sandbox._local import LocalBackend

__all__ = [
    "BASE_REF",
    "DEFAULT_OUTPUT_LIMIT",
    "TIMEOUT_EXIT_CODE",
    "CommandResult",
    "DummyBackend",
    "LocalBackend",
    "SandboxBackend",
    "validate_container_id",
]
