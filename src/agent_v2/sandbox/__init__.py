"""Sandbox backends: where containers live and commands run."""

from __future__ import annotations

from agent_v2.sandbox._base import (
    DEFAULT_OUTPUT_LIMIT,
    TIMEOUT_EXIT_CODE,
    CommandResult,
    SandboxBackend,
)

__all__ = [
    "DEFAULT_OUTPUT_LIMIT",
    "TIMEOUT_EXIT_CODE",
    "CommandResult",
    "SandboxBackend",
]
